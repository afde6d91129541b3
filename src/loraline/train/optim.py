"""Optimizer and learning-rate schedule.

paged_adamw_32bit / paged_adamw_8bit are bitsandbytes' paged AdamW on CUDA (optimizer state in
unified memory, paged to the host under memory pressure). Paging is a CUDA feature, so on CPU the
same names map to the non-paged equivalent and one log line says so: torch AdamW for 32-bit, and
bitsandbytes' AdamW8bit for 8-bit (bitsandbytes 0.50 runs its blockwise 8-bit AdamW on CPU, so a
CPU run keeps the 8-bit state quantization that the GPU run has).
"""

from __future__ import annotations

import logging
import math

import torch

from loraline.config import TrainParams

log = logging.getLogger(__name__)


def parameter_groups(params: TrainParams, trainable: dict[str, torch.nn.Parameter]) -> list[dict]:
    """The trainable parameters in groups by learning rate (in name order, so a resumed run's optimizer
    state lines up with the same groups):

    - LoRA's B matrices at learning_rate x loraplus_lr_ratio (LoRA+, Hayou et al. 2024: B and A learn
      best at different rates; the A matrices, DoRA magnitudes and the rest stay at learning_rate);
    - modules_to_save (full copies, e.g. trained embeddings) at modules_to_save_learning_rate.
    Groups that would be empty are left out; without either setting there is one group.
    """
    base_lr = params.learning_rate
    b_lr = base_lr * params.loraplus_lr_ratio if params.loraplus_lr_ratio else base_lr
    saved_lr = params.modules_to_save_learning_rate or base_lr
    groups: dict[str, dict] = {}
    for name in sorted(trainable):
        if ".modules_to_save." in name and saved_lr != base_lr:
            kind, lr = "modules_to_save", saved_lr
        elif (".lora_B." in name or ".lora_embedding_B." in name) and b_lr != base_lr:
            kind, lr = "lora_B", b_lr
        else:
            kind, lr = "lora", base_lr
        groups.setdefault(kind, {"params": [], "lr": lr, "name": kind})["params"].append(trainable[name])
    return list(groups.values())


def make_optimizer(
    params: TrainParams, trainable: dict[str, torch.nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    kwargs = dict(lr=params.learning_rate, weight_decay=params.weight_decay)
    groups = parameter_groups(params, trainable)
    name = params.optimizer
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes.optim as bnb_optim

    if device.type == "cuda":
        cls = bnb_optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb_optim.PagedAdamW32bit
        return cls(groups, **kwargs)
    if name == "paged_adamw_8bit":
        log.warning(
            "train.optimizer paged_adamw_8bit: paging is CUDA-only; using non-paged 8-bit AdamW (bitsandbytes) on CPU"
        )
        return bnb_optim.AdamW8bit(groups, **kwargs)
    log.warning("train.optimizer paged_adamw_32bit: paging is CUDA-only; using torch AdamW on CPU")
    return torch.optim.AdamW(groups, **kwargs)


def warmup_steps(params: TrainParams, total_steps: int) -> int:
    return math.ceil(params.warmup_ratio * total_steps)


def make_scheduler(params: TrainParams, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    # "constant" still warms up: a cold start at full learning rate is what warmup_ratio is for.
    name = "constant_with_warmup" if params.lr_scheduler == "constant" else params.lr_scheduler
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps(params, total_steps), num_training_steps=total_steps
    )

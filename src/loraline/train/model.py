"""Load the base model (4-bit or 16/32-bit), prepare it for training and attach LoRA through peft.

One code path for every quantization setting: `quantization: none` differs only in skipping
BitsAndBytesConfig and prepare_model_for_kbit_training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraline.config import ConfigError, TrainParams
from loraline.modelling.device import compute_dtype
from loraline.modelling.loading import load_base_causal_lm, load_base_config
from loraline.modelling.variants import Variants
from loraline.train.errors import TrainError
from loraline.train.speed import apply_checkpoint_fraction, use_varlen_attention


def load_base_model(
    params: TrainParams,
    base_dir: Path,
    device: torch.device,
    *,
    world_size: int = 1,
    progress: bool = False,
    variants: Variants | None = None,
) -> nn.Module:
    """The base causal LM on `device`, quantized when asked, ready for (k-bit) training; with
    train.sharding fsdp, its decoder layers sharded over the `world_size` ranks (train.sharded).
    `variants`: the adapter's variants (training_variants; picked from `params` when not given), which
    load and prepare the base their way (QA-LoRA's group-wise quantization, long context's rope scaling)."""
    variants = variants if variants is not None else training_variants(params, base_dir)
    quantization = variants.base_quantization(params.quantization)  # QA-LoRA: none, it quantizes the base itself
    if params.sharding == "fsdp":
        from loraline.train.sharded import load_sharded_base

        model = load_sharded_base(params, base_dir, device, world_size, progress=progress)
    else:
        model = load_base_causal_lm(
            base_dir,
            device,
            variants.load_dtype(compute_dtype(device)),
            quantization,
            params.double_quant,
            variants.config_overrides() or None,
        )
    try:
        variants.prepare_base(model, compute_dtype(device))
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    model.config.use_cache = False  # no KV cache in training; a cache would also disable packed-sequence masking
    model = _prepare_for_training(model, params, quantized=quantization != "none")
    if params.gradient_checkpointing and params.checkpoint_fraction < 1:
        apply_checkpoint_fraction(model, params.checkpoint_fraction)
    if not variants.use_attention(model) and params.varlen_attention and params.packing:
        use_varlen_attention(model)  # flash varlen on CUDA, SDPA per example elsewhere
    return model


def _prepare_for_training(model: nn.Module, params: TrainParams, *, quantized: bool) -> nn.Module:
    """Frozen base weights and activation checkpointing; a 4-bit base also through peft's k-bit preparation
    (which upcasts the non-quantized weights to fp32) when train.upcast_non_quantized asks for it."""
    # Non-reentrant checkpointing needs no requires_grad trick on the inputs and keeps dropout's RNG.
    ckpt_kwargs = {"use_reentrant": False}
    if quantized:
        _keep_trainable_4bit_layout(model)
    if quantized and params.upcast_non_quantized:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=params.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    # The same preparation without the fp32 upcast of embeddings, norms and lm_head: they stay in
    # the compute dtype, so the residual stream and saved activations stay bf16 on CUDA (as in the
    # textbook recipe, which skips the preparation); on CPU the compute dtype is fp32 anyway.
    for p in model.parameters():
        p.requires_grad_(False)
    if params.gradient_checkpointing:
        enable_activation_checkpointing(model, ckpt_kwargs)
    return model


def training_variants(params: TrainParams, base_dir: Path) -> Variants:
    """The variants train.method and train.long_context ask for (modelling/variants.py); a base that cannot be
    extended as train.long_context asks fails here, before the model is loaded."""
    try:
        return Variants.for_training(params, lambda: load_base_config(base_dir))
    except ConfigError as exc:
        raise TrainError(str(exc)) from None


def with_long_context_trainables(
    params: TrainParams, model: nn.Module, variants: Variants | None = None
) -> TrainParams:
    """params with the trainables the variants add (LongLoRA's embeddings and norms, as this model names them) in
    modules_to_save, those not already there."""
    variants = variants if variants is not None else Variants.for_training(params, lambda: model.config)
    have = list(params.modules_to_save)
    extra = [n for n in variants.trainables(model) if not any(_matches(k, [n]) for k in have)]
    if not extra:
        return params
    return params.model_copy(update={"modules_to_save": [*params.modules_to_save, *extra]})


def _keep_trainable_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, bnb 0.50's Linear4bit converts its weight, the first time it runs in
    eval mode without grad (our validation pass), into an inference-only layout whose kernel
    (gemv_4bit) has no autograd formula; every later backward then silently drops the gradient
    through the frozen 4-bit weights (measured: the first layer's LoRA gradient shrank 6x). The
    flag is bnb's own switch for that conversion.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def linear_module_names(model: nn.Module) -> list[str]:
    """Last name component of every LoRA-targetable layer (nn.Linear, bnb Linear4bit, GPT-2 Conv1D,
    QA-LoRA's GroupQuantizedLinear)."""
    from transformers.pytorch_utils import Conv1D

    from loraline.modelling.qalora import GroupQuantizedLinear

    kinds = (nn.Linear, Conv1D, GroupQuantizedLinear)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, kinds) and name})


def check_module_names(params: TrainParams, model: nn.Module) -> None:
    """Unknown target_modules / modules_to_save fail here, naming the key and what exists."""
    names = [name for name, _ in model.named_modules() if name]
    if params.target_modules != "all-linear":
        available = linear_module_names(model)
        unknown = [
            t
            for t in params.target_modules
            if not _matches(t, [n for n in names if n.rsplit(".", 1)[-1] in available])
        ]
        if unknown:
            raise TrainError(
                f"train.target_modules: {', '.join(map(repr, unknown))} match no linear layer of the base model; "
                f'available: {", ".join(available)} (or "all-linear")'
            )
    unknown = [m for m in params.modules_to_save if not _matches(m, names)]
    if unknown:
        tops = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())})
        raise TrainError(
            f"train.modules_to_save: {', '.join(map(repr, unknown))} match no module of the base model; "
            f"leaf modules: {', '.join(tops)}"
        )


def _matches(key: str, names: list[str]) -> bool:
    # peft's rule for a list entry: the full module name or its dotted suffix.
    return any(n == key or n.endswith("." + key) for n in names)


def attach_lora(params: TrainParams, model: nn.Module, variants: Variants | None = None) -> nn.Module:
    """LoRA on the prepared base, through peft; `variants` (picked from `params` when not given) set their own
    LoraConfig options (QA-LoRA's pooled layers on the group-quantized ones)."""
    from peft import LoraConfig, get_peft_model

    variants = variants if variants is not None else Variants.for_training(params, lambda: model.config)
    targets = params.target_modules if params.target_modules == "all-linear" else list(params.target_modules)
    options = {
        "r": params.lora_r,
        "lora_alpha": params.lora_alpha,
        "lora_dropout": params.lora_dropout,
        "target_modules": targets,
        "use_rslora": params.use_rslora,
        "use_dora": params.use_dora,
        "modules_to_save": list(params.modules_to_save) or None,
        "ensure_weight_tying": trains_tied_embeddings(params, model),
        "task_type": "CAUSAL_LM",
        "use_qalora": False,
        "qalora_group_size": params.qalora.group_size,
    }
    config = LoraConfig(**(options | variants.lora_options(model, targets)))
    variants.registered(config)
    return get_peft_model(model, config)


def trains_tied_embeddings(params: TrainParams, model: nn.Module) -> bool:
    """True when modules_to_save trains the input embeddings or the output head of a base that ties them.

    peft otherwise trains a copy of one side only: the other keeps the base's weights, so the adapter
    silently unties what the base shares (and the merged model carries two matrices). Kept tied, the
    trained matrix serves both as the base intends, which is also what lets a small base learn the
    tenant's words (README: what the default model can and cannot do).
    """
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not (tied and params.modules_to_save and get_in and get_out):
        return False
    embed, head = get_in(), get_out()
    if embed is None or head is None or embed.weight is not head.weight:
        return False
    names = {m: n for n, m in model.named_modules()}
    sides = [names.get(embed, ""), names.get(head, "")]
    return any(_matches(key, [side]) for key in params.modules_to_save for side in sides if side)


def sort_config_sets(model: nn.Module) -> None:
    """Sets in the peft config (target_modules: "all-linear" resolves to a set of module names) as sorted
    lists. peft writes a set in iteration order, which follows Python's per-process hash seed, so the
    same adapter would get a different adapter_config.json (and folder hash) from run to run."""
    for config in model.peft_config.values():
        for key, value in vars(config).items():
            if isinstance(value, (set, frozenset)):
                setattr(config, key, sorted(value))


def trainable_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for everything training changes (LoRA A/B, DoRA magnitudes, modules_to_save)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def enable_activation_checkpointing(model: Any, kwargs: dict[str, Any]) -> None:
    """transformers' activation checkpointing under its current name (`gradient_checkpointing_enable` is a
    deprecated alias since 5.x, removed in 6); the old name where an older 5.x has no new one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_reference_adapter(folder: Path, base_hash: str) -> str:
    """train.preference.reference: an adapter folder the train stage wrote, for this base; returns a hash of its
    weights and config (part of the run's fingerprint). Checked before the base loads."""
    import hashlib

    from loraline.layout import ADAPTER_FILES, TRAIN_RECORD
    from loraline.provenance import sha256_file
    from loraline.records import TrainRecord

    where = f"train.preference.reference {str(folder)!r}"
    if not folder.is_dir():
        raise TrainError(f"{where}: no such adapter folder (name an adapter folder, e.g. models/adapters/<tenant>)")
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise TrainError(f"{where} is not an adapter folder: it lacks {', '.join(missing)}")
    if (folder / TRAIN_RECORD).is_file():
        trained_on = TrainRecord.read(folder / TRAIN_RECORD).base.sha256
        if trained_on != base_hash:
            raise TrainError(
                f"{where} was trained on another base model (sha256 {trained_on[:12]}, this base {base_hash[:12]})"
            )
    return hashlib.sha256("".join(sha256_file(folder / f) for f in ADAPTER_FILES).encode()).hexdigest()


def start_from_adapter(model: nn.Module, folder: Path, params: TrainParams) -> None:
    """Load the adapter in `folder` into the model's (just attached) LoRA weights, so the policy starts as it: it
    must have this run's LoRA shape (r, alpha, rsLoRA, DoRA, target modules, modules_to_save)."""
    import json

    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from loraline.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    where = f"train.preference.reference {str(folder)!r}"
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    ours = {"r": params.lora_r, "lora_alpha": params.lora_alpha, "use_rslora": params.use_rslora}
    ours["use_dora"] = params.use_dora
    differ = [f"{k} {config.get(k)!r} (train: {v!r})" for k, v in ours.items() if config.get(k, v) != v]
    if differ:
        raise TrainError(f"{where} has another LoRA shape than this run: {', '.join(differ)}; train with its settings")
    weights = load_file(folder / ADAPTER_WEIGHTS)
    expected = get_peft_model_state_dict(model)
    odd = sorted(set(weights) ^ set(expected)) + sorted(
        k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape
    )
    if odd:
        raise TrainError(
            f"{where} does not fit this run's LoRA layers ({len(odd)} weight(s) differ, e.g. {odd[0]}); "
            "train with the target_modules and modules_to_save it was trained with"
        )
    set_peft_model_state_dict(model, weights)

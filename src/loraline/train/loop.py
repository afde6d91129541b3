"""The training loop: plain torch, top to bottom.

Objective: mean cross-entropy over answer tokens of the optimizer step. Each micro-batch's summed
token loss is divided by the number of answer tokens in the whole step (all its micro-batches),
so packing vs padding and any grad_accum give the same gradient for the same examples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from loraline.config import TrainParams
from loraline.modelling.constants import IGNORE_INDEX
from loraline.modelling.device import autocast, compute_dtype
from loraline.modelling.s2attn import S2_ATTN
from loraline.progress import progress_bar
from loraline.train.data import Example
from loraline.train.distributed import World, shard, sum_grads, sum_numbers
from loraline.train.packing import Batch, PlannedStep, collate, pack_rows
from loraline.train.speed import VARLEN, FusedHead, chunked_linear_cross_entropy


@dataclass
class Progress:
    """Everything about the run so far that a checkpoint must carry to continue exactly."""

    history: list[dict[str, Any]] = field(default_factory=list)  # {step, train_loss, val_loss, lr}
    base_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0  # real (non-pad) tokens fed to the model in training steps
    answer_tokens_seen: int = 0  # tokens with a loss
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        return cls(**d)


@dataclass
class Run:
    """What the loop works on (built by the stage)."""

    model: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: TrainParams
    device: torch.device
    pad_id: int
    train: list[Example]
    validation: list[Example]
    plan: list[PlannedStep]
    fused: FusedHead | None = None  # (decoder, lm_head) for the fused cross-entropy; None: plain logits
    world: World = field(default_factory=World)  # data-parallel ranks (train.distributed)
    # Every rank runs every forward pass, an empty share included: sharded layers gather their
    # weights collectively (train.sharded), so a rank that skipped one would hang the others.
    lockstep: bool = False

    @property
    def flat(self) -> bool:
        """Lay each packed micro-batch out as one row (no pad tokens): varlen attention only."""
        return self.params.packing and _uses_varlen(self.model)

    def loss(self, batch: Batch) -> torch.Tensor:
        return loss_sum(
            self.model, batch.to(self.device), self.device, fused=self.fused, chunk=self.params.cross_entropy_chunk
        )


def loss_sum(
    model: torch.nn.Module, batch: Batch, device: torch.device, *, fused: FusedHead | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (fp32 softmax for stability).

    With `fused` (decoder, lm_head), the loss comes from the decoder's hidden states chunk by chunk
    (speed.chunked_linear_cross_entropy): the same value and gradients, without full-vocabulary logits.
    """
    inputs = batch.model_inputs(varlen=_attends_by_segments(model))
    with autocast(device):
        if fused is not None:
            decoder, head = fused
            hidden = decoder(**inputs, use_cache=False)[0]
            return chunked_linear_cross_entropy(
                hidden, head.weight, batch.targets, chunk=chunk, dtype=compute_dtype(device)
            )
        logits = model(**inputs, use_cache=False).logits
    keep = batch.targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), batch.targets[keep], reduction="sum")


def _uses_varlen(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == VARLEN


def _attends_by_segments(model: torch.nn.Module) -> bool:
    """Whether the attention function takes the packed batch's example boundaries (cu_seq_lens_q)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in (VARLEN, S2_ATTN)


def train_step(run: Run, planned: PlannedStep) -> tuple[float, int, int]:
    """One optimizer step over its micro-batches; returns (mean answer-token loss, tokens, answer tokens)."""
    world = run.world
    mine = [shard(mb, world) for mb in planned.micro_batches] if world.distributed else planned.micro_batches
    # (rows, counts): an empty share runs in lockstep on the micro-batch's first row, weighted 0
    work = [(m or mb[:1], bool(m)) for m, mb in zip(mine, planned.micro_batches) if m or run.lockstep]
    batches = [
        (collate([[run.train[i] for i in row] for row in mb], run.pad_id, run.params.packing, run.flat), counts)
        for mb, counts in work
    ]
    if world.distributed:  # the divisor is the whole step's answer tokens, over every rank's share
        n_targets = sum(run.train[i].n_targets for mb in planned.micro_batches for row in mb for i in row)
    else:
        n_targets = sum(b.n_targets for b, _ in batches)
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    for batch, counts in batches:
        loss = run.loss(batch) if counts else run.loss(batch) * 0.0
        (loss / max(n_targets, 1)).backward()
        total += loss.detach()  # one device sync per step (below), not one per micro-batch
    params = list(run.trainable.values())
    sum_grads(params, world)
    torch.nn.utils.clip_grad_norm_(params, run.params.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    summed, n_tokens = sum_numbers(
        [total.item(), sum(b.n_tokens for b, counts in batches if counts)], world, run.device
    )
    return summed / max(n_targets, 1), int(n_tokens), n_targets


@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Mean answer-token loss over the validation split (dataset order; dropout off)."""
    examples = run.validation
    if not examples:
        return None
    lengths = [e.n_tokens for e in examples]
    order = list(range(len(examples)))
    rows = pack_rows(lengths, order, run.params.max_seq_len) if run.params.packing else [[i] for i in order]
    mine = shard(rows, run.world)  # each rank scores its share; the sums are added up below
    size = run.params.batch_size
    # In lockstep every rank runs as many batches as the largest share needs (extra ones not counted).
    n_batches = math.ceil((math.ceil(len(rows) / run.world.size) if run.lockstep else len(mine)) / size)
    was_training = run.model.training
    run.model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, n_batches * size, size):
            mb = mine[start : start + size]
            batch = collate(
                [[examples[i] for i in row] for row in mb or rows[:1]], run.pad_id, run.params.packing, run.flat
            )
            loss = run.loss(batch).item()
            if mb:
                total += loss
                count += batch.n_targets
    finally:
        run.model.train(was_training)
    total, count = sum_numbers([total, count], run.world, run.device)
    return total / max(count, 1)


def snapshot(trainable: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in trainable.items()}


def train_loop(
    run: Run,
    progress: Progress,
    *,
    start_step: int,
    best: dict[str, torch.Tensor] | None,
    save_checkpoint: Callable[[int, Progress, dict[str, torch.Tensor] | None], None] | None,
    show_progress: bool = False,
) -> tuple[Progress, dict[str, torch.Tensor] | None]:
    """Run steps start_step..len(plan)-1; returns the progress and (with early stopping) the best adapter."""
    params, total_steps = run.params, len(run.plan)
    early = params.early_stopping_patience
    if start_step == 0 and run.validation:
        # LoRA starts as a no-op (B = 0), so this is the base model's validation loss: the baseline.
        progress.base_val_loss = evaluate(run)
        progress.history.append({"step": 0, "train_loss": None, "val_loss": progress.base_val_loss, "lr": None})
    run.model.train()
    started, tokens_here = time.perf_counter(), 0
    bar = progress_bar(total=total_steps, initial=start_step, desc="train", unit="step", disable=not show_progress)
    try:
        for step in range(start_step, total_steps):
            lr = run.optimizer.param_groups[0]["lr"]
            train_loss, n_tokens, n_targets = train_step(run, run.plan[step])
            done = step + 1
            progress.tokens_seen += n_tokens
            progress.answer_tokens_seen += n_targets
            tokens_here += n_tokens
            row: dict[str, Any] = {"step": done, "train_loss": train_loss, "val_loss": None, "lr": lr}
            progress.history.append(row)
            if run.validation and (done % params.eval_every == 0 or done == total_steps):
                row["val_loss"] = val = evaluate(run)
                if progress.best_val_loss is None or val < progress.best_val_loss:
                    progress.best_val_loss, progress.best_step = val, done
                    progress.evals_without_improvement = 0
                    if early is not None:
                        best = snapshot(run.trainable)
                else:
                    progress.evals_without_improvement += 1
                if early is not None and progress.evals_without_improvement >= early:
                    progress.stopped_early = True
            rate = tokens_here / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(
                loss=f"{train_loss:.4f}", tok_s=f"{rate:.0f}", refresh=False
            )  # update() draws, at its pace
            bar.update(1)
            if progress.stopped_early:
                break
            if save_checkpoint is not None and done % params.save_every == 0 and done < total_steps:
                save_checkpoint(done, progress, best)
    finally:
        bar.close()
    return progress, best

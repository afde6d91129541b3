"""The training loop: plain torch, top to bottom.

Objective: train.objective's (train.objective), which the loop dispatches to without asking which it is.
SFT's is the mean cross-entropy over answer tokens of the optimizer step: each micro-batch's summed token
loss is divided by the number of answer tokens in the whole step (all its micro-batches), so packing vs
padding and any grad_accum give the same gradient for the same examples. The preference objectives divide
the same way by their own counts (pairs; ORPO's chosen answer tokens too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loraline.config import TrainParams
from loraline.progress import progress_bar
from loraline.train.distributed import World, shard, sum_grads, sum_numbers
from loraline.train.forward import loss_sum, uses_varlen
from loraline.train.objective import Objective, SftObjective
from loraline.train.packing import Batch, PlannedStep, pack_rows
from loraline.train.speed import FusedHead

__all__ = ["Progress", "Run", "StepResult", "evaluate", "loss_sum", "snapshot", "train_loop", "train_step"]


@dataclass
class Progress:
    """Everything about the run so far that a checkpoint must carry to continue exactly."""

    # {step, train_loss, val_loss, lr}, and train_<m>/val_<m> for each of a preference objective's metric_names
    history: list[dict[str, Any]] = field(default_factory=list)
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
    train: list[Any]  # the objective's units (SFT: data.Example; DPO/ORPO: preference.Pair)
    validation: list[Any]
    plan: list[PlannedStep]
    fused: FusedHead | None = None  # (decoder, lm_head) for the fused cross-entropy; None: plain logits
    world: World = field(default_factory=World)  # data-parallel ranks (train.distributed)
    # Every rank runs every forward pass, an empty share included: sharded layers gather their
    # weights collectively (train.sharded), so a rank that skipped one would hang the others.
    lockstep: bool = False
    objective: Objective = field(default_factory=SftObjective)  # what the steps minimize (train.objective)

    @property
    def flat(self) -> bool:
        """Lay each packed micro-batch out as one row (no pad tokens): varlen attention only."""
        return self.params.packing and uses_varlen(self.model)

    @property
    def chunk(self) -> int:
        return self.params.cross_entropy_chunk

    def loss(self, batch: Batch) -> torch.Tensor:
        return loss_sum(self.model, batch.to(self.device), self.device, fused=self.fused, chunk=self.chunk)

    def collate(self, rows: list[list[int]], units: list[Any]) -> Any:
        """A micro-batch of `units` (the split's), rows of unit indices, as the objective lays it out."""
        return self.objective.collate(
            [[units[i] for i in row] for row in rows], self.pad_id, self.params.packing, self.flat
        )


class StepResult(tuple):
    """(mean loss, tokens, answer tokens) of an optimizer step, unpacked as ever; `.metrics`: the objective's
    metrics (loss first) for the history."""

    metrics: dict[str, float]

    def __new__(cls, loss: float, n_tokens: int, n_targets: int, metrics: dict[str, float]) -> StepResult:
        out = super().__new__(cls, (loss, n_tokens, n_targets))
        out.metrics = metrics
        return out


def train_step(run: Run, planned: PlannedStep) -> StepResult:
    """One optimizer step over its micro-batches; returns (mean loss, tokens, answer tokens) and the metrics."""
    world, objective = run.world, run.objective
    mine = [shard(mb, world) for mb in planned.micro_batches] if world.distributed else planned.micro_batches
    # (rows, counts): an empty share runs in lockstep on the micro-batch's first row, weighted 0
    work = [(m or mb[:1], bool(m)) for m, mb in zip(mine, planned.micro_batches) if m or run.lockstep]
    batches = [(run.collate(mb, run.train), counts) for mb, counts in work]
    # the divisors count the whole step, over every rank's share
    step_units = [run.train[i] for mb in planned.micro_batches for row in mb for i in row]
    divisors = objective.divisors(step_units)
    # every rank sums the same names, a rank without a share included (the sums are added up across ranks)
    totals = {k: torch.zeros((), dtype=torch.float64, device=run.device) for k in objective.term_names}
    for batch, counts in batches:
        terms = objective.terms(run, batch)
        if not counts:
            terms = {k: v * 0.0 for k, v in terms.items()}
        objective.step_loss(terms, divisors).backward()
        for k, v in terms.items():  # one device sync per step (below), not one per micro-batch
            totals[k] += v.detach()
    params = list(run.trainable.values())
    sum_grads(params, world)
    torch.nn.utils.clip_grad_norm_(params, run.params.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    names = list(totals)
    *summed, n_tokens = sum_numbers(
        [totals[k].item() for k in names] + [sum(b.n_tokens for b, counts in batches if counts)], world, run.device
    )
    metrics = objective.metrics(dict(zip(names, summed)), divisors)
    return StepResult(metrics["loss"], int(n_tokens), objective.answer_tokens(step_units), metrics)


@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Mean loss of the objective over the validation split (dataset order; dropout off)."""
    metrics = evaluate_metrics(run)
    return None if metrics is None else metrics["loss"]


@torch.no_grad()
def evaluate_metrics(run: Run) -> dict[str, float] | None:
    """The objective's metrics over the validation split (dataset order; dropout off), "loss" first."""
    units, objective = run.validation, run.objective
    if not units:
        return None
    lengths = [u.n_tokens for u in units]
    order = list(range(len(units)))
    rows = pack_rows(lengths, order, run.params.max_seq_len) if run.params.packing else [[i] for i in order]
    mine = shard(rows, run.world)  # each rank scores its share; the sums are added up below
    size = run.params.batch_size
    # In lockstep every rank runs as many batches as the largest share needs (extra ones not counted).
    n_batches = math.ceil((math.ceil(len(rows) / run.world.size) if run.lockstep else len(mine)) / size)
    was_training = run.model.training
    run.model.eval()
    sums = dict.fromkeys(objective.term_names, 0.0)
    counts = list(objective.divisors([]))
    try:
        for start in range(0, n_batches * size, size):
            mb = mine[start : start + size]
            terms = objective.terms(run, run.collate(mb or rows[:1], units))
            if mb:
                for k, v in terms.items():
                    sums[k] += v.item()
                divisors = objective.divisors([units[i] for row in mb for i in row])
                counts = [a + b for a, b in zip(counts, divisors)]
    finally:
        run.model.train(was_training)
    names = list(sums)
    values = sum_numbers([sums[k] for k in names] + counts, run.world, run.device)
    return objective.metrics(dict(zip(names, values)), tuple(int(c) for c in values[len(names) :]))


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
    names = run.objective.metric_names
    run.objective.start(run)  # DPO: the reference log-probs by the starting policy (a resumed run loaded them)
    if start_step == 0 and run.validation:
        # LoRA starts as a no-op (B = 0), so this is the base model's validation loss: the baseline.
        val = evaluate_metrics(run)
        progress.base_val_loss = val["loss"]
        progress.history.append(
            {"step": 0, "train_loss": None, "val_loss": progress.base_val_loss, "lr": None}
            | {f"train_{m}": None for m in names}
            | {f"val_{m}": val[m] for m in names}
        )
    run.model.train()
    started, tokens_here = time.perf_counter(), 0
    bar = progress_bar(total=total_steps, initial=start_step, desc="train", unit="step", disable=not show_progress)
    try:
        for step in range(start_step, total_steps):
            lr = run.optimizer.param_groups[0]["lr"]
            result = train_step(run, run.plan[step])
            train_loss, n_tokens, n_targets = result
            done = step + 1
            progress.tokens_seen += n_tokens
            progress.answer_tokens_seen += n_targets
            tokens_here += n_tokens
            row: dict[str, Any] = {"step": done, "train_loss": train_loss, "val_loss": None, "lr": lr}
            row |= {f"train_{m}": result.metrics[m] for m in names} | {f"val_{m}": None for m in names}
            progress.history.append(row)
            if run.validation and (done % params.eval_every == 0 or done == total_steps):
                metrics = evaluate_metrics(run)
                row["val_loss"] = val = metrics["loss"]
                row |= {f"val_{m}": metrics[m] for m in names}
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

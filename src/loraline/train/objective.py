"""The training objective: what the loop minimizes, over which units of data, and what it reports.

The loop (train.loop) never asks which objective runs; it calls these methods:

- `units(splits)`: what the plan packs and orders (SFT: examples; DPO/ORPO: chosen/rejected pairs, kept
  together in one row so a pair never straddles micro-batches, ranks or steps).
- `collate(rows, ...)`: a micro-batch of units as tensors.
- `divisors(units)`: the step's normalizers, counted over every unit of the optimizer step (all its
  micro-batches, all ranks): SFT divides by answer tokens, DPO by pairs, ORPO its two terms by chosen
  answer tokens and by pairs. Each micro-batch's sums are divided by them, so packing vs padding, any
  grad_accum and any number of ranks give the same gradient for the same units.
- `terms(run, batch)`: sums over the micro-batch ("loss" carries the gradient; the others are detached
  metrics); `step_loss(terms, divisors)` is what backward runs on; `metrics(sums, divisors)` turns the
  step's (or the validation split's) sums into the numbers the history keeps, "loss" first.
- `start(run)` before the loop's first step (DPO: the reference log-probs), `state()`/`load_state()` what a
  checkpoint must carry beyond the weights (DPO: those log-probs, so a resume is exact).

SftObjective is the code path that existed before objectives did, operation for operation, so an SFT
run's numbers (and files) are bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loraline.config import TrainParams
from loraline.train.data import Example, Splits, check_splits, load_splits
from loraline.train.forward import loss_sum
from loraline.train.packing import Batch, collate


def objective_for(params: TrainParams) -> Objective:
    """The objective train.objective names (train.preference: its weights)."""
    if params.objective == "sft":
        return SftObjective()
    from loraline.train.preference import DpoObjective, OrpoObjective

    if params.objective == "dpo":
        return DpoObjective(beta=params.preference.beta)
    return OrpoObjective(orpo_lambda=params.preference.orpo_lambda)


class Objective:
    """The interface (see the module docstring); the defaults are those of an objective with no extra state."""

    name = "objective"
    term_names: tuple[str, ...] = ("loss",)  # the keys terms() gives
    metric_names: tuple[str, ...] = ()  # what metrics() gives beside "loss" (history keys train_<m> / val_<m>)

    def load(self, dataset_dir: Path, params: TrainParams) -> Splits:
        raise NotImplementedError

    def units(self, examples: list[Any]) -> list[Any]:
        return examples

    def collate(self, rows: list[list[Any]], pad_id: int, packed: bool, flat: bool = False) -> Any:
        raise NotImplementedError

    def divisors(self, units: list[Any]) -> tuple[int, ...]:
        raise NotImplementedError

    def answer_tokens(self, units: list[Any]) -> int:
        return sum(u.n_targets for u in units)

    def terms(self, run: Any, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_loss(self, terms: dict[str, torch.Tensor], divisors: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, sums: dict[str, float], divisors: tuple[int, ...]) -> dict[str, float]:
        raise NotImplementedError

    def start(self, run: Any) -> None:
        """Before the loop's first step, fresh or resumed (what load_state brought is used, not made again)."""

    def probe_units(self, units: list[Any]) -> list[Any]:
        """Units the batch-size probe may run before start() (DPO: with a stand-in reference)."""
        return units

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise RuntimeError(f"the {self.name} objective keeps no checkpoint state, got {sorted(tensors)}")


class SftObjective(Objective):
    """Mean cross-entropy over the answer tokens of the optimizer step."""

    name = "sft"

    def load(self, dataset_dir: Path, params: TrainParams) -> Splits:
        splits = load_splits(dataset_dir)
        check_splits(splits, params, dataset_dir)
        return splits

    def collate(self, rows: list[list[Example]], pad_id: int, packed: bool, flat: bool = False) -> Batch:
        return collate(rows, pad_id, packed, flat)

    def divisors(self, units: list[Example]) -> tuple[int, ...]:
        return (sum(e.n_targets for e in units),)

    def terms(self, run: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return {"loss": loss_sum(run.model, batch.to(run.device), run.device, fused=run.fused, chunk=run.chunk)}

    def step_loss(self, terms: dict[str, torch.Tensor], divisors: tuple[int, ...]) -> torch.Tensor:
        return terms["loss"] / max(divisors[0], 1)

    def metrics(self, sums: dict[str, float], divisors: tuple[int, ...]) -> dict[str, float]:
        return {"loss": sums["loss"] / max(divisors[0], 1)}

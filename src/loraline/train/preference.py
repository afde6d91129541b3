"""Preference objectives (train.objective dpo | orpo): chosen vs rejected answers to the same context.

Data: the prepared dataset's pair columns (the issue-41 contract, prepare.features.PREFERENCE_COLUMNS):
input_ids/labels hold context + chosen answer, rejected_input_ids/rejected_labels context + rejected
answer, labels -100 outside the final answer; a row is a pair iff rejected_input_ids is non-empty. SFT
rows of a mixed dataset are left out of a preference run (counted in the record).

Invariants:
- A pair is one unit of the plan: its chosen and rejected sequences sit in the same micro-batch (two
  packed segments of one row, each attending only to itself; or two padded rows), so the divisor of a
  step (its pairs, on every rank) divides each pair's loss exactly once.
- Sequence log-probs are sums of fp32 per-token log-softmax values (forward.token_nll: the fused chunked
  head where it applies), added up per sequence in float64 in token order (deterministic, no atomics).
- DPO's reference log-probs are computed once, before the first step, by the starting policy in eval
  mode without gradients (LoRA B = 0: the base exactly; train.preference.reference: the adapter loaded
  into the policy), kept by the objective and in every checkpoint (state()), never by a second model.
- The losses are TRL's (tests compare with trl.DPOTrainer and trl.experimental.orpo.ORPOTrainer): DPO's
  sigmoid loss -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with summed answer log-probs;
  ORPO's chosen-answer cross-entropy minus lambda * log sigmoid(log odds ratio) of the mean answer
  log-probs. ORPO's cross-entropy covers the answer tokens (the paper's L_SFT and our SFT mask), where
  TRL's trainer also scores the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraline.config import TrainParams
from loraline.train.data import REQUIRED_COLUMNS, Example, Splits, open_dataset, to_example
from loraline.train.errors import TrainError
from loraline.train.forward import token_nll
from loraline.train.objective import Objective
from loraline.train.packing import Batch, collate, pack_rows

REJECTED_COLUMNS = ("rejected_input_ids", "rejected_labels")  # prepare.features.PREFERENCE_COLUMNS' token columns
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class Pair:
    """One preference row: the chosen and the rejected conversation (targets shifted as data.to_example does)."""

    chosen: Example
    rejected: Example
    row: int  # the row in its split, for messages
    reference: tuple[float, float] | None = None  # DPO: the reference's summed answer log-probs (chosen, rejected)

    @property
    def n_tokens(self) -> int:
        return self.chosen.n_tokens + self.rejected.n_tokens

    @property
    def n_targets(self) -> int:
        return self.chosen.n_targets + self.rejected.n_targets


@dataclass
class PairBatch:
    """A micro-batch of pairs: sequences in the order chosen 0, rejected 0, chosen 1, ... (their targets in
    that order in the flattened batch), each sequence's answer-token count, and DPO's reference [pairs, 2]."""

    batch: Batch
    targets_per_sequence: list[int]
    reference: torch.Tensor | None

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def n_pairs(self) -> int:
        return len(self.targets_per_sequence) // 2


@dataclass(frozen=True)
class PairSplits(Splits):
    """The pairs of the train and validation splits, and how many SFT rows each split held (left out)."""

    sft_rows: dict[str, int]


def load_pairs(dataset_dir: Path, objective: str) -> PairSplits:
    """The dataset's pairs; a dataset without any in its train split is refused, naming what it holds."""
    dd = open_dataset(dataset_dir)
    out: dict[str, list[Pair]] = {}
    sft_rows: dict[str, int] = {}
    for split in ("train", "validation"):
        ds = dd[split]
        lacking = [c for c in REJECTED_COLUMNS if c not in ds.column_names]
        if lacking:
            raise TrainError(
                f"train.objective {objective} trains on preference pairs, but dataset {dataset_dir} has none (0 pairs "
                f"in {ds.num_rows} {split} rows: no {', '.join(lacking)} column, which the prepare stage writes for a "
                "tenant whose raw data has rows with both `chosen` and `rejected`); use objective sft, or add pairs"
            )
        cols = ds.select_columns([*REQUIRED_COLUMNS, *REJECTED_COLUMNS]).to_dict()
        rows = zip(cols["input_ids"], cols["labels"], cols["rejected_input_ids"], cols["rejected_labels"])
        out[split] = [
            Pair(to_example(ids, labels), to_example(r_ids, r_labels), row)
            for row, (ids, labels, r_ids, r_labels) in enumerate(rows)
            if len(r_ids) > 0
        ]
        sft_rows[split] = ds.num_rows - len(out[split])
    if not out["train"]:
        raise TrainError(
            f"train.objective {objective} trains on preference pairs, but dataset {dataset_dir} has 0 pairs in its "
            f"{sft_rows['train']} train rows (rejected_input_ids empty in every row); use objective sft, or add pairs"
        )
    return PairSplits(out["train"], out["validation"], sft_rows)


def check_pairs(splits: PairSplits, params: TrainParams, dataset_dir: Path) -> None:
    """What would make a pair meaningless or silently cut: an answer without tokens, a sequence too long."""
    for split, pairs in (("train", splits.train), ("validation", splits.validation)):
        for pair in pairs:
            for side, seq in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                where = f"dataset {dataset_dir} split {split} row {pair.row}"
                if not seq.n_targets:
                    column = "labels" if side == "chosen" else "rejected_labels"
                    raise TrainError(f"{where}: the {side} answer has no answer tokens ({column} all -100)")
                if seq.n_tokens > params.max_seq_len:
                    raise TrainError(
                        f"{where}: the {side} sequence has {seq.n_tokens} tokens, more than train.max_seq_len "
                        f"({params.max_seq_len}); raise it or lower prepare.max_tokens (pairs are never truncated)"
                    )
    if params.early_stopping_patience is not None and not splits.validation:
        raise TrainError(
            f"train.early_stopping_patience is set but the validation split of {dataset_dir} has no pairs; "
            "raise prepare.split.validation or unset train.early_stopping_patience"
        )


def collate_pairs(rows: list[list[Pair]], pad_id: int, packed: bool, flat: bool = False) -> PairBatch:
    """Packed: each row's pairs as consecutive segments chosen, rejected, ... (packing.collate keeps every
    segment to itself). Not packed: each pair as two padded rows, chosen then rejected."""
    if packed:
        example_rows = [[seq for pair in row for seq in (pair.chosen, pair.rejected)] for row in rows]
    else:
        example_rows = [[seq] for row in rows for pair in row for seq in (pair.chosen, pair.rejected)]
    pairs = [pair for row in rows for pair in row]
    references = [pair.reference for pair in pairs]
    reference = None if any(r is None for r in references) else torch.tensor(references, dtype=torch.float64)
    targets = [seq.n_targets for pair in pairs for seq in (pair.chosen, pair.rejected)]
    return PairBatch(collate(example_rows, pad_id, packed, flat), targets, reference)


def sequence_logps(run: Any, batch: PairBatch) -> torch.Tensor:
    """Summed answer-token log-probs of every sequence of the batch, float64: [chosen 0, rejected 0, ...]."""
    nll = token_nll(run.model, batch.batch.to(run.device), run.device, fused=run.fused, chunk=run.chunk)
    logp = -nll.double()
    return torch.stack([part.sum() for part in logp.split(batch.targets_per_sequence)])


class _PairObjective(Objective):
    """What DPO and ORPO share: pairs as units, their loading, checks and layout."""

    def load(self, dataset_dir: Path, params: TrainParams) -> PairSplits:
        splits = load_pairs(dataset_dir, self.name)
        check_pairs(splits, params, dataset_dir)
        return splits

    def collate(self, rows: list[list[Pair]], pad_id: int, packed: bool, flat: bool = False) -> PairBatch:
        return collate_pairs(rows, pad_id, packed, flat)

    def rewards(self, sums: dict[str, float], pairs: int) -> dict[str, float]:
        n = max(pairs, 1)
        return {
            "reward_accuracy": sums["correct"] / n,
            "reward_margin": (sums["chosen_reward"] - sums["rejected_reward"]) / n,
            "chosen_reward": sums["chosen_reward"] / n,
            "rejected_reward": sums["rejected_reward"] / n,
        }


def _reward_terms(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair rewards summed, and how many pairs rank the chosen answer first (strictly, as TRL counts)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "correct": (chosen > rejected).double().sum(),
        "chosen_reward": chosen.sum(),
        "rejected_reward": rejected.sum(),
    }


class DpoObjective(_PairObjective):
    """Direct Preference Optimization (Rafailov et al. 2023), TRL's sigmoid loss, mean over the step's pairs."""

    name = "dpo"
    term_names = ("loss", "correct", "chosen_reward", "rejected_reward")
    metric_names = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.reference: dict[str, torch.Tensor] = {}  # split -> [pairs, 2] float64 (chosen, rejected)

    def divisors(self, units: list[Pair]) -> tuple[int, ...]:
        return (len(units),)

    def terms(self, run: Any, batch: PairBatch) -> dict[str, torch.Tensor]:
        if batch.reference is None:
            raise RuntimeError("DPO needs the reference log-probs of every pair; DpoObjective.start computes them")
        logps = sequence_logps(run, batch).view(-1, 2) - batch.reference.to(run.device)
        chosen, rejected = self.beta * logps[:, 0], self.beta * logps[:, 1]  # the implicit rewards
        return {"loss": -F.logsigmoid(chosen - rejected).sum(), **_reward_terms(chosen, rejected)}

    def step_loss(self, terms: dict[str, torch.Tensor], divisors: tuple[int, ...]) -> torch.Tensor:
        return terms["loss"] / max(divisors[0], 1)

    def metrics(self, sums: dict[str, float], divisors: tuple[int, ...]) -> dict[str, float]:
        return {"loss": sums["loss"] / max(divisors[0], 1), **self.rewards(sums, divisors[0])}

    def start(self, run: Any) -> None:
        """The reference log-probs of every train and validation pair (unless a checkpoint brought them),
        attached to the pairs. Every rank scores every pair, in dataset order: the same forwards on every
        rank, as sharded layers need (loop.lockstep)."""
        for split in ("train", "validation"):
            units = getattr(run, split)
            if split not in self.reference:
                self.reference[split] = reference_logps(run, units)
            table = self.reference[split]
            if table.shape != (len(units), 2):
                raise RuntimeError(
                    f"DPO reference log-probs for {table.shape[0]} {split} pairs, the run has {len(units)}"
                )
            units[:] = [replace(pair, reference=tuple(ref)) for pair, ref in zip(units, table.tolist())]

    def probe_units(self, units: list[Pair]) -> list[Pair]:
        return [replace(pair, reference=(0.0, 0.0)) for pair in units]

    def state(self) -> dict[str, torch.Tensor]:
        return {f"dpo_reference.{split}": table for split, table in self.reference.items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.reference = {k.removeprefix("dpo_reference."): t.to(torch.float64) for k, t in tensors.items()}


@torch.no_grad()
def reference_logps(run: Any, units: list[Pair]) -> torch.Tensor:
    """[pairs, 2] summed answer log-probs (chosen, rejected) under the model as it is, in eval mode, float64."""
    out = torch.zeros((len(units), 2), dtype=torch.float64)
    lengths = [u.n_tokens for u in units]
    order = list(range(len(units)))
    rows = pack_rows(lengths, order, run.params.max_seq_len) if run.params.packing else [[i] for i in order]
    size = run.params.batch_size
    was_training = run.model.training
    run.model.eval()
    try:
        for start in range(0, len(rows), size):
            mb = rows[start : start + size]
            logps = sequence_logps(run, run.collate(mb, units)).view(-1, 2).cpu()
            out[[i for row in mb for i in row]] = logps
    finally:
        run.model.train(was_training)
    return out


class OrpoObjective(_PairObjective):
    """ORPO (Hong et al. 2024): the chosen answers' cross-entropy (mean over the step's chosen answer tokens)
    minus lambda x the mean over pairs of log sigmoid(log odds(chosen) - log odds(rejected)), odds of the
    mean answer-token probability. No reference model."""

    name = "orpo"
    term_names = ("nll", "log_odds_ratio", "correct", "chosen_reward", "rejected_reward")
    metric_names = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "nll", "log_odds_ratio")

    def __init__(self, orpo_lambda: float) -> None:
        self.orpo_lambda = orpo_lambda

    def divisors(self, units: list[Pair]) -> tuple[int, ...]:
        return (len(units), sum(pair.chosen.n_targets for pair in units))

    def terms(self, run: Any, batch: PairBatch) -> dict[str, torch.Tensor]:
        sums = sequence_logps(run, batch).view(-1, 2)
        counts = torch.tensor(batch.targets_per_sequence, dtype=torch.float64, device=sums.device).view(-1, 2)
        mean = sums / counts  # mean answer-token log-prob, chosen and rejected
        log_odds = (mean[:, 0] - mean[:, 1]) - (_log1mexp(mean[:, 0]) - _log1mexp(mean[:, 1]))
        ratio = F.logsigmoid(log_odds)
        rewards = _reward_terms(self.orpo_lambda * mean[:, 0], self.orpo_lambda * mean[:, 1])
        return {"nll": -sums[:, 0].sum(), "log_odds_ratio": ratio.sum(), **rewards}

    def step_loss(self, terms: dict[str, torch.Tensor], divisors: tuple[int, ...]) -> torch.Tensor:
        pairs, chosen_tokens = divisors
        return terms["nll"] / max(chosen_tokens, 1) - self.orpo_lambda * terms["log_odds_ratio"] / max(pairs, 1)

    def metrics(self, sums: dict[str, float], divisors: tuple[int, ...]) -> dict[str, float]:
        pairs, chosen_tokens = divisors
        nll, ratio = sums["nll"] / max(chosen_tokens, 1), sums["log_odds_ratio"] / max(pairs, 1)
        return {
            "loss": nll - self.orpo_lambda * ratio,
            **self.rewards(sums, pairs),
            "nll": nll,
            "log_odds_ratio": ratio,
        }


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

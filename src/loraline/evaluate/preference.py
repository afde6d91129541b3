"""Preference pairs in the test split: how often each model prefers the chosen answer, and by how much
the candidate moved from the base (DPO's implicit reward).

A test row is a pair when its `rejected_input_ids` is not empty (prepare writes the four PREFERENCE_COLUMNS
for a tenant with preference rows; input_ids/labels are then the context + chosen answer). Per model, with
log p(answer | context) the summed log-probability of the answer tokens (generate.answer_logps):

  preference_accuracy   share of pairs where log p(chosen) > log p(rejected): the model itself prefers the
                        chosen answer (the base has one too, which is what the gate compares against)
  logp_margin           mean of log p(chosen) - log p(rejected), in nats
  reward_accuracy       share of pairs where the implicit reward of chosen beats rejected's, the reward of an
                        answer being log p_model(answer) - log p_base(answer) (DPO's reward at beta = 1):
                        the pairs the model moved the right way from the base; 0.0 for the base itself
  reward_margin         mean of reward(chosen) - reward(rejected), in nats; 0.0 for the base itself

Ties (equal log-probabilities) count as not preferred: a model that cannot tell the answers apart has not
learned the preference. Every pair of the test split is scored, whatever evaluate.max_examples (which bounds the
generations): two forward passes a pair, in dataset order, batched as the rest of the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraline.evaluate.generate import answer_logps

METRICS = ("preference_accuracy", "logp_margin", "reward_accuracy", "reward_margin")
PAIR_COLUMNS = ("id", "input_ids", "labels", "rejected_input_ids", "rejected_labels")


@dataclass(frozen=True)
class PairSet:
    """The test split's pairs: chosen and rejected conversations, tokenized as the dataset stores them."""

    ids: list[str]
    chosen_ids: list[list[int]]
    chosen_labels: list[list[int]]
    rejected_ids: list[list[int]]
    rejected_labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def longest(self) -> int:
        return max(max(map(len, self.chosen_ids)), max(map(len, self.rejected_ids)))


@dataclass(frozen=True)
class PairLogps:
    """One model's summed answer log-probabilities, pair by pair."""

    chosen: list[float]
    rejected: list[float]


def load_pairs(ds: Any) -> PairSet | None:
    """The pairs of a test split (a datasets.Dataset), or None when it holds none (no preference columns, or
    only SFT rows)."""
    if "rejected_input_ids" not in ds.column_names:
        return None
    cols = ds.select_columns(list(PAIR_COLUMNS)).to_dict()
    keep = [i for i, ids in enumerate(cols["rejected_input_ids"]) if ids]
    if not keep:
        return None
    return PairSet(*([cols[c][i] for i in keep] for c in PAIR_COLUMNS))


def pair_logps(model: Any, pairs: PairSet, pad_id: int, rows: int) -> PairLogps:
    """`model`'s log-probabilities of every pair's chosen and rejected answers (no grad, `rows` at once)."""
    return PairLogps(
        chosen=answer_logps(model, pairs.chosen_ids, pairs.chosen_labels, pad_id, rows),
        rejected=answer_logps(model, pairs.rejected_ids, pairs.rejected_labels, pad_id, rows),
    )


def preference_scores(own: PairLogps, base: PairLogps) -> dict[str, float]:
    """The four METRICS of a model from its log-probabilities and the base's (the base's own: pass it twice)."""
    n = len(own.chosen)
    margins = [c - r for c, r in zip(own.chosen, own.rejected, strict=True)]
    rewards = [
        (c - bc) - (r - br) for c, r, bc, br in zip(own.chosen, own.rejected, base.chosen, base.rejected, strict=True)
    ]
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "logp_margin": sum(margins) / n,
        "reward_accuracy": sum(w > 0 for w in rewards) / n,
        "reward_margin": sum(rewards) / n,
    }


def render(pairs: int, scores: dict[str, dict[str, Any]]) -> str:
    """report.md's preference section: the four metrics per model."""
    lines = [
        "",
        "## Preference pairs",
        "",
        f"{pairs} pairs of the test split (chosen vs rejected answer to one context). preference accuracy: the "
        "model's own log-probability of the chosen answer is higher; reward: the log-probability's change from "
        "the base (DPO's implicit reward at beta 1), so the base's is 0.",
        "",
        "| model | " + " | ".join(METRICS) + " |",
        "| --- |" + " --- |" * len(METRICS),
    ]
    for name, values in scores.items():
        cells = [f"{values[m]:.4f}" if values.get(m) is not None else "-" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

"""The numbers of a parity check, apart from the models that produce them: the error a stage raises when a
model does not behave like its reference, and the summaries its report and metrics hold. No torch here, so
that a stage with nothing to compare (export without onnx in deploy.targets) starts in a fraction of a second.
"""

from __future__ import annotations

from typing import Any

from loraline.records import Record


class ParityError(ValueError):
    """A model does not behave like its reference within tolerance (or the probes are unusable);
    `report` holds the numbers measured so far (the stage's report model), for the caller to show or keep."""

    def __init__(self, message: str, report: Record | None = None):
        super().__init__(message)
        self.report = report


def summarize(per_probe: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst and mean logit difference and the agreement fractions over the probes."""
    n = len(per_probe)
    return {
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in per_probe),
        "mean_abs_logit_diff": sum(p["mean_abs_logit_diff"] for p in per_probe) / n,
        "greedy_agreement": sum(p["greedy_equal"] for p in per_probe) / n,
        "next_token_agreement": sum(p["next_token_equal"] for p in per_probe) / n,
    }


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The parity numbers worth comparing across runs (a stage's metrics file): the worst logit
    difference and the greedy agreement of a `compare`/`summarize` result."""
    return {k: summary[k] for k in ("max_abs_logit_diff", "greedy_agreement")}

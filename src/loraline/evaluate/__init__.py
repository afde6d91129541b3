"""The `evaluate` stage: base, candidate and production scored on a tenant's held-out test split."""

from loraline.evaluate.stage import EvaluateResult, evaluate_model, evaluate_tenant, run

__all__ = ["EvaluateResult", "evaluate_model", "evaluate_tenant", "run"]

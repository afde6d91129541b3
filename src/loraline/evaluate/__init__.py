"""Evaluation: task metrics from generations and the promotion gate (pure functions, no model)."""

from loraline.evaluate.gate import GateDecision, RuleResult, decide, to_json
from loraline.evaluate.metrics import aggregate, expects_json

__all__ = ["GateDecision", "RuleResult", "aggregate", "decide", "expects_json", "to_json"]

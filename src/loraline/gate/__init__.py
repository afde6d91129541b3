"""The `gate` stage: the promotion decision (`decision.decide`, a pure function of metrics and
parity) and the stage that applies it to a tenant's reports (`stage.run`)."""

from loraline.gate.decision import GateDecision, RuleResult, decide, to_json
from loraline.gate.stage import read_parity, run

__all__ = ["GateDecision", "RuleResult", "decide", "read_parity", "run", "to_json"]

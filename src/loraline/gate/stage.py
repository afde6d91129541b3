"""The `gate` stage: decide from the evaluation and the parity metrics whether a tenant's candidate
may be promoted, and write that decision (reports/<tenant>/gate.json, every rule with its reason)
and its summary (reports/<tenant>/metrics/gate.json: passed and the failed rules, a DVC metric)."""

from __future__ import annotations

import json

from loraline.config import Params
from loraline.gate.decision import EXPORT_PARITY_KEY, MERGE_PARITY_KEY, GateDecision, decide, to_json
from loraline.io import write_json
from loraline.layout import Layout

PARITY_SOURCES = ((MERGE_PARITY_KEY, "merge"), (EXPORT_PARITY_KEY, "export"))


def run(params: Params, layout: Layout, tenant: str) -> GateDecision:
    """Decide on `tenant`'s candidate from the files the evaluate, merge and export stages wrote."""
    evaluation = json.loads(layout.evaluation_results_path(tenant).read_text())
    models = evaluation["models"]
    decision = decide(
        params.gate_for(tenant),
        models["candidate"],
        models["base"],
        models.get("production"),
        read_parity(layout, tenant),
        targets=params.deploy_for(tenant).targets,
        judge=evaluation.get("judge"),
    )
    write_json(layout.gate_path(tenant), {"tenant": tenant, **to_json(decision)})
    write_json(layout.metrics_path("gate", tenant), gate_metrics(decision))
    return decision


def read_parity(layout: Layout, tenant: str) -> dict[str, float]:
    """The parity evidence the gate decides on: `max_abs_logit_diff` of the merge and export stages'
    metrics files (merged vs base+adapter, fp32 ONNX vs PyTorch). An absent file or number is left
    out, and the gate then fails the rule on missing evidence."""
    parity = {}
    for key, stage in PARITY_SOURCES:
        path = layout.metrics_path(stage, tenant)
        if path.exists():
            value = json.loads(path.read_text()).get("max_abs_logit_diff")
            if value is not None:
                parity[key] = value
    return parity


def gate_metrics(decision: GateDecision) -> dict[str, bool | str]:
    """The verdict as `dvc metrics show` can print it (it leaves lists out): the failed rules as one string."""
    return {"passed": decision.passed, "failed": ", ".join(decision.failed)}

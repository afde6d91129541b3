"""The `gate` stage: decide from the evaluation and the parity reports whether a tenant's candidate
may be promoted, and write that decision (reports/<tenant>/gate.json)."""

from __future__ import annotations

import json

from loraline.config import Params
from loraline.gate.decision import EXPORT_PARITY_KEY, MERGE_PARITY_KEY, GateDecision, decide, to_json
from loraline.io import write_json
from loraline.layout import Layout


def read_parity(layout: Layout, tenant: str) -> dict[str, float]:
    """The parity evidence the gate decides on: merge and fp32-export max logit differences (absent
    reports are left out, and the gate then fails the rule on missing evidence)."""
    parity = {}
    for key, path, (section, name) in (
        (MERGE_PARITY_KEY, layout.merge_report_path(tenant), ("merged_vs_unmerged", "max_abs_logit_diff")),
        (EXPORT_PARITY_KEY, layout.export_report_path(tenant), ("fp32", "max_abs_logit_diff")),
    ):
        if path.exists():
            parity[key] = json.loads(path.read_text())[section][name]
    return parity


def run(params: Params, layout: Layout, tenant: str) -> GateDecision:
    """Decide on `tenant`'s candidate from the files the evaluate, merge and export stages wrote."""
    metrics = json.loads(layout.eval_metrics_path(tenant).read_text())["models"]
    decision = decide(
        params.gate_for(tenant), metrics["candidate"], metrics["base"], metrics.get("production"), read_parity(layout, tenant)
    )
    write_json(layout.gate_path(tenant), {"tenant": tenant, **to_json(decision)})
    return decision

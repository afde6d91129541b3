"""What a run produced, gathered from the files the stages wrote, for people: the CLI's end-of-run
summary and the Prefect run's artifacts render the same `RunSummary`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraline.config import Params
from loraline.layout import NOT_BUILT, Layout
from loraline.records import BaseRecord, ExportReport, GraphReport, MergeReport, QuantizedGap

# The metrics worth a column, in reading order; anything else stays in metrics.json. The same as
# loraline.evaluate.stage.HEADLINE_METRICS (importing that would load torch for every CLI command).
HEADLINE_METRICS = (
    "answer_loss",
    "exact_match",
    "token_f1",
    "rouge_l",
    "json_valid",
    "json_field_accuracy",
    "long_context_perplexity",
    "general_loss",
    "judge_win_rate",
    "preference_accuracy",
    "reward_margin",
)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class TenantSummary:
    tenant: str
    prepare_stats: dict[str, Any] | None  # reports/<tenant>/prepare_stats.json
    train_metrics: dict[str, Any] | None  # the train stage's DVC metrics
    train_timing: dict[str, Any] | None
    scores: dict[str, dict[str, float | None]]  # the evaluation's: model ("base", "candidate", ...) -> metric -> value
    low_bit: dict[str, Any] | None  # the evaluation's QA-LoRA comparison (train.qalora.reference)
    gate: dict[str, Any] | None
    release: dict[str, Any] | None
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.gate is None:
            return "not run"
        return "PASS" if self.gate["passed"] else "FAIL (" + ", ".join(self.gate.get("failed", [])) + ")"

    @property
    def registry_line(self) -> str:
        r = self.release
        if r is None:
            return "not registered"
        version = r.get("version") or "-"
        new = "new" if r.get("registered_new") else "unchanged"
        prod = r.get("production_after") or "none"
        action = "promoted to prod" if r.get("promoted") else f"not promoted ({r.get('reason', '')})"
        return f"{version} ({new}), {action}; prod is {prod}"

    def metric_rows(self) -> list[dict[str, Any]]:
        """One row per headline metric, one column per evaluated model."""
        models = [m for m in ("base", "candidate", "production") if m in self.scores]
        return [
            {"metric": name, **{m: self.scores[m].get(name) for m in models}}
            for name in HEADLINE_METRICS
            if any(name in self.scores[m] for m in models)
        ]


@dataclass
class RunSummary:
    base: BaseRecord | None
    tenants: list[TenantSummary]


def collect_summary(params: Params, layout: Layout | None = None, tenants: list[str] | None = None) -> RunSummary:
    layout = layout or Layout()
    out = []
    for name in tenants or params.tenant_names:
        evaluation = _read(layout.evaluation_results_path(name)) or {}
        paths = {
            "adapter": layout.adapter_dir(name),
            "merged": layout.merged_dir(name),
            "onnx": layout.onnx_dir(name),
            "report": layout.evaluation_dir(name) / "report.md",
        }
        out.append(
            TenantSummary(
                tenant=name,
                prepare_stats=_read(layout.prepare_stats_path(name)),
                train_metrics=_read(layout.metrics_path("train", name)),
                train_timing=_read(layout.timing_path("train", name)),
                scores=evaluation.get("models", {}),
                low_bit=evaluation.get("qalora_comparison"),
                gate=_read(layout.gate_path(name)),
                release=_read(layout.release_path(name)),
                paths=_paths(paths, params.deploy_for(name).targets),
            )
        )
    base = layout.base_record_path()
    return RunSummary(base=BaseRecord.read(base) if base.is_file() else None, tenants=out)


def _paths(paths: dict[str, Path], targets: list[str]) -> dict[str, str]:
    """Each output that exists; a deploy target not built says so (its stage wrote only a report)."""
    out = {}
    for kind, path in paths.items():
        if kind in ("merged", "onnx") and kind not in targets:
            out[kind] = NOT_BUILT
        elif path.exists():
            out[kind] = str(path)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def reasons(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(stats.get("rejected_by_reason", {}).items()) if v) or "none"


def base_line(record: BaseRecord) -> str:
    if record.source != "built":
        return f"base: {record.source} model {record.model_ref} (recorded, not downloaded)"
    pre = record.pretraining
    tokens = (pre.tokens_seen if pre else None) or 0
    loss = pre.final_loss if pre and pre.final_loss is not None else float("nan")
    return (
        f"base: built {record.architecture}, {(record.parameters or 0) / 1e6:.1f}M parameters, "
        f"{pre.steps if pre else None} steps / {tokens / 1e6:.2f}M tokens, final pretraining loss {loss:.3f}"
    )


def train_line(name: str, m: dict[str, Any], timing: dict[str, Any] | None = None) -> str:
    """`m`: the train stage's metrics (train.train_metrics); `timing`: its run timing, when known."""
    gain = "n/a" if m.get("val_loss_gain") is None else f"{100 * m['val_loss_gain']:.0f}%"
    # a dpo/orpo run's loss is its objective's (train.objective), and its reward accuracy says more than the loss
    what = f"{m['objective']} loss" if m.get("objective") else "answer loss"
    rewards = (
        f", reward accuracy {_fmt(m.get('reward_accuracy_base'))} -> {_fmt(m.get('reward_accuracy'))}"
        if m.get("objective")
        else ""
    )
    line = (
        f"train[{name}]: validation {what} {_fmt(m.get('val_loss_base'))} (base) -> {_fmt(m.get('val_loss'))} "
        f"(adapter), {gain} lower{rewards} | {m['steps']} steps, {m['tokens_seen']} tokens"
    )
    if timing:
        line += f", {timing['tokens_per_s']:.0f} tokens/s on {timing['device']}"
        if timing.get("wall_s") is not None:
            line += f", {timing['wall_s']:.0f}s"
    return line


# -- one stage's report lines: what `loraline <stage>` and `loraline run --no-dvc` print per tenant --


def documents_line(name: str, result: Any) -> str:
    """`result`: the documents stage's DocumentsResult."""
    skipped = (
        f", {len(result.skipped)} skipped ({'; '.join(f'{k}: {v}' for k, v in result.skipped.items())})"
        if result.skipped
        else ""
    )
    return f"documents[{name}]: {len(result.files)} files -> {result.out_dir}{skipped}"


def synthesize_line(name: str, result: Any) -> str:
    """`result`: the synthesize stage's SynthesizeResult."""
    rejects = ", ".join(f"{k} {v}" for k, v in sorted(result.rejected.items())) or "none"
    usage = "".join(f", {k} {v}" for k, v in result.usage.items())
    return (
        f"synthesize[{name}]: {result.generated} generated = {result.kept} kept + {sum(result.rejected.values())} "
        f"rejected ({rejects}) by {result.stats['generator']}{usage} -> {result.rows_path}"
    )


def prepare_line(name: str, stats: Any) -> str:
    """`stats`: the prepare stage's PrepareStats (or its dict)."""
    s = stats if isinstance(stats, dict) else stats.__dict__
    splits = " / ".join(f"{k} {s.get('splits', {}).get(k, 0)}" for k in ("train", "validation", "test"))
    return (
        f"prepare[{name}]: {s['rows_in']} rows in = {s['kept']} kept + {s['rejected']} rejected "
        f"+ {s['duplicates']} duplicates + {s.get('near_duplicates', 0)} near-duplicates "
        f"+ {s.get('contaminated', 0)} contaminated | {splits} | documents {s.get('documents', 0)} "
        f"| rejects: {reasons(s)}"
    )


def merge_line(name: str, report: MergeReport, layout: Layout) -> str:
    """`report`: the merge stage's report (merge_report.json)."""
    r, p = report, report.probes
    probes = f"{p.count} probes ({p.builtin} built-in, {p.tenant} from the test split)"
    mv = r.merged_vs_unmerged
    if mv is None:  # deploy.targets without merged
        return (
            f"merge[{name}]: merged {r.merged}; reference answers to {probes} from base + adapter "
            f"-> {layout.merge_report_path(name)}"
        )
    q = r.vs_4bit or QuantizedGap()
    worst = q.max_abs_logit_diff if q.max_abs_logit_diff is not None else float("nan")
    gap = "skipped" if q.skipped is not None else f"{worst:.3g} (greedy agreement {q.greedy_agreement or 0:.0%})"
    return (
        f"merge[{name}]: merged vs adapter max logit diff {mv.max_abs_logit_diff:.2e} "
        f"(tolerance {r.tolerance:g}), greedy agreement {mv.greedy_agreement:.0%} on {probes}; "
        f"gap to 4-bit {gap} -> {layout.merged_dir(name)}"
    )


def export_lines(name: str, report: ExportReport, layout: Layout) -> list[str]:
    """`report`: the export stage's report (export_report.json): a headline, then one line per graph."""
    r = report
    if r.graph is None:  # deploy.targets without onnx
        return [f"export[{name}]: onnx {r.onnx}"]
    lines = [f"export[{name}] -> {layout.onnx_dir(name)}"]
    for graph in r.graphs or []:
        g: GraphReport = getattr(r, graph)
        drift = f"; vs the float model {g.vs_float.max_abs_logit_diff:.3g}" if g.vs_float is not None else ""
        lines.append(
            f"  {graph:<5} {g.file:<17} {g.bytes / 2**20:9.1f} MiB  max logit diff "
            f"{g.max_abs_logit_diff:.2e}, greedy agreement {g.greedy_agreement:.0%}{drift}"
        )
    return lines


def evaluate_line(name: str, result: Any) -> str:
    """`result`: the evaluate stage's EvaluateResult."""
    models = result.metrics["models"]
    cols = [m for m in ("base", "candidate", "production") if m in models]
    return (
        f"evaluate[{name}]: {result.metrics['test_rows']} test rows; "
        + "; ".join(
            f"{k}: "
            + " / ".join(
                f"{m} {models[m].get(k) if models[m].get(k) is None else round(models[m][k], 3)}" for m in cols
            )
            for k in models["candidate"]
        )
        + f" -> {result.report_path}"
    )


def gate_lines(name: str, decision: Any) -> list[str]:
    """`decision`: the gate stage's GateDecision: the verdict, then one line per rule."""
    lines = [f"gate[{name}]: {'PASS' if decision.passed else 'FAIL'}"]
    lines += [f"    {'ok  ' if rule.passed else 'FAIL'} {rule.name}: {rule.reason}" for rule in decision.rules]
    return lines


def tenant_failures(failures: dict[str, Any], sep: str = "; ") -> str:
    """Why each failed tenant failed, `[tenant] error` (a run goes on past a failed tenant and says so at the end)."""
    return sep.join(f"[{t}] {e}" for t, e in failures.items())


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[_fmt(v) for v in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]


def render_text(summary: RunSummary, seconds: float | None = None) -> str:
    lines = ["", "== loraline summary =="]
    if summary.base:
        lines.append(base_line(summary.base))
    lines += _data_table(summary.tenants)
    for t in summary.tenants:
        lines += ["", f"{t.tenant}:", *_tenant_lines(t)]
    if seconds is not None:
        lines += ["", f"total time: {seconds:.0f}s"]
    return "\n".join(lines)


DATA_COLUMNS = [
    "tenant",
    "rows in",
    "kept",
    "rejected",
    "duplicates",
    "near dup",
    "contaminated",
    "synthetic",
    "train",
    "validation",
    "test",
]


def _data_table(tenants: list[TenantSummary]) -> list[str]:
    """What the prepare stage made of each tenant's rows (DATA_COLUMNS), under a blank line and `data:`."""
    rows = [
        [
            t.tenant,
            s["rows_in"],
            s["kept"],
            s["rejected"],
            s["duplicates"],
            s.get("near_duplicates", 0),
            s.get("contaminated", 0),
            s.get("by_source", {}).get("synthetic", {}).get("kept", 0),
            *(s.get("splits", {}).get(k, 0) for k in ("train", "validation", "test")),
        ]
        for t in tenants
        if (s := t.prepare_stats)
    ]
    if not rows:
        return []
    return ["", "data:"] + ["  " + r for r in _table(DATA_COLUMNS, rows)]


def _tenant_lines(t: TenantSummary) -> list[str]:
    """One tenant's section, indented: rejects, training, metrics, gate, registry and output paths."""
    lines = []
    if t.prepare_stats:
        lines.append(f"  rejects: {reasons(t.prepare_stats)}")
    if t.train_metrics:
        lines.append("  " + train_line(t.tenant, t.train_metrics, t.train_timing))
    rows = t.metric_rows()
    if rows:
        models = [k for k in rows[0] if k != "metric"]
        lines += [
            "  " + r for r in _table(["metric", *models], [[r["metric"], *(r[m] for m in models)] for r in rows])
        ]
    if t.low_bit:
        from loraline.evaluate.lowbit import summary_line  # torch: only for a run that has the comparison

        lines.append("  " + summary_line(t.low_bit))
    lines.append(f"  gate: {t.verdict}")
    lines.append(f"  registry: {t.registry_line}")
    lines += [f"  {kind}: {path}" for kind, path in t.paths.items()]
    return lines


def render_markdown(summary: RunSummary, seconds: float | None = None) -> str:
    """The run summary as a Prefect markdown artifact."""
    out = ["# loraline run", ""]
    if summary.base:
        out += [base_line(summary.base), ""]
    out += [
        "| tenant | gate | version | promoted | prod | answer loss base → candidate |",
        "|---|---|---|---|---|---|",
    ]
    for t in summary.tenants:
        r = t.release or {}
        loss = " → ".join(_fmt(t.scores.get(m, {}).get("answer_loss")) for m in ("base", "candidate"))
        out.append(
            f"| {t.tenant} | {t.verdict} | {r.get('version') or '-'} | {'yes' if r.get('promoted') else 'no'} "
            f"| {r.get('production_after') or '-'} | {loss} |"
        )
    if seconds is not None:
        out += ["", f"Total time: {seconds:.0f} s"]
    return "\n".join(out)


def gate_markdown(t: TenantSummary) -> str:
    out = [f"# Gate: {t.tenant}: {t.verdict}", "", "| rule | result | reason |", "|---|---|---|"]
    for rule in (t.gate or {}).get("rules", []):
        out.append(f"| {rule['name']} | {'ok' if rule['passed'] else 'FAIL'} | {rule.get('reason', '')} |")
    out += ["", f"Registry: {t.registry_line}"]
    return "\n".join(out)

"""report.md: one metrics table (models side by side, candidate-vs-base delta), the forgetting check (general_loss
on text that is not the tenant's, and its rise over the base's), and example generations."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

EXCERPT_CHARS = 300
# Display order of the metrics; any other metric follows in its own order.
METRIC_ORDER = (
    "answer_loss",
    "answer_perplexity",
    "exact_match",
    "token_f1",
    "rouge_l",
    "json_valid",
    "json_field_accuracy",
    "general_loss",
)
LOWER_IS_BETTER = frozenset({"answer_loss", "answer_perplexity", "general_loss"})


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}"


def _delta(a: Any, b: Any) -> str:
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)):
        return "n/a"
    return f"{a - b:+.4f}"


def _cell(text: str, limit: int | None = None) -> str:
    if limit is not None and len(text) > limit:
        text = text[:limit] + " …"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return f"`{text}`" if text and "`" not in text else (text or "*(empty)*")


def metrics_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(models)
    keys = [k for k in METRIC_ORDER if any(k in m for m in models.values())]
    keys += [k for m in models.values() for k in m if k not in keys]
    keys = list(dict.fromkeys(keys))
    has_delta = "candidate" in models and "base" in models
    header = ["metric", *names] + (["Δ candidate − base"] if has_delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for key in keys:
        label = f"{key} ↓" if key in LOWER_IS_BETTER else key
        row = [label, *(_fmt(models[n].get(key)) for n in names)]
        if has_delta:
            row.append(_delta(models["candidate"].get(key), models["base"].get(key)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_report(
    *,
    tenant: str,
    test_rows: int,
    expects_json: bool,
    max_new_tokens: int,
    models: Mapping[str, Mapping[str, Any]],
    examples: Sequence[Mapping[str, Any]],
    fields: Mapping[str, Mapping[str, float]] | None = None,
    general: Mapping[str, Any] | None = None,
) -> str:
    """Markdown for one tenant; `examples` are generations.jsonl rows (with a "prompt" excerpt); `general` is
    metrics.json's `general` (the forgetting check's sample, or why it was not measured)."""
    parts = [
        f"# Evaluation: {tenant}",
        "",
        f"Test rows: **{test_rows}** · answers expected as JSON: **{'yes' if expects_json else 'no'}** · "
        f"greedy decoding, max_new_tokens={max_new_tokens}. ↓ = lower is better; all others higher is better.",
        "",
        "## Metrics",
        "",
        metrics_table(models),
    ]
    if fields:
        names = list(fields)
        keys = list(dict.fromkeys(k for f in fields.values() for k in f))
        parts += [
            "",
            "## Accuracy per JSON field",
            "",
            "| field | " + " | ".join(names) + " |",
            "|" + "|".join(["---"] + ["---:"] * len(names)) + "|",
        ]
        parts += [f"| `{k}` | " + " | ".join(_fmt(fields[n].get(k)) for n in names) + " |" for k in keys]
    if general is not None:
        parts += ["", "## Forgetting: general text", "", *forgetting_lines(models, general)]
    if examples:
        names = list(models)
        parts += ["", f"## Examples ({len(examples)} of {test_rows})"]
        for i, ex in enumerate(examples, 1):
            parts += ["", f"### {i}. `{ex['id'][:12]}`", "", f"**Prompt:** {_cell(ex['prompt'], EXCERPT_CHARS)}", ""]
            parts += ["| | answer | exact match |", "|---|---|:---:|", f"| reference | {_cell(ex['reference'])} | |"]
            for name in names:
                pred = ex["predictions"][name]
                mark = "✓" if ex["exact_match"][name] else "✗"
                parts.append(f"| {name} | {_cell(pred)} | {mark} |")
    return "\n".join(parts) + "\n"


def forgetting_lines(models: Mapping[str, Mapping[str, Any]], general: Mapping[str, Any]) -> list[str]:
    """The sample general_loss was measured on and each model's rise over the base (the gate's max_forgetting
    decides on the candidate's), or the line saying it was not measured and why."""
    if not general.get("measured"):
        return [f"Not measured: {general.get('reason', 'no general-text sample')}."]
    kinds = ", ".join(f"{n} {kind}" for kind, n in general.get("kinds", {}).items())
    lines = [
        f"Sample `{general['path']}` (sha256 `{str(general['sha256'])[:12]}`): {general['rows']} rows ({kinds}), "
        f"{general['target_tokens']} scored tokens, each row cut to {general['max_tokens']} tokens. "
        "Plain text is scored on every token, chat rows on their answers.",
        "",
        "| model | general_loss ↓ | rise over base |",
        "|---|---:|---:|",
    ]
    base = models.get("base", {}).get("general_loss")
    for name, scores in models.items():
        value = scores.get("general_loss")
        rise = (
            f"{(value - base) / abs(base):+.2%}"
            if name != "base" and _finite(value) and _finite(base) and base
            else ""
        )
        lines.append(f"| {name} | {_fmt(value)} | {rise} |")
    return lines


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)

"""report.md: one metrics table (models side by side, candidate-vs-base delta) and example generations."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

EXCERPT_CHARS = 300
# Display order of the metrics; any other metric follows in its own order.
METRIC_ORDER = (
    "answer_loss", "answer_perplexity", "exact_match", "token_f1", "rouge_l", "json_valid", "json_field_accuracy",
)
LOWER_IS_BETTER = frozenset({"answer_loss", "answer_perplexity"})


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
    *, tenant: str, test_rows: int, expects_json: bool, max_new_tokens: int,
    models: Mapping[str, Mapping[str, Any]], examples: Sequence[Mapping[str, Any]],
    fields: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """Markdown for one tenant; `examples` are generations.jsonl rows (with a "prompt" excerpt)."""
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
        parts += ["", "## Accuracy per JSON field", "", "| field | " + " | ".join(names) + " |",
                  "|" + "|".join(["---"] + ["---:"] * len(names)) + "|"]
        parts += [f"| `{k}` | " + " | ".join(_fmt(fields[n].get(k)) for n in names) + " |" for k in keys]
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

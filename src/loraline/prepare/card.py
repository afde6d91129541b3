"""The dataset card: data/prepared/<tenant>/README.md, written inside prepare's atomic output.

Everything a reader needs to trust or reproduce the dataset without running code: where the rows came
from (raw files with their sha256, synthetic generators and models from the rows' provenance), what
happened to every input row (the reconciliation, by file and by reason), which filters ran with which
parameters, and the hashes that pin data, tokenizer and code. Its content depends only on the inputs
and the code revision, so two runs on the same inputs write the same bytes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from loraline.config import PrepareParams
from loraline.prepare.schema import PrepareStats


def render_card(
    stats: PrepareStats,
    params: PrepareParams,
    *,
    raw_files: dict[str, str],
    synthetic_file: str | None,
    synthetic_provenance: list[dict],
    dataset_hash: str,
    code: dict,
    seed: int,
) -> str:
    lines = [
        f"# Dataset card: {stats.tenant}",
        "",
        "Written by loraline's `prepare` stage with the dataset (`dataset/`: train, validation, test; "
        "`documents/`: plain documents). Synthetic rows are in train only; validation and test are real.",
        "",
        "## Sources",
        "",
        *_sources(stats, raw_files, synthetic_file, synthetic_provenance),
        "",
        *_counts(stats, params),
        "",
        *_filters(params, seed),
        "",
        *_hashes(stats, dataset_hash, code),
        "",
    ]
    return "\n".join(lines)


def _sources(
    s: PrepareStats, raw_files: dict[str, str], synthetic_file: str | None, synthetic_provenance: list[dict]
) -> list[str]:
    """Each raw file's reconciliation with its sha256, then the synthetic rows by generator."""
    file_rows = []
    for rel, c in sorted(s.by_file.items()):
        digest = raw_files.get(rel, s.synthetic_hash if synthetic_file and rel.endswith(synthetic_file) else "")
        file_rows.append(
            [
                f"`{rel}`",
                c["rows_in"],
                c["kept"],
                c["rejected"],
                c["duplicates"],
                c["near_duplicates"],
                c["contaminated"],
                f"`{digest}`" if digest else "-",
            ]
        )
    lines = _table(
        ["file", "rows in", "kept", "rejected", "duplicates", "near-duplicates", "contaminated", "sha256"], file_rows
    )
    lines.append("")
    if synthetic_file:
        lines += [f"Synthetic rows: `{synthetic_file}` (sha256 `{s.synthetic_hash}`), by generator:", ""]
        lines += _table(
            ["generator", "model", "prompt template sha256", "rows read"],
            [[g, m, f"`{t}`" if t != "-" else t, n] for g, m, t, n in generators(synthetic_provenance)],
        )
    else:
        lines.append("Synthetic rows: none (no synthetic rows file).")
    return lines


def _counts(s: PrepareStats, params: PrepareParams) -> list[str]:
    """Where every input row went: kept (by split and source), rejected (by reason) or removed."""
    syn = s.by_source.get("synthetic", {})
    return [
        "## Counts",
        "",
        f"rows_in = kept + rejected + duplicates + near_duplicates + contaminated: "
        f"{s.rows_in} = {s.kept} + {s.rejected} + {s.duplicates} + {s.near_duplicates} + {s.contaminated}",
        "",
        f"- kept: {s.kept} = train {s.splits.get('train', 0)} + validation {s.splits.get('validation', 0)} "
        f"+ test {s.splits.get('test', 0)} + documents {s.documents}",
        *_pairs(s),
        f"- real: {s.by_source.get('real', {}).get('rows_in', 0)} in, {s.by_source.get('real', {}).get('kept', 0)} "
        f"kept; synthetic: {syn.get('rows_in', 0)} in, {syn.get('kept', 0)} kept (quota {s.synthetic_quota})",
        f"- exact duplicates: {s.duplicates}; near-duplicates: {s.near_duplicates}; contaminated: {s.contaminated}",
        f"- conflicting answers: {s.conflicting_answers} rows over {s.conflicting_prompts} prompts asked with "
        f"different answers (`conflicts={params.conflicts}`; rejected: "
        f"{s.rejected_by_reason.get('conflicting_answers', 0)})",
        f"- groups: {s.groups.get('groups', 0)} groups of rows sharing a context ({s.groups.get('rows', 0)} rows, "
        f"largest {s.groups.get('largest', 0)}), each whole in one split: "
        + ", ".join(f"{split} {n}" for split, n in s.groups.get("by_split", {}).items()),
        f"- PII ({params.pii.mode}): {s.pii_rows} rows; " + ", ".join(f"{kind} {n}" for kind, n in s.pii.items()),
        "- rejected by reason: " + (", ".join(f"{r} {n}" for r, n in s.rejected_by_reason.items() if n) or "none"),
    ]


def _pairs(s: PrepareStats) -> list[str]:
    """The kept preference pairs by split (part of the kept rows), for a tenant that has them."""
    if not s.pairs:
        return []
    by_split = " + ".join(f"{split} {n}" for split, n in s.pairs.items())
    return [
        f"- preference pairs (one kept row each, the split keeping a prompt's pairs together): "
        f"{sum(s.pairs.values())} = {by_split}"
    ]


def _filters(params: PrepareParams, seed: int) -> list[str]:
    """Which filters ran, with which parameters."""
    return [
        "## Filters and parameters",
        "",
        f"- shape and length: `max_chars={params.max_chars}`, `max_tokens={params.max_tokens}`; "
        "rows holding the tokenizer's control tokens are rejected",
        "- exact duplicates: same normalized content (NFKC, whitespace collapsed); the first in file order is kept",
        f"- PII: `mode={params.pii.mode}`, `types={list(params.pii.types)}`",
        f"- near-duplicates: `enabled={params.near_dedup.enabled}`, MinHash LSH over "
        f"{params.near_dedup.shingle_words}-word shingles of the user and assistant turns, "
        f"`threshold={params.near_dedup.threshold}`, `num_perm={params.near_dedup.num_perm}`; the answers (assistant "
        "turns) must reach the threshold too, so rows asking different questions of one passage are kept",
        "- conflicting answers: the same prompt (system, user and tool turns, normalized) with a different answer; "
        f"`conflicts={params.conflicts}` (keep: all kept; first: the first in file and row order kept, the others "
        "rejected; reject: all rejected)",
        f"- decontamination: `enabled={params.decontamination.enabled}`, {params.decontamination.ngram}-word n-grams, "
        f"a train/validation row is removed when `overlap >= {params.decontamination.threshold}` with one test row, "
        "both in its text (user and assistant turns) and in its "
        "answer (assistant turns): sharing a passage is no copy",
        f"- mix: `synthetic_ratio={params.synthetic_ratio}` (at most that many "
        f"synthetic rows per real train row), seeded draw and MinHash `seed={seed}`",
        f"- split by content hash: validation {params.split.validation}, test {params.split.test}, salt "
        f"`{params.split.salt}`; a row in a group (`sources[].group`, or the longest line of its first user turn when "
        "that turn holds more and the line has at least "
        f"`group_min_chars={params.group_min_chars}` characters) by its group's key instead",
    ]


def _hashes(s: PrepareStats, dataset_hash: str, code: dict) -> list[str]:
    """The hashes that pin data, tokenizer and code."""
    return [
        "## Hashes",
        "",
        f"- raw data (tree): `{s.data_hash}`",
        f"- synthetic rows: `{s.synthetic_hash or '-'}`",
        f"- dataset (tree of `dataset/`): `{dataset_hash}`",
        f"- tokenizer: `{s.tokenizer or '(in memory)'}`, `{s.tokenizer_hash}`",
        f"- code: `{code['sha256']}` ({code['modules']} modules of loraline)",
    ]


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def generators(provenance: list[dict]) -> list[tuple[str, str, str, int]]:
    """(generator, model, prompt_template_sha256, rows) for every distinct synthetic source, sorted."""
    counts = Counter(
        (str(p.get("generator", "?")), str(p.get("model") or "-"), str(p.get("prompt_template_sha256") or "-"))
        for p in provenance
    )
    return [(*key, n) for key, n in sorted(counts.items())]


def raw_file_hashes(raw_dir: Path, by_file: dict) -> dict[str, str]:
    """sha256 of each raw file named in by_file (files whose name cannot be encoded are left out)."""
    from loraline.provenance import hash_tree, sha256_file

    out = {}
    for rel in by_file:
        path = raw_dir / rel
        try:
            if path.is_file():
                out[rel] = sha256_file(path)
            elif path.is_dir():  # a save_to_disk folder: one source
                out[rel] = hash_tree(path)
        except (OSError, UnicodeEncodeError):
            continue
    return out

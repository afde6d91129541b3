"""prepare_stats.json's numbers, from what the passes collected: where every input row ended, by
file, by source, by reason and by shape; token percentiles; the tokenizer's and the raw data's hashes.
Every input row ends in one of OUTCOMES, and the counts are checked to add up (in total and per
file; kept preference pairs, by split, against the kept rows) before anything is written: counts
that do not add up mean a row was lost. Rows that prepare.conflicts removes are rejects (reason
conflicting_answers), so the equation stays
rows_in = kept + rejected + duplicates + near_duplicates + contaminated; conflicting_answers counts
the rows sharing a prompt with a different answer wherever they ended (kept, under keep).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loraline.modelling.loading import tokenizer_hash
from loraline.prepare.collected import Collected
from loraline.prepare.mapping import SourceSpec
from loraline.prepare.quality.mix import SYNTHETIC_PREFIX
from loraline.prepare.readers import has_surrogates
from loraline.prepare.render import tokenizer_name
from loraline.prepare.schema import PREFERENCE_REASONS, SPLITS, PrepareStats, RejectReason
from loraline.provenance import hash_tree

PERCENTILES = (50, 90, 99)
OUTCOMES = ("kept", "rejected", "duplicates", "near_duplicates", "contaminated")


def summarize(out: Collected, raw_dir: Path, tokenizer, rows_in: dict[str, int]) -> None:
    stats = out.stats
    summary = out.rejects.summary
    stats.rows_in = sum(rows_in.values())
    stats.rejected = summary.count
    stats.duplicates = sum(1 for d in out.duplicates if d["kind"] == "exact")
    stats.near_duplicates = sum(1 for d in out.duplicates if d["kind"] == "near")
    stats.contaminated = len(out.contaminated)
    stats.documents = len(out.documents)
    stats.kept = sum(len(out.splits[s]) for s in SPLITS) + stats.documents
    by_reason = sum(summary.by_file.values(), Counter())
    stats.rejected_by_reason = {
        reason.value: by_reason.get(reason.value, 0)
        for reason in RejectReason
        if reason not in PREFERENCE_REASONS or out.has_pairs or by_reason.get(reason.value)
    }
    stats.by_shape = dict(sorted(out.shapes.items()))
    stats.splits = {s: len(out.splits[s]) for s in SPLITS}
    stats.pairs = {s: out.pairs.get(s, 0) for s in SPLITS} if out.has_pairs else {}
    stats.by_file = _by_file(out, rows_in)
    synthetic_in = sum(n for rel, n in rows_in.items() if rel.startswith(SYNTHETIC_PREFIX))
    synthetic_kept = out.synthetic_kept
    stats.by_source = {
        "real": {"rows_in": stats.rows_in - synthetic_in, "kept": stats.kept - synthetic_kept},
        "synthetic": {"rows_in": synthetic_in, "kept": synthetic_kept},
    }
    stats.token_length_percentiles = percentiles(out.token_lengths)
    stats.answer_token_percentiles = percentiles(out.answer_lengths)
    stats.tokenizer = tokenizer_name(tokenizer)
    stats.tokenizer_hash = tokenizer_hash(tokenizer)
    # provenance.hash_tree cannot encode file names that are not UTF-8; those files are rejected as
    # invalid_utf8 anyway, so the hash covers every file that could contribute a row.
    undecodable = tuple(
        rel
        for rel in (p.relative_to(raw_dir).as_posix() for p in raw_dir.rglob("*") if p.is_file())
        if has_surrogates(rel)
    )
    stats.data_hash = hash_tree(raw_dir, exclude=undecodable)
    # Checked in code, not by assert (stripped under -O): counts that do not add up mean a row was lost.
    bad_files = [rel for rel, c in stats.by_file.items() if c["rows_in"] != sum(c[k] for k in OUTCOMES)]
    if not stats.reconciles or bad_files or not _pairs_reconcile(stats):
        raise RuntimeError(
            f"tenant {stats.tenant!r}: counts do not reconcile: rows_in={stats.rows_in} kept={stats.kept} "
            f"rejected={stats.rejected} duplicates={stats.duplicates} near_duplicates={stats.near_duplicates} "
            f"contaminated={stats.contaminated} (files: {', '.join(bad_files) or 'totals'})"
            + (f"; preference pairs {stats.pairs} of splits {stats.splits}" if stats.pairs else "")
        )


def _pairs_reconcile(stats: PrepareStats) -> bool:
    """Every kept pair is a kept row of its split, and each is one preference row (by_shape)."""
    return sum(stats.pairs.values()) == stats.by_shape.get("preference", 0) and all(
        n <= stats.splits.get(split, 0) for split, n in stats.pairs.items()
    )


def _by_file(out: Collected, rows_in: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per input file: rows_in and where each row ended (one of OUTCOMES)."""
    counts = {rel: {"rows_in": n, **dict.fromkeys(OUTCOMES, 0)} for rel, n in rows_in.items()}
    for rel, n in out.kept_by_file.items():
        counts[rel]["kept"] += n
    for rel, reasons in out.rejects.summary.by_file.items():
        counts[rel]["rejected"] += sum(reasons.values())
    for d in out.duplicates:
        counts[d["source_file"]]["duplicates" if d["kind"] == "exact" else "near_duplicates"] += 1
    for c in out.contaminated:
        counts[c["source_file"]]["contaminated"] += 1
    return counts


def by_source_entry(stats: PrepareStats, assigned: list[tuple[str, SourceSpec]]) -> list[dict]:
    """prepare_stats.json's per-source counts: each sources[] entry (and the detected rest) with its files."""
    entries: dict[int | None, dict] = {}
    for rel, spec in assigned:
        entry = entries.setdefault(
            spec.index,
            {
                "path": spec.label,
                "format": spec.format,
                "files": 0,
                "rows_in": 0,
                **dict.fromkeys(OUTCOMES, 0),
            },
        )
        entry["files"] += 1
        for key, n in stats.by_file.get(rel, {}).items():
            entry[key] += n
    out = [entries[k] for k in sorted(entries, key=lambda k: (k is None, k or 0))]
    # the synthesize stage's rows are a source too, so the entries add up to rows_in
    out += [
        {"path": rel, "format": "jsonl", "files": 1, **counts}
        for rel, counts in stats.by_file.items()
        if rel.startswith(SYNTHETIC_PREFIX)
    ]
    return out


def percentiles(values: Sequence[int]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 and max (0.0 when there are no values, so the keys are always there)."""
    if not values:
        return {**{f"p{p}": 0.0 for p in PERCENTILES}, "max": 0.0}
    ordered = sorted(values)
    n = len(ordered)
    out = {f"p{p}": float(ordered[max(0, math.ceil(p / 100 * n) - 1)]) for p in PERCENTILES}
    out["max"] = float(ordered[-1])
    return out

"""Mixing synthetic rows into the train split, by a ratio to the real train rows.

Synthetic rows only ever join train: validation and test stay real, so held-out numbers measure the
tenant's own data. At most floor(ratio * real train rows kept) synthetic rows are kept; which ones is
decided by a seeded hash of each row's content, so the choice is deterministic, does not depend on
the order of the synthetic file, and a different seed draws a different sample. Rows beyond the
quota are rejected as over_mix_ratio, so every synthetic row is still accounted for.

The drawn rows pass the same steps as the real ones (exact duplicates first, so none repeats a real
row, then control tokens, the chat template, max_tokens, decontamination and near-duplicates); they
come after every real row, so the quota is known and a real row always wins a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from loraline.prepare.collected import Collected
from loraline.prepare.first_pass import route
from loraline.prepare.readers import RawRow, read_rows
from loraline.prepare.rows import RowContext, admit_synthetic, parse_row, reject_row
from loraline.prepare.schema import Reject, RejectReason, locate
from loraline.prepare.screening import Quality, quality_batch
from loraline.prepare.shapes import Parsed
from loraline.provenance import sha256_file

SYNTHETIC_PREFIX = "synthetic:"  # by_file key and source_file of synthetic rows: never a raw file's path


def mix_synthetic(out: Collected, path: Path, ctx: RowContext, q: Quality, seed: int, rows_in: dict[str, int]) -> None:
    """Synthetic rows into train: parsed and scrubbed, drawn in seeded order, then the quality steps
    until floor(synthetic_ratio x real train rows) are kept; the rest are over_mix_ratio."""
    rel = f"{SYNTHETIC_PREFIX}{path.name}"
    rows_in[rel] = 0
    out.stats.synthetic_hash = sha256_file(path)
    drawn = _drawable_rows(out, path, rel, ctx, seed, rows_in)
    drawn.sort(key=lambda d: d[0])
    real_train = len(out.splits["train"])
    allowed = quota(real_train, ctx.params.synthetic_ratio)
    out.stats.synthetic_quota = allowed
    kept = 0
    for _, item, parsed, provenance in drawn:
        if kept >= allowed:
            out.reject(
                reject_row(
                    item,
                    parsed,
                    None,
                    RejectReason.OVER_MIX_RATIO,
                    f"beyond the mix quota: {allowed} synthetic rows for {real_train} real train rows "
                    f"(synthetic_ratio={ctx.params.synthetic_ratio})",
                )
            )
            continue
        kept += _admit(out, item, parsed, provenance, ctx, q)


def _drawable_rows(
    out: Collected, path: Path, rel: str, ctx: RowContext, seed: int, rows_in: dict[str, int]
) -> list[tuple[tuple[str, int], RawRow, Parsed, dict]]:
    """(draw key, raw row, parsed row, provenance) of every synthetic chat row with its provenance, in file
    order; the other rows are rejected, and every row read is counted in rows_in."""
    drawn = []
    for item in read_rows(path, rel, ctx.tenant, ctx.params.csv_delimiter):
        rows_in[rel] += 1
        if isinstance(item, Reject):
            out.reject(item)
            continue
        provenance = item.value.get("provenance") if isinstance(item.value, dict) else None
        if not isinstance(provenance, dict):
            out.reject(_no_provenance(item, rel, ctx))
            continue
        out.synthetic_provenance.append(provenance)
        parsed = parse_row(item, ctx)
        if isinstance(parsed, Reject):
            out.reject(parsed)
            continue
        if parsed.record.kind != "chat":
            out.reject(
                reject_row(
                    item,
                    parsed,
                    None,
                    RejectReason.UNKNOWN_SHAPE,
                    "a synthetic row must be a chat ({'messages': [...]}), not a document",
                )
            )
            continue
        drawn.append((draw_key(seed, parsed.record.content_hash, item.row), item, parsed, provenance))
    return drawn


def _no_provenance(item: RawRow, rel: str, ctx: RowContext) -> Reject:
    """A synthetic row without a provenance object: missing_field, or wrong_type when it is not an object."""
    missing = not isinstance(item.value, dict) or "provenance" not in item.value
    return Reject(
        ctx.tenant,
        rel,
        item.row,
        "provenance",
        RejectReason.MISSING_FIELD if missing else RejectReason.WRONG_TYPE,
        f"{locate(rel, item.row, 'provenance')}: a synthetic row needs its provenance object (generator, model, "
        "source)",
        item.excerpt,
    )


def _admit(out: Collected, item: RawRow, parsed: Parsed, provenance: dict, ctx: RowContext, q: Quality) -> bool:
    """One drawn row through the same steps as a real one; whether it was kept in train."""
    outcome = admit_synthetic(item, parsed, ctx)
    if not isinstance(outcome, tuple):
        route(out, outcome, q)
        return False
    _, row = outcome
    row["source"] = "synthetic"
    row["provenance"] = json.dumps({"id": item.value.get("id"), **provenance}, sort_keys=True, ensure_ascii=False)
    if quality_batch(out, [("train", row)], q)[0]:
        ctx.dedup.keep(row["id"], row["source_file"], row["row"])
        out.keep("train", row)
        return True
    return False


def quota(real_train_rows: int, ratio: float) -> int:
    """Most synthetic rows allowed next to `real_train_rows` real ones (1e-9 absorbs float error in ratio*n)."""
    return max(0, math.floor(ratio * real_train_rows + 1e-9))


def draw_key(seed: int, content_hash: str, row: int) -> tuple[str, int]:
    """Sort key of a synthetic row in the seeded draw (ties, i.e. exact duplicates: file order)."""
    return hashlib.sha256(f"{seed}\0{content_hash}".encode()).hexdigest(), row

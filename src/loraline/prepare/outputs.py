"""What the prepare stage writes for a tenant, all of it or none of it.

Output layout (everything rewritten atomically on each run):

    out_dir/dataset/         datasets.DatasetDict with train, validation and test (always all three); with
                             prepare.document_rows also {train,validation,test}_documents (document_rows.py)
    out_dir/documents/       datasets.Dataset of plain documents (text, source_file, row, content_hash, tenant)
    out_dir/duplicates.jsonl one line per dropped duplicate (kind exact or near), naming the kept original
    out_dir/contaminated.jsonl one line per train/validation row removed for overlapping a test row
    out_dir/README.md        the dataset card: sources, counts, filters and parameters, hashes
    rejected_path            one line per rejected row (written even when empty)
    stats_path               PrepareStats as JSON: counts that reconcile, splits, token percentiles, hashes
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from loraline.config import PrepareParams, TenantParams
from loraline.io import atomic_dir, write_json, write_jsonl
from loraline.layout import PREPARED_DATASET
from loraline.modelling.loading import write_tokenizer_stamp
from loraline.prepare.card import raw_file_hashes, render_card
from loraline.prepare.collected import Collected
from loraline.prepare.document_rows import document_splits
from loraline.prepare.features import DOCUMENT_FEATURES, STORE_FEATURES, written_columns
from loraline.prepare.schema import SPLITS, PrepareStats
from loraline.prepare.stores import ArrowRows, RejectSummary
from loraline.provenance import code_fingerprint, hash_tree

ENTRY = "loraline.prepare.stage"  # the stage's entry module: the card records its import closure as the code


def write_outputs(
    collected: Collected,
    params: PrepareParams,
    raw_dir: Path,
    *,
    out_dir: Path,
    rejected_path: Path,
    stats_path: Path,
    spilled_rejects: Path,
    synthetic_rows: Path | None,
    seed: int,
    progress: bool,
    tokenizer: Any = None,
    spill_dir: Path | None = None,
) -> None:
    """Every output of a tenant whose counts reconcile; `spilled_rejects` is moved to rejected_path.
    With prepare.document_rows, `tokenizer` cuts the documents into rows (streamed through `spill_dir`)."""
    stats = collected.stats
    # Rejects and stats live outside out_dir, so they are staged next to their final paths and
    # renamed only once out_dir is in place: a failure leaves all previous outputs as they were.
    staged = {path: path.with_name(f".{path.name}.staged-{os.getpid()}") for path in (rejected_path, stats_path)}
    try:
        with atomic_dir(out_dir) as tmp, _quiet_datasets(not progress):
            documents = _dataset(collected, "documents")
            long_rows = (
                document_splits(documents, tokenizer, params.document_rows, params.split, spill_dir)
                if params.document_rows
                else {}
            )
            stats.document_rows = {name: len(ds) for name, ds in long_rows.items()}
            splits = datasets.DatasetDict({s: _dataset(collected, s) for s in SPLITS} | long_rows)
            # An empty dataset is saved with zero shards by default, which load_from_disk cannot read back.
            splits.save_to_disk(str(tmp / PREPARED_DATASET), num_shards={s: _shards(ds) for s, ds in splits.items()})
            write_tokenizer_stamp(tmp / PREPARED_DATASET, stats.tokenizer_hash, stats.tokenizer)
            documents.save_to_disk(str(tmp / "documents"), num_shards=_shards(documents))
            write_jsonl(tmp / "duplicates.jsonl", collected.duplicates)
            write_jsonl(tmp / "contaminated.jsonl", collected.contaminated)
            has_synthetic = synthetic_rows is not None and Path(synthetic_rows).is_file()
            card = render_card(
                stats,
                params,
                raw_files=raw_file_hashes(raw_dir, stats.by_file),
                synthetic_file=Path(synthetic_rows).name if has_synthetic else None,
                synthetic_provenance=collected.synthetic_provenance,
                dataset_hash=hash_tree(tmp / PREPARED_DATASET),
                code=code_fingerprint(ENTRY),
                seed=seed,
            )
            (tmp / "README.md").write_text(card, encoding="utf-8")
            write_json(staged[stats_path], stats.to_dict())
            rejected_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(spilled_rejects, staged[rejected_path])  # the spill folder may be on another file system
        for final, temporary in staged.items():  # stats.json, the stage's metric, last
            os.replace(temporary, final)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)


def no_rows_message(
    stats: PrepareStats, rejects: RejectSummary, tenant_params: TenantParams, rejected_path: Path
) -> str:
    """Why a tenant has no dataset: each file's rejects by reason, and its first reject."""
    name, raw_dir = tenant_params.name, tenant_params.raw_dir
    lines = [f"tenant {name!r}: no valid row in {raw_dir}; every row was rejected or a duplicate:"]
    for rel, counts in stats.by_file.items():
        reasons = rejects.by_file.get(rel, Counter())
        summary = ", ".join(f"{reason} x{n}" for reason, n in sorted(reasons.items())) or "no rows"
        first = rejects.first.get(rel)
        lines.append(f"  {rel}: {counts['rows_in']} rows ({summary})" + (f"; first: {first}" if first else ""))
    lines.append(f"every rejected row is listed in {rejected_path}")
    return "\n".join(lines)


def _dataset(out: Collected, name: str) -> datasets.Dataset:
    """One split (or the documents) as a Dataset: memory-mapped from its Arrow file, or from the list."""
    store = out.documents if name == "documents" else out.splits[name]
    features = DOCUMENT_FEATURES if name == "documents" else written_columns(out.has_pairs)
    if isinstance(store, ArrowRows):
        ds = _only(store.dataset(), features)
    else:
        ds = datasets.Dataset.from_dict({col: [r[col] for r in store] for col in features}, features=features)
    # The fingerprint lands in state.json; it is random for in-memory data in some datasets releases,
    # so one derived from the tenant and the rows keeps saved datasets byte-identical across runs.
    digest = out.dataset_digest[name].copy()
    digest.update(f"{out.stats.tenant}/{name}/{out.stats.tokenizer_hash}".encode())
    ds._fingerprint = digest.hexdigest()[:16]
    return ds


def _only(ds: datasets.Dataset, features: datasets.Features) -> datasets.Dataset:
    """The stored rows with only the columns written (STORE_FEATURES less those a tenant without pairs
    lacks), saved with the same bytes as rows stored with just those columns: remove_columns would list
    the remaining format columns sorted, so their order is restored."""
    dropped = [name for name in STORE_FEATURES if name in ds.column_names and name not in features]
    if not dropped:
        return ds
    columns = ds._format_columns
    ds = ds.remove_columns(dropped)
    ds._format_columns = None if columns is None else [c for c in columns if c in features]
    return ds


def _shards(ds: datasets.Dataset, max_shard_bytes: int = 500 << 20) -> int:
    return max(1, math.ceil((ds.data.nbytes or 0) / max_shard_bytes))


@contextlib.contextmanager
def _quiet_datasets(quiet: bool) -> Iterator[None]:
    was_enabled = datasets.utils.are_progress_bars_disabled() is False
    if quiet and was_enabled:
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and was_enabled:
            datasets.utils.enable_progress_bars()

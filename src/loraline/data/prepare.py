"""The prepare stage for one tenant: raw folder to a split, chat-templated, completion-masked dataset.

Output layout (everything rewritten atomically on each run):

    out_dir/dataset/         datasets.DatasetDict with train, validation and test (always all three)
    out_dir/documents/       datasets.Dataset of plain documents (text, source_file, row, content_hash, tenant)
    out_dir/duplicates.jsonl one line per dropped duplicate, naming the kept original
    rejected_path            one line per rejected row (written even when empty)
    stats_path               PrepareStats as JSON: counts that reconcile, splits, token percentiles, hashes

Documents are not split: they are unlabelled text (for continued pretraining or retrieval), not
answers to evaluate, so they live in their own dataset; they still count as kept.
Each row is checked in order: read, shape, max_chars, duplicate of a kept row, control tokens,
render, max_tokens. A duplicate is only ever a duplicate of a kept row, so every row of
duplicates.jsonl points at a row of the dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from loraline.config import PrepareParams, TenantParams
from loraline.data.readers import RawRow, has_surrogates, list_files, read_rows
from loraline.data.render import (
    check_tokenizer,
    control_tokens,
    find_control_token,
    render,
    tokenizer_hash,
    tokenizer_name,
)
from loraline.data.schema import (
    SPLITS,
    ChatTemplateError,
    PrepareError,
    PrepareStats,
    Reject,
    RejectReason,
    locate,
    top_field,
)
from loraline.data.shapes import Parsed, to_record
from loraline.data.split import Deduplicator, split_of
from loraline.io import atomic_dir, write_json, write_jsonl
from loraline.provenance import hash_tree

CHAT_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "tenant": datasets.Value("string"),
        "source_file": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "shape": datasets.Value("string"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "text": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "n_tokens": datasets.Value("int32"),
        "n_answer_tokens": datasets.Value("int32"),
    }
)
DOCUMENT_FEATURES = datasets.Features(
    {
        "text": datasets.Value("string"),
        "source_file": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "content_hash": datasets.Value("string"),
        "tenant": datasets.Value("string"),
    }
)
PERCENTILES = (50, 90, 99)


@dataclass
class PrepareResult:
    stats: PrepareStats
    out_dir: Path
    dataset_dir: Path
    documents_dir: Path
    duplicates_path: Path
    rejected_path: Path
    stats_path: Path


@dataclass
class Collected:
    """Everything prepare writes, held in memory so counts can be checked before anything is written."""

    stats: PrepareStats
    splits: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    documents: list[dict] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)


def prepare_tenant(
    tenant: TenantParams,
    params: PrepareParams,
    tokenizer,
    *,
    out_dir: Path,
    rejected_path: Path,
    stats_path: Path,
    system_prompt: str | None = None,
    progress: bool = False,
) -> PrepareResult:
    """Prepare one tenant's raw folder. `system_prompt` defaults to the tenant's, then prepare's.

    Raises PrepareError (naming the files) when no row is usable; the rejects are still written so
    they can be inspected. Raises ChatTemplateError when the tokenizer's template cannot be masked.
    """
    out_dir, rejected_path, stats_path = Path(out_dir), Path(rejected_path), Path(stats_path)
    collected = collect(tenant, params, tokenizer, system_prompt=system_prompt, progress=progress)
    stats = collected.stats
    if stats.kept == 0:
        write_jsonl(rejected_path, [r.to_dict() for r in collected.rejects])
        raise PrepareError(_no_rows_message(stats, collected.rejects, tenant, rejected_path))
    # Rejects and stats live outside out_dir, so they are staged next to their final paths and
    # renamed only once out_dir is in place: a failure leaves all previous outputs as they were.
    staged = {path: path.with_name(f".{path.name}.staged-{os.getpid()}") for path in (rejected_path, stats_path)}
    try:
        with atomic_dir(out_dir) as tmp, _quiet_datasets(not progress):
            splits = datasets.DatasetDict({s: _dataset(collected.splits[s], CHAT_FEATURES, stats, s) for s in SPLITS})
            # An empty dataset is saved with zero shards by default, which load_from_disk cannot read back.
            splits.save_to_disk(str(tmp / "dataset"), num_shards={s: _shards(ds) for s, ds in splits.items()})
            documents = _dataset(collected.documents, DOCUMENT_FEATURES, stats, "documents")
            documents.save_to_disk(str(tmp / "documents"), num_shards=_shards(documents))
            write_jsonl(tmp / "duplicates.jsonl", collected.duplicates)
            write_jsonl(staged[rejected_path], [r.to_dict() for r in collected.rejects])
            write_json(staged[stats_path], stats.to_dict())
        for final, temporary in staged.items():  # stats.json, the stage's metric, last
            os.replace(temporary, final)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
    return PrepareResult(
        stats=stats,
        out_dir=out_dir,
        dataset_dir=out_dir / "dataset",
        documents_dir=out_dir / "documents",
        duplicates_path=out_dir / "duplicates.jsonl",
        rejected_path=rejected_path,
        stats_path=stats_path,
    )


def collect(
    tenant: TenantParams,
    params: PrepareParams,
    tokenizer,
    *,
    system_prompt: str | None = None,
    progress: bool = False,
) -> Collected:
    """Read, validate, deduplicate, render and split every row of the tenant, in memory."""
    raw_dir = Path(tenant.raw_dir)
    if not raw_dir.is_dir():
        raise PrepareError(f"tenant {tenant.name!r}: raw folder {raw_dir} does not exist (tenants[].raw_dir in params.yaml)")
    files = list_files(raw_dir)
    if not files:
        raise PrepareError(f"tenant {tenant.name!r}: raw folder {raw_dir} holds no files (hidden files are skipped)")
    check_tokenizer(tokenizer)
    if system_prompt is None:
        system_prompt = tenant.system_prompt if tenant.system_prompt is not None else params.system_prompt

    stats = PrepareStats(tenant=tenant.name)
    out = Collected(stats=stats)
    stats.by_file = {rel: {"rows_in": 0, "kept": 0, "rejected": 0, "duplicates": 0} for _, rel in files}
    ctx = _Context(tenant.name, params, tokenizer, system_prompt, Deduplicator(), control_tokens(tokenizer))
    for path, rel in tqdm(files, desc=f"prepare {tenant.name}", unit="file", disable=not progress):
        for item in read_rows(path, rel, tenant.name, params.csv_delimiter):
            _tally(out, rel, _process(item, ctx))

    _summarize(out, raw_dir, tokenizer)
    return out


@dataclass(frozen=True)
class _Context:
    tenant: str
    params: PrepareParams
    tokenizer: object
    system_prompt: str | None
    dedup: Deduplicator
    controls: tuple[str, ...]


Kept = tuple[str, dict]  # ("train" | "validation" | "test" | "document", the dataset row)


def _process(item: RawRow | Reject, ctx: _Context) -> Reject | dict | Kept:
    """One raw row to a Reject, a duplicates.jsonl entry (a dict) or a Kept row."""
    if isinstance(item, Reject):
        return item
    tenant, params, tokenizer, dedup = ctx.tenant, ctx.params, ctx.tokenizer, ctx.dedup
    system_prompt = ctx.system_prompt
    parsed = to_record(item, tenant, max_chars=params.max_chars, system_prompt=system_prompt)
    if isinstance(parsed, Reject):
        return parsed
    record = parsed.record
    duplicate = dedup.duplicate(record.content_hash, record.source_file, record.row)
    if duplicate is not None:
        return duplicate
    texts = [record.text] if record.kind == "document" else [m.content for m in record.messages]
    found = find_control_token(texts, ctx.controls)
    if found is not None:
        index, token = found
        return _reject(item, parsed, parsed.fields[index], RejectReason.CONTROL_TOKEN,
                       f"contains the tokenizer's control token {token!r}, which would be read as template markup")
    if record.kind == "document":
        dedup.keep(record.content_hash, record.source_file, record.row)
        return "document", {
            "text": record.text, "source_file": record.source_file, "row": record.row,
            "content_hash": record.content_hash, "tenant": tenant,
        }
    try:
        rendered = render(record.messages, tokenizer)
    except ChatTemplateError as exc:
        raise ChatTemplateError(f"{locate(record.source_file, record.row)}: {exc}") from exc
    if rendered.n_tokens > params.max_tokens:
        return _reject(item, parsed, None, RejectReason.TOO_LONG,
                       f"renders to {rendered.n_tokens} tokens with the chat template (prepare.max_tokens={params.max_tokens})")
    dedup.keep(record.content_hash, record.source_file, record.row)
    return split_of(record.content_hash, params.split), {
        "id": record.content_hash,
        "tenant": tenant,
        "source_file": record.source_file,
        "row": record.row,
        "shape": record.shape,
        "messages": [{"role": m.role, "content": m.content} for m in record.messages],
        "text": rendered.text,
        "input_ids": rendered.input_ids,
        "labels": rendered.labels,
        "n_tokens": rendered.n_tokens,
        "n_answer_tokens": rendered.n_answer_tokens,
    }


def _reject(raw: RawRow, parsed: Parsed, path: str | None, reason: RejectReason, message: str) -> Reject:
    rec = parsed.record
    return Reject(rec.tenant, rec.source_file, rec.row, top_field(path), reason,
                  f"{locate(rec.source_file, rec.row, path)}: {message}", raw.excerpt)


def _tally(out: Collected, rel: str, outcome) -> None:
    counts = out.stats.by_file[rel]
    counts["rows_in"] += 1
    if isinstance(outcome, Reject):
        counts["rejected"] += 1
        out.rejects.append(outcome)
    elif isinstance(outcome, dict):
        counts["duplicates"] += 1
        out.duplicates.append(outcome)
    else:
        counts["kept"] += 1
        where, row = outcome
        (out.documents if where == "document" else out.splits[where]).append(row)


def _summarize(out: Collected, raw_dir: Path, tokenizer) -> None:
    stats = out.stats
    rows = [r for s in SPLITS for r in out.splits[s]]
    stats.rows_in = sum(c["rows_in"] for c in stats.by_file.values())
    stats.rejected = len(out.rejects)
    stats.duplicates = len(out.duplicates)
    stats.documents = len(out.documents)
    stats.kept = len(rows) + stats.documents
    by_reason = Counter(r.reason.value for r in out.rejects)
    stats.rejected_by_reason = {reason.value: by_reason.get(reason.value, 0) for reason in RejectReason}
    shapes = Counter(r["shape"] for r in rows)
    if out.documents:
        shapes["document"] = stats.documents
    stats.by_shape = dict(sorted(shapes.items()))
    stats.splits = {s: len(out.splits[s]) for s in SPLITS}
    stats.token_length_percentiles = percentiles([r["n_tokens"] for r in rows])
    stats.answer_token_percentiles = percentiles([r["n_answer_tokens"] for r in rows])
    stats.tokenizer = tokenizer_name(tokenizer)
    stats.tokenizer_hash = tokenizer_hash(tokenizer)
    # provenance.hash_tree cannot encode file names that are not UTF-8; those files are rejected as
    # invalid_utf8 anyway, so the hash covers every file that could contribute a row.
    undecodable = tuple(
        rel for rel in (p.relative_to(raw_dir).as_posix() for p in raw_dir.rglob("*") if p.is_file()) if has_surrogates(rel)
    )
    stats.data_hash = hash_tree(raw_dir, exclude=undecodable)
    # Checked in code, not by assert (stripped under -O): counts that do not add up mean a row was lost.
    bad_files = [rel for rel, c in stats.by_file.items() if c["rows_in"] != c["kept"] + c["rejected"] + c["duplicates"]]
    if not stats.reconciles or bad_files:
        raise RuntimeError(
            f"tenant {stats.tenant!r}: counts do not reconcile: rows_in={stats.rows_in} kept={stats.kept} "
            f"rejected={stats.rejected} duplicates={stats.duplicates} (files: {', '.join(bad_files) or 'totals'})"
        )


def percentiles(values: list[int]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 and max (0.0 when there are no values, so the keys are always there)."""
    if not values:
        return {**{f"p{p}": 0.0 for p in PERCENTILES}, "max": 0.0}
    ordered = sorted(values)
    n = len(ordered)
    out = {f"p{p}": float(ordered[max(0, math.ceil(p / 100 * n) - 1)]) for p in PERCENTILES}
    out["max"] = float(ordered[-1])
    return out


def _dataset(rows: list[dict], features: datasets.Features, stats: PrepareStats, name: str) -> datasets.Dataset:
    columns = {col: [r[col] for r in rows] for col in features}
    ds = datasets.Dataset.from_dict(columns, features=features)
    # The fingerprint lands in state.json; some datasets releases make it random for in-memory data,
    # so a content-derived one keeps saved datasets byte-identical across runs.
    digest = hashlib.sha256(json.dumps([stats.tenant, name, rows], sort_keys=True, ensure_ascii=False).encode())
    ds._fingerprint = digest.hexdigest()[:16]
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


def _no_rows_message(stats: PrepareStats, rejects: list[Reject], tenant: TenantParams, rejected_path: Path) -> str:
    lines = [f"tenant {tenant.name!r}: no valid row in {tenant.raw_dir}; every row was rejected or a duplicate:"]
    for rel, counts in stats.by_file.items():
        reasons = Counter(r.reason.value for r in rejects if r.source_file == rel)
        summary = ", ".join(f"{reason} x{n}" for reason, n in sorted(reasons.items())) or "no rows"
        first = next((r.detail for r in rejects if r.source_file == rel), None)
        lines.append(f"  {rel}: {counts['rows_in']} rows ({summary})" + (f"; first: {first}" if first else ""))
    lines.append(f"every rejected row is listed in {rejected_path}")
    return "\n".join(lines)

"""The prepare stage for one tenant: raw folder to a split, chat-templated, completion-masked dataset.

Output layout (everything rewritten atomically on each run):

    out_dir/dataset/         datasets.DatasetDict with train, validation and test (always all three)
    out_dir/documents/       datasets.Dataset of plain documents (text, source_file, row, content_hash, tenant)
    out_dir/duplicates.jsonl one line per dropped duplicate (kind exact or near), naming the kept original
    out_dir/contaminated.jsonl one line per train/validation row removed for overlapping a test row
    out_dir/README.md        the dataset card: sources, counts, filters and parameters, hashes
    rejected_path            one line per rejected row (written even when empty)
    stats_path               PrepareStats as JSON: counts that reconcile, splits, token percentiles, hashes

Documents are not split: they are unlabelled text (for continued pretraining or retrieval), not
answers to evaluate, so they live in their own dataset; they still count as kept.
Each row is checked in order: read, shape, max_chars, PII, duplicate of a kept row, control tokens,
render, max_tokens, then (across rows) decontamination and near-duplicates; synthetic rows (train
only) follow the real ones, drawn in a seeded order, until the mix quota is reached. A duplicate is
only ever a duplicate of a kept row, so every row of duplicates.jsonl points at a row of the dataset.
Every input row ends kept, rejected (with a reason), a duplicate, a near-duplicate or contaminated,
and the counts are checked to add up before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from loraline.config import PrepareParams, TenantParams
from loraline.data.controls import text_cleaner
from loraline.data.mapping import DETECTED, SourceSpec, assign, compile_sources, map_rows
from loraline.data.readers import RawRow, has_surrogates, list_files, read_rows
from loraline.data.render import (
    check_tokenizer,
    control_tokens,
    find_control_token,
    render,
    tokenizer_hash,
    tokenizer_name,
)
from loraline.data.card import raw_file_hashes, render_card
from loraline.data.quality import row_text
from loraline.data.quality.decontam import TestIndex
from loraline.data.quality.mix import draw_key, quota
from loraline.data.quality.near_dup import NearDuplicateIndex
from loraline.data.quality.pii import PII_TYPES, PiiScrubber
from loraline.data.schema import (
    SPLITS,
    ChatTemplateError,
    Message,
    PrepareError,
    PrepareStats,
    Reject,
    RejectReason,
    locate,
    top_field,
)
from loraline.data.shapes import NO_OPTIONS, Parsed, ShapeOptions, to_record
from loraline.data.split import Deduplicator, content_hash, split_of
from loraline.io import atomic_dir, write_json, write_jsonl
from loraline.provenance import code_revision, hash_tree, sha256_file

CHAT_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "tenant": datasets.Value("string"),
        "source_file": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "shape": datasets.Value("string"),
        "source": datasets.Value("string"),  # "real" or "synthetic"
        "provenance": datasets.Value("string"),  # JSON: a synthetic row's generator, model, source span...; "null" for real rows
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
CODE_ROOT = Path(__file__).resolve().parents[3]  # the checkout holding src/loraline, for the card's code revision


@dataclass
class PrepareResult:
    stats: PrepareStats
    out_dir: Path
    dataset_dir: Path
    documents_dir: Path
    duplicates_path: Path
    rejected_path: Path
    stats_path: Path
    contaminated_path: Path
    card_path: Path


@dataclass
class Collected:
    """Everything prepare writes, held in memory so counts can be checked before anything is written."""

    stats: PrepareStats
    splits: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    documents: list[dict] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)  # exact and near (kind), each naming its kept original
    contaminated: list[dict] = field(default_factory=list)
    synthetic_provenance: list[dict] = field(default_factory=list)  # of every synthetic row read, for the card


def prepare_tenant(
    tenant: TenantParams,
    params: PrepareParams,
    tokenizer,
    *,
    out_dir: Path,
    rejected_path: Path,
    stats_path: Path,
    system_prompt: str | None = None,
    synthetic_rows: Path | None = None,
    progress: bool = False,
) -> PrepareResult:
    """Prepare one tenant's raw folder. `system_prompt` defaults to the tenant's, then prepare's.

    `synthetic_rows` is the synthesize stage's rows.jsonl; when it does not exist there are no
    synthetic rows (so prepare works before that stage has run).

    Raises PrepareError (naming the files) when no row is usable; the rejects are still written so
    they can be inspected. Raises ChatTemplateError when the tokenizer's template cannot be masked.
    """
    out_dir, rejected_path, stats_path = Path(out_dir), Path(rejected_path), Path(stats_path)
    collected = collect(
        tenant, params, tokenizer, system_prompt=system_prompt, synthetic_rows=synthetic_rows, progress=progress
    )
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
            write_jsonl(tmp / "contaminated.jsonl", collected.contaminated)
            has_synthetic = synthetic_rows is not None and Path(synthetic_rows).is_file()
            card = render_card(
                stats, params,
                raw_files=raw_file_hashes(Path(tenant.raw_dir), stats.by_file),
                synthetic_file=Path(synthetic_rows).name if has_synthetic else None,
                synthetic_provenance=collected.synthetic_provenance,
                dataset_hash=hash_tree(tmp / "dataset"),
                code_revision=code_revision(CODE_ROOT),
                seed=params.seed if params.seed is not None else DEFAULT_SEED,
            )
            (tmp / "README.md").write_text(card, encoding="utf-8")
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
        contaminated_path=out_dir / "contaminated.jsonl",
        card_path=out_dir / "README.md",
    )


def collect(
    tenant: TenantParams,
    params: PrepareParams,
    tokenizer,
    *,
    system_prompt: str | None = None,
    synthetic_rows: Path | None = None,
    progress: bool = False,
) -> Collected:
    """Read, scrub, deduplicate, decontaminate, render, split and mix every row of the tenant, in memory.

    Order: real rows stream through _process (read, shape, max_chars, PII, exact duplicate, control
    tokens, render, max_tokens); then decontamination against the test split, then near-duplicates,
    both in that stable order; then the synthetic rows, in their seeded draw, through the same steps
    until the mix quota is reached.
    """
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
    rows_in = {rel: 0 for _, rel in files}
    seed = params.seed if params.seed is not None else DEFAULT_SEED
    scrubber = PiiScrubber(params.pii.types) if params.pii.mode != "off" else None
    controls = control_tokens(tokenizer)
    ctx = _Context(tenant.name, params, tokenizer, system_prompt, Deduplicator(), controls, scrubber,
                   options=_options(DETECTED, params, controls, tokenizer))
    candidates: list[Kept] = []
    assigned = assign(files, compile_sources(tenant.sources))
    for path, rel, spec in tqdm(assigned, desc=f"prepare {tenant.name}", unit="file", disable=not progress):
        source_ctx = replace(ctx, options=_options(spec, params, controls, tokenizer))
        rows = read_rows(path, rel, tenant.name, params.csv_delimiter, spec.format, whole_object=spec.explode is not None)
        for item in map_rows(rows, spec, tenant.name):
            rows_in[rel] += 1
            _route(out, _process(item, source_ctx), candidates)

    q = _Quality(
        TestIndex(params.decontamination) if params.decontamination.enabled else None,
        NearDuplicateIndex(params.near_dedup, seed=seed) if params.near_dedup.enabled else None,
    )
    for split, row in candidates:
        if split == "test":
            q.test_at.setdefault(row["id"], (row["source_file"], row["row"]))
            if q.test_index is not None:
                q.test_index.add(row["id"], row_text(row["messages"]))
    for split, row in candidates:
        if _quality(out, split, row, q):
            out.splits[split].append(row)

    if synthetic_rows is not None and Path(synthetic_rows).is_file():
        _mix_synthetic(out, Path(synthetic_rows), ctx, q, seed, rows_in)
    _follow_removed_originals(out)
    if scrubber is not None:  # rejects quote the raw row: PII must not survive there either
        out.rejects = [
            replace(r, detail=scrubber.scrub(r.detail)[0], excerpt=scrubber.scrub(r.excerpt)[0]) for r in out.rejects
        ]
    stats.pii = {kind: ctx.pii.get(kind, 0) for kind in sorted(PII_TYPES)}
    stats.pii_rows = ctx.pii_rows[0]
    _summarize(out, raw_dir, tokenizer, rows_in)
    stats.sources = _by_source_entry(stats, [(rel, spec) for _, rel, spec in assigned])
    return out


def _options(spec: SourceSpec, params: PrepareParams, controls: tuple[str, ...], tokenizer) -> ShapeOptions:
    """A source's shape options: its roles and origins, and the text cleaner of its control-token policy."""
    policy = (spec.params.control_tokens if spec.params is not None else None) or params.control_tokens
    return spec.options(text_cleaner(policy, controls, tokenizer))


def _by_source_entry(stats: PrepareStats, assigned: list[tuple[str, SourceSpec]]) -> list[dict]:
    """prepare_stats.json's per-source counts: each sources[] entry (and the detected rest) with its files."""
    entries: dict[int | None, dict] = {}
    for rel, spec in assigned:
        entry = entries.setdefault(spec.index, {
            "path": spec.label, "format": spec.format, "files": 0, "rows_in": 0, **{k: 0 for k in OUTCOMES},
        })
        entry["files"] += 1
        for key, n in stats.by_file.get(rel, {}).items():
            entry[key] += n
    return [entries[k] for k in sorted(entries, key=lambda k: (k is None, k or 0))]


DEFAULT_SEED = 1234  # Params.seed's default, for callers passing a PrepareParams without prepare_for()


@dataclass(frozen=True)
class _Context:
    tenant: str
    params: PrepareParams
    tokenizer: object
    system_prompt: str | None
    dedup: Deduplicator
    controls: tuple[str, ...]
    scrubber: PiiScrubber | None = None
    options: ShapeOptions = NO_OPTIONS  # the source's roles, origins and control-token cleaner
    pii: Counter = field(default_factory=Counter)
    pii_rows: list[int] = field(default_factory=lambda: [0])


Kept = tuple[str, dict]  # ("train" | "validation" | "test" | "document", the dataset row)


def _process(item: RawRow | Reject, ctx: _Context) -> Reject | dict | Kept:
    """One raw row to a Reject, a duplicates.jsonl entry (a dict) or a Kept row."""
    if isinstance(item, Reject):
        return item
    parsed = _parse(item, ctx)
    if isinstance(parsed, Reject):
        return parsed
    return _admit(item, parsed, ctx)


def _parse(item: RawRow, ctx: _Context) -> Parsed | Reject:
    """Shape and max_chars, then PII: masked rows get the content hash of their masked content, so
    that exact deduplication and the split see what the dataset holds."""
    parsed = to_record(item, ctx.tenant, max_chars=ctx.params.max_chars, system_prompt=ctx.system_prompt, options=ctx.options)
    if isinstance(parsed, Reject) or ctx.scrubber is None:
        return parsed
    record = parsed.record
    found: Counter = Counter()
    if record.kind == "document":
        text, found = ctx.scrubber.scrub(record.text)
        scrubbed = replace(record, text=text, content_hash=content_hash([("document", text)]))
    else:
        messages = []
        for m in record.messages:
            text, counts = ctx.scrubber.scrub(m.content)
            found.update(counts)
            messages.append(Message(m.role, text))
        scrubbed = replace(
            record, messages=tuple(messages), content_hash=content_hash((m.role, m.content) for m in messages)
        )
    if not found:
        return parsed
    ctx.pii.update(found)
    ctx.pii_rows[0] += 1
    if ctx.params.pii.mode == "drop":
        kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(found.items()))
        return _reject(item, parsed, None, RejectReason.PII, f"holds PII ({kinds}); prepare.pii.mode=drop")
    return Parsed(scrubbed, parsed.fields)


def _admit(item: RawRow, parsed: Parsed, ctx: _Context, *, keep: bool = True, split: str | None = None) -> Reject | dict | Kept:
    """Exact duplicate, control tokens, render, max_tokens. keep=False leaves remembering the row as
    kept to the caller (synthetic rows still face later steps that may drop them)."""
    tenant, params, tokenizer, dedup = ctx.tenant, ctx.params, ctx.tokenizer, ctx.dedup
    record = parsed.record
    duplicate = dedup.duplicate(record.content_hash, record.source_file, record.row)
    if duplicate is not None:
        return duplicate
    texts = [record.text] if record.kind == "document" else [m.content for m in record.messages]
    found = find_control_token(texts, ctx.controls)
    if found is not None:
        index, token = found
        return _reject(item, parsed, parsed.fields[index], RejectReason.CONTROL_TOKEN,
                       f"contains the tokenizer's control token {token!r}, which would be read as template markup "
                       "(control_tokens: escape keeps it as literal text; strip removes end-of-text markers at the ends)")
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
    if keep:
        dedup.keep(record.content_hash, record.source_file, record.row)
    return split or split_of(record.content_hash, params.split), {
        "id": record.content_hash,
        "tenant": tenant,
        "source_file": record.source_file,
        "row": record.row,
        "shape": record.shape,
        "source": "real",
        "provenance": "null",
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
                  f"{locate(rec.source_file, rec.row, path, raw.item)}: {message}", raw.excerpt)


def _route(out: Collected, outcome, candidates: list[Kept]) -> None:
    if isinstance(outcome, Reject):
        out.rejects.append(outcome)
    elif isinstance(outcome, dict):
        out.duplicates.append({**outcome, "kind": "exact"})
    elif outcome[0] == "document":
        out.documents.append(outcome[1])
    else:
        candidates.append(outcome)


@dataclass
class _Quality:
    """The state of the steps that look across rows: the test split's n-grams and the kept rows' MinHashes."""

    test_index: TestIndex | None
    near: NearDuplicateIndex | None
    kept_at: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (source_file, row) of kept chat rows
    test_at: dict[str, tuple[str, int]] = field(default_factory=dict)  # the same for test rows


def _quality(out: Collected, split: str, row: dict, q: _Quality) -> bool:
    """Decontamination (train/validation only) then near-duplicates; True when the row is kept."""
    text = row_text(row["messages"])
    if q.test_index is not None and split != "test":
        hit = q.test_index.match(text)
        if hit is not None:
            test_file, test_row = q.test_at[hit.test_key]
            out.contaminated.append({
                "id": row["id"], "source_file": row["source_file"], "row": row["row"], "split": split,
                "source": row["source"], "matched_test_id": hit.test_key, "matched_test_file": test_file,
                "matched_test_row": test_row, "overlap": hit.overlap,
            })
            return False
    if q.near is not None:
        match = q.near.check(row["id"], text)
        if match is not None:
            kept_file, kept_row = q.kept_at[match.kept_key]
            out.duplicates.append({
                "source_file": row["source_file"], "row": row["row"], "duplicate_of_file": kept_file,
                "duplicate_of_row": kept_row, "content_hash": row["id"], "kind": "near",
                "duplicate_of_id": match.kept_key, "jaccard": match.jaccard,
            })
            return False
    q.kept_at.setdefault(row["id"], (row["source_file"], row["row"]))
    return True


def _mix_synthetic(out: Collected, path: Path, ctx: _Context, q: _Quality, seed: int, rows_in: dict[str, int]) -> None:
    """Synthetic rows into train: parsed and scrubbed, drawn in seeded order, then the quality steps
    until floor(synthetic_ratio x real train rows) are kept; the rest are over_mix_ratio."""
    rel = f"{SYNTHETIC_PREFIX}{path.name}"
    rows_in[rel] = 0
    out.stats.synthetic_hash = sha256_file(path)
    drawn = []
    for item in read_rows(path, rel, ctx.tenant, ctx.params.csv_delimiter):
        rows_in[rel] += 1
        if isinstance(item, Reject):
            out.rejects.append(item)
            continue
        provenance = item.value.get("provenance") if isinstance(item.value, dict) else None
        if not isinstance(provenance, dict):
            missing = not isinstance(item.value, dict) or "provenance" not in item.value
            reason = RejectReason.MISSING_FIELD if missing else RejectReason.WRONG_TYPE
            out.rejects.append(Reject(
                ctx.tenant, rel, item.row, "provenance", reason,
                f"{locate(rel, item.row, 'provenance')}: a synthetic row needs its provenance object (generator, model, source)",
                item.excerpt,
            ))
            continue
        out.synthetic_provenance.append(provenance)
        parsed = _parse(item, ctx)
        if isinstance(parsed, Reject):
            out.rejects.append(parsed)
            continue
        if parsed.record.kind != "chat":
            out.rejects.append(_reject(item, parsed, None, RejectReason.UNKNOWN_SHAPE,
                                       "a synthetic row must be a chat ({'messages': [...]}), not a document"))
            continue
        drawn.append((draw_key(seed, parsed.record.content_hash, item.row), item, parsed, provenance))
    drawn.sort(key=lambda d: d[0])
    real_train = len(out.splits["train"])
    allowed = quota(real_train, ctx.params.synthetic_ratio)
    out.stats.synthetic_quota = allowed
    kept = 0
    for _, item, parsed, provenance in drawn:
        if kept >= allowed:
            out.rejects.append(_reject(
                item, parsed, None, RejectReason.OVER_MIX_RATIO,
                f"beyond the mix quota: {allowed} synthetic rows for {real_train} real train rows "
                f"(synthetic_ratio={ctx.params.synthetic_ratio})",
            ))
            continue
        outcome = _admit(item, parsed, ctx, keep=False, split="train")
        if not isinstance(outcome, tuple):
            _route(out, outcome, [])
            continue
        _, row = outcome
        row["source"] = "synthetic"
        row["provenance"] = json.dumps({"id": item.value.get("id"), **provenance}, sort_keys=True, ensure_ascii=False)
        if _quality(out, "train", row, q):
            ctx.dedup.keep(row["id"], row["source_file"], row["row"])
            out.splits["train"].append(row)
            kept += 1


SYNTHETIC_PREFIX = "synthetic:"  # by_file key and source_file of synthetic rows: never a raw file's path


def _follow_removed_originals(out: Collected) -> None:
    """An exact duplicate of a row that decontamination or near-dedup removed shares its fate: it
    becomes contaminated (same overlap) or a near-duplicate of the same kept row. So every entry of
    duplicates.jsonl points at a row of the dataset."""
    contaminated = {c["id"]: c for c in out.contaminated}
    near = {d["content_hash"]: d for d in out.duplicates if d["kind"] == "near"}
    duplicates = []
    for d in out.duplicates:
        original = d["content_hash"]
        if d["kind"] == "exact" and original in contaminated:
            c = contaminated[original]
            out.contaminated.append({**c, "source_file": d["source_file"], "row": d["row"]})
        elif d["kind"] == "exact" and original in near:
            n = near[original]
            duplicates.append({**n, "source_file": d["source_file"], "row": d["row"]})
        else:
            duplicates.append(d)
    out.duplicates = duplicates


def _summarize(out: Collected, raw_dir: Path, tokenizer, rows_in: dict[str, int]) -> None:
    stats = out.stats
    rows = [r for s in SPLITS for r in out.splits[s]]
    stats.rows_in = sum(rows_in.values())
    stats.rejected = len(out.rejects)
    stats.duplicates = sum(1 for d in out.duplicates if d["kind"] == "exact")
    stats.near_duplicates = sum(1 for d in out.duplicates if d["kind"] == "near")
    stats.contaminated = len(out.contaminated)
    stats.documents = len(out.documents)
    stats.kept = len(rows) + stats.documents
    by_reason = Counter(r.reason.value for r in out.rejects)
    stats.rejected_by_reason = {reason.value: by_reason.get(reason.value, 0) for reason in RejectReason}
    shapes = Counter(r["shape"] for r in rows)
    if out.documents:
        shapes["document"] = stats.documents
    stats.by_shape = dict(sorted(shapes.items()))
    stats.splits = {s: len(out.splits[s]) for s in SPLITS}
    stats.by_file = _by_file(out, rows, rows_in)
    synthetic_in = sum(n for rel, n in rows_in.items() if rel.startswith(SYNTHETIC_PREFIX))
    synthetic_kept = sum(1 for r in rows if r["source"] == "synthetic")
    stats.by_source = {
        "real": {"rows_in": stats.rows_in - synthetic_in, "kept": stats.kept - synthetic_kept},
        "synthetic": {"rows_in": synthetic_in, "kept": synthetic_kept},
    }
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
    bad_files = [rel for rel, c in stats.by_file.items() if c["rows_in"] != sum(c[k] for k in OUTCOMES)]
    if not stats.reconciles or bad_files:
        raise RuntimeError(
            f"tenant {stats.tenant!r}: counts do not reconcile: rows_in={stats.rows_in} kept={stats.kept} "
            f"rejected={stats.rejected} duplicates={stats.duplicates} near_duplicates={stats.near_duplicates} "
            f"contaminated={stats.contaminated} (files: {', '.join(bad_files) or 'totals'})"
        )


OUTCOMES = ("kept", "rejected", "duplicates", "near_duplicates", "contaminated")


def _by_file(out: Collected, rows: list[dict], rows_in: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per input file: rows_in and where each row ended (one of OUTCOMES)."""
    counts = {rel: {"rows_in": n, **{k: 0 for k in OUTCOMES}} for rel, n in rows_in.items()}
    for r in [*rows, *out.documents]:
        counts[r["source_file"]]["kept"] += 1
    for r in out.rejects:
        counts[r.source_file]["rejected"] += 1
    for d in out.duplicates:
        counts[d["source_file"]]["duplicates" if d["kind"] == "exact" else "near_duplicates"] += 1
    for c in out.contaminated:
        counts[c["source_file"]]["contaminated"] += 1
    return counts


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

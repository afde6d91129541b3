"""Pass 1 of prepare, row by row: shape, PII, control tokens, chat template and tokens (`examine_batch`,
pure, so it runs in worker processes), then exact duplicates in row order (`settle`, here).

A batch's candidates can leave a worker as Arrow record batches (the stage's stores), so the main
process never converts the token ids row by row.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa

from loraline.config import PrepareParams
from loraline.prepare import preference
from loraline.prepare.controls import text_cleaner
from loraline.prepare.features import PREFERENCE_COLUMNS, STORE_SCHEMA
from loraline.prepare.mapping import DETECTED, SourceSpec
from loraline.prepare.quality.pii import PiiScrubber
from loraline.prepare.readers import RawRow
from loraline.prepare.render import Rendered, find_control_token
from loraline.prepare.schema import ChatTemplateError, Message, Record, Reject, RejectReason, locate, top_field
from loraline.prepare.shapes import NO_OPTIONS, Parsed, ShapeOptions, to_record
from loraline.prepare.split import Deduplicator, content_hash, group_id, group_of, prompt_key, split_key, split_of

BATCH_ROWS = 1024  # rows rendered and tokenized together: one tokenizer call, bounded memory
_EXAMINERS: dict[int | None, RowContext] = {}  # per sources[] entry (None: detected), in this process
_TO_ARROW: list[bool] = [False]  # candidates leave the examiner as Arrow record batches (the stage)


@dataclass(frozen=True)
class RowContext:
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


def examine_batch(batch: list[RawRow | Reject], ctx: RowContext) -> list:
    """The per-row work, which depends on nothing but the row: shape, PII, control tokens, then the
    chat rows rendered and tokenized together, then max_tokens. Each item becomes a Reject, a
    ChatTemplateError (the template is unusable: prepare stops), or a candidate (split, row) /
    ("document", row) that still has to pass the exact-duplicate check (`settle`)."""
    pending: list[tuple[int, RawRow, Parsed]] = []
    outcomes: list = [None] * len(batch)
    for i, item in enumerate(batch):
        if isinstance(item, Reject):
            outcomes[i] = item
            continue
        parsed = parse_row(item, ctx)
        rejected = parsed if isinstance(parsed, Reject) else control_reject(item, parsed, ctx)
        if rejected is not None:
            outcomes[i] = rejected
        else:
            pending.append((i, item, parsed))
    chats = [(i, item, parsed) for i, item, parsed in pending if parsed.record.kind == "chat"]
    rendered = dict(
        zip((i for i, _, _ in chats), preference.render_records([p.record for _, _, p in chats], ctx.tokenizer))
    )
    for i, item, parsed in pending:
        record = parsed.record
        result, rejected = rendered.get(i, (None, None))
        error = result if isinstance(result, ChatTemplateError) else rejected
        if isinstance(error, ChatTemplateError):
            outcomes[i] = ChatTemplateError(f"{locate(record.source_file, record.row)}: {error}")
        elif result is None:
            outcomes[i] = ("document", _document_row(record, ctx.tenant))
        elif _longer(result, rejected).n_tokens > ctx.params.max_tokens:
            outcomes[i] = too_long(item, parsed, _longer(result, rejected), ctx.params)
        else:
            group = group_of(record.messages, item.group, ctx.params.group_min_chars)
            if rejected is not None:
                group = preference.pair_group(record, group)
            row = _chat_row(record, result, ctx.tenant, rejected)
            row["_group"] = group_id(group)  # read by pass 1 (first_pass._candidate), never stored
            outcomes[i] = (split_of(split_key(record.content_hash, group), ctx.params.split), row)
    return outcomes


def _longer(chosen: Rendered, rejected: Rendered | None) -> Rendered:
    """What max_tokens applies to: the conversation, or the longer of a pair's two."""
    return chosen if rejected is None or chosen.n_tokens >= rejected.n_tokens else rejected


def settle(examined: list, dedup: Deduplicator) -> Iterator[Reject | tuple]:
    """Exact duplicates, in row order. Checking them after the content checks gives the same outcome
    as checking them first: a duplicate has the kept row's content, so it passes the same checks."""
    for outcome in examined:
        if isinstance(outcome, ChatTemplateError):
            raise outcome
        if isinstance(outcome, Reject):
            yield outcome
            continue
        where, row = outcome
        key = row.get("id") or row["content_hash"]
        duplicate = dedup.duplicate(key, row["source_file"], row["row"])
        if duplicate is not None:
            yield ("duplicate", duplicate, None if where == "document" else where, row)
        else:
            dedup.keep(key, row["source_file"], row["row"])
            yield outcome


def set_up_examiners(ctx: RowContext, specs: list[SourceSpec], to_arrow: bool, worker: bool = False) -> None:
    if worker:  # tokenizers' own threads do not survive a fork; the workers are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TO_ARROW[0] = to_arrow
    if worker:  # the scrubber's patterns are rebuilt here rather than pickled
        ctx = replace(ctx, scrubber=scrubber_for(ctx.params))
    _EXAMINERS.clear()
    for spec in [DETECTED, *specs]:
        _EXAMINERS[spec.index] = replace(
            ctx, options=source_options(spec, ctx.params, ctx.controls, ctx.tokenizer), pii=Counter(), pii_rows=[0]
        )


def portable(ctx: RowContext) -> RowContext:
    """What a worker needs of the context, picklable for spawn: no cleaner closure (the workers build
    their own from the specs) and no duplicate index (duplicates are settled in the main process)."""
    return replace(ctx, options=NO_OPTIONS, dedup=Deduplicator(), scrubber=None, pii=Counter(), pii_rows=[0])


def examine_job(job: tuple[int | None, list]) -> tuple[list, Counter, int, dict[str, pa.RecordBatch]]:
    """A batch of one source examined; the PII counts it found travel back with it.

    For the stage, the chat candidates also leave as one Arrow record batch per split, built here
    (in the workers) rather than row by row in the main process; the outcomes then carry only what
    the main process needs of them (id and origin, and the messages of test rows for decontamination).
    """
    index, batch = job
    ctx = _EXAMINERS[index]
    ctx.pii.clear()
    ctx.pii_rows[0] = 0
    outcomes = examine_batch(batch, ctx)
    batches: dict[str, pa.RecordBatch] = {}
    if _TO_ARROW[0]:
        rows: dict[str, list[dict]] = {}
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, tuple) and outcome[0] != "document":
                split, row = outcome
                rows.setdefault(split, []).append(row)
                light = {
                    "id": row["id"],
                    "source_file": row["source_file"],
                    "row": row["row"],
                    "_prompt": prompt_key(row["messages"]),
                    "_group": row["_group"],
                    "_pair": bool(row["rejected"]),
                }
                outcomes[i] = (split, {**light, "messages": row["messages"]} if split == "test" else light)
        batches = {split: pa.RecordBatch.from_pylist(r, schema=STORE_SCHEMA) for split, r in rows.items()}
    return outcomes, Counter(ctx.pii), ctx.pii_rows[0], batches


def parse_row(item: RawRow, ctx: RowContext) -> Parsed | Reject:
    """Shape and max_chars, then PII: masked rows get the content hash of their masked content, so
    that exact deduplication and the split see what the dataset holds."""
    parsed = to_record(
        item, ctx.tenant, max_chars=ctx.params.max_chars, system_prompt=ctx.system_prompt, options=ctx.options
    )
    if isinstance(parsed, Reject) or ctx.scrubber is None:
        return parsed
    scrubbed, found = _scrubbed(parsed.record, ctx.scrubber)
    if scrubbed is None:
        return parsed
    ctx.pii.update(found)
    ctx.pii_rows[0] += 1
    if ctx.params.pii.mode == "drop":
        kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(found.items()))
        return reject_row(item, parsed, None, RejectReason.PII, f"holds PII ({kinds}); prepare.pii.mode=drop")
    if preference.same_answers(scrubbed):
        return reject_row(
            item,
            parsed,
            parsed.rejected_field,
            RejectReason.SAME_ANSWERS,
            "is the same answer as chosen once PII is masked; a pair needs two answers",
        )
    return replace(parsed, record=scrubbed)


def _scrubbed(record: Record, scrubber: PiiScrubber) -> tuple[Record | None, Counter]:
    """The record with its PII masked and its content hash redone, or None when it holds none."""
    found: Counter = Counter()
    if record.kind == "document":
        text, found = scrubber.scrub(record.text)
        return (replace(record, text=text, content_hash=content_hash([("document", text)])) if found else None), found
    messages = []
    for m in record.messages:
        text, counts = scrubber.scrub(m.content)
        found.update(counts)
        messages.append(Message(m.role, text))
    if record.rejected:
        record, counts = preference.scrub(record, scrubber)
        found.update(counts)
    if not found:
        return None, found
    if record.rejected:
        return preference.rehash(replace(record, messages=tuple(messages))), found
    return replace(
        record, messages=tuple(messages), content_hash=content_hash((m.role, m.content) for m in messages)
    ), found


def control_reject(item: RawRow, parsed: Parsed, ctx: RowContext) -> Reject | None:
    record = parsed.record
    texts = [record.text] if record.kind == "document" else [m.content for m in record.messages]
    fields = parsed.fields
    if record.rejected:  # a pair's rejected answer is checked as its conversation is
        texts, fields = [*texts, record.rejected], (*fields, parsed.rejected_field)
    found = find_control_token(texts, ctx.controls)
    if found is None:
        return None
    index, token = found
    return reject_row(
        item,
        parsed,
        fields[index],
        RejectReason.CONTROL_TOKEN,
        f"contains the tokenizer's control token {token!r}, which would be read as template markup "
        "(control_tokens: escape keeps it as literal text; strip removes end-of-text markers at the ends)",
    )


def too_long(item: RawRow, parsed: Parsed, rendered: Rendered, params: PrepareParams) -> Reject:
    which = "the longer of its chosen and rejected conversations " if parsed.record.rejected else ""
    return reject_row(
        item,
        parsed,
        None,
        RejectReason.TOO_LONG,
        f"{which}renders to {rendered.n_tokens} tokens with the chat template "
        f"(prepare.max_tokens={params.max_tokens})",
    )


def _document_row(record, tenant: str) -> dict:
    return {
        "text": record.text,
        "source_file": record.source_file,
        "row": record.row,
        "content_hash": record.content_hash,
        "tenant": tenant,
    }


def _chat_row(record, rendered: Rendered, tenant: str, rejected: Rendered | None = None) -> dict:
    """A dataset row; a pair's rejected conversation fills the preference columns (empty for other rows)."""
    return {
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
        **dict(zip(PREFERENCE_COLUMNS, preference.pair_values(rejected, record))),
    }


def admit_synthetic(item: RawRow, parsed: Parsed, ctx: RowContext) -> Reject | dict | Kept:
    """A synthetic row through the same checks (exact duplicate first: it must not repeat a real row);
    remembering it as kept is left to the caller, since the quality steps may still drop it."""
    record = parsed.record
    duplicate = ctx.dedup.duplicate(record.content_hash, record.source_file, record.row)
    if duplicate is not None:
        return duplicate
    refused = control_reject(item, parsed, ctx)
    if refused is not None:
        return refused
    ((result, rejected),) = preference.render_records([record], ctx.tokenizer)
    for error in (result, rejected):
        if isinstance(error, ChatTemplateError):
            raise ChatTemplateError(f"{locate(record.source_file, record.row)}: {error}") from error
    if _longer(result, rejected).n_tokens > ctx.params.max_tokens:
        return too_long(item, parsed, _longer(result, rejected), ctx.params)
    return "train", _chat_row(record, result, ctx.tenant, rejected)


def reject_row(raw: RawRow, parsed: Parsed, path: str | None, reason: RejectReason, message: str) -> Reject:
    rec = parsed.record
    return Reject(
        rec.tenant,
        rec.source_file,
        rec.row,
        top_field(path),
        reason,
        f"{locate(rec.source_file, rec.row, path, raw.item)}: {message}",
        raw.excerpt,
    )


def scrubber_for(params: PrepareParams) -> PiiScrubber | None:
    return PiiScrubber(params.pii.types) if params.pii.mode != "off" else None


def source_options(spec: SourceSpec, params: PrepareParams, controls: tuple[str, ...], tokenizer) -> ShapeOptions:
    """A source's shape options: its roles and origins, and the text cleaner of its control-token policy."""
    policy = (spec.params.control_tokens if spec.params is not None else None) or params.control_tokens
    return spec.options(text_cleaner(policy, controls, tokenizer))


def batches(items: Iterator) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch

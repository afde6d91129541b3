"""The general-text sample of the forgetting check (evaluate.general), read and tokenized for a tenant's evaluation.

An adapter can ace its task while the model gets worse at everything else. The evaluate stage measures that as
general_loss: the mean cross-entropy per target token of base, candidate and production on text that is not the
tenant's (evaluate/stage.py), and the gate refuses a candidate whose loss rose past gate.max_forgetting over the
base's. This module makes that text into token rows, with prepare's own readers and shapes, so the sample may be a
file or a folder in any format prepare reads, in any row shape it recognises:

- plain text (a .txt/.md file, or a row with only `text`) is scored as language modelling, every token a target
  (the first excepted: nothing predicts it), tokenized as prepare.document_rows does (the text, then end-of-text).
  There is no prompt to condition on, and "worse at text in general" is just the model's loss on such text.
- chat rows (instruction, messages, sharegpt, prompt/completion) are rendered with the base's chat template and
  scored on their answer tokens only, like the test split and training: the prompt is given, what may have been
  forgotten is how the model answers things that are not the tenant's.

Each row keeps its first `max_tokens` tokens. The `rows` rows taken are those of lowest content hash (prepare's
Record.content_hash): the same sample every run, whatever the files' order, held in memory `rows` at a time while
the source streams past. A text is taken once. Rows prepare would reject (malformed, no known shape, a control
token after prepare.control_tokens' cleaning) are skipped and counted by reason; a sample left with no target
token is an error naming evaluate.general.path. No system prompt is added (a tenant's would make the base's
score differ per tenant) and PII is not masked: the sample is scored, never trained on or served.

Written to data/general/<tenant>/ (layout.general_sample_dir): rows.jsonl ({id, kind, input_ids, labels} per row,
in hash order) and sample.json (where it came from: the path as params.yaml gives it and a sha256 of its content;
rows read, skipped by reason, used and per kind; target tokens; rows and max_tokens asked for).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraline import io
from loraline.config import GeneralParams, PrepareParams
from loraline.layout import GENERAL_ROWS, GENERAL_SAMPLE, GENERAL_TEXT
from loraline.modelling.constants import IGNORE_INDEX
from loraline.prepare.controls import text_cleaner
from loraline.prepare.readers import format_of, is_hf_folder, list_files, read_rows
from loraline.prepare.render import check_tokenizer, control_tokens, find_control_token, render_batch
from loraline.prepare.schema import ChatTemplateError, PrepareError, Record, Reject
from loraline.prepare.shapes import ShapeOptions, to_record
from loraline.provenance import sha256_file

KEY = "evaluate.general.path"
NO_LIMIT = 2**62  # prepare.max_chars does not apply: a long text is cut to max_tokens instead
# Characters of a plain text tokenized per row, per token kept: BPE tokens of prose average about 4 characters,
# so this gives max_tokens tokens without tokenizing a whole book to keep its first 256.
CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class GeneralRow:
    id: str  # the row's content hash
    kind: str  # document (every token a target) | chat (answer tokens only)
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class GeneralSample:
    """The tokenized sample and the facts metrics.json repeats so that a general_loss can be traced to its text."""

    path: str  # as params.yaml gives it
    sha256: str  # of the file, or of a folder's files (relative path and content)
    rows_read: int
    skipped: dict[str, int]  # reject reason -> rows
    rows: int
    kinds: dict[str, int]
    target_tokens: int
    rows_requested: int
    max_tokens: int
    sample: list[GeneralRow]

    def facts(self) -> dict[str, Any]:
        """sample.json: everything but the token rows."""
        return {k: v for k, v in asdict(self).items() if k != "sample"}


def general_sample(general: GeneralParams, prepare: PrepareParams, tokenizer: Any, project: Path) -> GeneralSample:
    """Read, select and tokenize `general.path` (relative to `project`; refused outside it unless
    general.allow_outside_dirs holds it). Raises PrepareError naming evaluate.general.path when it does not
    exist, holds nothing prepare reads, or leaves no row to score."""
    path = _existing_path(general, project)
    check_tokenizer(tokenizer)
    sources = _readable_sources(general, path, project)
    records, read, skipped = _lowest_hash_records(sources, general, prepare, tokenizer)
    sample = _tokenize(records, tokenizer, general.max_tokens)
    targets = sum(_targets(row) for row in sample)
    if targets == 0:
        why = ", ".join(f"{reason} x{n}" for reason, n in sorted(skipped.items())) or "no rows"
        raise PrepareError(
            f"{KEY}: {str(general.path)!r} leaves no token to score ({read} rows read; skipped: {why}); rows "
            "need a known shape: text (plain text), messages, instruction/output, conversations or prompt/completion"
        )
    return GeneralSample(
        path=str(general.path),
        sha256=_content_sha256(path, sources),
        rows_read=read,
        skipped=dict(sorted(skipped.items())),
        rows=len(sample),
        kinds=dict(sorted(Counter(r.kind for r in sample).items())),
        target_tokens=targets,
        rows_requested=general.rows,
        max_tokens=general.max_tokens,
        sample=sample,
    )


def _existing_path(general: GeneralParams, project: Path) -> Path:
    """general.path resolved against `project`, refused outside it (unless allowed) or when it does not exist."""
    general.check_inside(project)
    path = general.resolved(project)
    if not path.exists():
        hint = " (the base stage writes it: run `dvc repro base`)" if path.name == GENERAL_TEXT else ""
        raise PrepareError(f"{KEY}: {str(general.path)!r} does not exist{hint}")
    return path


def _readable_sources(general: GeneralParams, path: Path, project: Path) -> list[tuple[Path, str]]:
    """(file, relative name) of each source under `path`; refused when none is, or one is not a format prepare
    reads, or a file is linked out of the folder."""
    sources = [(path, path.name)] if path.is_file() or is_hf_folder(path) else list_files(path)
    if not sources:
        raise PrepareError(f"{KEY}: folder {str(general.path)!r} holds no files")
    general.check_inside(project, sources if path.is_dir() else ())  # a file linked out of the folder, too
    if not path.is_dir() and format_of(path) is None:
        raise PrepareError(
            f"{KEY}: {str(general.path)!r} is not a format prepare reads (JSONL, JSON, CSV, TSV, Parquet, "
            "Arrow, .txt, .md, also .gz/.zst, or a save_to_disk folder)"
        )
    return sources


def _lowest_hash_records(
    sources: list[tuple[Path, str]], general: GeneralParams, prepare: PrepareParams, tokenizer: Any
) -> tuple[list[Record], int, Counter[str]]:
    """(the general.rows records of lowest content hash, in hash order; rows read; rows skipped by reason)."""
    controls = control_tokens(tokenizer)
    options = ShapeOptions(clean=text_cleaner(prepare.control_tokens, controls, tokenizer))
    kept: list[tuple[str, Record]] = []  # a heap of the lowest hashes, as (negated order key, record)
    taken: set[str] = set()
    skipped: Counter[str] = Counter()
    read = 0
    for source, rel in sources:
        for item in read_rows(source, rel, "evaluate.general", prepare.csv_delimiter):
            read += 1  # a file that cannot be read is one reject, as prepare counts it
            parsed = (
                item
                if isinstance(item, Reject)
                else to_record(item, "evaluate.general", max_chars=NO_LIMIT, options=options)
            )
            if isinstance(parsed, Reject):
                skipped[parsed.reason.value] += 1
                continue
            record = parsed.record
            texts = [record.text] if record.kind == "document" else [m.content for m in record.messages]
            if find_control_token(texts, controls) is not None:
                skipped["control_token"] += 1
                continue
            _keep(kept, taken, record, general.rows)
    return sorted((r for _, r in kept), key=lambda r: r.content_hash), read, skipped


def write_general_sample(sample: GeneralSample, out_dir: Path) -> Path:
    """rows.jsonl and sample.json into `out_dir`, replaced as a whole."""
    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        io.write_jsonl(tmp / GENERAL_ROWS, [asdict(row) for row in sample.sample])
        io.write_json(tmp / GENERAL_SAMPLE, sample.facts())
    return Path(out_dir)


def _keep(kept: list[tuple[str, Record]], taken: set[str], record: Record, rows: int) -> None:
    """Keep `record` among the `rows` of lowest content hash seen so far (a max-heap through negated keys)."""
    key = record.content_hash
    if key in taken:
        return
    if len(kept) < rows:
        heapq.heappush(kept, (_negated(key), record))
        taken.add(key)
    elif key < _negated(kept[0][0]):
        _, dropped = heapq.heapreplace(kept, (_negated(key), record))
        taken.discard(dropped.content_hash)
        taken.add(key)


def _negated(hex_key: str) -> str:
    """A string that sorts in the reverse order of the hex digest `hex_key` (and back again)."""
    return hex_key.translate(_REVERSE_HEX)


_REVERSE_HEX = str.maketrans("0123456789abcdef", "fedcba9876543210")


def _tokenize(records: list[Record], tokenizer: Any, max_tokens: int) -> list[GeneralRow]:
    chats = [r for r in records if r.kind == "chat"]
    rendered = dict(
        zip((r.content_hash for r in chats), render_batch([r.messages for r in chats], tokenizer), strict=True)
    )
    eos = tokenizer.eos_token_id
    out = []
    for record in records:
        if record.kind == "document":
            text = record.text[: max_tokens * CHARS_PER_TOKEN_BOUND]
            ends = eos is not None and text == record.text  # a cut text does not end there
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if ends else [])
            out.append(GeneralRow(record.content_hash, "document", ids[:max_tokens], ids[:max_tokens]))
            continue
        result = rendered[record.content_hash]
        if isinstance(result, ChatTemplateError):
            raise ChatTemplateError(f"{KEY}: {record.source_file} row {record.row}: {result}") from result
        out.append(GeneralRow(record.content_hash, "chat", result.input_ids[:max_tokens], result.labels[:max_tokens]))
    return out


def _targets(row: GeneralRow) -> int:
    """Tokens the loss is taken on: labels after the first position (the model predicts token t from those before)."""
    return sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)


def _content_sha256(path: Path, sources: list[tuple[Path, str]]) -> str:
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for source, rel in sources:
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for f in files:
            h.update(f"{rel}/{f.relative_to(source).as_posix()}".encode() if source.is_dir() else rel.encode())
            h.update(b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()

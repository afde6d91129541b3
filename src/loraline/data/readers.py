"""Raw files to raw rows: one `RawRow` per input row, or a `Reject` when the row cannot be read.

Every yielded item is exactly one input row, so counts reconcile: a file that cannot be read at all
yields a single `Reject` with row=None. Rows are numbered from 1 within their file: the line for
JSONL (blank lines are not rows, but keep their line numbers), the element for JSON arrays, the data
record (header excluded; blank lines and all-empty records, as spreadsheets export, are not rows) for
CSV and Parquet, and 1 for a whole .txt/.md document.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from loraline.data.schema import Reject, RejectReason, locate, safe_text

STRUCTURED = (".jsonl", ".json", ".csv", ".parquet")
DOCUMENTS = (".txt", ".md")
SUPPORTED = STRUCTURED + DOCUMENTS
EXCERPT_CHARS = 200


@dataclass(frozen=True)
class RawRow:
    source_file: str
    row: int
    value: Any  # the parsed row; {"text": ...} for a .txt/.md document
    raw: str | None = None  # the row as written (JSONL line), preferred for excerpts
    tabular: bool = False  # CSV/Parquet: a cell may hold JSON text for a nested column

    @property
    def excerpt(self) -> str:
        text = self.raw if self.raw is not None else json.dumps(self.value, ensure_ascii=False, default=str)
        return excerpt(text)


def excerpt(text: str) -> str:
    return safe_text(text[:EXCERPT_CHARS])


def has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def bad_utf8_detail(text: str) -> str:
    pos = next(i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff")
    return f"is not valid UTF-8 (first bad byte at character {pos}: {excerpt(text[pos])}); re-save the file as UTF-8"


def list_files(raw_dir: Path) -> list[tuple[Path, str]]:
    """Every non-hidden file under raw_dir as (path, path relative to raw_dir), sorted by that relative path.

    Hidden files and folders (a name starting with '.') are skipped: they are editor, OS or VCS
    droppings (.DS_Store, .git), never data.
    """
    found = []
    for path in raw_dir.rglob("*"):
        rel = path.relative_to(raw_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        found.append((path, safe_text(rel.as_posix())))
    return sorted(found, key=lambda item: item[1])


def read_rows(path: Path, rel: str, tenant: str, csv_delimiter: str = ",") -> Iterator[RawRow | Reject]:
    """The rows of one raw file, in file order."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        yield _file_reject(
            tenant, rel, RejectReason.UNREADABLE_FILE,
            f"unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(SUPPORTED)}",
        )
        return
    if has_surrogates(str(path)):
        yield _file_reject(tenant, rel, RejectReason.INVALID_UTF8, "file name is not valid UTF-8; rename the file")
        return
    try:
        if suffix == ".jsonl":
            # Streamed: JSONL is the format of large exports, and rows are independent lines.
            with open(path, "rb") as fh:
                yield from _jsonl(fh, rel, tenant)
            return
        data = path.read_bytes()
    except OSError as exc:
        yield _file_reject(tenant, rel, RejectReason.UNREADABLE_FILE, f"cannot be read: {exc}")
        return
    if suffix == ".json":
        yield from _json_array(data, rel, tenant)
    elif suffix == ".csv":
        yield from _csv(data, rel, tenant, csv_delimiter)
    elif suffix == ".parquet":
        yield from _parquet(data, rel, tenant)
    else:
        yield from _document(data, rel, tenant)


def _file_reject(tenant: str, rel: str, reason: RejectReason, message: str, excerpt_text: str = "") -> Reject:
    return Reject(tenant, rel, None, None, reason, f"{locate(rel, None)}: {message}", excerpt(excerpt_text))


def _jsonl(lines: Iterable[bytes], rel: str, tenant: str) -> Iterator[RawRow | Reject]:
    for lineno, line_bytes in enumerate(lines, start=1):
        if lineno == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):  # a Windows editor's BOM is not row data
            line_bytes = line_bytes[3:]
        line = line_bytes.rstrip(b"\r\n").decode("utf-8", errors="surrogateescape")
        if not line.strip():
            continue
        if has_surrogates(line):
            yield Reject(
                tenant, rel, lineno, None, RejectReason.INVALID_UTF8,
                f"{locate(rel, lineno)}: line {bad_utf8_detail(line)}", excerpt(line),
            )
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Reject(
                tenant, rel, lineno, None, RejectReason.MALFORMED_JSON,
                f"{locate(rel, lineno)}: not valid JSON ({exc.msg}: column {exc.colno})", excerpt(line),
            )
            continue
        yield RawRow(rel, lineno, value, raw=line)


def _json_array(data: bytes, rel: str, tenant: str) -> Iterator[RawRow | Reject]:
    # A .json file is parsed as a whole, so a failure is file-level: one reject with row=None.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if has_surrogates(text):
        yield _file_reject(tenant, rel, RejectReason.INVALID_UTF8, f"file {bad_utf8_detail(text)}", text)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        yield _file_reject(
            tenant, rel, RejectReason.MALFORMED_JSON,
            f"not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})", text,
        )
        return
    if not isinstance(value, list):
        yield _file_reject(
            tenant, rel, RejectReason.WRONG_TYPE,
            f"top level is a JSON {type(value).__name__}; a .json file must hold a list of row objects "
            "(use .jsonl for one object per line)",
            text,
        )
        return
    for i, item in enumerate(value, start=1):
        yield RawRow(rel, i, item)


def _csv(data: bytes, rel: str, tenant: str, delimiter: str) -> Iterator[RawRow | Reject]:
    text = data.decode("utf-8-sig", errors="surrogateescape")
    # newline="" hands line endings to the csv module, so quoted cells may hold newlines.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        row = 0
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue  # blank lines are not rows
            row += 1
            yield _csv_row(rel, tenant, row, header, cells, delimiter)
    except csv.Error as exc:
        yield _file_reject(tenant, rel, RejectReason.UNREADABLE_FILE, f"not valid CSV at line {reader.line_num}: {exc}")


def _csv_row(rel: str, tenant: str, row: int, header: list[str], cells: list[str], delimiter: str) -> RawRow | Reject:
    raw = delimiter.join(cells)
    if len(cells) != len(header):
        return Reject(
            tenant, rel, row, None, RejectReason.WRONG_TYPE,
            f"{locate(rel, row)}: has {len(cells)} values but the header names {len(header)} columns "
            f"({', '.join(header)}); quote values that contain {delimiter!r}",
            excerpt(raw),
        )
    for name, cell in zip(header, cells):
        if has_surrogates(cell):
            return Reject(
                tenant, rel, row, name, RejectReason.INVALID_UTF8,
                f"{locate(rel, row, name)}: value {bad_utf8_detail(cell)}", excerpt(raw),
            )
    return RawRow(rel, row, dict(zip(header, cells)), raw=raw, tabular=True)


def _parquet(data: bytes, rel: str, tenant: str) -> Iterator[RawRow | Reject]:
    row = 0
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        for batch in parquet.iter_batches():
            for value in batch.to_pylist():
                row += 1
                yield RawRow(rel, row, value, tabular=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        # Rows decoded before a corrupt row group stay counted; the rest of the file is one reject.
        after = f" after row {row}" if row else ""
        yield _file_reject(tenant, rel, RejectReason.UNREADABLE_FILE, f"not a readable Parquet file{after}: {exc}")


def _document(data: bytes, rel: str, tenant: str) -> Iterator[RawRow | Reject]:
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if has_surrogates(text):
        yield Reject(
            tenant, rel, 1, "text", RejectReason.INVALID_UTF8,
            f"{locate(rel, 1, 'text')}: document {bad_utf8_detail(text)}", excerpt(text),
        )
        return
    yield RawRow(rel, 1, {"text": text}, raw=text)

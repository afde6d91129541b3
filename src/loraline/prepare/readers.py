"""Raw files to raw rows: one `RawRow` per input row, or a `Reject` when the row cannot be read.

Every yielded item is exactly one input row, so counts reconcile: a file that cannot be read at all
yields a single `Reject` with row=None (and a file that breaks part-way, one reject for the rest).
Rows are numbered from 1 within their file: the line for JSONL (blank lines are not rows, but keep
their line numbers), the element for JSON arrays, the data record (header excluded; blank lines and
all-empty records, as spreadsheets export, are not rows) for CSV/TSV, Parquet, Arrow and Hugging
Face `save_to_disk` folders, and 1 for a whole .txt/.md document.

Everything but a JSON array streams: a raw file may be larger than memory. `.gz` and `.zst` files
are decompressed on the fly, and the format is taken from the name under the compression suffix.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from loraline.prepare.schema import Reject, RejectReason, locate, safe_text

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "txt",
    ".md": "md",
}
COMPRESSIONS = (".gz", ".zst")
# What `datasets.Dataset.save_to_disk` writes: such a folder is one source, not three files.
HF_MARKERS = ("dataset_info.json", "state.json")
EXCERPT_CHARS = 200
BATCH_ROWS = 1024  # Arrow batches decoded at a time: bounded memory, few Python calls


@dataclass(frozen=True)
class RawRow:
    source_file: str
    row: int
    value: Any  # the parsed row; {"text": ...} for a .txt/.md document
    raw: str | None = None  # the row as written (JSONL line), preferred for excerpts
    tabular: bool = False  # CSV/Parquet/Arrow: a cell may hold JSON text for a nested column
    item: int | None = None  # with sources[].explode: the element of the row's list (0-based)
    group: str | None = None  # with sources[].group: the value rows of one group share

    @property
    def excerpt(self) -> str:
        text = self.raw if self.raw is not None else json.dumps(self.value, ensure_ascii=False, default=str)
        return excerpt(text)


def excerpt(text: str) -> str:
    return safe_text(text[:EXCERPT_CHARS])


def has_surrogates(text: str) -> bool:
    """Lone surrogates: undecodable bytes (surrogateescape) or "\\ud800" JSON escapes, neither UTF-8."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")  # C speed; only surrogates cannot be encoded
    except UnicodeEncodeError:
        return True
    return False


def bad_utf8_detail(text: str) -> str:
    pos = next(i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff")
    return f"is not valid UTF-8 (first bad byte at character {pos}: {excerpt(text[pos])}); re-save the file as UTF-8"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in HF_MARKERS)


def list_files(raw_dir: Path) -> list[tuple[Path, str]]:
    """Every source under raw_dir as (path, path relative to raw_dir), sorted by that relative path.

    A source is a file, or a folder written by `datasets` `save_to_disk` (one per split of a
    DatasetDict), whose files are not listed on their own. Hidden files and folders (a name starting
    with '.') are skipped: they are editor, OS or VCS droppings (.DS_Store, .git), never data.
    """
    found = []
    paths = list(raw_dir.rglob("*"))
    hf_roots = {p for p in paths if is_hf_folder(p)}
    for path in paths:
        rel = path.relative_to(raw_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.name == "dataset_dict.json" and any(root.parent == path.parent for root in hf_roots):
            continue  # a DatasetDict's index of its split folders, each of which is read
        if path in hf_roots or (path.is_file() and not hf_roots.intersection(path.parents)):
            found.append((path, safe_text(rel.as_posix())))
    return sorted(found, key=lambda item: item[1])


def format_of(path: Path) -> str | None:
    """The format from the file name (under .gz/.zst), 'hf' for a save_to_disk folder, else None."""
    if is_hf_folder(path):
        return "hf"
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return FORMATS.get(Path(name).suffix)


def read_rows(
    path: Path, rel: str, tenant: str, csv_delimiter: str = ",", fmt: str | None = None, *, whole_object: bool = False
) -> Iterator[RawRow | Reject]:
    """The rows of one raw source, in file order. `fmt` overrides the format from the name;
    `whole_object` lets a .json file hold one object (one row, for sources[].explode)."""
    fmt = fmt or format_of(path)
    if fmt is None:
        suffix = "".join(path.suffixes[-2:]) or "(no extension)"
        yield _file_reject(
            tenant,
            rel,
            RejectReason.UNREADABLE_FILE,
            f"unsupported file type {suffix!r}; supported: {', '.join(FORMATS)} (also .gz/.zst) and "
            "Hugging Face save_to_disk folders, or set tenants.<t>.sources[].format",
        )
        return
    if has_surrogates(str(path)):
        yield _file_reject(tenant, rel, RejectReason.INVALID_UTF8, "file name is not valid UTF-8; rename the file")
        return
    count = _Count()
    try:
        if fmt == "hf":
            yield from count(_hf(path, rel))
        elif fmt in ("parquet", "arrow"):
            yield from count(_parquet(path, rel) if fmt == "parquet" else _arrow(path, rel))
        else:
            with _open(path) as fh:
                if fmt == "jsonl":
                    yield from count(_jsonl(fh, rel, tenant))
                elif fmt in ("csv", "tsv"):
                    yield from count(_csv(fh, rel, tenant, "\t" if fmt == "tsv" else csv_delimiter))
                elif fmt == "json":
                    yield from count(_json_array(fh.read(), rel, tenant, whole_object))
                else:
                    yield from count(_document(fh.read(), rel, tenant))
    except (OSError, EOFError, ValueError, pa.ArrowException, _zstd_error()) as exc:
        # Rows decoded before the break stay counted; the rest of the file is one reject.
        after = f" after row {count.last}" if count.last else ""
        yield _file_reject(tenant, rel, RejectReason.UNREADABLE_FILE, f"cannot be read as {fmt}{after}: {exc}")


class _Count:
    """Remembers the last row yielded, so a reader that breaks can say how far it got."""

    last = 0

    def __call__(self, items: Iterable[RawRow | Reject]) -> Iterator[RawRow | Reject]:
        for item in items:
            if item.row is not None:
                self.last = item.row
            yield item


def _zstd_error() -> type[Exception]:
    try:
        import zstandard

        return zstandard.ZstdError
    except ImportError:  # pragma: no cover - a dependency; only .zst files need it
        return OSError


@contextmanager
def _open(path: Path) -> Iterator[IO[bytes]]:
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            yield fh
    elif name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            yield io.BufferedReader(reader, buffer_size=1 << 20)
    else:
        with open(path, "rb", buffering=1 << 20) as fh:
            yield fh


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
                tenant,
                rel,
                lineno,
                None,
                RejectReason.INVALID_UTF8,
                f"{locate(rel, lineno)}: line {bad_utf8_detail(line)}",
                excerpt(line),
            )
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Reject(
                tenant,
                rel,
                lineno,
                None,
                RejectReason.MALFORMED_JSON,
                f"{locate(rel, lineno)}: not valid JSON ({exc.msg}: column {exc.colno})",
                excerpt(line),
            )
            continue
        except RecursionError:
            yield Reject(
                tenant,
                rel,
                lineno,
                None,
                RejectReason.MALFORMED_JSON,
                f"{locate(rel, lineno)}: nested too deeply to parse (over {sys.getrecursionlimit()} levels)",
                excerpt(line),
            )
            continue
        yield RawRow(rel, lineno, value, raw=line)


def _json_array(data: bytes, rel: str, tenant: str, whole_object: bool) -> Iterator[RawRow | Reject]:
    # A .json file is parsed as a whole, so a failure is file-level: one reject with row=None.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if has_surrogates(text):
        yield _file_reject(tenant, rel, RejectReason.INVALID_UTF8, f"file {bad_utf8_detail(text)}", text)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # Many exports name JSON Lines files .json: one object per line.
            yield from _jsonl(io.BytesIO(data), rel, tenant)
            return
        yield _file_reject(
            tenant,
            rel,
            RejectReason.MALFORMED_JSON,
            f"not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})",
            text,
        )
        return
    except RecursionError:
        yield _file_reject(tenant, rel, RejectReason.MALFORMED_JSON, "nested too deeply to parse", text)
        return
    if isinstance(value, dict) and whole_object:
        yield RawRow(rel, 1, value)
        return
    if not isinstance(value, list):
        yield _file_reject(
            tenant,
            rel,
            RejectReason.WRONG_TYPE,
            f"top level is a JSON {type(value).__name__}; a .json file must hold a list of row objects "
            "(use .jsonl for one object per line, or sources[].explode to take the rows from a list inside it)",
            text,
        )
        return
    for i, item in enumerate(value, start=1):
        yield RawRow(rel, i, item)


def _csv(binary: IO[bytes], rel: str, tenant: str, delimiter: str) -> Iterator[RawRow | Reject]:
    # newline="" hands line endings to the csv module, so quoted cells may hold newlines.
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    row = 0
    try:
        header = next(reader, None)
        if header is None:
            return
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue  # blank lines are not rows
            row += 1
            yield _csv_row(rel, tenant, row, header, cells, delimiter)
    except csv.Error as exc:
        after = f" after row {row}" if row else ""
        yield _file_reject(
            tenant, rel, RejectReason.UNREADABLE_FILE, f"not valid CSV at line {reader.line_num}{after}: {exc}"
        )
    finally:
        text.detach()  # the caller closes the underlying file


def _csv_row(rel: str, tenant: str, row: int, header: list[str], cells: list[str], delimiter: str) -> RawRow | Reject:
    raw = delimiter.join(cells)
    if len(cells) != len(header):
        return Reject(
            tenant,
            rel,
            row,
            None,
            RejectReason.WRONG_TYPE,
            f"{locate(rel, row)}: has {len(cells)} values but the header names {len(header)} columns "
            f"({', '.join(header)}); quote values that contain {delimiter!r}",
            excerpt(raw),
        )
    for name, cell in zip(header, cells):
        if has_surrogates(cell) or has_surrogates(name):
            return Reject(
                tenant,
                rel,
                row,
                safe_text(name),
                RejectReason.INVALID_UTF8,
                f"{locate(rel, row, safe_text(name))}: value {bad_utf8_detail(cell + name)}",
                excerpt(raw),
            )
    return RawRow(rel, row, dict(zip(header, cells)), raw=raw, tabular=True)


def _batches_to_rows(batches: Iterable[pa.RecordBatch], rel: str) -> Iterator[RawRow]:
    row = 0
    for batch in batches:
        for value in batch.to_pylist():
            row += 1
            yield RawRow(rel, row, value, tabular=True)


def _parquet(path: Path, rel: str) -> Iterator[RawRow]:
    with _open(path) as fh:
        source = fh if not path.name.lower().endswith(COMPRESSIONS) else pa.BufferReader(fh.read())
        yield from _batches_to_rows(pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS), rel)


def _arrow(path: Path, rel: str) -> Iterator[RawRow]:
    """Arrow IPC: the file format (random access) or the stream format, as `datasets` writes it."""
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches: Iterable[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        yield from _batches_to_rows(batches, rel)


def _hf(path: Path, rel: str) -> Iterator[RawRow]:
    """A `datasets` save_to_disk folder: memory-mapped Arrow, read in batches (never unpickled)."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):  # reached only when named explicitly with format: hf
        raise ValueError("a DatasetDict folder; name one split's folder (e.g. train/) or use a glob such as folder/*")
    yield from _batches_to_rows(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS), rel)


def _document(data: bytes, rel: str, tenant: str) -> Iterator[RawRow | Reject]:
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if has_surrogates(text):
        yield Reject(
            tenant,
            rel,
            1,
            "text",
            RejectReason.INVALID_UTF8,
            f"{locate(rel, 1, 'text')}: document {bad_utf8_detail(text)}",
            excerpt(text),
        )
        return
    yield RawRow(rel, 1, {"text": text}, raw=text)

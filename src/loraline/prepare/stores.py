"""Where prepare keeps rows between its passes: in memory (collect(), tests) or on disk (the stage).

A tenant's raw data may be larger than memory, so the stage streams every row to Arrow files as it
goes and builds the saved datasets from them; `collect()` keeps lists, which tests read directly.
Both stores take rows in the same order and give them back in that order, so the outcome of
prepare does not depend on which one holds the rows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import datasets
import pyarrow as pa

from loraline.prepare.schema import Reject

SPILL_ROWS = 2048  # rows buffered before a record batch is written: bounded memory, few Arrow calls


class ListRows(list):
    """Rows in memory; `select` keeps the rows a mask marks (rows appended later are kept)."""

    def columns(self, names: Sequence[str]) -> Iterator[dict]:
        return iter(self)

    def select(self, keep: Sequence[bool]) -> None:
        self[:] = [row for row, kept in zip(self, keep) if kept]


class ArrowRows:
    """Rows appended to Arrow stream files in `features`' schema, read back batch by batch.

    `select(mask)` marks which of the rows so far are kept without rewriting anything: the saved
    dataset takes only those (Dataset.select on the memory-mapped files). Rows appended after a read
    go to a new segment file.
    """

    def __init__(self, path: Path, features: datasets.Features) -> None:
        self.path, self.features = Path(path), features
        self._schema = features.arrow_schema
        self._segments: list[Path] = []
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._buffer: list[dict] = []
        self._count = 0
        self._keep: bytearray | None = None  # None: every row

    def append_batch(self, batch: pa.RecordBatch) -> None:
        """Rows already in this store's schema (built where the rows were made)."""
        self._open()
        self._flush()
        assert self._writer is not None
        self._writer.write_batch(batch)
        self._count += batch.num_rows
        if self._keep is not None:
            self._keep.extend(b"\x01" * batch.num_rows)

    def append(self, row: dict) -> None:
        self._open()
        self._buffer.append(row)
        self._count += 1
        if self._keep is not None:
            self._keep.append(1)
        if len(self._buffer) >= SPILL_ROWS:
            self._flush()

    def _open(self) -> None:
        if self._writer is None:
            segment = self.path.with_name(f"{self.path.stem}-{len(self._segments)}{self.path.suffix}")
            self._segments.append(segment)
            self._sink = pa.OSFile(str(segment), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self._schema)

    def __len__(self) -> int:
        return self._count if self._keep is None else sum(self._keep)

    def __iter__(self) -> Iterator[dict]:
        keep = self._keep
        for i, row in enumerate(self.columns(list(self.features))):
            if keep is None or keep[i]:
                yield row

    def columns(self, names: Sequence[str]) -> Iterator[dict]:
        """Every row so far (selected or not), with only the named columns: cheap to read back."""
        self.close()
        for segment in self._segments:
            with pa.memory_map(str(segment)) as source:
                for batch in pa.ipc.open_stream(source):
                    yield from batch.select(list(names)).to_pylist()

    def select(self, keep: Sequence[bool]) -> None:
        if len(keep) != self._count:
            raise ValueError(f"select: a mask of {len(keep)} for {self._count} rows")
        self._keep = bytearray(1 if k else 0 for k in keep)

    def dataset(self) -> datasets.Dataset:
        """The kept rows as a Dataset over the memory-mapped files (nothing is loaded into memory)."""
        self.close()
        parts = [datasets.Dataset.from_file(str(segment)) for segment in self._segments]
        ds = (
            datasets.concatenate_datasets(parts)
            if parts
            else datasets.Dataset.from_dict({name: [] for name in self.features}, features=self.features)
        )
        if self._keep is not None and not all(self._keep):
            ds = ds.select([i for i, k in enumerate(self._keep) if k])
        return ds

    def close(self) -> None:
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        assert self._sink is not None
        self._sink.close()
        self._writer = self._sink = None

    def _flush(self) -> None:
        if self._buffer and self._writer is not None:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._buffer, schema=self._schema))
            self._buffer = []


class RejectSummary:
    """Per file: how many rows were rejected for what, and the first detail (for the no-rows error)."""

    def __init__(self) -> None:
        self.by_file: dict[str, Counter] = {}
        self.first: dict[str, str] = {}
        self.count = 0

    def add(self, reject: Reject) -> None:
        self.by_file.setdefault(reject.source_file, Counter())[reject.reason.value] += 1
        self.first.setdefault(reject.source_file, reject.detail)
        self.count += 1


class RejectList(list):
    """Rejects in memory (collect()), with the same summary as the file store."""

    def __init__(self) -> None:
        super().__init__()
        self.summary = RejectSummary()

    def append(self, reject: Reject) -> None:  # type: ignore[override]
        super().append(reject)
        self.summary.add(reject)


class RejectFile:
    """Rejects written as JSON lines as they come (a file of bad rows may be larger than memory)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = open(self.path, "w", encoding="utf-8")
        self.summary = RejectSummary()

    def append(self, reject: Reject) -> None:
        assert self._fh is not None, "RejectFile is closed"
        self._fh.write(json.dumps(reject.to_dict(), sort_keys=True, ensure_ascii=False) + "\n")
        self.summary.add(reject)

    def __len__(self) -> int:
        return self.summary.count

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

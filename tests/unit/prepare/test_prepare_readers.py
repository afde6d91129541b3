"""Every input format is read into the same canonical rows, with 1-based row numbers per file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prepare_helpers import write_jsonl

from loraline.config import PrepareParams
from loraline.prepare.readers import RawRow, list_files, read_rows
from loraline.prepare.schema import Reject, RejectReason

HELLO = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello!"}]
FOX = [{"role": "user", "content": "Name an animal"}, {"role": "assistant", "content": "A fox, quick and brown."}]


def _jsonl(d: Path) -> None:
    write_jsonl(d / "data.jsonl", [{"messages": HELLO}, {"messages": FOX}])


def _json(d: Path) -> None:
    (d / "data.json").write_text(json.dumps([{"messages": HELLO}, {"messages": FOX}]), encoding="utf-8")


def _csv(d: Path) -> None:
    # A chat column holding JSON text, with the delimiter and a newline inside quoted cells.
    rows = [json.dumps(HELLO), json.dumps(FOX)]
    text = "id,messages\n" + "".join(f'{i},"{r.replace(chr(34), chr(34) * 2)}"\n' for i, r in enumerate(rows))
    (d / "data.csv").write_text(text, encoding="utf-8")


def _parquet(d: Path) -> None:
    pq.write_table(pa.Table.from_pylist([{"messages": HELLO}, {"messages": FOX}]), d / "data.parquet")


FORMATS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_structured_format_gives_the_same_rows(fmt, raw_dir, gather):
    FORMATS[fmt](raw_dir)
    out = gather()
    rows = sorted((r for s in out.splits.values() for r in s), key=lambda r: r["row"])
    assert out.rejects == []
    assert [(r["source_file"], r["row"], r["shape"], r["messages"]) for r in rows] == [
        (f"data.{fmt}", 1, "chat", HELLO),
        (f"data.{fmt}", 2, "chat", FOX),
    ]


@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_plain_documents_are_one_row_each(suffix, raw_dir, gather):
    text = "# Returns\n\nItems can be returned within 30 days.\n"
    (raw_dir / f"policy{suffix}").write_text(text, encoding="utf-8")
    out = gather()
    assert [(d["source_file"], d["row"], d["text"]) for d in out.documents] == [(f"policy{suffix}", 1, text)]
    assert out.stats.by_shape == {"document": 1}
    assert out.stats.kept == 1 and all(len(s) == 0 for s in out.splits.values())


@pytest.mark.parametrize(
    "make",
    [
        lambda d: write_jsonl(d / "t.jsonl", [{"text": "just text", "id": 7}]),
        lambda d: (d / "t.json").write_text(json.dumps([{"text": "just text"}])),
        lambda d: (d / "t.csv").write_text("text\njust text\n"),
        lambda d: pq.write_table(pa.Table.from_pylist([{"text": "just text"}]), d / "t.parquet"),
    ],
    ids=["jsonl", "json", "csv", "parquet"],
)
def test_text_only_rows_are_documents_in_every_format(make, raw_dir, gather):
    make(raw_dir)
    out = gather()
    assert [d["text"] for d in out.documents] == ["just text"]


def test_csv_delimiter_comes_from_params(raw_dir, gather):
    (raw_dir / "semi.csv").write_text("instruction;input;output\nAdd;2, 3;5\n", encoding="utf-8")
    out = gather(params=PrepareParams(csv_delimiter=";"))
    (row,) = out.splits["train"] + out.splits["validation"] + out.splits["test"]
    assert row["messages"] == [{"role": "user", "content": "Add\n\n2, 3"}, {"role": "assistant", "content": "5"}]


def test_parquet_nulls_count_as_absent_columns(raw_dir, gather):
    table = pa.Table.from_pylist(
        [
            {"instruction": "Greet", "input": None, "output": "Hi", "text": None},
            {"instruction": None, "input": None, "output": None, "text": "a document"},
        ]
    )
    pq.write_table(table, raw_dir / "mixed.parquet")
    out = gather()
    assert out.rejects == []
    assert out.stats.by_shape == {"document": 1, "instruction": 1}


def test_jsonl_rows_are_line_numbers_and_blank_lines_are_not_rows(raw_dir):
    write_jsonl(raw_dir / "a.jsonl", [json.dumps({"text": "one"}), "", "   ", json.dumps({"text": "four"})])
    items = list(read_rows(raw_dir / "a.jsonl", "a.jsonl", "acme"))
    assert [(i.row, i.value) for i in items] == [(1, {"text": "one"}), (4, {"text": "four"})]


def test_utf8_bom_is_not_part_of_the_first_row(raw_dir):
    (raw_dir / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "x"}).encode() + b"\n")
    (raw_dir / "bom.csv").write_bytes(b"\xef\xbb\xbftext\nx\n")
    for name in ("bom.jsonl", "bom.csv"):
        (item,) = read_rows(raw_dir / name, name, "acme")
        assert isinstance(item, RawRow) and item.value == {"text": "x"}


def test_files_are_listed_recursively_sorted_and_hidden_ones_skipped(raw_dir):
    for rel in ["b.jsonl", "a/z.csv", "a/b/c.md", ".hidden.jsonl", ".git/config", "sub/.DS_Store", "C.TXT"]:
        (raw_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw_dir / rel).write_text("x")
    assert [rel for _, rel in list_files(raw_dir)] == ["C.TXT", "a/b/c.md", "a/z.csv", "b.jsonl"]


def test_upper_case_extensions_are_read(raw_dir, gather):
    (raw_dir / "NOTES.TXT").write_text("some notes")
    assert [d["text"] for d in gather().documents] == ["some notes"]


def test_unsupported_extension_is_rejected_not_silently_skipped(raw_dir):
    (raw_dir / "data.xml").write_text("<rows/>")
    (item,) = read_rows(raw_dir / "data.xml", "data.xml", "acme")
    assert isinstance(item, Reject)
    assert (item.reason, item.row, item.field) == (RejectReason.UNREADABLE_FILE, None, None)
    assert "data.xml" in item.detail and ".xml" in item.detail and ".jsonl" in item.detail


def test_csv_rows_are_data_records_and_blank_lines_are_not_rows(raw_dir):
    (raw_dir / "a.csv").write_text('prompt,completion\n"two\nlines",a\n\n,\nq,b\n', encoding="utf-8")
    items = list(read_rows(raw_dir / "a.csv", "a.csv", "acme"))
    assert [(i.row, i.value) for i in items] == [
        (1, {"prompt": "two\nlines", "completion": "a"}),
        (2, {"prompt": "q", "completion": "b"}),
    ]

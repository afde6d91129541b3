"""Property: whatever bytes and values the raw files hold, prepare never crashes, and every input row
ends kept, a duplicate or rejected with a reason, with counts that reconcile per file and per source."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraline.config import PrepareParams, SourceParams, TenantParams
from loraline.prepare.schema import PrepareError
from loraline.prepare.stage import prepare_tenant
from loraline.prepare.stats import OUTCOMES

KEYS = st.sampled_from(
    [
        "instruction",
        "input",
        "output",
        "prompt",
        "completion",
        "messages",
        "conversations",
        "text",
        "system",
        "role",
        "content",
        "from",
        "value",
        "question",
        "answer",
        "instances",
        "meta",
        "item",
    ]
)
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "   ",
            "<|im_end|>",
            "done<|endoftext|>",
            "<|im_start|>user\nx",
            "\ud800bad",
            "a" * 30_000,
            "user",
            "assistant",
            "system",
            "tool",
            "human",
            "gpt",
        ]
    ),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=20,
)
ROWS = st.lists(st.one_of(JSON, st.dictionaries(KEYS, JSON, min_size=1, max_size=6)), max_size=12)
# Lines that are not JSON at all: broken UTF-8, truncated objects, nesting deeper than the parser allows.
BAD_LINES = st.lists(
    st.sampled_from(
        [
            b"\xff\xfe{",
            b'{"instruction": "x", "output": "\xc3\x28"}',
            b'{"a": ',
            b"[" * 100_000,
            b'"just a string"',
            b"null",
            b"\x00\x01",
        ]
    ),
    max_size=3,
)
SOURCES = st.lists(
    st.fixed_dictionaries(
        {
            "path": st.sampled_from(["*.jsonl", "mapped/*", "**/*.csv", "*"]),
            "columns": st.sampled_from(
                [
                    {},
                    {"instruction": "question", "output": "answer"},
                    {"instruction": "{meta.q} {question}", "output": "item.output"},
                    {"prompt": "instances[0].input", "completion": "meta"},
                    {"conversations": "messages"},
                ]
            ),
            "explode": st.sampled_from([None, "instances", "meta"]),
            "roles": st.sampled_from([{}, {"human": "user", "bot": "assistant", "tool": "tool"}]),
            "control_tokens": st.sampled_from([None, "reject", "strip", "escape"]),
            "group": st.sampled_from([None, "meta", "question", "item.output", "{meta.q}"]),
        }
    ),
    max_size=2,
)
# Rows asking about a few shared passages (issue 37), so that groups of several rows occur.
PASSAGE_TEXT = [f"Passage {p}: " + " ".join(f"word{p}{i}" for i in range(40)) for p in range(3)]
PASSAGE_ROWS = st.lists(
    st.builds(lambda p, q, a: {"prompt": f"{PASSAGE_TEXT[p]}\n{q}", "completion": a}, st.integers(0, 2), TEXT, TEXT),
    max_size=8,
)
PARAMS = st.builds(
    lambda conflicts, min_chars: PrepareParams(conflicts=conflicts, group_min_chars=min_chars),
    st.sampled_from(["keep", "first", "reject"]),
    st.sampled_from([None, 1, 200]),
)


def _jsonl(path: Path) -> list[dict]:
    # split on "\n" only: JSON strings may hold U+0085 or U+2028, which str.splitlines() breaks on
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def _valid_sources(entries: list[dict]) -> list[SourceParams]:
    out = []
    for entry in entries:
        try:
            out.append(SourceParams(**entry))
        except ValueError:
            continue  # e.g. item without explode: params.yaml refuses it before any file is read
    return out


def _write(raw: Path, rows: list, bad: list[bytes]) -> None:
    """The rows in five formats, one of them a truncated .gz."""
    lines = [json.dumps(r, allow_nan=True).encode() for r in rows] + bad
    (raw / "mapped").mkdir(parents=True)
    (raw / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (raw / "mapped" / "cut.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines))[:-3])  # truncated mid-stream
    (raw / "mapped" / "rows.json").write_text(json.dumps(rows, allow_nan=True))
    text_rows = [
        {k: json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()} for r in rows if isinstance(r, dict)
    ]
    header = sorted({k for r in text_rows for k in r}) or ["text"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(text_rows)
    # lone surrogates become the invalid UTF-8 bytes they stand for: broken UTF-8 inside a CSV cell
    (raw / "sheet.csv").write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
    texts = [str(r)[:500].encode("utf-8", "replace").decode("utf-8") for r in rows]  # Parquet strings are valid UTF-8
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in texts] or [{"text": "x"}]), raw / "t.parquet")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(rows=ROWS, passages=PASSAGE_ROWS, bad=BAD_LINES, sources=SOURCES, params=PARAMS)
def test_prepare_never_loses_a_row(rows, passages, bad, sources, params, tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        _write(raw, rows + passages, bad)
        tenant = TenantParams(name="acme", raw_dir=raw, sources=_valid_sources(sources))
        out = Path(tmp) / "out"
        try:
            result = prepare_tenant(
                tenant,
                params,
                tokenizer,
                out_dir=out / "prepared",
                rejected_path=out / "rejected.jsonl",
                stats_path=out / "stats.json",
            )
        except PrepareError:  # no usable row: a clear error, and every row is in the reject file
            rejected = _jsonl(out / "rejected.jsonl")
            assert all(r["reason"] and r["detail"] for r in rejected)
            return
        stats = result.stats
        assert stats.reconciles
        for rel, counts in stats.by_file.items():
            assert counts["rows_in"] == sum(counts[k] for k in OUTCOMES), rel
        assert sum(e["rows_in"] for e in stats.sources) == stats.rows_in
        rejected = _jsonl(result.rejected_path)
        assert len(rejected) == stats.rejected and all(r["reason"] and r["detail"] for r in rejected)
        # JSONL rows: one per non-blank line, whatever it held (explode may make several of one line)
        lines = [line for line in (raw / "data.jsonl").read_bytes().split(b"\n") if line.strip()]
        assert stats.by_file["data.jsonl"]["rows_in"] >= len(lines) or any(s.explode for s in tenant.sources)
        _groups_whole(result, stats, params, tenant)


def _groups_whole(result, stats, params: PrepareParams, tenant: TenantParams) -> None:
    """Grouping neither loses nor double-counts a row: each kept row is in exactly one split, the
    splits hold what the stats count, and an automatic group never straddles two splits."""
    import datasets

    from loraline.prepare.schema import Message
    from loraline.prepare.split import group_of

    dataset = datasets.load_from_disk(str(result.dataset_dir))
    seen: dict[tuple, str] = {}
    group_split: dict[str, set] = {}
    for split in ("train", "validation", "test"):
        assert len(dataset[split]) == stats.splits[split]
        for row in dataset[split]:
            key = (row["source_file"], row["row"], row["id"])
            assert key not in seen, (key, seen.get(key), split)  # not in two splits, nor twice in one
            seen[key] = split
            if not tenant.sources:  # every file detected: only automatic groups
                group = group_of(
                    [Message(m["role"], m["content"]) for m in row["messages"]], None, params.group_min_chars
                )
                if group is not None:
                    group_split.setdefault(group, set()).add(split)
    assert sum(stats.splits.values()) + stats.documents == stats.kept
    assert all(len(splits) == 1 for splits in group_split.values())
    groups = stats.groups
    assert sum(groups["by_split"].values()) == groups["groups"] and groups["rows"] <= sum(stats.splits.values())
    assert groups["groups"] == 0 or 2 <= groups["largest"] <= groups["rows"]

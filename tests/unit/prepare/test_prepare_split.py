"""Deterministic hash split (stable when rows are added) and exact deduplication of normalized content."""

from __future__ import annotations

import hashlib

import pytest
from prepare_helpers import chat, write_jsonl

from loraline.config import SplitParams
from loraline.prepare.split import bucket, content_hash, normalize, split_of

SPLIT = SplitParams(validation=0.1, test=0.15, salt="loraline")


def hashes(n: int, start: int = 0) -> list[str]:
    return [content_hash([("user", f"question {i}"), ("assistant", f"answer {i}")]) for i in range(start, start + n)]


def test_bucket_is_first_8_bytes_of_salted_sha256():
    h = "ab" * 32
    expected = int.from_bytes(hashlib.sha256(b"salty" + h.encode()).digest()[:8], "big") / 2**64
    assert bucket(h, "salty") == expected
    assert 0 <= bucket(h, "") < 1


@pytest.mark.parametrize(
    ("b", "split"),
    [(0.0, "test"), (0.1499, "test"), (0.15, "validation"), (0.2499, "validation"), (0.25, "train"), (0.999, "train")],
)
def test_thresholds(monkeypatch, b, split):
    monkeypatch.setattr("loraline.prepare.split.bucket", lambda h, salt: b)
    assert split_of("x", SPLIT) == split


def test_proportions_are_roughly_the_configured_fractions():
    counts = {"train": 0, "validation": 0, "test": 0}
    for h in hashes(2000):
        counts[split_of(h, SPLIT)] += 1
    assert abs(counts["test"] / 2000 - 0.15) < 0.03
    assert abs(counts["validation"] / 2000 - 0.10) < 0.03
    assert abs(counts["train"] / 2000 - 0.75) < 0.04


def test_salt_changes_the_assignment():
    hs = hashes(200)
    assert [split_of(h, SPLIT) for h in hs] != [split_of(h, SplitParams(salt="other")) for h in hs]


def _assignments(out) -> dict[str, str]:
    return {r["id"]: s for s, rows in out.splits.items() for r in rows}


def test_adding_rows_never_moves_existing_rows(raw_dir, gather):
    write_jsonl(raw_dir / "b.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(60)])
    before = _assignments(gather())
    # New rows in a file sorted before the old one, and appended to it: neither moves anything.
    write_jsonl(raw_dir / "a.jsonl", [chat(f"new question {i}", f"new answer {i}") for i in range(40)])
    write_jsonl(raw_dir / "b.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(80)])
    after = _assignments(gather())
    assert len(before) == 60 and len(after) == 120
    assert {h: after[h] for h in before} == before
    assert set(before.values()) == {"train", "validation", "test"}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Hello   world", "Hello world"),
        ("  Hello world\n", "Hello world"),
        ("Hello\tworld\r\n", "Hello world"),
        ("ｆｕｌｌwidth", "fullwidth"),  # NFKC folds compatibility forms
        ("caf\u0065\u0301", "caf\u00e9"),  # decomposed vs precomposed
        ("ﬁne", "fine"),  # ligature
    ],
)
def test_normalized_variants_collapse(a, b):
    assert normalize(a) == normalize(b)
    assert content_hash([("user", a), ("assistant", "x")]) == content_hash([("user", b), ("assistant", "x")])


def test_roles_and_turn_boundaries_are_part_of_the_identity():
    base = content_hash([("user", "a"), ("assistant", "b")])
    assert base != content_hash([("assistant", "a"), ("user", "b")])
    assert base != content_hash([("user", "a b")])
    assert content_hash([("document", "a")]) != content_hash([("user", "a")])


def test_duplicates_across_files_and_shapes_keep_the_first_in_sorted_order(raw_dir, gather):
    write_jsonl(raw_dir / "b.jsonl", [{"prompt": "What is 2+2?", "completion": "4"}, {"text": "Doc  one"}])
    write_jsonl(raw_dir / "a.jsonl", [{"instruction": "unique", "output": "row"}, chat("What is  2+2?", " 4 ")])
    (raw_dir / "c.txt").write_text("Doc one\n")
    out = gather()
    kept = [(r["source_file"], r["row"]) for s in out.splits.values() for r in s]
    assert sorted(kept) == [("a.jsonl", 1), ("a.jsonl", 2)]
    assert [(d["source_file"], d["row"]) for d in out.documents] == [("b.jsonl", 2)]
    assert [(d["source_file"], d["row"], d["duplicate_of_file"], d["duplicate_of_row"]) for d in out.duplicates] == [
        ("b.jsonl", 1, "a.jsonl", 2),
        ("c.txt", 1, "b.jsonl", 2),
    ]
    a_hash = next(r["id"] for s in out.splits.values() for r in s if r["row"] == 2)
    assert out.duplicates[0]["content_hash"] == a_hash
    assert out.stats.by_file["b.jsonl"] == {
        "rows_in": 2,
        "kept": 1,
        "rejected": 0,
        "duplicates": 1,
        "near_duplicates": 0,
        "contaminated": 0,
    }
    assert (out.stats.rows_in, out.stats.kept, out.stats.duplicates) == (5, 3, 2)


def test_a_duplicate_of_a_rejected_row_is_judged_on_its_own(raw_dir, gather):
    from loraline.config import PrepareParams

    long = "word " * 40
    write_jsonl(raw_dir / "a.jsonl", [{"prompt": "q", "completion": long}, {"prompt": "q", "completion": long}])
    out = gather(params=PrepareParams(max_chars=100))
    assert [(r.row, r.reason.value) for r in out.rejects] == [(1, "too_long"), (2, "too_long")]
    assert out.duplicates == []


def test_the_system_prompt_is_part_of_the_hash(raw_dir, gather):
    write_jsonl(raw_dir / "a.jsonl", [{"prompt": "q", "completion": "a"}])
    plain = next(r["id"] for s in gather().splits.values() for r in s)
    prompted = next(r["id"] for s in gather(system_prompt="Be kind.").splits.values() for r in s)
    assert plain != prompted

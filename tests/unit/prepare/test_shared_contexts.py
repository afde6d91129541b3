"""Issue 37: rows that share a context (several questions about one passage) are kept, and each
passage goes whole to one split; exact copies, near copies of whole rows and conflicting answers are
still found, with exact counts."""

from __future__ import annotations

import json
import random

import pytest
from prepare_helpers import chat, write_jsonl

from loraline.config import PrepareParams, SourceParams, TenantParams
from loraline.inspection import inspect_path, report_text

VOCAB = [
    f"{a}{b}{c}"
    for a in ("ka", "lo", "mi", "nu", "po", "ri", "sa", "te")
    for b in ("b", "d", "g", "k", "m", "n")
    for c in ("a", "e", "i", "o", "u")
]
PASSAGES, QUESTIONS = 8, 4


def passage(p: int) -> str:
    rng = random.Random(p)
    return "Passage: " + " ".join(rng.choices(VOCAB, k=60)) + "."


def question(p: int, q: int) -> tuple[str, str]:
    rng = random.Random(1000 * p + q)
    ask = f"Question: what does the passage say about {' '.join(rng.choices(VOCAB, k=3))}?"
    return (
        f"Read the passage and answer the question.\n{passage(p)}\n{ask}",
        f"It says {' '.join(rng.choices(VOCAB, k=5))}.",
    )


def hand_built() -> list[dict]:
    rows = [chat(*question(p, q)) for p in range(PASSAGES) for q in range(QUESTIONS)]  # 32 rows, 8 passages
    rows.append(chat(*question(0, 1)))  # an exact copy
    rows.append(chat(*question(1, 2)))  # an exact copy
    for p in (2, 3):  # near copies of whole rows: the same words, other case and punctuation
        user, answer = question(p, 0)
        rows.append(chat(user.upper().replace("?", " ?!"), answer.upper() + "!"))
    for p in (4, 5):  # conflicting answers: the same prompt, another answer
        rows.append(chat(question(p, 3)[0], "It says nothing about that."))
    return rows


def test_hand_built_set_counts(raw_dir, run):
    write_jsonl(raw_dir / "a.jsonl", hand_built())
    result = run()
    s = result.stats
    assert (s.rows_in, s.kept, s.rejected, s.duplicates, s.near_duplicates, s.contaminated) == (38, 34, 0, 2, 2, 0)
    assert (s.conflicting_answers, s.conflicting_prompts) == (4, 2)
    assert s.groups["groups"] == PASSAGES and s.groups["rows"] == 34 and s.groups["largest"] == QUESTIONS + 1
    assert sum(s.groups["by_split"].values()) == PASSAGES
    assert s.kept / (s.rows_in - s.duplicates - s.near_duplicates) >= 0.95
    card = result.card_path.read_text()
    assert "groups: 8 groups of rows sharing a context (34 rows, largest 5)" in card


def test_a_passage_is_never_in_two_splits(raw_dir, gather):
    write_jsonl(raw_dir / "a.jsonl", hand_built())
    out = gather()
    where: dict[str, set] = {}
    for split, rows in out.splits.items():
        for row in rows:
            where.setdefault(row["messages"][0]["content"].split("\n")[1], set()).add(split)
    assert len(where) == PASSAGES and all(len(s) == 1 for s in where.values())
    assert len({split for s in where.values() for split in s}) > 1  # the passages do not all land in one split


def test_without_groups_no_row_is_lost_to_its_passage(raw_dir, gather):
    """With groups off, passages straddle the splits, yet decontamination removes no row that only
    shares a passage with a test row: only the two near copies go (as near-duplicates or, when the
    original is in test, as contaminated)."""
    write_jsonl(raw_dir / "a.jsonl", hand_built())
    s = gather(params=PrepareParams(group_min_chars=None)).stats
    assert (s.kept, s.duplicates, s.near_duplicates + s.contaminated) == (34, 2, 2)
    assert s.groups["groups"] == 0


def test_a_named_group_keeps_its_rows_together(tmp_path, raw_dir, tokenizer):
    from loraline.prepare.stage import collect

    rows = [
        {
            "doc": f"d{i % 5}",
            "prompt": f"Short question {i} about {VOCAB[i]}?",
            "completion": f"Answer {VOCAB[i + 1]}.",
        }
        for i in range(40)
    ]
    write_jsonl(raw_dir / "a.jsonl", rows)
    tenant = TenantParams(
        name="acme",
        raw_dir=raw_dir,
        sources=[SourceParams(path="*.jsonl", group="doc", columns={"prompt": "prompt", "completion": "completion"})],
    )
    out = collect(tenant, PrepareParams(), tokenizer)
    assert out.stats.kept == 40 and out.stats.groups["groups"] == 5 and out.stats.groups["largest"] == 8
    doc_split = {}
    for split, kept in out.splits.items():
        for row in kept:
            doc_split.setdefault(rows[row["row"] - 1]["doc"], set()).add(split)
    assert all(len(s) == 1 for s in doc_split.values())


def test_group_needs_explode_for_item():
    with pytest.raises(ValueError, match="group: 'item.passage' addresses item"):
        SourceParams(path="*.jsonl", group="item.passage")


def test_inspect_says_rows_share_contexts(raw_dir):
    write_jsonl(
        raw_dir / "a.jsonl",
        [{"context": passage(i % 3), "question": f"Q{i}?", "answer": f"A{i}."} for i in range(9)]
        + [json.loads(json.dumps(r)) for r in hand_built()[:8]],
    )
    (result,) = inspect_path(raw_dir / "a.jsonl")
    report = report_text([result])
    assert "shared contexts: 8 rows in 2 groups (largest 4)" in report
    assert "field 'context' repeats: 9 rows in 3 groups (largest 3); to group by it, add group: context" in report


def test_two_questions_with_one_answer_about_a_passage_are_two_rows(raw_dir, gather):
    """The same short answer to two questions about a passage: the passage set aside, the questions differ."""
    write_jsonl(
        raw_dir / "a.jsonl",
        [
            chat(f"{passage(0)}\nQuestion: who wrote it?", "Kaba."),
            chat(f"{passage(0)}\nQuestion: whose name opens the passage?", "Kaba."),
        ],
    )
    assert gather().stats.kept == 2

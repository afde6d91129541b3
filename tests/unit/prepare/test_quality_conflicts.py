"""prepare.conflicts: rows asking the same prompt with different answers are counted, and kept,
reduced to the first, or all rejected (issue 37)."""

from __future__ import annotations

import json

import pytest
from prepare_helpers import chat, write_jsonl

from loraline.config import DecontamParams, PrepareParams

ROWS = [
    chat("What colour is the sky?", "Blue."),  # 1: conflicts with 3 and 5
    chat("What is two plus two?", "Four."),  # 2
    chat("What  colour is the sky?", "Grey, today."),  # 3: same prompt once whitespace is normalized
    chat("What colour is the sky?", "Blue."),  # 4: exact duplicate of 1
    chat("What colour is the sky?", "Azure."),  # 5
    chat("What colour is grass?", "Green."),  # 6
]


def params(policy: str) -> PrepareParams:
    return PrepareParams(conflicts=policy, decontamination=DecontamParams(enabled=False))


@pytest.mark.parametrize(
    ("policy", "kept", "rejected_rows"),
    [
        ("keep", 5, []),
        ("first", 3, [3, 5]),
        ("reject", 2, [1, 3, 4, 5]),
    ],
)
def test_conflicting_answers_by_policy(raw_dir, run, policy, kept, rejected_rows):
    write_jsonl(raw_dir / "a.jsonl", ROWS)
    result = run(params=params(policy))
    stats = result.stats
    assert (stats.conflicting_answers, stats.conflicting_prompts) == (3, 1)
    assert stats.kept == kept
    rejects = [json.loads(line) for line in result.rejected_path.read_text().splitlines()]
    assert sorted(r["row"] for r in rejects) == rejected_rows
    assert all(r["reason"] == "conflicting_answers" for r in rejects)
    assert stats.rejected_by_reason["conflicting_answers"] == len(rejected_rows)
    # the exact duplicate follows its original: a duplicate while row 1 is kept, a reject once it is not
    assert stats.duplicates == (0 if policy == "reject" else 1)
    assert stats.rows_in == stats.kept + stats.rejected + stats.duplicates + stats.near_duplicates + stats.contaminated
    card = result.card_path.read_text()
    assert "conflicting answers: 3 rows over 1 prompts" in card and f"`conflicts={policy}`" in card


def test_a_reject_names_the_other_row(raw_dir, run):
    write_jsonl(raw_dir / "a.jsonl", ROWS)
    rejects = [json.loads(line) for line in run(params=params("reject")).rejected_path.read_text().splitlines()]
    details = {r["row"]: r["detail"] for r in rejects}
    assert "asks what a.jsonl row 3 asks" in details[1]  # the first names the second
    assert "asks what a.jsonl row 1 asks" in details[5]  # the others name the first
    assert "repeats a.jsonl row 1" in details[4]


def test_other_system_prompts_do_not_conflict(raw_dir, gather):
    rows = [
        {"messages": [{"role": "system", "content": "Answer in French."}, *chat("Hello", "Bonjour")["messages"]]},
        {"messages": [{"role": "system", "content": "Answer in German."}, *chat("Hello", "Hallo")["messages"]]},
    ]
    write_jsonl(raw_dir / "a.jsonl", rows)
    out = gather(params=params("reject"))
    assert out.stats.conflicting_answers == 0 and out.stats.kept == 2

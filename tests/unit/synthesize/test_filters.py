"""Each filter with cases it must catch and cases it must let through; rejects and counts in the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraline.config import SynthesizeParams, SynthFilterParams
from loraline.synthesize import Generated, Generator, synthesize_tenant
from loraline.synthesize.filters import (
    FilterChain,
    check_boilerplate,
    check_grounding,
    check_length,
    check_refusal,
    grounding,
)
from loraline.synthesize.prompt import parse_pairs

SPAN = "Refunds go back to the original payment method within five business days."
P = SynthFilterParams(
    min_question_chars=8, max_question_chars=60, min_answer_chars=2, max_answer_chars=80, min_grounding=0.7
)


def test_length_bounds() -> None:
    assert check_length("Where does my refund go?", "To the original payment method.", P) is None
    assert check_length("Refund?", "To the card.", P)[0] == "question_length"
    assert check_length("x" * 61, "To the card.", P)[0] == "question_length"
    assert check_length("Where does my refund go?", "A", P)[0] == "answer_length"
    assert check_length("Where does my refund go?", "y" * 81, P)[0] == "answer_length"


@pytest.mark.parametrize(
    "answer",
    [
        "As an AI, I don't have access to your order.",
        "I cannot help with that request.",
        "I'm sorry, but I can't provide refund details.",
        "As a language model I do not know.",
    ],
)
def test_refusals_are_caught(answer: str) -> None:
    assert check_refusal("Where is my refund?", answer)[0] == "refusal"


@pytest.mark.parametrize(
    "answer",
    [
        "Refunds go back to the original payment method.",
        "Customers who cannot find the label can email us.",
        "The identity team can unlock you after verifying your identity.",
    ],
)
def test_plain_answers_are_not_refusals(answer: str) -> None:
    assert check_refusal("Where is my refund?", answer) is None


@pytest.mark.parametrize(
    "question,answer",
    [
        ("Where is my refund?", "Sure! Here is the answer: five business days."),
        ("Where is my refund?", "Certainly, it takes five days."),
        ("Where is my refund?", "Five business days. I hope this helps!"),
        ("Here are 3 questions about refunds", "Five business days."),
        ("Where is my refund?", "Five days. Let me know if you have any other questions."),
    ],
)
def test_boilerplate_is_caught(question: str, answer: str) -> None:
    assert check_boilerplate(question, answer)[0] == "boilerplate"


@pytest.mark.parametrize(
    "answer",
    [
        "Surely not: refunds take five business days.",
        "Here, the refund goes back to the card.",
        "Reply to your order email; we are happy to look at it.",
    ],
)
def test_plain_answers_are_not_boilerplate(answer: str) -> None:
    assert check_boilerplate("Where is my refund?", answer) is None


def test_grounding() -> None:
    assert grounding("Refunds go back to the original payment method.", SPAN) == 1.0
    assert grounding("**Refunds** go back\nto the original payment method", SPAN) == 1.0  # markup and spacing
    assert grounding("", SPAN) == 0.0
    assert check_grounding("Within five business days, to the original payment method.", SPAN, 0.7) is None
    verdict = check_grounding("We send a cheque by post within a month.", SPAN, 0.7)
    assert verdict[0] == "ungrounded" and "min 0.7" in verdict[1]


def test_exact_duplicates_of_kept_rows_only() -> None:
    chain = FilterChain(P)
    assert chain.check("Where is my refund?", "Five business days.", SPAN + " Five") is None
    chain.keep("Where is my refund?", "Five business days.", "syn-1")
    assert chain.check("Where is my refund?", "Five business days.", SPAN) == (
        "duplicate",
        "same question and answer as row syn-1",
    )
    assert chain.check("where is my refund?", "Five business days.", SPAN) is None  # a casing variant is not exact
    assert chain.check("Where is my refund?", "Within five business days.", SPAN) is None


def test_parse_pairs_accepts_json_lines_arrays_and_fences() -> None:
    good = '{"question": "Q1?", "answer": "A1"}\n\n{"question": "Q2?", "answer": "A2"}\n'
    assert parse_pairs(good) == ([("Q1?", "A1"), ("Q2?", "A2")], [])
    assert parse_pairs('```json\n[{"question": "Q?", "answer": "A"}]\n```')[0] == [("Q?", "A")]
    pairs, errors = parse_pairs('Sure! Here are pairs:\n{"question": "Q?", "answer": "A"}\n{"question": ""}')
    assert pairs == [("Q?", "A")] and len(errors) == 2
    assert errors[0].startswith("line 1: not JSON") and "line 3" in errors[1]
    assert parse_pairs("") == ([], ["empty reply"])


class Scripted:
    """A generator that yields fixed items, to drive every filter through the stage."""

    name, model, template_sha256 = "scripted", "none", "0" * 64

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def generate(self, doc, seed, seed_tasks=()):
        if doc.source != "returns_policy.md":
            return
        span = (0, len(doc.text))
        for q, a in self.items:
            if q == "UNPARSEABLE":
                yield Generated(
                    "", "", doc.source, span, method="scripted", reject="unparseable", detail="line 1: not JSON"
                )
            else:
                yield Generated(q, a, doc.source, span, method="scripted")

    def usage(self) -> dict:
        return {}


def test_stage_writes_rejects_with_reasons_and_counts_reconcile(documents: Path, tmp_path: Path) -> None:
    items = [
        ("How long do I have to return items?", "You can return most items within 30 days of delivery."),
        ("How long do I have to return items?", "You can return most items within 30 days of delivery."),
        ("Huh?", "Within 30 days."),
        ("How long do I have to return items?", "As an AI, I cannot see your order."),
        ("How long do I have to return items?", "Sure! Here is the answer: 30 days."),
        ("How long do I have to return items?", "You get a full year and free pizza with every return."),
        ("UNPARSEABLE", ""),
    ]
    gen = Scripted(items)
    assert isinstance(gen, Generator)
    result = synthesize_tenant(
        "lampwick", SynthesizeParams(), documents, tmp_path / "out", tmp_path / "stats.json", seed=1, generator=gen
    )
    assert result.generated == 7 and result.kept == 1
    assert result.rejected == {
        "duplicate": 1,
        "question_length": 1,
        "refusal": 1,
        "boilerplate": 1,
        "ungrounded": 1,
        "unparseable": 1,
    }
    rejected = [json.loads(x) for x in result.rejected_path.read_text().splitlines()]
    assert [r["reason"] for r in rejected] == [
        "duplicate",
        "question_length",
        "refusal",
        "boilerplate",
        "ungrounded",
        "unparseable",
    ]
    assert all(r["detail"] and r["provenance"]["source"] == "returns_policy.md" for r in rejected)
    stats = json.loads(result.stats_path.read_text())
    assert stats["generated"] == stats["kept"] + sum(stats["rejected_by_reason"].values()) == 7
    assert stats["by_generator"] == {"scripted": {"generated": 7, "kept": 1}}

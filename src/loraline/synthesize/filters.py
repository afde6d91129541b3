"""Filters on synthetic rows: each a small pure function returning None (keep) or (reason, detail).

Order in `FilterChain.check`: length, refusal, boilerplate, grounding, then exact duplicates of a row
already kept (so every duplicate points at a kept row, as in prepare). Grounding is the share of the
answer's word tokens found in its source span: an answer copied from the document scores 1.0, a
model's invention scores low.
"""

from __future__ import annotations

import re

from loraline.config import SynthFilterParams
from loraline.synthesize.passages import clean

Verdict = tuple[str, str] | None

QUESTION_LENGTH = "question_length"
ANSWER_LENGTH = "answer_length"
REFUSAL = "refusal"
BOILERPLATE = "boilerplate"
UNGROUNDED = "ungrounded"
DUPLICATE = "duplicate"
UNPARSEABLE = "unparseable"  # set by the model generators, not here
REASONS = (UNPARSEABLE, QUESTION_LENGTH, ANSWER_LENGTH, REFUSAL, BOILERPLATE, UNGROUNDED, DUPLICATE)

_REFUSAL = re.compile(
    r"\b(?:as an ai\b|as a (?:large )?language model|i(?: a|')m (?:sorry|unable|not able)|i cannot\b|i can(?:no|')t "
    r"(?:help|assist|answer|provide)|i am (?:sorry|unable|not able)|i do(?: no|n')t have (?:access|information)|"
    r"i won't be able)",
    re.I,
)
_BOILERPLATE = re.compile(
    r"^(?:sure|certainly|of course|absolutely|great question)\b[!,.]|^here (?:is|are) (?:a|an|the|some|\d+)\b|"
    r"\b(?:i hope this helps|let me know if you (?:have|need)|feel free to ask|happy to help)\b",
    re.I,
)
_WORD = re.compile(r"\w+")


def check_length(question: str, answer: str, p: SynthFilterParams) -> Verdict:
    if not p.min_question_chars <= len(question) <= p.max_question_chars:
        return (
            QUESTION_LENGTH,
            f"question has {len(question)} chars (allowed {p.min_question_chars}-{p.max_question_chars})",
        )
    if not p.min_answer_chars <= len(answer) <= p.max_answer_chars:
        return ANSWER_LENGTH, f"answer has {len(answer)} chars (allowed {p.min_answer_chars}-{p.max_answer_chars})"
    return None


def check_refusal(question: str, answer: str) -> Verdict:
    m = _REFUSAL.search(answer)
    return (REFUSAL, f"answer says {m.group(0)!r}") if m else None


def check_boilerplate(question: str, answer: str) -> Verdict:
    for field, text in (("question", question), ("answer", answer)):
        m = _BOILERPLATE.search(text.strip())
        if m:
            return BOILERPLATE, f"{field} has {m.group(0)!r}"
    return None


def tokens(text: str) -> list[str]:
    return _WORD.findall(clean(text).lower())


def grounding(answer: str, span_text: str) -> float:
    """Share of the answer's word tokens that occur in the span (0.0 for an answer with no words)."""
    words = tokens(answer)
    if not words:
        return 0.0
    present = set(tokens(span_text))
    return sum(w in present for w in words) / len(words)


def check_grounding(answer: str, span_text: str, min_grounding: float) -> Verdict:
    g = grounding(answer, span_text)
    return (
        (UNGROUNDED, f"{g:.2f} of the answer's words are in its source span (min {min_grounding})")
        if g < min_grounding
        else None
    )


class FilterChain:
    """The filters in order; remembers kept rows for the duplicate check."""

    def __init__(self, params: SynthFilterParams) -> None:
        self.params = params
        self._kept: dict[tuple[str, str], str] = {}

    def check(self, question: str, answer: str, span_text: str) -> Verdict:
        verdict = (
            check_length(question, answer, self.params)
            or check_refusal(question, answer)
            or check_boilerplate(question, answer)
            or check_grounding(answer, span_text, self.params.min_grounding)
        )
        if verdict:
            return verdict
        return self.duplicate(question, answer)

    def duplicate(self, question: str, answer: str) -> Verdict:
        original = self._kept.get((question, answer))
        return (DUPLICATE, f"same question and answer as row {original}") if original else None

    def keep(self, question: str, answer: str, row_id: str) -> None:
        self._kept[(question, answer)] = row_id

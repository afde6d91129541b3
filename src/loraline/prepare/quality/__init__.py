"""Data-quality steps that every row, real and synthetic, passes in the prepare stage.

Each step is a small, independently testable object: near-duplicates (MinHash LSH), PII scrubbing,
test-set decontamination (word n-gram overlap) and the synthetic/real mix. They share one notion of
a row's words, so that "similar" means the same thing to near-dedup and to decontamination.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

_WORD = re.compile(r"\w+")


def row_text(messages: Iterable[dict]) -> str:
    """The user and assistant turns joined: what a row teaches. The system prompt is left out, since it
    is shared boilerplate that would make unrelated rows of one tenant look alike."""
    return "\n".join(m["content"] for m in messages if m["role"] in ("user", "assistant"))


def prompt_text(messages: Iterable[dict]) -> str:
    """The user turns joined: what a row asks (the system prompt left out, as in row_text)."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def answer_turns(messages: Iterable[dict]) -> list[str]:
    """The assistant turns: what a row trains on, which makes two rows the same example or not."""
    return [m["content"] for m in messages if m["role"] == "assistant"]


def answer_text(messages: Iterable[dict]) -> str:
    """The assistant turns joined."""
    return "\n".join(answer_turns(messages))


def words(text: str) -> list[str]:
    """NFKC-normalized, case-folded word tokens: punctuation and whitespace do not make rows differ."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def ngrams(tokens: list[str], n: int) -> set[str]:
    """Word n-grams as strings; a row shorter than n words is one n-gram of all its words."""
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}

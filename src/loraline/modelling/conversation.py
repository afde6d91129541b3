"""A chat row as a question and its answer: the conversation before the last assistant turn (what the
model is asked) and that turn (what it should say). Evaluate scores generations against the answer; the
merge stage draws probes from the tenant's test rows the same way, so a probe is a prompt evaluate asks."""

from __future__ import annotations

from collections.abc import Sequence


def split_conversation(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(the conversation before the last assistant turn, that turn's content)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("a test row has no assistant turn: nothing to compare a generation against")
    return [dict(m) for m in messages[:last]], messages[last]["content"]

"""A judge for the evaluate.judge tests: the synthesize tests' small OpenAI-compatible server on 127.0.0.1
(synth_helpers.FakeOpenAI), replying with the verdict a rule gives for the two answers it was shown."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "synthesize"))
from synth_helpers import SECRET, FakeOpenAI  # noqa: E402

from loraline.config import JudgeParams  # noqa: E402

__all__ = ["SECRET", "KEY_ENV", "FakeJudge", "judge_params", "longer_wins", "verdict"]
KEY_ENV = "LORALINE_TEST_JUDGE_KEY"
SHOWN = re.compile(r"\[Answer A\]\n(?P<a>.*)\n\n\[Answer B\]\n(?P<b>.*)\n\nWhich answer is better\?", re.DOTALL)


def verdict(word: str) -> str:
    return json.dumps({"reason": "because", "verdict": word})


def longer_wins(a: str, b: str) -> str:
    """A rule whose verdicts a test can recompute: the longer answer wins, equal lengths tie."""
    return verdict("A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie")


class FakeJudge(FakeOpenAI):
    """`rule(answer_a, answer_b) -> reply text` decides each request."""

    def __init__(self, rule: Callable[[str, str], str], fail: list[int] | None = None) -> None:
        super().__init__(fail=fail)
        self.rule = rule

    def answer(self, body: dict) -> str:
        shown = SHOWN.search(body["messages"][-1]["content"])
        assert shown is not None, body
        return self.rule(shown["a"], shown["b"])

    def chats(self) -> list[dict]:
        return [r["body"] for r in self.requests]


def judge_params(base_url: str, **overrides) -> JudgeParams:
    endpoint = dict(
        base_url=base_url, api_key_env=KEY_ENV, requests_per_minute=60000, max_retries=2, backoff_s=0.01, timeout_s=5
    )
    return JudgeParams(**{"endpoint": endpoint, "model": "judge-7b", **overrides})

"""Helpers for the prepare tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def synthetic(user: str, answer: str, i: int = 0, **provenance) -> dict:
    """A row as the synthesize stage writes it to data/synthetic/<tenant>/rows.jsonl."""
    return {
        "id": f"syn-{i:04d}",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "provenance": {
            "generator": "offline",
            "model": None,
            "prompt_template_sha256": "ab" * 32,
            "source_file": "guide.md",
            "span": [0, 10],
            "seed": 1234,
            **provenance,
        },
    }


def split_for(user: str, answer: str, salt: str = "loraline") -> str:
    """The split prepare gives a plain user/assistant row (no system prompt, no PII)."""
    from loraline.config import SplitParams
    from loraline.prepare.split import content_hash, split_of

    return split_of(content_hash([("user", user), ("assistant", answer)]), SplitParams(salt=salt))


TOPICS = [
    "the blue kettle",
    "a velvet armchair",
    "the oak dining table",
    "linen bed sheets",
    "a ceramic vase",
    "the brass floor lamp",
    "a wool rug",
    "the bamboo bath mat",
    "a cast iron skillet",
    "the glass pendant light",
]


def ticket(i: int, variant: int = 0) -> tuple[str, str]:
    """A distinct, realistic support exchange per i; variant > 0 changes one word (a paraphrase)."""
    topic = TOPICS[i % len(TOPICS)]
    verb = ("arrived", "showed up", "came")[variant % 3]
    user = (
        f"Hello, my order number {10000 + i * 37} with {topic} {verb} yesterday but the box was crushed and "
        f"one corner is cracked. Customer {i} would like a replacement sent to the usual address rather than a refund."
    )
    answer = (
        f"Sorry about {topic}. A replacement for order "
        f"{10000 + i * 37} ships today, no need to return the damaged one."
    )
    return user, answer

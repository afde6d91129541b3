"""What the model generators (hf, openai) share: passages, the prompt, and the strict output format.

The prompt asks for JSON lines `{"question": ..., "answer": ...}` and nothing else, because a format
that is checked line by line turns a rambling or truncated reply into rejects with reasons instead
of a crash or silently wrong rows. The tenant's seed tasks are the few-shot examples. The template's
sha256 goes into every row's provenance, so a prompt change is visible in the data.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence

from loraline.config import SeedTask, SynthesizeParams
from loraline.provenance import sha256_bytes
from loraline.synthesize.base import Generated
from loraline.synthesize.passages import Document, Span, clean

MAX_PASSAGE_CHARS = 1500
SYSTEM = (
    "You write training data for an assistant that answers questions about the document below. "
    "Write question/answer pairs that the passage answers. Each answer must be taken from the passage or "
    "be fully supported by it; do not add facts. Reply only with JSON lines, one object per line: "
    '{"question": "...", "answer": "..."}. No other text.'
)
USER = (
    "{examples}Passage from {source}:\n<<<\n{passage}\n>>>\n\n"
    "Write {n} different question/answer pairs about this passage as JSON lines."
)
EXAMPLES = "Examples of the tasks we want (match their style):\n{lines}\n\n"
TEMPLATE_SHA256 = sha256_bytes(json.dumps({"system": SYSTEM, "user": USER, "examples": EXAMPLES}).encode())


def passages(doc: Document, max_chars: int = MAX_PASSAGE_CHARS) -> list[Span]:
    """Consecutive blocks of one section, up to `max_chars` each: enough context for a model."""
    out: list[Span] = []
    start = end = None
    heading = object()
    for block in doc.blocks:
        s, e = block.span
        if start is not None and (block.heading != heading or e - start > max_chars):
            out.append((start, end))
            start = None
        if start is None:
            start, heading = s, block.heading
        end = e
    if start is not None:
        out.append((start, end))
    return out


def build_messages(doc: Document, span: Span, seed_tasks: Sequence[SeedTask], n: int) -> list[dict[str, str]]:
    examples = ""
    if seed_tasks:
        lines = "\n".join(
            json.dumps({"question": t.instruction, "answer": t.output}, ensure_ascii=False) for t in seed_tasks
        )
        examples = EXAMPLES.format(lines=lines)
    user = USER.format(examples=examples, source=doc.source, passage=doc.text[span[0] : span[1]].strip(), n=n)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def passage_seed(seed: int, source: str, span: Span) -> int:
    """A per-passage seed: stable across runs and independent of the other passages."""
    digest = hashlib.sha256(f"{seed}|{source}|{span[0]}|{span[1]}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def parse_pairs(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(question, answer) pairs from a model's reply, and one error per line that is not a pair.

    Accepts JSON lines, or one JSON array of objects; code fences around them are ignored.
    """
    body = re.sub(r"^\s*```[a-zA-Z]*\s*$", "", text, flags=re.M).strip()
    pairs: list[tuple[str, str]] = []
    errors: list[str] = []
    if body.startswith("["):
        try:
            items = json.loads(body)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            for i, item in enumerate(items):
                _take(item, f"item {i}", json.dumps(item, ensure_ascii=False), pairs, errors)
            return pairs, errors
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {n}: not JSON ({exc.msg}): {line.strip()[:200]}")
            continue
        _take(item, f"line {n}", line.strip(), pairs, errors)
    if not pairs and not errors:
        errors.append("empty reply")
    return pairs, errors


def _take(item: object, where: str, raw: str, pairs: list, errors: list) -> None:
    if (
        isinstance(item, dict)
        and isinstance(item.get("question"), str)
        and isinstance(item.get("answer"), str)
        and item["question"].strip()
        and item["answer"].strip()
    ):
        pairs.append((clean(item["question"]), item["answer"].strip()))
    else:
        errors.append(f'{where}: not an object with non-empty "question" and "answer" strings: {raw[:200]}')


class ModelGenerator:
    """generate() for any backend that can complete a chat: subclasses provide `complete`."""

    name = "model"
    model: str | None = None
    template_sha256 = TEMPLATE_SHA256

    def __init__(self, params: SynthesizeParams) -> None:
        self.params = params

    def complete(self, messages: list[dict[str, str]], seed: int) -> str:
        raise NotImplementedError

    def generate(self, doc: Document, seed: int, seed_tasks: Sequence[SeedTask] = ()) -> Iterator[Generated]:
        used = list(range(len(seed_tasks)))
        for span in passages(doc):
            messages = build_messages(doc, span, seed_tasks, self.params.pairs_per_passage)
            reply = self.complete(messages, passage_seed(seed, doc.source, span))
            pairs, errors = parse_pairs(reply)
            for q, a in pairs:
                yield Generated(question=q, answer=a, source=doc.source, span=span, seed_tasks=used, method=self.name)
            for error in errors:
                yield Generated(
                    question="",
                    answer="",
                    source=doc.source,
                    span=span,
                    seed_tasks=used,
                    method=self.name,
                    reject="unparseable",
                    detail=error,
                )

    def usage(self) -> dict:
        return {}

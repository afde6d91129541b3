"""The preference shape: a context with a chosen and a rejected answer, read from its raw forms.

A raw row is a preference row when it has both `chosen` and `rejected` (non-null). Its context is
`prompt` (a string, or a message list as TRL writes it) or `messages`, with an optional `system`;
each answer is
- a string: the assistant's answer, or Anthropic-HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...");
- a message list (role/content or from/value): a full conversation.
Both answers are read as conversations; what they share from the start is context too, and each
must then hold exactly one more turn, the assistant's answer: anything else is no pair (bad_pair,
or no_assistant_turn naming the turn). The pair becomes one Record: messages = context + chosen,
`rejected` = the rejected answer, shape 'preference', a content hash over both answers (exact
duplicates are the same context, chosen and rejected). Chosen and rejected equal once normalized
is same_answers.

Rated lists (UltraFeedback: completions with scores) become one pair in mapping (sources[].preference,
`pick_pair`): best against worst, or against the best scored below it, when the scores are apart by
min_margin; else no_pair.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from loraline.config import PairPickParams
from loraline.fieldpath import FieldPath, Missing, parse_path
from loraline.prepare.fields import Bad, ShapeOptions, Turn, json_type, message_list, message_turns, text
from loraline.prepare.render import Rendered, render_batch
from loraline.prepare.schema import ChatTemplateError, Message, Record, RejectReason
from loraline.prepare.split import content_hash, normalize

ANSWER_KEYS = ("chosen", "rejected")
# The keys of the other shapes: a preference row holding one of them is ambiguous.
OTHER_SHAPE_KEYS = ("instruction", "input", "output", "completion", "conversations")
_HH_START = re.compile(r"\s*Human:")
_HH_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def is_pair_row(present: set[str]) -> bool:
    """Whether a row with these non-null keys is a preference row."""
    return all(key in present for key in ANSWER_KEYS)


@dataclass(frozen=True)
class PairTurns:
    context: list[Turn]  # system, prompt or messages, then what the two answers share
    chosen: Turn
    rejected: Turn


def pair_turns(row: dict, tabular: bool, options: ShapeOptions) -> PairTurns:
    """The context and the two answers of a preference row; raises Bad naming the field."""
    mixed = [key for key in OTHER_SHAPE_KEYS if row.get(key) is not None]
    if mixed:
        raise Bad(
            RejectReason.UNKNOWN_SHAPE,
            None,
            f"mixes a preference pair (chosen, rejected) with {', '.join(mixed)}; a preference row's context is "
            "prompt or messages",
        )
    context = _context(row, tabular, options)
    chosen = _answer(row, "chosen", tabular, options)
    rejected = _answer(row, "rejected", tabular, options)
    _check_ends_with_answer(chosen)
    _check_ends_with_answer(rejected)
    shared = _shared_turns(chosen, rejected)
    context += chosen[:shared]
    _check_one_answer(chosen, shared, "chosen", rejected)
    _check_one_answer(rejected, shared, "rejected", chosen)
    if not context:
        raise Bad(
            RejectReason.MISSING_FIELD,
            "prompt",
            "is missing: a pair of bare answers needs the prompt (or messages) they answer",
        )
    if context[-1][0] not in ("user", "tool"):
        raise Bad(
            RejectReason.BAD_PAIR,
            context[-1][2],
            f"the context ends with a {context[-1][0]} message; the answers must reply to a user turn",
        )
    return PairTurns(context, chosen[-1], rejected[-1])


def _context(row: dict, tabular: bool, options: ShapeOptions) -> list[Turn]:
    if row.get("prompt") is not None and row.get("messages") is not None:
        raise Bad(
            RejectReason.UNKNOWN_SHAPE, None, "has both prompt and messages; a preference row's context is one of them"
        )
    key = "messages" if row.get("messages") is not None else "prompt"
    turns: list[Turn] = []
    if isinstance(row.get(key), str) and key == "prompt":
        turns = [("user", text(row, "prompt", clean=options.clean), "prompt")]
    elif row.get(key) is not None:
        turns = message_turns(message_list(row, key, tabular), key, _is_sharegpt(row[key]), options)
    system = text(row, "system", required=False, clean=options.clean)
    return [("system", system, "system"), *turns] if system else turns


def _answer(row: dict, key: str, tabular: bool, options: ShapeOptions) -> list[Turn]:
    """An answer as a conversation: a plain answer is one assistant turn."""
    value = row[key]
    if tabular and isinstance(value, str) and value.lstrip().startswith("["):
        value = _json_list(value)
    if isinstance(value, list):
        return message_turns(message_list({key: value}, key, False), key, _is_sharegpt(value), options)
    if not isinstance(value, str):
        raise Bad(
            RejectReason.WRONG_TYPE,
            key,
            f"must be the answer (a string, or HH text) or a conversation (a list of messages), "
            f"got a JSON {json_type(value)}",
        )
    if _HH_START.match(value) and "\n\nAssistant:" in value:
        return _hh_turns(row, key, options)
    return [("assistant", text(row, key, clean=options.clean), key)]


def _hh_turns(row: dict, key: str, options: ShapeOptions) -> list[Turn]:
    """Anthropic-HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as turns; turn n's path is key[n]."""
    raw = text(row, key)  # type, undecodable bytes and emptiness of the whole text
    pieces = _HH_MARKER.split(raw)
    turns = []
    for n, (speaker, content) in enumerate(zip(pieces[1::2], pieces[2::2])):
        path = f"{key}[{n}]"
        if options.clean is not None:
            content = options.clean(content)
        if not content.strip():
            raise Bad(RejectReason.EMPTY_FIELD, path, f"HH text's {speaker} turn {n + 1} is empty")
        turns.append((_HH_ROLES[speaker], content.strip(), path))
    return turns


def _shared_turns(chosen: list[Turn], rejected: list[Turn]) -> int:
    """How many turns the two conversations share from the start (same role, same normalized text)."""
    n = 0
    for (role_c, text_c, _), (role_r, text_r, _) in zip(chosen, rejected):
        if role_c != role_r or normalize(text_c) != normalize(text_r):
            break
        n += 1
    return n


def _check_ends_with_answer(turns: list[Turn]) -> None:
    if turns[-1][0] != "assistant":
        raise Bad(
            RejectReason.NO_ASSISTANT_TURN,
            turns[-1][2],
            f"the conversation ends with a {turns[-1][0]} message; the last message must be the assistant's answer",
        )


def _check_one_answer(turns: list[Turn], shared: int, key: str, other: list[Turn]) -> None:
    """After the turns both conversations share, one turn: the assistant's answer."""
    rest = len(turns) - shared
    if rest == 0 and len(other) == shared:
        raise Bad(RejectReason.SAME_ANSWERS, "rejected", "is the same answer as chosen; a pair needs two answers")
    if rest != 1:
        raise Bad(
            RejectReason.BAD_PAIR,
            key,
            f"chosen and rejected differ before their last assistant turn ({key} has {rest} turns after the "
            f"{shared} they share); a pair is two answers to one context",
        )


def _is_sharegpt(items: Any) -> bool:
    return isinstance(items, list) and bool(items) and all(isinstance(m, dict) and "from" in m for m in items)


def _json_list(value: str) -> Any:
    """A CSV cell's message list (JSON text); any other text, "[1] Unplug it first." included, is an answer."""
    try:
        items = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return value
    return items if isinstance(items, list) and items and all(isinstance(m, dict) for m in items) else value


def record_turns(pair: PairTurns) -> tuple[list[Turn], Turn]:
    """The chosen conversation's turns and the rejected answer's, for shapes._chat."""
    return [*pair.context, pair.chosen], pair.rejected


def pair_hash(messages: Sequence[Message], rejected: str) -> str:
    """A pair's identity: its context, its chosen answer and its rejected answer."""
    return content_hash([*((m.role, m.content) for m in messages), ("rejected", rejected)])


def same_answers(record: Record) -> bool:
    return bool(record.rejected) and normalize(record.messages[-1].content) == normalize(record.rejected)


# -- the per-row pass (rows.py) ------------------------------------------------------------------


def rejected_conversation(record: Record) -> tuple[Message, ...]:
    """The context with the rejected answer in place of the chosen one."""
    return (*record.messages[:-1], Message("assistant", record.rejected))


def render_records(
    records: Sequence[Record], tokenizer
) -> list[tuple[Rendered | ChatTemplateError, Rendered | ChatTemplateError | None]]:
    """(chosen conversation, rejected conversation or None) of each record, rendered in one batch."""
    pairs = [i for i, record in enumerate(records) if record.rejected]
    conversations = [r.messages for r in records] + [rejected_conversation(records[i]) for i in pairs]
    results = render_batch(conversations, tokenizer)
    rejected: list = [None] * len(records)
    for i, result in zip(pairs, results[len(records) :]):
        rejected[i] = result
    return list(zip(results[: len(records)], rejected))


def pair_values(rejected: Rendered | None, record: Record) -> tuple[str, list[int], list[int], int]:
    """The values of features.PREFERENCE_COLUMNS: empty for a row that is no pair."""
    if rejected is None:
        return "", [], [], 0
    return record.rejected, rejected.input_ids, rejected.labels, rejected.n_tokens


def scrub(record: Record, scrubber) -> tuple[Record, Any]:
    """The rejected answer with its PII masked (the conversation is scrubbed as any row's), and the counts."""
    masked, found = scrubber.scrub(record.rejected)
    return replace(record, rejected=masked), found


def rehash(record: Record) -> Record:
    return replace(record, content_hash=pair_hash(record.messages, record.rejected))


def pair_group(record: Record, group: str | None) -> str:
    """A pair's group: the row's own (a named group or a shared passage), else its context, so that the
    pairs answering one prompt go whole to one split."""
    if group is not None:
        return group
    return "prompt\x00" + pair_hash(record.messages[:-1], "")


# -- rated lists (sources[].preference, in mapping) ------------------------------------------------


@dataclass(frozen=True)
class PairPick:
    """sources[].preference, compiled."""

    params: PairPickParams
    items: FieldPath
    answer: FieldPath
    score: FieldPath

    @classmethod
    def of(cls, params: PairPickParams) -> PairPick:
        return cls(params, parse_path(params.list), parse_path(params.answer), parse_path(params.score))

    @property
    def origin(self) -> str:
        return f"{self.params.list}[].{self.params.answer}"


class NoPair(Exception):
    """A rated list gives no pair: the reason (no_pair, wrong_type) and why."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def pick_pair(scope: dict, pick: PairPick) -> tuple[str, str]:
    """(chosen, rejected) answers from the rated list; raises Missing (no list) or NoPair."""
    items = pick.items.resolve(scope)
    if not isinstance(items, list):
        raise NoPair(RejectReason.WRONG_TYPE, f"must be a list of rated answers, got a JSON {json_type(items)}")
    rated = [(score, i, answer) for i, element in enumerate(items) for score, answer in _rated(element, pick)]
    params = pick.params
    if len(rated) < 2:
        raise NoPair(
            RejectReason.NO_PAIR,
            f"holds {len(rated)} rated answers of {len(items)} (text at {params.answer!r}, a number at "
            f"{params.score!r}); a pair needs two",
        )
    best = min(rated, key=lambda r: (-r[0], r[1]))
    lower = [r for r in rated if r[0] < best[0]]
    if params.pick == "best_vs_worst":
        other = min(rated, key=lambda r: (r[0], r[1]))
    else:
        other = min(lower, key=lambda r: (-r[0], r[1])) if lower else best
    margin = best[0] - other[0]
    if not lower or margin < params.min_margin - 1e-9:
        raise NoPair(
            RejectReason.NO_PAIR,
            f"no pair above the margin: the best answer ({params.list}[{best[1]}], score {best[0]:g}) and the "
            f"{_other_name(params)} ({params.list}[{other[1]}], score {other[0]:g}) are {margin:g} apart; "
            f"preference.min_margin is {params.min_margin:g}, and the chosen answer must score higher",
        )
    return best[2], other[2]


def _rated(element: Any, pick: PairPick) -> list[tuple[float, str]]:
    """[(score, answer)] of one list element, or [] when it has no text answer or no numeric score."""
    try:
        answer, score = pick.answer.resolve(element), pick.score.resolve(element)
    except Missing:
        return []
    if not isinstance(answer, str) or not answer.strip() or isinstance(score, bool):
        return []
    if not isinstance(score, (int, float)) or not math.isfinite(score):
        return []
    return [(float(score), answer)]


def _other_name(params: PairPickParams) -> str:
    return "worst" if params.pick == "best_vs_worst" else "second best"

"""Raw row to canonical `Record`, or a `Reject` naming the file, row, field and reason.

Recognized shapes (keys whose value is null count as absent, other keys such as "id" or "meta" are
ignored):

- instruction: instruction, output, optional input and system (alpaca)
- chat: messages = [{role, content}], roles system/user/assistant/tool (OpenAI), optional system
- sharegpt: conversations = [{from, value}], from human/user, gpt/assistant, system, tool, optional system
- prompt_completion: prompt, completion, optional system
- preference: chosen and rejected, with prompt or messages as their context, optional system
  (preference.py: answers as strings, message lists or Anthropic-HH text)
- document: only text (plus ignored metadata); .txt/.md files are documents

A reject's field is the row's top-level key ("messages"), and its detail gives the full path, which
indexes lists from 0: "messages[2].role". too_long concerns the whole row, so its field is None.
Fields are read by fields.py (optional ones that are empty count as absent).

Options for mapped sources (tenants.<t>.sources[]): `roles` renames source roles (tool turns stay
context: only assistant turns are trained on), `clean` rewrites every text field (the control-token
policy) before the empty check, and `origins` names the source path a canonical field came from, so
that a reject says "field 'output' (from 'answer')".
"""

from __future__ import annotations

from dataclasses import dataclass

from loraline.prepare import preference
from loraline.prepare.fields import (
    CHAT_ROLES,
    NO_OPTIONS,
    SHAREGPT_ROLES,
    Bad,
    ShapeOptions,
    Turn,
    json_type,
    message_list,
    message_turns,
    text,
)
from loraline.prepare.readers import RawRow
from loraline.prepare.schema import Message, Record, Reject, RejectReason, locate, top_field
from loraline.prepare.split import content_hash

SHAPE_KEYS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
}
SHAPES_HELP = (
    "instruction+output (alpaca), messages (chat), conversations (sharegpt), prompt+completion, or text (document)"
)
__all__ = [
    "CHAT_ROLES",
    "NO_OPTIONS",
    "SHAPES_HELP",
    "SHAPE_KEYS",
    "SHAREGPT_ROLES",
    "Parsed",
    "ShapeOptions",
    "json_type",
    "to_record",
]


@dataclass(frozen=True)
class Parsed:
    record: Record
    fields: tuple[str, ...]  # the raw field each message came from, so later rejects can name it
    rejected_field: str | None = None  # a pair's: the raw field its rejected answer came from


def to_record(
    raw: RawRow, tenant: str, *, max_chars: int, system_prompt: str | None = None, options: ShapeOptions = NO_OPTIONS
) -> Parsed | Reject:
    try:
        return _parse(raw, tenant, max_chars, system_prompt, options)
    except Bad as bad:
        shown = bad.field
        origin = options.origins.get(top_field(bad.field) or "")
        if origin is not None:
            shown = f"{bad.field} (from {origin})"
        return Reject(
            tenant,
            raw.source_file,
            raw.row,
            top_field(bad.field),
            bad.reason,
            f"{locate(raw.source_file, raw.row, shown, raw.item)}: {bad.message}",
            raw.excerpt,
        )


def _parse(raw: RawRow, tenant: str, max_chars: int, system_prompt: str | None, options: ShapeOptions) -> Parsed:
    row = raw.value
    if not isinstance(row, dict):
        raise Bad(
            RejectReason.WRONG_TYPE, None, f"row is a JSON {json_type(row)}; expected an object with {SHAPES_HELP}"
        )
    present = {k for k, v in row.items() if v is not None}
    if preference.is_pair_row(present):
        turns, rejected = preference.record_turns(preference.pair_turns(row, raw.tabular, options))
        return _chat(raw, tenant, "preference", turns, max_chars, system_prompt, rejected)
    shapes = [name for name, keys in SHAPE_KEYS.items() if present.intersection(keys)]
    if len(shapes) > 1:
        raise Bad(
            RejectReason.UNKNOWN_SHAPE,
            None,
            f"mixes the keys of several shapes ({', '.join(shapes)}); a row must have exactly one of {SHAPES_HELP}",
        )
    if not shapes:
        if "text" in present:
            return _document(raw, tenant, row, max_chars, options.clean)
        keys = ", ".join(sorted(present)) or "none"
        lone = [key for key in preference.ANSWER_KEYS if key in present]
        hint = f"; a preference row needs both chosen and rejected (it has only {lone[0]})" if lone else ""
        raise Bad(RejectReason.UNKNOWN_SHAPE, None, f"has no known shape (keys: {keys}); expected {SHAPES_HELP}{hint}")
    shape = shapes[0]
    clean = options.clean
    if shape == "instruction":
        turns = _instruction(row, clean)
    elif shape == "prompt_completion":
        turns = _prompt_completion(row, clean)
    else:
        turns = _conversation(row, shape, raw.tabular, options)
    return _chat(raw, tenant, shape, turns, max_chars, system_prompt)


def _instruction(row: dict, clean) -> list[Turn]:
    instruction = text(row, "instruction", clean=clean)
    extra = text(row, "input", required=False, clean=clean)
    output = text(row, "output", clean=clean)
    system = text(row, "system", required=False, clean=clean)
    turns = [("system", system, "system")] if system else []
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [*turns, ("user", user, "instruction"), ("assistant", output, "output")]


def _prompt_completion(row: dict, clean) -> list[Turn]:
    prompt = text(row, "prompt", clean=clean)
    completion = text(row, "completion", clean=clean)
    system = text(row, "system", required=False, clean=clean)
    turns = [("system", system, "system")] if system else []
    return [*turns, ("user", prompt, "prompt"), ("assistant", completion, "completion")]


def _conversation(row: dict, shape: str, tabular: bool, options: ShapeOptions) -> list[Turn]:
    key = "messages" if shape == "chat" else "conversations"
    items = message_list(row, key, tabular)
    system = text(row, "system", required=False, clean=options.clean)
    turns = [("system", system, "system")] if system else []
    return [*turns, *message_turns(items, key, shape == "sharegpt", options)]


def _chat(
    raw: RawRow,
    tenant: str,
    shape: str,
    turns: list[Turn],
    max_chars: int,
    system_prompt: str | None,
    rejected: Turn | None = None,
) -> Parsed:
    """The conversation as a Record; `rejected`: a pair's rejected answer, in place of the last turn."""
    if system_prompt and not any(role == "system" for role, _, _ in turns):
        turns = [("system", system_prompt, "system_prompt"), *turns]
    list_field = SHAPE_KEYS[shape][0] if shape in ("chat", "sharegpt") else None
    roles = [role for role, _, _ in turns]
    if "assistant" not in roles:
        raise Bad(RejectReason.NO_ASSISTANT_TURN, list_field, "has no assistant message; there is nothing to train on")
    if roles[-1] != "assistant":
        raise Bad(
            RejectReason.NO_ASSISTANT_TURN,
            turns[-1][2],
            f"the conversation ends with a {roles[-1]} message; the last message must be the assistant's answer",
        )
    if all(i == 0 for i, role in enumerate(roles) if role == "assistant"):
        # A chat template cannot render the prompt of an opening assistant message (there is none).
        raise Bad(
            RejectReason.NO_ASSISTANT_TURN,
            turns[0][2],
            "the only assistant message is the first one; nothing prompts it",
        )
    _check_length(turns if rejected is None else max(turns, [*turns[:-1], rejected], key=_chars), max_chars)
    messages = tuple(Message(role, content) for role, content, _ in turns)
    record = Record(
        tenant=tenant,
        kind="chat",
        source_file=raw.source_file,
        row=raw.row,
        shape=shape,
        content_hash=(
            content_hash((role, content) for role, content, _ in turns)
            if rejected is None
            else preference.pair_hash(messages, rejected[1])
        ),
        messages=messages,
        rejected="" if rejected is None else rejected[1],
    )
    return Parsed(record, tuple(f for _, _, f in turns), None if rejected is None else rejected[2])


def _chars(turns: list[Turn]) -> int:
    return sum(len(content) for _, content, _ in turns)


def _check_length(turns: list[Turn], max_chars: int) -> None:
    """max_chars over the conversation (of a pair: the longer of its two)."""
    total = _chars(turns)
    if total > max_chars:
        longest = max(turns, key=lambda t: len(t[1]))
        raise Bad(
            RejectReason.TOO_LONG,
            None,
            f"the conversation has {total} characters (prepare.max_chars={max_chars}); "
            f"the longest field, {longest[2]!r}, has {len(longest[1])}",
        )


def _document(raw: RawRow, tenant: str, row: dict, max_chars: int, clean) -> Parsed:
    body = text(row, "text", clean=clean)
    if len(body) > max_chars:
        raise Bad(
            RejectReason.TOO_LONG, None, f"field 'text' has {len(body)} characters (prepare.max_chars={max_chars})"
        )
    record = Record(
        tenant=tenant,
        kind="document",
        source_file=raw.source_file,
        row=raw.row,
        shape="document",
        content_hash=content_hash([("document", body)]),
        text=body,
    )
    return Parsed(record, ("text",))

"""Raw row to canonical `Record`, or a `Reject` naming the file, row, field and reason.

Recognized shapes (keys whose value is null count as absent, other keys such as "id" or "meta" are
ignored):

- instruction: instruction, output, optional input and system (alpaca)
- chat: messages = [{role, content}], roles system/user/assistant/tool (OpenAI), optional system
- sharegpt: conversations = [{from, value}], from human/user, gpt/assistant, system, tool, optional system
- prompt_completion: prompt, completion, optional system
- document: only text (plus ignored metadata); .txt/.md files are documents

A reject's field is the row's top-level key ("messages"), and its detail gives the full path, which
indexes lists from 0: "messages[2].role". too_long concerns the whole row, so its field is None.
Optional fields that are empty are treated as absent; required ones are rejected as empty_field
(whitespace-only counts as empty).

Options for mapped sources (tenants.<t>.sources[]): `roles` renames source roles (tool turns stay
context: only assistant turns are trained on), `clean` rewrites every text field (the control-token
policy) before the empty check, and `origins` names the source path a canonical field came from, so
that a reject says "field 'output' (from 'answer')".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loraline.prepare.readers import RawRow, bad_utf8_detail, has_surrogates
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
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Parsed:
    record: Record
    fields: tuple[str, ...]  # the raw field each message came from, so later rejects can name it


@dataclass(frozen=True)
class ShapeOptions:
    """How a source's rows are read beyond shape detection (tenants.<t>.sources[]); the default is none."""

    roles: Mapping[str, str] = field(default_factory=dict)  # source role name -> system|user|assistant|tool
    clean: Callable[[str], str] | None = None  # applied to every text field (control-token policy)
    origins: Mapping[str, str] = field(default_factory=dict)  # canonical field -> the source path it came from


NO_OPTIONS = ShapeOptions()


class _Bad(Exception):
    def __init__(self, reason: RejectReason, field: str | None, message: str) -> None:
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


def to_record(
    raw: RawRow, tenant: str, *, max_chars: int, system_prompt: str | None = None, options: ShapeOptions = NO_OPTIONS
) -> Parsed | Reject:
    try:
        return _parse(raw, tenant, max_chars, system_prompt, options)
    except _Bad as bad:
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


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _parse(raw: RawRow, tenant: str, max_chars: int, system_prompt: str | None, options: ShapeOptions) -> Parsed:
    row = raw.value
    if not isinstance(row, dict):
        raise _Bad(
            RejectReason.WRONG_TYPE, None, f"row is a JSON {json_type(row)}; expected an object with {SHAPES_HELP}"
        )
    present = {k for k, v in row.items() if v is not None}
    shapes = [name for name, keys in SHAPE_KEYS.items() if present.intersection(keys)]
    if len(shapes) > 1:
        raise _Bad(
            RejectReason.UNKNOWN_SHAPE,
            None,
            f"mixes the keys of several shapes ({', '.join(shapes)}); a row must have exactly one of {SHAPES_HELP}",
        )
    if not shapes:
        if "text" in present:
            return _document(raw, tenant, row, max_chars, options.clean)
        keys = ", ".join(sorted(present)) or "none"
        raise _Bad(RejectReason.UNKNOWN_SHAPE, None, f"has no known shape (keys: {keys}); expected {SHAPES_HELP}")
    shape = shapes[0]
    clean = options.clean
    if shape == "instruction":
        turns = _instruction(row, clean)
    elif shape == "prompt_completion":
        turns = _prompt_completion(row, clean)
    else:
        turns = _conversation(row, shape, raw.tabular, options)
    return _chat(raw, tenant, shape, turns, max_chars, system_prompt)


def _text(row: dict, key: str, path: str | None = None, *, required: bool = True, clean=None) -> str | None:
    path = path or key
    value = row.get(key)
    if value is None:
        if required:
            raise _Bad(RejectReason.MISSING_FIELD, path, "is missing" if key not in row else "is null")
        return None
    if not isinstance(value, str):
        raise _Bad(RejectReason.WRONG_TYPE, path, f"must be a string, got a JSON {json_type(value)}")
    if has_surrogates(value):
        raise _Bad(RejectReason.INVALID_UTF8, path, f"text {bad_utf8_detail(value)}")
    if clean is not None:
        value = clean(value)
    if not value.strip():
        if required:
            raise _Bad(RejectReason.EMPTY_FIELD, path, "is empty" if not value else "is only whitespace")
        return None
    return value


Turn = tuple[str, str, str]  # role, content, the field it came from


def _instruction(row: dict, clean) -> list[Turn]:
    instruction = _text(row, "instruction", clean=clean)
    extra = _text(row, "input", required=False, clean=clean)
    output = _text(row, "output", clean=clean)
    system = _text(row, "system", required=False, clean=clean)
    turns = [("system", system, "system")] if system else []
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [*turns, ("user", user, "instruction"), ("assistant", output, "output")]


def _prompt_completion(row: dict, clean) -> list[Turn]:
    prompt = _text(row, "prompt", clean=clean)
    completion = _text(row, "completion", clean=clean)
    system = _text(row, "system", required=False, clean=clean)
    turns = [("system", system, "system")] if system else []
    return [*turns, ("user", prompt, "prompt"), ("assistant", completion, "completion")]


def _conversation(row: dict, shape: str, tabular: bool, options: ShapeOptions) -> list[Turn]:
    key = "messages" if shape == "chat" else "conversations"
    role_key, content_key = ("role", "content") if shape == "chat" else ("from", "value")
    items = row[key]
    if tabular and isinstance(items, str):
        # CSV (and Parquet written from it) can only hold the conversation as JSON text in one cell.
        try:
            items = json.loads(items)
        except json.JSONDecodeError as exc:
            raise _Bad(
                RejectReason.MALFORMED_JSON, key, f"is not valid JSON ({exc.msg}: column {exc.colno})"
            ) from None
    if not isinstance(items, list):
        raise _Bad(RejectReason.WRONG_TYPE, key, f"must be a list of messages, got a JSON {json_type(items)}")
    if not items:
        raise _Bad(RejectReason.EMPTY_FIELD, key, "is an empty list")
    system = _text(row, "system", required=False, clean=options.clean)
    turns = [("system", system, "system")] if system else []
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _Bad(
                RejectReason.WRONG_TYPE,
                path,
                f"must be an object with {role_key!r} and {content_key!r}, got a JSON {json_type(item)}",
            )
        raw_role = _text(item, role_key, f"{path}.{role_key}")
        name = raw_role.strip().lower()
        role = options.roles.get(raw_role.strip(), options.roles.get(name))
        if role is None:
            role = name if shape == "chat" else SHAREGPT_ROLES.get(name)
        if role not in CHAT_ROLES:
            allowed = (*(CHAT_ROLES if shape == "chat" else tuple(SHAREGPT_ROLES)), *options.roles)
            raise _Bad(
                RejectReason.UNKNOWN_ROLE,
                f"{path}.{role_key}",
                f"{raw_role!r} is not one of {', '.join(allowed)} (map it with the source's roles: in params.yaml)",
            )
        content = _text(item, content_key, f"{path}.{content_key}", clean=options.clean)
        turns.append((role, content, f"{path}.{content_key}"))
    return turns


def _chat(
    raw: RawRow, tenant: str, shape: str, turns: list[Turn], max_chars: int, system_prompt: str | None
) -> Parsed:
    if system_prompt and not any(role == "system" for role, _, _ in turns):
        turns = [("system", system_prompt, "system_prompt"), *turns]
    list_field = SHAPE_KEYS[shape][0] if shape in ("chat", "sharegpt") else None
    roles = [role for role, _, _ in turns]
    if "assistant" not in roles:
        raise _Bad(
            RejectReason.NO_ASSISTANT_TURN, list_field, "has no assistant message; there is nothing to train on"
        )
    if roles[-1] != "assistant":
        raise _Bad(
            RejectReason.NO_ASSISTANT_TURN,
            turns[-1][2],
            f"the conversation ends with a {roles[-1]} message; the last message must be the assistant's answer",
        )
    if all(i == 0 for i, role in enumerate(roles) if role == "assistant"):
        # A chat template cannot render the prompt of an opening assistant message (there is none).
        raise _Bad(
            RejectReason.NO_ASSISTANT_TURN,
            turns[0][2],
            "the only assistant message is the first one; nothing prompts it",
        )
    total = sum(len(content) for _, content, _ in turns)
    if total > max_chars:
        longest = max(turns, key=lambda t: len(t[1]))
        raise _Bad(
            RejectReason.TOO_LONG,
            None,
            f"the conversation has {total} characters (prepare.max_chars={max_chars}); "
            f"the longest field, {longest[2]!r}, has {len(longest[1])}",
        )
    record = Record(
        tenant=tenant,
        kind="chat",
        source_file=raw.source_file,
        row=raw.row,
        shape=shape,
        content_hash=content_hash((role, content) for role, content, _ in turns),
        messages=tuple(Message(role, content) for role, content, _ in turns),
    )
    return Parsed(record, tuple(f for _, _, f in turns))


def _document(raw: RawRow, tenant: str, row: dict, max_chars: int, clean) -> Parsed:
    text = _text(row, "text", clean=clean)
    if len(text) > max_chars:
        raise _Bad(
            RejectReason.TOO_LONG, None, f"field 'text' has {len(text)} characters (prepare.max_chars={max_chars})"
        )
    record = Record(
        tenant=tenant,
        kind="document",
        source_file=raw.source_file,
        row=raw.row,
        shape="document",
        content_hash=content_hash([("document", text)]),
        text=text,
    )
    return Parsed(record, ("text",))

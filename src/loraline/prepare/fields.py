"""Reading a raw row's fields into conversation turns, for every shape (shapes.py, preference.py).

A field that cannot be read raises `Bad`, naming the reject reason and the field's full path
("messages[2].role"); the shape's caller turns it into a `Reject` naming the file and row.
Optional fields that are empty are treated as absent; required ones are rejected as empty_field
(whitespace-only counts as empty).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loraline.prepare.readers import bad_utf8_detail, has_surrogates
from loraline.prepare.schema import RejectReason

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")

Turn = tuple[str, str, str]  # role, content, the field it came from


@dataclass(frozen=True)
class ShapeOptions:
    """How a source's rows are read beyond shape detection (tenants.<t>.sources[]); the default is none."""

    roles: Mapping[str, str] = field(default_factory=dict)  # source role name -> system|user|assistant|tool
    clean: Callable[[str], str] | None = None  # applied to every text field (control-token policy)
    origins: Mapping[str, str] = field(default_factory=dict)  # canonical field -> the source path it came from


NO_OPTIONS = ShapeOptions()


class Bad(Exception):
    """A field that cannot be read: the reason, the field's full path (None: the whole row) and why."""

    def __init__(self, reason: RejectReason, field: str | None, message: str) -> None:
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def text(row: dict, key: str, path: str | None = None, *, required: bool = True, clean=None) -> str | None:
    path = path or key
    value = row.get(key)
    if value is None:
        if required:
            raise Bad(RejectReason.MISSING_FIELD, path, "is missing" if key not in row else "is null")
        return None
    if not isinstance(value, str):
        raise Bad(RejectReason.WRONG_TYPE, path, f"must be a string, got a JSON {json_type(value)}")
    if has_surrogates(value):
        raise Bad(RejectReason.INVALID_UTF8, path, f"text {bad_utf8_detail(value)}")
    if clean is not None:
        value = clean(value)
    if not value.strip():
        if required:
            raise Bad(RejectReason.EMPTY_FIELD, path, "is empty" if not value else "is only whitespace")
        return None
    return value


def message_list(row: dict, key: str, tabular: bool) -> list:
    """row[key] as a non-empty list (CSV and Parquet written from it hold it as JSON text in one cell)."""
    items = row[key]
    if tabular and isinstance(items, str):
        try:
            items = json.loads(items)
        except json.JSONDecodeError as exc:
            raise Bad(RejectReason.MALFORMED_JSON, key, f"is not valid JSON ({exc.msg}: column {exc.colno})") from None
    if not isinstance(items, list):
        raise Bad(RejectReason.WRONG_TYPE, key, f"must be a list of messages, got a JSON {json_type(items)}")
    if not items:
        raise Bad(RejectReason.EMPTY_FIELD, key, "is an empty list")
    return items


def message_turns(items: list, key: str, sharegpt: bool, options: ShapeOptions) -> list[Turn]:
    """The turns of a list of {role, content} (sharegpt: {from, value}) objects at row[key]."""
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    turns = []
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise Bad(
                RejectReason.WRONG_TYPE,
                path,
                f"must be an object with {role_key!r} and {content_key!r}, got a JSON {json_type(item)}",
            )
        raw_role = text(item, role_key, f"{path}.{role_key}")
        name = raw_role.strip().lower()
        role = options.roles.get(raw_role.strip(), options.roles.get(name))
        if role is None:
            role = SHAREGPT_ROLES.get(name) if sharegpt else name
        if role not in CHAT_ROLES:
            allowed = (*(tuple(SHAREGPT_ROLES) if sharegpt else CHAT_ROLES), *options.roles)
            raise Bad(
                RejectReason.UNKNOWN_ROLE,
                f"{path}.{role_key}",
                f"{raw_role!r} is not one of {', '.join(allowed)} (map it with the source's roles: in params.yaml)",
            )
        content = text(item, content_key, f"{path}.{content_key}", clean=options.clean)
        turns.append((role, content, f"{path}.{content_key}"))
    return turns

"""Where a canonical field's value comes from in a raw row: a field path or a template of paths.

    answer                      the row's key "answer"
    meta.answer                 key "answer" of the object under "meta"
    instances[0].output         key "output" of the first element of the list "instances"
    ["Question Title"]          a key holding dots, brackets or spaces (quoted, JSON string syntax)
    "{context}\\n\\nQuestion: {question}"   a template: each {path} is replaced by that path's value;
                                           {{ and }} are literal braces

Parsing is pure (no data involved), so params.yaml can be checked before any file is read; resolving
a path against a row raises `Missing` naming the part of the path that was not there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"[^.\[\]{}\"]+")
_INDEX = re.compile(r"\[(-?\d+)\]")
_QUOTED = re.compile(r"\[(\"(?:[^\"\\]|\\.)*\")\]")


class PathSyntaxError(ValueError):
    """A field path or template in params.yaml cannot be parsed (the message says where)."""


class Missing(LookupError):
    """A path did not resolve against a row; `at` is the prefix of the path that was missing."""

    def __init__(self, path: str, at: str, why: str) -> None:
        super().__init__(f"{path!r}: {why}")
        self.path, self.at, self.why = path, at, why


@dataclass(frozen=True)
class FieldPath:
    text: str
    parts: tuple[str | int, ...]  # keys (str) and list indices (int)

    @property
    def root(self) -> str:
        return str(self.parts[0])

    def resolve(self, row: Any) -> Any:
        """The value at this path; raises Missing when a key or index is absent or the type is wrong."""
        value = row
        for i, part in enumerate(self.parts):
            at = _render(self.parts[: i + 1])
            if isinstance(part, int):
                if not isinstance(value, list):
                    raise Missing(self.text, at, f"{_render(self.parts[:i]) or 'the row'} is not a list")
                if not -len(value) <= part < len(value):
                    raise Missing(self.text, at, f"{_render(self.parts[:i])} has {len(value)} elements")
                value = value[part]
            else:
                if not isinstance(value, dict):
                    raise Missing(self.text, at, f"{_render(self.parts[:i]) or 'the row'} is not an object")
                if part not in value:
                    where = _render(self.parts[:i])
                    raise Missing(self.text, at, f"no key {part!r}" + (f" in {where!r}" if where else ""))
                value = value[part]
        return value


@dataclass(frozen=True)
class Template:
    text: str
    pieces: tuple[str | FieldPath, ...]  # literal text and placeholders, in order

    @property
    def paths(self) -> tuple[FieldPath, ...]:
        return tuple(p for p in self.pieces if isinstance(p, FieldPath))


Source = FieldPath | Template


def parse_path(text: str) -> FieldPath:
    """`a.b[0]["c d"]` to its parts; PathSyntaxError naming the position of the first bad character."""
    if not isinstance(text, str) or not text.strip():
        raise PathSyntaxError("a field path must be a non-empty string")
    parts: list[str | int] = []
    pos = 0
    while pos < len(text):
        dotted = False
        if parts and text[pos] == ".":
            pos, dotted = pos + 1, True
        elif parts and text[pos] != "[":
            raise PathSyntaxError(f"field path {text!r}: expected '.' or '[' at character {pos}")
        if not dotted and text.startswith("[", pos):
            quoted = _QUOTED.match(text, pos)
            index = _INDEX.match(text, pos)
            if quoted:
                parts.append(json.loads(quoted.group(1)))
                pos = quoted.end()
            elif index:
                parts.append(int(index.group(1)))
                pos = index.end()
            else:
                raise PathSyntaxError(
                    f"field path {text!r}: bad index at character {pos}; "
                    'use [0] for a list element or ["key"] for a key'
                )
            continue
        name = _NAME.match(text, pos)
        if not name or not name.group().strip():
            raise PathSyntaxError(f"field path {text!r}: expected a key name at character {pos}")
        parts.append(name.group().strip())
        pos = name.end()
    if isinstance(parts[0], int):
        raise PathSyntaxError(f"field path {text!r}: must start with a key, not an index")
    return FieldPath(text, tuple(parts))


def parse_source(text: str) -> Source:
    """A plain path, or a template when the text holds a brace; a template needs a placeholder."""
    if not isinstance(text, str):
        raise PathSyntaxError(f"expected a field path or template string, got {type(text).__name__}")
    if "{" not in text and "}" not in text:
        return parse_path(text)
    pieces: list[str | FieldPath] = []
    literal = []
    pos = 0
    while pos < len(text):
        ch = text[pos]
        if text.startswith("{{", pos) or text.startswith("}}", pos):
            literal.append(ch)
            pos += 2
        elif ch == "{":
            end = text.find("}", pos)
            if end < 0:
                raise PathSyntaxError(
                    f"template {text!r}: '{{' at character {pos} is never closed (write {{{{ for a literal brace)"
                )
            if literal:
                pieces.append("".join(literal))
                literal = []
            try:
                pieces.append(parse_path(text[pos + 1 : end]))
            except PathSyntaxError as exc:
                raise PathSyntaxError(f"template {text!r}: placeholder {{{text[pos + 1 : end]}}}: {exc}") from None
            pos = end + 1
        elif ch == "}":
            raise PathSyntaxError(
                f"template {text!r}: '}}' at character {pos} closes nothing (write }}}} for a literal brace)"
            )
        else:
            literal.append(ch)
            pos += 1
    if literal:
        pieces.append("".join(literal))
    if not any(isinstance(p, FieldPath) for p in pieces):
        raise PathSyntaxError(f"template {text!r} has no {{placeholder}}; name a field such as {{question}}")
    return Template(text, tuple(pieces))


def _render(parts: tuple[str | int, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.fullmatch(part) and part == part.strip():
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out

"""tenants.<t>.sources: which raw files a source entry reads, and its rows mapped to canonical fields.

A raw source (file or save_to_disk folder) belongs to the first entry whose `path` glob matches it or
a folder above it; sources matched by no entry are read with shape detection, as before sources
existed. Mapping turns each raw row into a row of canonical fields (instruction, output, messages...)
that shape detection then reads; `explode` first turns a row into one row per element of a list.
Every raw row still ends as exactly one item per mapped row: a row that cannot be mapped is one
`Reject` (reason mapping) naming the file, row and the source path that was missing. `group` names
what rows share (a passage, a document id): its value travels with the row (RawRow.group) to the
split, which sends a group whole to one side; a null value leaves the row in no named group.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from loraline.config import SourceParams
from loraline.fieldpath import FieldPath, Missing, Source, Template, parse_path, parse_source
from loraline.prepare.preference import NoPair, PairPick, pick_pair
from loraline.prepare.readers import RawRow, excerpt
from loraline.prepare.schema import Reject, RejectReason, locate
from loraline.prepare.shapes import ShapeOptions, json_type

TEXT_FIELDS = ("instruction", "input", "output", "system", "prompt", "completion", "text", "chosen", "rejected")


@dataclass(frozen=True)
class SourceSpec:
    """One entry of tenants.<t>.sources, compiled; `index` None is the auto-detected rest."""

    index: int | None
    params: SourceParams | None
    columns: dict[str, Source] = field(default_factory=dict)
    explode: FieldPath | None = None
    group: Source | None = None
    pick: PairPick | None = None  # sources[].preference: the pair a list of rated answers gives

    @property
    def label(self) -> str:
        return "(detected)" if self.params is None else self.params.path

    @property
    def format(self) -> str | None:
        return None if self.params is None else self.params.format

    @property
    def mapped(self) -> bool:
        return bool(self.columns) or self.explode is not None or self.group is not None or self.pick is not None

    def options(self, clean) -> ShapeOptions:
        roles = {} if self.params is None else dict(self.params.roles)
        origins = {name: source.text for name, source in self.columns.items()}
        if self.pick is not None:
            origins.update(chosen=self.pick.origin, rejected=self.pick.origin)
        return ShapeOptions(roles=roles, clean=clean, origins=origins)


DETECTED = SourceSpec(None, None)


def compile_sources(sources: Iterable[SourceParams]) -> list[SourceSpec]:
    return [
        SourceSpec(
            i,
            s,
            {name: parse_source(text) for name, text in s.columns.items()},
            parse_path(s.explode) if s.explode else None,
            parse_source(s.group) if s.group else None,
            PairPick.of(s.preference) if s.preference is not None else None,
        )
        for i, s in enumerate(sources)
    ]


def assign(files: list[tuple[Path, str]], specs: list[SourceSpec]) -> list[tuple[Path, str, SourceSpec]]:
    """Each (path, rel) with the first spec whose glob matches rel or one of its parent folders."""
    out = []
    for path, rel in files:
        candidates = [PurePosixPath(rel), *PurePosixPath(rel).parents]
        spec = next(
            (s for s in specs if any(_glob_match(c, s.params.path) for c in candidates if str(c) != ".")), DETECTED
        )
        out.append((path, rel, spec))
    return out


def _glob_match(rel: PurePosixPath, pattern: str) -> bool:
    """Whole-path glob: * and ? stay inside one folder, ** spans any number of folders."""
    return _match_parts(rel.parts, PurePosixPath(pattern).parts)


def _match_parts(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _match_parts(parts[1:], pattern[1:])


def map_rows(items: Iterable[RawRow | Reject], spec: SourceSpec, tenant: str) -> Iterator[RawRow | Reject]:
    """Rows of one source in canonical fields (explode first); unmapped sources pass through."""
    if not spec.mapped:
        yield from items
        return
    for item in items:
        if isinstance(item, Reject):
            yield item
        elif spec.explode is None:
            yield _map_one(item, item.value, None, spec, tenant)
        else:
            yield from _explode(item, spec, tenant)


def _explode(raw: RawRow, spec: SourceSpec, tenant: str) -> Iterator[RawRow | Reject]:
    assert spec.explode is not None
    path = spec.explode
    try:
        elements = path.resolve(raw.value)
    except Missing as missing:
        yield _mapping_reject(raw, tenant, path.root, f"explode: source path {path.text!r} is missing ({missing.why})")
        return
    if raw.tabular and isinstance(elements, str):
        elements = _json_cell(elements)
    if not isinstance(elements, list):
        yield Reject(
            tenant,
            raw.source_file,
            raw.row,
            path.root,
            RejectReason.WRONG_TYPE,
            f"{locate(raw.source_file, raw.row, path.text)}: explode needs a list, got a JSON {json_type(elements)}",
            raw.excerpt,
        )
        return
    if not elements:
        yield Reject(
            tenant,
            raw.source_file,
            raw.row,
            path.root,
            RejectReason.EMPTY_FIELD,
            f"{locate(raw.source_file, raw.row, path.text)}: is an "
            "empty list; explode has no element to make a row of",
            raw.excerpt,
        )
        return
    for i, element in enumerate(elements):
        yield _map_one(
            RawRow(raw.source_file, raw.row, raw.value, raw.raw, raw.tabular, item=i), raw.value, element, spec, tenant
        )


def _map_one(raw: RawRow, value: Any, element: Any, spec: SourceSpec, tenant: str) -> RawRow | Reject:
    mapped = _map_columns(raw, value, element, spec, tenant)
    if spec.pick is not None and not isinstance(mapped, Reject):
        mapped = _pick(mapped, value if element is None else {**value, "item": element}, spec.pick, tenant)
    if spec.group is None or isinstance(mapped, Reject):
        return mapped
    if not isinstance(value, dict):
        return Reject(
            tenant,
            raw.source_file,
            raw.row,
            None,
            RejectReason.WRONG_TYPE,
            f"{locate(raw.source_file, raw.row, None, raw.item)}: row is a JSON {json_type(value)}; "
            "group names a field of an object",
            raw.excerpt,
        )
    scope = value if element is None else {**value, "item": element}
    try:
        group = _resolve(spec.group, scope, "group")
    except Missing as missing:
        return _mapping_reject(
            raw,
            tenant,
            _raw_key(missing.path, spec),
            f"group: source path {missing.path!r} is missing ({missing.why})",
        )
    except _NotText as bad:
        return _mapping_reject(raw, tenant, _raw_key(bad.path, spec), f"group: {bad.path!r} {bad.why}")
    return replace(mapped, group=_group_text(group))


def _pick(mapped: RawRow, scope: dict, pick: PairPick, tenant: str) -> RawRow | Reject:
    """The mapped row with the chosen and rejected answers its rated list gives, or the reject saying why not."""
    path = pick.items
    try:
        chosen, rejected = pick_pair(scope, pick)
    except Missing as missing:
        return _mapping_reject(
            mapped, tenant, path.root, f"preference.list: source path {missing.path!r} is missing ({missing.why})"
        )
    except NoPair as no:
        return Reject(
            tenant,
            mapped.source_file,
            mapped.row,
            path.root,
            no.reason,
            f"{locate(mapped.source_file, mapped.row, path.text, mapped.item)}: {no.message}",
            mapped.excerpt,
        )
    return replace(mapped, value={**mapped.value, "chosen": chosen, "rejected": rejected})


def _group_text(value: Any) -> str | None:
    """A group value as text: objects and lists by their sorted JSON, null as no group."""
    if value is None or isinstance(value, str):
        return value
    if _is_scalar(value):
        return _scalar_text(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _map_columns(raw: RawRow, value: Any, element: Any, spec: SourceSpec, tenant: str) -> RawRow | Reject:
    if not spec.columns:  # explode alone: the element is the row (no explode: the row), read with shape detection
        return RawRow(
            raw.source_file, raw.row, value if spec.explode is None else element, raw.raw, raw.tabular, raw.item
        )
    if not isinstance(value, dict):
        return Reject(
            tenant,
            raw.source_file,
            raw.row,
            None,
            RejectReason.WRONG_TYPE,
            f"{locate(raw.source_file, raw.row, None, raw.item)}: row is a JSON {json_type(value)}; "
            "columns name fields of an object",
            raw.excerpt,
        )
    scope = value if element is None else {**value, "item": element}  # the parent's fields stay addressable
    canonical: dict[str, Any] = {}
    for name, source in spec.columns.items():
        try:
            canonical[name] = _resolve(source, scope, name)
        except Missing as missing:
            return _mapping_reject(
                raw,
                tenant,
                _raw_key(missing.path, spec),
                f"columns.{name}: source path {missing.path!r} is missing ({missing.why})",
            )
        except _NotText as bad:
            return _mapping_reject(raw, tenant, _raw_key(bad.path, spec), f"columns.{name}: {bad.path!r} {bad.why}")
    return RawRow(raw.source_file, raw.row, canonical, raw.raw, raw.tabular, raw.item)


class _NotText(Exception):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(why)
        self.path, self.why = path, why


def _resolve(source: Source, scope: dict, name: str) -> Any:
    if isinstance(source, FieldPath):
        value = source.resolve(scope)
        # Numbers and booleans are text to a model (math answers are often stored as numbers).
        return _scalar_text(value) if name in TEXT_FIELDS and _is_scalar(value) else value
    pieces = []
    for piece in source.pieces:
        if isinstance(piece, str):
            pieces.append(piece)
            continue
        value = piece.resolve(scope)
        if value is None:
            raise _NotText(piece.text, "is null; a template needs a value for every placeholder")
        if isinstance(value, str):
            pieces.append(value)
        elif _is_scalar(value):
            pieces.append(_scalar_text(value))
        else:
            raise _NotText(piece.text, f"is a JSON {json_type(value)}; a template placeholder needs text or a number")
    return "".join(pieces)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _raw_key(path_text: str, spec: SourceSpec) -> str:
    """The raw row's top-level key a path starts from (an element's path starts at the exploded list)."""
    root = parse_path(path_text).root
    return spec.explode.root if root == "item" and spec.explode is not None else root


def _json_cell(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def _mapping_reject(raw: RawRow, tenant: str, field_name: str | None, message: str) -> Reject:
    return Reject(
        tenant,
        raw.source_file,
        raw.row,
        field_name,
        RejectReason.MAPPING,
        f"{locate(raw.source_file, raw.row, None, raw.item)}: {message}",
        excerpt(raw.excerpt),
    )


__all__ = ["DETECTED", "SourceSpec", "Template", "assign", "compile_sources", "map_rows"]

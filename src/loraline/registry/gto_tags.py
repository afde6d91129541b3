"""GTO's registry read from its git tags directly: the events `gto.api.history` lists, without GTO's state.

GTO 1.10.1 answers every read by building the state of every artifact from every tag and then "enriching"
each version (its commit's artifacts.yaml, a pydantic-settings config per version): about 1 ms a tag. The
events themselves come from the tags alone, so `read_registry` reads them with one `git for-each-ref` (the raw
tag objects, framed by their size, so any message is safe) and replays what GTO does with them
(gto/tag.py `find`, `index_tag`; gto/base.py `get_events`; gto/api.py `history`, `_show_registry`):

- Which tags: refs under refs/tags whose name gto.tag.parse_name (GTO's own `tag_re`) parses, annotated ones
  only (GTO drops a lightweight tag: scmrepo's get_tag gives it a str). Any other tag is not GTO's and is
  ignored, as GTO ignores it.
- What an event says: action, artifact (a tag's `=` is a name's `:`), version and stage from the tag's name;
  commit = the object the tag names; timestamp = the tagger date at its offset (scmrepo's tag_datetime); author
  and email from the tagger identity (dulwich's parse_time_entry, scmrepo's _IDENTITY_RE); message = the tag
  message stripped; ref = the tag's name. An assignment's version is the version registered at its commit
  (GTO's find_version(commit_hexsha=...)), whatever its name says.
- Order: GTO's three passes (deprecations, then registrations and deregistrations, then assignments and
  unassignments), each over the tags sorted by name and then stably by tag time; its nested newest-first sorts
  (stage, version, artifact); then history's stable sort by (timestamp, priority). Tags of the same second keep
  the order GTO gives them, which a plain sort would not reproduce.
- The artifacts `gto show` lists (`active`): those whose newest event is not a deprecation, counting the event
  GTO's enrichment adds at each version's commit time.

Where GTO would do something not replayed here, `NotCovered` says why and the caller asks GTO: a .gto config or
a GTO_* environment variable; an artifacts.yaml at HEAD or at a version's commit (GTO's enrichment reads it and
may add artifacts or fail); a tag named `<artifact>@created` (GTO 1.10.1 fails on it); a tag object not in
git's plain form (another object than a commit, extra headers, a signature, a name other than its ref's, no
tagger, no message, not UTF-8); an assignment at a commit with no registered version or several (GTO then
names a version by the commit, or fails); git too old for %(raw) (2.35).

Reading one artifact reads only its tags (for-each-ref patterns on its tag prefix): an artifact's events depend
on its own tags only. GTO fails a read of any artifact when another artifact's tags break it (an `@created`
tag, an artifacts.yaml it cannot parse); reading one artifact here answers for that artifact.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

TAG_FIELDS = ("%(refname)", "%(objectname)", "%(objecttype)", "%(*committerdate:raw)")
RAW = "%(if:equals=tag)%(objecttype)%(then)%(raw:size)%00%(raw)%(else)0%00%(end)"
FORMAT = "%00".join(TAG_FIELDS) + "%00" + RAW  # git ends each record with a newline
INDEX = "artifacts.yaml"  # GTO's default index (RegistryConfig.INDEX); a config that changes it is not covered
EVENTS = {  # GTO's event classes: (name in history, priority), gto/base.py
    "deprecate": ("deprecation", 2),
    "register": ("registration", 3),
    "deregister": ("deregistration", 4),
    "assign": ("assignment", 5),
    "unassign": ("unassignment", 6),
}
_HEADERS = re.compile(rb"object ([0-9a-f]{40}|[0-9a-f]{64})\ntype commit\ntag ([^\n]*)\ntagger ([^\n]*)\n\n")
_TAGGER = re.compile(rb"(.*>) (\d+) ([+-]\d{4})")
_IDENTITY = re.compile(r"(?P<name>.+)\s+<(?P<email>.+)>")  # scmrepo's dulwich backend, _IDENTITY_RE
_SIGNATURE = b"-----BEGIN "  # dulwich splits a signature off the message; GTO's message would lose it


class NotCovered(Exception):
    """GTO may read these tags differently from this module: ask GTO (the message says why)."""


@dataclass(frozen=True)
class TagRead:
    events: dict[str, list[dict[str, Any]]]  # by artifact, oldest first, as api.history(artifact, ascending=True)
    active: list[str] | None  # sorted: the artifacts api.show lists; None when not read (ask GTO)


@dataclass(frozen=True)
class _Tag:
    name: str
    artifact: str
    action: str
    version: str | None
    stage: str | None
    commit: str
    time: int
    created_at: datetime
    author: str
    author_email: str
    message: str
    commit_time: int


def read_registry(root: Path, artifact: str | None = None) -> TagRead:
    """The events of `artifact` (None: of every artifact) as GTO reads them; NotCovered where GTO must answer."""
    if artifact is not None:
        return read_artifact(root, artifact).read
    check_config(root)
    by_artifact: dict[str, list[_Tag]] = {}
    for record in records(for_each_ref(root, ["refs/tags"])):
        tag = gto_tag(record)
        if tag is not None:
            by_artifact.setdefault(tag.artifact, []).append(tag)
    check_no_index(root, {t.commit for tags in by_artifact.values() for t in tags if t.version is not None})
    events = {name: artifact_history(tags) for name, tags in by_artifact.items()}
    active = sorted(name for name, tags in by_artifact.items() if is_active(tags))
    return TagRead(events, active)


@dataclass(frozen=True)
class ArtifactRead:
    """One artifact's tags, as its writer needs them (gto_writes)."""

    read: TagRead  # as read_registry(root, artifact)
    tags: list[_Tag]  # its GTO tags in the order GTO's state takes them (gto.tag.find: by name, then tag time)
    names: list[str]  # the name of every tag GTO parses as its own, lightweight ones too (GTO's name_tag counts them)


def read_artifact(root: Path, artifact: str) -> ArtifactRead:
    """`artifact`'s tags only (for-each-ref patterns on its tag prefix); NotCovered where GTO must answer."""
    from gto.constants import fullname_re, name_to_tag
    from gto.tag import parse_name

    check_config(root)
    if not fullname_re.match(artifact):
        return ArtifactRead(TagRead({}, []), [], [])  # no tag can name it: GTO's history filters it to nothing
    prefix = "refs/tags/" + name_to_tag(artifact)
    tags, names = [], []
    for record in records(for_each_ref(root, [f"{prefix}@*", f"{prefix}#*", f"{prefix}#*/**"])):
        name = record.name
        if (parse_name(name, raise_on_fail=False) or {}).get("name") == artifact:
            names.append(name)
        tag = gto_tag(record)
        if tag is not None and tag.artifact == artifact:
            tags.append(tag)
    check_no_index(root, {t.commit for t in tags if t.version is not None})
    if not tags:
        return ArtifactRead(TagRead({}, []), [], names)
    read = TagRead({artifact: artifact_history(tags)}, [artifact] if is_active(tags) else [])
    return ArtifactRead(read, gto_order(tags), names)


def gto_order(tags: list[_Tag]) -> list[_Tag]:
    """gto.tag.find's order: tag names sorted (scm.list_tags), then a stable sort by tag time."""
    return sorted(sorted(tags, key=lambda t: t.name), key=lambda t: t.time)


def artifact_history(tags: list[_Tag]) -> list[dict[str, Any]]:
    """One artifact's events, oldest first, in the order GTO's state and api.history give them (module docstring)."""
    ordered = gto_order(tags)
    deprecations = [_event(t, None) for t in ordered if t.action == "deprecate"]
    versions: dict[tuple[str, str], tuple[list, list, dict[str, tuple[list, list]]]] = {}
    for t in ordered:
        if t.action in ("register", "deregister"):
            registrations, deregistrations, _ = versions.setdefault((t.version, t.commit), ([], [], {}))
            (registrations if t.action == "register" else deregistrations).append(_event(t, t.version))
    at_commit: dict[str, list[tuple[str, str]]] = {}
    for key in versions:
        at_commit.setdefault(key[1], []).append(key)
    for t in ordered:
        if t.action in ("assign", "unassign"):
            found = at_commit.get(t.commit, [])
            if len(found) != 1:
                raise NotCovered(f"tag {t.name}: {len(found)} registered versions of {t.artifact} at {t.commit}")
            assignments, unassignments = versions[found[0]][2].setdefault(t.stage, ([], []))
            (assignments if t.action == "assign" else unassignments).append(_event(t, found[0][0]))
    per_version = [
        _newest_first(regs + deregs + [e for a, u in stages.values() for e in _newest_first(a + u)])
        for regs, deregs, stages in versions.values()
    ]
    newest_first = _newest_first(deprecations + [e for events in per_version for e in events])
    return sorted(newest_first, key=lambda e: (e["timestamp"], e["priority"]))


def _newest_first(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GTO's get_events: a stable sort by time, reversed (so ties come out in reverse order)."""
    return sorted(events, key=lambda e: e["timestamp"])[::-1]


def _event(tag: _Tag, version: str | None) -> dict[str, Any]:
    """api.history's row for `tag` (its keys in its order)."""
    event, priority = EVENTS[tag.action]
    return dict(
        timestamp=tag.created_at,
        artifact=tag.artifact,
        event=event,
        priority=priority,
        version=version,
        stage=tag.stage,
        commit=tag.commit,
        author=tag.author,
        author_email=tag.author_email,
        message=tag.message,
        ref=tag.name,
    )


def is_active(tags: list[_Tag]) -> bool:
    """GTO's Artifact.is_active: its newest event is not a deprecation. Deprecations come first in the list GTO
    sorts, so a version's event (enrichment at the commit's time included) of the same second is the newer."""
    deprecated = [t.time for t in tags if t.action == "deprecate"]
    if not deprecated:
        return True
    in_versions = [t.time for t in tags if t.action != "deprecate"]
    in_versions += [t.commit_time for t in tags if t.action in ("register", "deregister")]
    return bool(in_versions) and max(in_versions) >= max(deprecated)


# ---- git -----------------------------------------------------------------------------------------


def check_config(root: Path) -> None:
    """GTO's RegistryConfig comes from <root>/.gto and GTO_* variables: any of them may change what it reads."""
    if (root / ".gto").exists():
        raise NotCovered(f"{root / '.gto'} configures GTO")
    named = sorted(k for k in os.environ if k.upper().startswith("GTO_"))
    if named:
        raise NotCovered(f"environment variables {', '.join(named)} configure GTO")


def for_each_ref(root: Path, patterns: list[str]) -> bytes:
    done = subprocess.run(
        ["git", "for-each-ref", f"--format={FORMAT}", *patterns], cwd=root, capture_output=True, check=False
    )
    if done.returncode:
        raise NotCovered(f"git for-each-ref failed in {root}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def check_no_index(root: Path, commits: set[str]) -> None:
    """GTO's enrichment reads artifacts.yaml at every version's commit and at HEAD: none may have one."""
    asked = "".join(f"{rev}:{INDEX}\n" for rev in ["HEAD", *sorted(commits)])
    done = subprocess.run(
        ["git", "cat-file", "--batch-check"], cwd=root, input=asked.encode(), capture_output=True, check=False
    )
    if done.returncode:
        raise NotCovered(f"git cat-file failed in {root}: {done.stderr.decode(errors='replace').strip()}")
    found = [line for line in done.stdout.decode(errors="replace").splitlines() if not line.endswith(" missing")]
    if found:
        raise NotCovered(f"{INDEX} in a commit GTO reads ({found[0].split()[0]})")


class Record(NamedTuple):
    """One ref as for-each-ref's FORMAT gives it."""

    refname: bytes
    oid: bytes  # the object the ref names (the tag object for an annotated tag)
    objecttype: bytes
    commit_date: bytes  # the tagged commit's committer date (raw), for a tag of a commit
    raw: bytes  # the tag object (empty for another type)

    @property
    def name(self) -> str:
        return self.refname.removeprefix(b"refs/tags/").decode(errors="surrogateescape")


def gto_tag(record: Record) -> _Tag | None:
    """The GTO tag `record` is, None when GTO skips it (not its format, lightweight), or NotCovered."""
    from gto.constants import Action
    from gto.tag import parse_name

    name = record.name
    parsed = parse_name(name, raise_on_fail=False)
    if not parsed:
        return None
    if "action" not in parsed:  # `@created`: gto.tag.find fails on it (KeyError), lightweight or not
        raise NotCovered(f"tag {name}: GTO 1.10.1 cannot read an @created tag")
    if record.objecttype != b"tag":
        return None  # lightweight: GTO skips it
    action: Action = parsed["action"]
    return _parse_tag(name, parsed, action.value, record.raw, record.commit_date)


def records(output: bytes) -> Iterator[Record]:
    """FORMAT's records: five NUL-ended fields, the raw object (as long as the fifth says), a newline."""
    pos = 0
    while pos < len(output):
        fields = []
        for _ in range(5):
            end = output.find(b"\0", pos)
            if end < 0:
                raise NotCovered("git for-each-ref's output is not framed as asked")
            fields.append(output[pos:end])
            pos = end + 1
        if not fields[4].isdigit():
            raise NotCovered("git for-each-ref's output is not framed as asked")
        size = int(fields[4])
        raw, pos = output[pos : pos + size], pos + size
        if output[pos : pos + 1] != b"\n":
            raise NotCovered("git for-each-ref's output is not framed as asked")
        yield Record(fields[0], fields[1], fields[2], fields[3], raw)
        pos += 1


def _parse_tag(name: str, parsed: dict[str, Any], action: str, raw: bytes, commit_date: bytes) -> _Tag:
    """A tag object as dulwich parses it and scmrepo's GitTag presents it to GTO, or NotCovered."""
    header = _HEADERS.match(raw)
    tagger = _TAGGER.fullmatch(header[3]) if header else None
    if not header or not tagger:
        raise NotCovered(f"tag {name}: its object is not a plain annotated tag of a commit")
    body = raw[header.end() :]
    if header[2] != name.encode(errors="surrogateescape") or _SIGNATURE in body or not commit_date:
        raise NotCovered(f"tag {name}: named otherwise inside, signed, or not of a commit")
    try:
        identity, message = tagger[1].decode(), body.decode()
    except UnicodeDecodeError as exc:
        raise NotCovered(f"tag {name}: not UTF-8") from exc
    who, offset = _IDENTITY.match(identity), _offset(tagger[3])
    if who is None or abs(offset) >= 86400:
        raise NotCovered(f"tag {name}: tagger {tagger[0]!r} GTO cannot read")
    time = int(tagger[2])
    return _Tag(
        name=name,
        artifact=parsed["name"],  # parse_name decodes `=` to `:`
        action=action,
        version=parsed.get("version"),
        stage=parsed.get("stage"),
        commit=header[1].decode(),
        time=time,
        created_at=datetime.fromtimestamp(time, tz=timezone(timedelta(seconds=offset))),
        author=who["name"],
        author_email=who["email"],
        message=message.strip(),
        commit_time=int(commit_date.split()[0]),
    )


def _offset(text: bytes) -> int:
    """dulwich's parse_timezone: sign, then hours and minutes as one number."""
    value = int(text[1:])
    return (-1 if text[:1] == b"-" else 1) * (value // 100 * 3600 + value % 100 * 60)

"""The whole registry read again and again (the serving poll, every serve.poll_seconds): only what changed is parsed.

Invariant: `read_whole(root)` answers exactly what `gto_tags.read_registry(root)` answers at that moment (the
same events, the same active artifacts, NotCovered where that raises), from a snapshot this process keeps per
repository, keyed by the tag objects' ids. Git objects are immutable and named by their content, so a ref
that names the same object as before is the same tag, of the same commit, with the same answer.

How a read finds what changed, cheapest first:
- The refs store's stats: packed-refs and every directory under refs/ that holds tags. Git creates, replaces
  and deletes a loose ref by a rename or unlink in its directory, and rewrites packed-refs by a rename, so an
  unchanged stat means unchanged refs. A stat is trusted only when everything it covers was older than
  TRUST_S when it was taken (a change in the same clock tick would not show: the racy-git problem), and only
  for the files backend (not reftable). Trusted and unchanged: no git call for the refs at all.
- Else one listing, `git for-each-ref --format='%(objectname) %(refname)' refs/tags`: the refs that are new,
  name another object, or are gone.
- Only the tags that are new or changed are read (for-each-ref with their names; every tag when there are more
  than MANY) and parsed (gto_tags.gto_tag); only the artifacts they belong to get their events recomputed.
- Every read still checks what is not in the tags: GTO's config and environment, and artifacts.yaml at HEAD
  (HEAD moves); a version's commit is checked for artifacts.yaml once (commits are immutable).

A read that fails half way (git failing) drops the snapshot: the next read starts over. The answers handed out
are shared and must not be changed by their callers (GtoRegistry copies what it returns).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from loraline.registry import gto_tags

TRUST_S = 2.0  # a stat of files changed more recently than this is not trusted (filesystem clock ticks)
MANY = 500  # changed tags above which reading every tag is cheaper than naming each
PATTERNS_PER_CALL = 200  # tag names per for-each-ref call (argv stays small)
MAX_ROOTS = 8  # repositories a process keeps a snapshot of
_LOCK = threading.Lock()
_SNAPSHOTS: dict[Path, _Snapshot] = {}


def read_whole(root: Path) -> gto_tags.TagRead:
    """gto_tags.read_registry(root)'s answer, parsing only the tags that changed since this process last read."""
    gto_tags.check_config(root)
    with _LOCK:
        snapshot = _SNAPSHOTS.pop(root, None) or _Snapshot(root)
        snapshot.refresh()  # raises before the snapshot is kept again: a failed refresh is dropped
        _SNAPSHOTS[root] = snapshot
        while len(_SNAPSHOTS) > MAX_ROOTS:
            del _SNAPSHOTS[next(iter(_SNAPSHOTS))]
        return snapshot.answer()


def forget(root: Path | None = None) -> None:
    """Drop the snapshot of `root` (None: of every repository)."""
    with _LOCK:
        if root is None:
            _SNAPSHOTS.clear()
        else:
            _SNAPSHOTS.pop(root, None)


class _Snapshot:
    """What the last read found in one repository's tags (module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.refs: dict[str, bytes] = {}  # every ref under refs/tags -> the object it names
        self.tags: dict[str, gto_tags._Tag] = {}  # the refs that are GTO tags, parsed
        self.broken: dict[str, gto_tags.NotCovered] = {}  # refs GTO must read
        self.by_artifact: dict[str, set[str]] = {}  # artifact -> its GTO tags' refs
        self.histories: dict[str, list] = {}  # artifact -> its events (gto_tags.artifact_history)
        self.uncovered: dict[str, gto_tags.NotCovered] = {}  # artifacts whose events GTO must replay
        self.active: set[str] = set()
        self.version_commits: Counter[str] = Counter()  # commits of registrations and deregistrations
        self.no_index: set[str] = set()  # commits known to have no artifacts.yaml
        self.stamp: tuple | None = None  # the refs store's stats at the last listing, when trusted
        self.dirs: list[Path] = []
        self.read: gto_tags.TagRead | None = None
        self.common = Path(root, _git(root, "rev-parse", "--git-common-dir").strip())

    def refresh(self) -> None:
        if self.read is not None and self.stamp is not None and self._stats(self.dirs) == self.stamp:
            return  # trusted and unchanged: the refs are those of the last read
        dirs = self._walk()
        taken, stats = time.time_ns(), self._stats(dirs)
        if self.read is None:
            self._replace(list(gto_tags.records(gto_tags.for_each_ref(self.root, ["refs/tags"]))))
        else:
            self._update(self._listing())
        trusted = stats is not None and self._walk() == dirs and _older(stats, taken - int(TRUST_S * 1e9))
        self.stamp, self.dirs = (stats if trusted else None), dirs

    def answer(self) -> gto_tags.TagRead:
        """The answer of gto_tags.read_registry, or its NotCovered."""
        if self.broken:
            raise self.broken[min(self.broken)]
        unchecked = {c for c in self.version_commits if c not in self.no_index}
        gto_tags.check_no_index(self.root, unchecked)  # HEAD's every time
        self.no_index |= unchecked
        if self.uncovered:
            raise self.uncovered[min(self.uncovered)]
        if self.read is None:
            self.read = gto_tags.TagRead(dict(self.histories), sorted(self.active))
        return self.read

    # -- what changed -------------------------------------------------------------------------

    def _listing(self) -> dict[str, bytes]:
        out = _git(self.root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/tags", raw=True)
        listed = {}
        for line in out.splitlines():
            oid, _, refname = line.partition(b" ")
            listed[refname.decode(errors="surrogateescape")] = oid
        return listed

    def _update(self, listed: dict[str, bytes]) -> None:
        changed = [ref for ref, oid in listed.items() if self.refs.get(ref) != oid]
        removed = [ref for ref in self.refs if ref not in listed]
        if len(changed) > MANY:
            self._replace(list(gto_tags.records(gto_tags.for_each_ref(self.root, ["refs/tags"]))))
            return
        wanted, records = set(changed), []
        for i in range(0, len(changed), PATTERNS_PER_CALL):
            output = gto_tags.for_each_ref(self.root, changed[i : i + PATTERNS_PER_CALL])
            records += [r for r in gto_tags.records(output) if _ref(r) in wanted]  # a pattern may match more
        read = {_ref(r) for r in records}
        self._apply(records, removed + [ref for ref in changed if ref not in read])  # gone since the listing

    def _replace(self, records: list[gto_tags.Record]) -> None:
        self._apply(records, [ref for ref in self.refs if ref not in {_ref(r) for r in records}])

    def _apply(self, records: list[gto_tags.Record], removed: list[str]) -> None:
        touched: set[str] = set()
        for ref in removed:
            self._drop(ref, touched)
        for record in records:
            ref = _ref(record)
            if self.refs.get(ref) == record.oid:
                continue  # the same object: the same tag
            self._drop(ref, touched)
            self.refs[ref] = record.oid
            try:
                tag = gto_tags.gto_tag(record)
            except gto_tags.NotCovered as why:
                self.broken[ref] = why
                continue
            if tag is not None:
                self.tags[ref] = tag
                self.by_artifact.setdefault(tag.artifact, set()).add(ref)
                self.version_commits.update([tag.commit] if tag.version is not None else [])
                touched.add(tag.artifact)
        for artifact in touched:
            self._recompute(artifact)
        if touched:
            self.read = None

    def _drop(self, ref: str, touched: set[str]) -> None:
        self.refs.pop(ref, None)
        self.broken.pop(ref, None)
        tag = self.tags.pop(ref, None)
        if tag is not None:
            self.by_artifact[tag.artifact].discard(ref)
            if tag.version is not None:
                self.version_commits[tag.commit] -= 1
                if not self.version_commits[tag.commit]:
                    del self.version_commits[tag.commit]
            touched.add(tag.artifact)

    def _recompute(self, artifact: str) -> None:
        refs = self.by_artifact.get(artifact)
        self.histories.pop(artifact, None)
        self.uncovered.pop(artifact, None)
        self.active.discard(artifact)
        if not refs:
            self.by_artifact.pop(artifact, None)
            return
        tags = [self.tags[ref] for ref in refs]
        try:
            self.histories[artifact] = gto_tags.artifact_history(tags)
        except gto_tags.NotCovered as why:
            self.uncovered[artifact] = why
        if gto_tags.is_active(tags):
            self.active.add(artifact)

    # -- the refs store -----------------------------------------------------------------------

    def _walk(self) -> list[Path]:
        """The directories whose stats cover the tags' refs: refs/, refs/tags/ and every directory below."""
        found = [self.common / "refs"]
        for top, subdirs, _ in os.walk(self.common / "refs" / "tags"):
            found.append(Path(top))
            subdirs.sort()
        return found

    def _stats(self, dirs: list[Path]) -> tuple | None:
        """(path, mtime, size, inode) of packed-refs and `dirs`; None where stats cannot tell (reftable)."""
        if (self.common / "reftable").exists():
            return None
        out = []
        for path in [self.common / "packed-refs", *dirs]:
            try:
                st = path.stat()
            except FileNotFoundError:
                out.append((str(path), None, None, None))
                continue
            out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)


def _older(stats: tuple, before_ns: int) -> bool:
    return all(mtime is None or mtime < before_ns for _, mtime, _, _ in stats)


def _ref(record: gto_tags.Record) -> str:
    return record.refname.decode(errors="surrogateescape")


def _git(root: Path, *args: str, raw: bool = False):
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, check=False)
    if done.returncode:
        raise gto_tags.NotCovered(f"git {args[0]} failed in {root}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout if raw else done.stdout.decode()

"""The registry as GTO git tags: `<name>@vX.Y.Z` registers a version, `<name>#prod#N` assigns production.

Plain git tags mean every consumer that speaks GTO (the `gto` CLI, `dvc artifacts get --stage prod`,
DVC Studio) sees the same registry, and `git push --tags` shares it. Version tags are annotated and
their message carries the lineage as JSON below a one-line summary, so `git show <name>@v0.0.3`
answers "where did this come from" without loraline.

Writers serialize on an fcntl lock under .git/: git itself only guarantees that one tag name is
created once, not that a promotion was decided against the production it replaces. GTO orders
assignments by the tag's time, which has one-second resolution, so a promotion waits for the next
second after the artifact's latest assignment; otherwise two tags of the same second would make
"which version is production" ambiguous to GTO and DVC.

Reads do not go through GTO's state, which GTO builds from every tag for any question (about 1 ms a tag on
2 CPU cores, bench/scale_tenants.py): gto_tags reads the tags with git and replays GTO's rules (its module
docstring says what it covers and why that matches); a read of one artifact reads only its tags, and a read of
every artifact parses only the tags that changed since this process last read them (gto_poll: the serving
poll). Writes do not either: gto_writes makes GTO's checks on the artifact's own tags and writes GTO's tag with
GTO's own tag writer. Where a repository holds something gto_tags does not replay, that read or write goes
through GTO (gto.api), so GTO's semantics decide every answer.
Inside `reading()` the reads share one read of every tag, so a loop over tenants (the serving poll,
`loraline registry list`) costs one read, not one per tenant and call. A write inside drops it, so later
reads see the write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loraline.registry import gto_poll, gto_tags, gto_writes
from loraline.registry.base import ANY, PROD, Assignment, PromotionConflict, RegistryError, Version, _AnyType
from loraline.registry.snapshot import ensure_git_identity, git

log = logging.getLogger(__name__)
_TOLD: set[tuple[Path, str, str]] = set()  # why reads or writes went to GTO, already logged
LOCK_NAME = "loraline-registry.lock"
_SEMVER = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


def _semver_key(version: str) -> tuple[int, int, int]:
    m = _SEMVER.match(version)
    if not m:
        raise RegistryError(f"version {version!r} is not of the form vMAJOR.MINOR.PATCH (e.g. v0.1.2)")
    return int(m[1]), int(m[2]), int(m[3])


def _bump_patch(version: str | None) -> str:
    if version is None:
        return "v0.0.1"
    major, minor, patch = _semver_key(version)
    return f"v{major}.{minor}.{patch + 1}"


def parse_lineage(message: str) -> dict[str, Any]:
    """The JSON below a version tag's summary line ({} when the tag was made by something else)."""
    _, _, rest = message.partition("\n")
    start = rest.find("{")
    if start < 0:
        return {}
    try:
        value = json.loads(rest[start:])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def version_message(name: str, version: str, commit: str, lineage: dict[str, Any]) -> str:
    summary = f"Register {name} {version} (commit {commit[:12]})"
    return f"{summary}\n\n{json.dumps(lineage, indent=2, sort_keys=True, default=str)}\n"


class GtoRegistry:
    """`Registry` over the GTO tags of the git repository at `root` (see the module docstring)."""

    def __init__(self, root: str | Path = ".") -> None:
        self.root = Path(root).resolve()
        ensure_git_identity(self.root)
        self._lock_fd: int | None = None
        self._depth = 0
        self._reading = 0
        self._shared: gto_tags.TagRead | None = None  # the whole registry, read once inside reading()

    # -- reading ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Reads inside share one read of the whole registry (see the module docstring); re-entrant."""
        self._reading += 1
        try:
            yield
        finally:
            self._reading -= 1
            if not self._reading:
                self._shared = None

    def _events(self, name: str) -> list[dict[str, Any]]:
        """GTO's events of `name`, oldest first, as `gto history` lists them."""
        read = self._whole() if self._reading else self._read(name)
        return list(read.events.get(name, []))

    def _whole(self) -> gto_tags.TagRead:
        """The read of every artifact: inside reading(), the shared one."""
        if not self._reading:
            return self._read(None)
        if self._shared is None:
            self._shared = self._read(None)
        return self._shared

    def _read(self, name: str | None) -> gto_tags.TagRead:
        """The events of `name` (None: of every artifact): from the tags where gto_tags covers them, else GTO's."""
        try:
            return gto_poll.read_whole(self.root) if name is None else gto_tags.read_registry(self.root, name)
        except gto_tags.NotCovered as why:
            self._tell(why, "reading")
            return self._read_with_gto(name)

    def _tell(self, why: gto_tags.NotCovered, doing: str) -> None:
        """Log once per process (the serving poll reads every few seconds) why GTO reads or writes."""
        if (self.root, doing, str(why)) not in _TOLD:
            _TOLD.add((self.root, doing, str(why)))
            log.info("registry %s: %s through GTO (every tag, slower): %s", self.root, doing, why)

    def _read_with_gto(self, name: str | None) -> gto_tags.TagRead:
        from gto import api
        from gto.exceptions import ArtifactNotFound, GTOException

        try:
            events = list(api.history(str(self.root), name, ascending=True))
        except ArtifactNotFound:
            events = []
        except GTOException as exc:
            raise RegistryError(f"{name or 'registry'}: cannot read the registry: {exc}") from exc
        by_artifact: dict[str, list[dict[str, Any]]] = {}
        for event in events:  # oldest first; grouping keeps each artifact's order
            by_artifact.setdefault(event["artifact"], []).append(event)
        return gto_tags.TagRead(by_artifact, active=None)

    def versions(self, name: str) -> list[Version]:
        found = {
            e["version"]: Version(
                name, e["version"], e["commit"], e["timestamp"], parse_lineage(e.get("message") or "")
            )
            for e in self._events(name)
            if e["event"] == "registration" and _SEMVER.match(e["version"] or "")
        }
        return sorted(found.values(), key=lambda v: _semver_key(v.version))

    def version(self, name: str, version: str) -> Version:
        for v in self.versions(name):
            if v.version == version:
                return v
        known = ", ".join(v.version for v in self.versions(name)) or "none"
        raise RegistryError(f"{name} has no version {version}; registered: {known}")

    def latest(self, name: str) -> Version | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def history(self, name: str, stage: str = PROD) -> list[Assignment]:
        out = []
        for e in self._events(name):
            if e["event"] != "assignment" or e["stage"] != stage:
                continue
            number = int(str(e["ref"]).rsplit("#", 1)[-1]) if str(e["ref"]).count("#") == 2 else 0
            out.append(
                Assignment(name, e["version"], stage, number, e["commit"], e["timestamp"], e.get("message") or "")
            )
        return sorted(out, key=lambda a: (a.created_at, a.number))

    def production(self, name: str) -> Version | None:
        assignments = self.history(name, PROD)
        return self.version(name, assignments[-1].version) if assignments else None

    def artifacts(self) -> list[str]:
        """The artifacts `gto show` lists (deprecated ones left out)."""
        from gto import api

        active = self._whole().active
        return list(active) if active is not None else sorted(api.show(str(self.root)))

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Exclusive across processes (flock); re-entrant within this object so promote can run inside one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        fd = os.open(self._git_dir() / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd, self._depth = fd, 1
            self._shared = None  # another process may have written before the lock was ours
            yield
        finally:
            self._lock_fd, self._depth = None, 0
            os.close(fd)  # closing releases the flock

    def register(self, name: str, ref: str, lineage: dict[str, Any], version: str | None = None) -> Version:
        from gto import api

        commit = self._resolve(ref)
        with self.transaction():
            latest = self.latest(name)
            version = version or _bump_patch(latest.version if latest else None)
            _semver_key(version)
            message = version_message(name, version, commit, lineage)
            with self._writing(f"cannot register {name} {version} at {commit[:12]}"):
                try:
                    gto_writes.register(self.root, name, commit, version, message)
                except gto_tags.NotCovered as why:
                    self._tell(why, "writing")
                    api.register(str(self.root), name, commit, version=version, message=message)
        return self.version(name, version)

    def promote(
        self, name: str, version: str, expected_current: str | None | _AnyType = ANY, message: str | None = None
    ) -> Assignment:
        with self.transaction():
            self.version(name, version)  # raises naming the registered versions
            current = self.production(name)
            current_version = current.version if current else None
            if not isinstance(expected_current, _AnyType) and current_version != expected_current:
                raise PromotionConflict(name, expected_current, current_version)
            if current_version == version:
                return self.history(name)[-1]
            return self._assign(
                name, version, message or f"Promote {name} {version} to {PROD} (was {current_version or 'none'})"
            )

    def rollback_target(self, name: str) -> tuple[str, str]:
        """(production now, the version a rollback makes production): the latest other version that was production."""
        assignments = self.history(name)
        if not assignments:
            raise RegistryError(f"{name} has never been promoted: there is no production to roll back")
        current, before = assignments[-1].version, previous_production(assignments)
        if before is None:
            raise RegistryError(
                f"{name}: nothing to roll back to, {current} is the only version that has been in {PROD}"
            )
        return current, before

    def rollback(self, name: str, message: str | None = None) -> Assignment:
        with self.transaction():
            current, before = self.rollback_target(name)
            return self._assign(name, before, message or f"Roll back {name} {PROD} from {current} to {before}")

    def _assign(self, name: str, version: str, message: str) -> Assignment:
        """Under the lock: a new `#prod#N` tag; GTO's force only allows re-assigning a version once in prod (never
        `git tag -f`)."""
        from gto import api

        previous = self.history(name)
        if previous:
            _wait_past(previous[-1].created_at)
        with self._writing(f"cannot promote {name} {version}"):
            try:
                gto_writes.assign(self.root, name, PROD, version, message)
            except gto_tags.NotCovered as why:
                self._tell(why, "writing")
                api.assign(str(self.root), name, PROD, version=version, message=message, force=True)
        made = self.history(name)[-1]
        if made.version != version:  # pragma: no cover - would mean a writer bypassed the lock
            raise RegistryError(f"{name}: assigned {version} but production reads {made.version}")
        return made

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A write's GTO errors as RegistryError (`what`: ...); later reads see the write."""
        from gto.exceptions import GTOException

        try:
            yield
        except GTOException as exc:
            raise RegistryError(f"{what}: {exc}") from exc
        finally:
            self._shared = None

    # -- git ----------------------------------------------------------------------------------

    def _git(self, *args: str) -> str:
        return git(self.root, *args)

    def _git_dir(self) -> Path:
        return Path(self.root, self._git("rev-parse", "--git-common-dir"))

    def _resolve(self, ref: str) -> str:
        return self._git("rev-parse", "--verify", f"{ref}^{{commit}}")


def previous_production(assignments: list[Assignment]) -> str | None:
    """The version a rollback returns to: the latest one in `assignments` (oldest first) other than the last's."""
    return next((a.version for a in reversed(assignments[:-1]) if a.version != assignments[-1].version), None)


def _wait_past(moment: datetime) -> None:
    """Sleep until the clock's whole second is later than `moment` (tag times have one-second resolution)."""
    target = moment.timestamp() + 1
    now = datetime.now(timezone.utc).timestamp()
    if int(now) < int(target):
        time.sleep(int(target) - now + 0.01)

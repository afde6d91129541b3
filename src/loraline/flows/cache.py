"""Checking DVC's cache before a run relies on it.

A cache file whose bytes no longer match its name (a disk error, a stray write through a link) is
reported by `dvc status` as "not in cache", removed, and its stage silently rebuilt on the next
`dvc repro`: an hour of training redone without a word. `check_cache` re-hashes, once, every cache
file that an output in dvc.lock points at (for a folder output, its .dir manifest and every file the
manifest lists), so that `loraline check` can say which file is damaged and `loraline run` can repair
it before DVC sees it: from the workspace copy when that is intact (nothing rebuilt), else by moving
the damaged file aside, so that `dvc pull` restores it or the run rebuilds its stage, saying so.

It reads dvc.lock and the cache directly rather than asking DVC: DVC's own check trusts its state
database (a file whose size, mtime and inode did not change is not re-read), which is exactly what a
damaged file in place defeats. Cache files that are absent (never built here, not pulled) are not
damage and are skipped.

Re-hashing an 8B model's cache at every run start costs 15-30 s, so the run-start check is
incremental: VERIFIED remembers each file found intact with its (size, mtime, ctime, inode), and only
a file whose stat differs, or that is not remembered, is re-hashed. Unlike DVC's state, it compares
ctime: any write, in place or through a link, changes it, and user space cannot set it back (mtime
it can, with os.utime). Only bytes that rot on the disk without a write go unseen; finding those is
what `loraline check`'s full re-hash is for (it refreshes VERIFIED).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraline import io
from loraline.dvcfiles import lock_paths, read_lock

__all__ = ["CacheCheck", "CorruptFile", "QUARANTINE", "VERIFIED", "check_cache", "repair"]

# Where `repair` moves a damaged cache file that it cannot restore (kept, not deleted: evidence).
QUARANTINE = Path(".dvc") / "tmp" / "corrupted-cache"
# The cache files found intact, with the stat they had when hashed: {path: [size, mtime_ns, ctime_ns, inode]}.
VERIFIED = Path(".dvc") / "tmp" / "loraline-cache-verified.json"
# A file whose ctime is this close to the moment it was hashed is not remembered: a write in the same
# timestamp tick (a few ms locally, more on a network file system) would leave its stat unchanged.
SETTLED_NS = 1_000_000_000


@dataclass(frozen=True)
class CorruptFile:
    cache_path: Path
    output: str  # the workspace path it belongs to, relative to the project root (a file inside a folder output)
    stage: str
    expected: str  # the hash its name says
    actual: str  # the hash of its bytes
    hash_name: str  # "md5" (DVC 3), "md5-dos2unix" (a DVC 2 lock entry)

    def describe(self, root: Path) -> str:
        return (
            f"DVC cache file {_shown(self.cache_path, root)} is corrupted: its bytes hash to {self.actual}, "
            f"not {self.expected.removesuffix('.dir')}; it holds {self.output} of stage {self.stage}"
        )


@dataclass(frozen=True)
class CacheCheck:
    root: Path
    files: int = 0  # cache files checked: re-hashed, or unchanged since they were verified
    bytes: int = 0  # of the files re-hashed
    missing: int = 0  # referenced by dvc.lock but not in this cache (not built or not pulled here)
    seconds: float = 0.0
    corrupt: list[CorruptFile] = field(default_factory=list)
    rehashed: int = 0
    incremental: bool = False  # files unchanged since verified were trusted, not re-hashed
    unrecorded: str | None = None  # why VERIFIED could not be written (the next check re-hashes all)

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def summary(self) -> str:
        if not self.files:  # a fresh clone before its first run or pull: nothing to vouch for yet
            return (
                "DVC cache: nothing of dvc.lock's outputs is in this "
                f"cache yet ({self.missing} missing; nothing to check)"
                if self.missing
                else "DVC cache: dvc.lock records no outputs yet (nothing to check)"
            )
        missing = f", {self.missing} not in this cache" if self.missing else ""
        verdict = "intact" if self.ok else f"{len(self.corrupt)} corrupted"
        read = f"{self.bytes / 1e6:.1f} MB in {self.seconds:.1f}s"
        how = (
            f"{self.rehashed} re-hashed ({self.files - self.rehashed} unchanged since verified; {read})"
            if self.incremental
            else f"all re-hashed ({read})"
        )
        unrecorded = f"; {self.unrecorded}, so the next run re-hashes every file" if self.unrecorded else ""
        return f"DVC cache: {self.files} files of dvc.lock's outputs checked, {how}: {verdict}{missing}{unrecorded}"


def check_cache(root: str | Path, *, incremental: bool = False) -> CacheCheck:
    """Re-hash every cache file that an output recorded in `root`/dvc.lock points at; `incremental`:
    only those whose stat changed since VERIFIED recorded them intact (or that it does not record).
    Either way VERIFIED is rewritten to record the files found intact now."""
    root = Path(root).resolve()
    started = time.perf_counter()
    if not lock_paths(root):
        return CacheCheck(root, incremental=incremental)
    locate = _cache_locator(root)
    state = _Scan(root, _read_verified(root) if incremental else {})
    for stage, output, oid, hash_name in _locked_outputs(root):
        cache_path = locate(oid, hash_name)
        if not oid.endswith(".dir"):
            state.check(cache_path, output, stage, oid, hash_name)
        elif state.check(cache_path, output, stage, oid, hash_name):  # an intact manifest: now its files
            for entry in json.loads(cache_path.read_text(encoding="utf-8")):
                state.check(
                    locate(entry["md5"], hash_name), f"{output}/{entry['relpath']}", stage, entry["md5"], hash_name
                )
    unrecorded = _write_verified(root, state.verified, state.trusted)
    return CacheCheck(
        root,
        state.files,
        state.bytes,
        state.missing,
        time.perf_counter() - started,
        state.corrupt,
        state.rehashed,
        incremental,
        unrecorded,
    )


def repair(check: CacheCheck) -> list[str]:
    """Repair what `check` found, one line per file saying what was done: restored from the workspace
    copy when that hashes right (the stage need not run again), else moved aside to QUARANTINE, so
    that DVC finds it missing and `dvc pull` restores it, or `dvc repro` rebuilds its stage."""
    lines = []
    for bad in check.corrupt:
        workspace = check.root / bad.output
        if (
            not bad.expected.endswith(".dir")
            and workspace.is_file()
            and _hash(workspace, bad.hash_name) == bad.expected
        ):
            _restore(workspace, bad.cache_path)
            lines.append(f"{_shown(bad.cache_path, check.root)}: restored from the intact workspace copy {bad.output}")
            continue
        aside = check.root / QUARANTINE / f"{bad.hash_name}-{bad.expected}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(bad.cache_path), aside)
        lines.append(
            f"{_shown(bad.cache_path, check.root)}: moved aside to {_shown(aside, check.root)} (the workspace copy of "
            f"{bad.output} does not match either); `dvc pull` restores it from the remote, else this run rebuilds "
            f"stage {bad.stage}"
        )
    return lines


class _Scan:
    """Check each cache file once (outputs of several stages may share one), counting what was read:
    trusted when its stat is what `trusted` recorded, else hashed; `verified` collects the intact ones."""

    def __init__(self, root: Path, trusted: dict[str, list[int]]):
        self.root, self.trusted = root, trusted
        self.files = self.bytes = self.missing = self.rehashed = 0
        self.corrupt: list[CorruptFile] = []
        self.verified: dict[str, list[int]] = {}
        self._seen: dict[Path, bool] = {}

    def check(self, cache_path: Path, output: str, stage: str, oid: str, hash_name: str) -> bool:
        """Whether `cache_path` is present and intact; a damaged one is recorded in `corrupt`."""
        if cache_path not in self._seen:
            self._seen[cache_path] = self._check(cache_path, output, stage, oid, hash_name)
        return self._seen[cache_path]

    def _check(self, cache_path: Path, output: str, stage: str, oid: str, hash_name: str) -> bool:
        try:
            st = cache_path.stat()
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            self.missing += 1
            return False
        before = _stat_key(st)
        self.files += 1
        key = _shown(cache_path, self.root)
        if self.trusted.get(key) == before:
            self.verified[key] = before
            return True
        hashed_at = time.time_ns()
        actual = _hash(cache_path, hash_name)
        self.rehashed += 1
        self.bytes += before[0]
        if actual != oid.removesuffix(".dir"):
            self.corrupt.append(CorruptFile(cache_path, output, stage, oid, actual, hash_name))
            return False
        # Remembered only when no write can hide behind an unchanged stat: none during the hashing,
        # and its last change a tick before it (else a write in that same tick leaves ctime as it is).
        if _stat_key(cache_path.stat()) == before and before[2] < hashed_at - SETTLED_NS:
            self.verified[key] = before
        return True


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_verified(root: Path) -> dict[str, list[int]]:
    """VERIFIED's record ({} when absent or unreadable: then every file is re-hashed, nothing is lost)."""
    try:
        data = json.loads((root / VERIFIED).read_text(encoding="utf-8"))
        return {str(k): list(v) for k, v in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_verified(root: Path, verified: dict[str, list[int]], before: dict[str, list[int]]) -> str | None:
    """Record `verified` in VERIFIED (not rewritten when unchanged); why it could not be, else None."""
    if verified == before:
        return None
    try:
        io.write_json(root / VERIFIED, {"files": verified})
    except io.WriteError as exc:
        return f"could not record the verified files ({exc})"
    return None


def _locked_outputs(root: Path) -> list[tuple[str, str, str, str]]:
    """(stage, output path, hash, hash name) of every output recorded in dvc.lock."""
    found = []
    for stage, entry in read_lock(root).items():
        for out in entry.get("outs") or []:
            if out.get("md5"):  # a lock entry without `hash: md5` was written by DVC 2 (md5 over dos2unix text)
                found.append((stage, out["path"], out["md5"], out.get("hash") or "md5-dos2unix"))
    return found


def _cache_locator(root: Path):
    """oid, hash name -> the cache file's path, as DVC lays out this project's cache (cache.dir honoured)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        to_path = {"md5": repo.cache.local.oid_to_path, "md5-dos2unix": repo.cache.legacy.oid_to_path}
    return lambda oid, hash_name: Path(to_path[hash_name](oid))


def _hash(path: Path, hash_name: str) -> str:
    from dvc_data.hashfile.hash import file_md5

    return file_md5(str(path), name=hash_name)


def _restore(source: Path, cache_path: Path) -> None:
    """Put `source`'s bytes at `cache_path` (atomically, read-only like DVC's own cache files)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{cache_path.name}.tmp-", dir=cache_path.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, cache_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shown(path: Path, root: Path) -> str:
    """`path` relative to the project when inside it (a cache elsewhere, cache.dir, stays absolute)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)

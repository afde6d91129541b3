"""Atomic output: a failed stage leaves either the previous output or nothing, never half a file.

A write that fails (disk full, read-only folder, a file where a folder should be) raises WriteError,
which names the output and the OS's reason (`cannot write reports/x.json: No space left on device`);
the CLI prints it as one line. Files outside a stage's outputs (its run timing) are written with
`write_timing`, which warns instead: a run fact that cannot be written must not fail the stage whose
real outputs are already in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Errors that only a write can cause: inside an atomic_dir block they are the output's, wherever raised.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class WriteError(OSError):
    """An output could not be written; str() is `cannot write <path>: <reason>`."""

    def __init__(self, path: str | Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror}"


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on error it is removed.

    An OSError of a write into the folder (disk full, or any error naming a file inside it) comes out
    as WriteError naming `final`; other errors (an input that cannot be read) pass through as they are.
    """
    final = Path(final)
    tmp = _make_temp(final, lambda: Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent)))
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, WriteError) or not _is_write_error(exc, tmp):
            raise
        raise WriteError(final, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final)


def _make_temp(final: Path, make: Callable[[], Any]) -> Any:
    """The temporary sibling of `final` (its folder created first), or WriteError naming `final`."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return make()
    except (FileExistsError, NotADirectoryError) as exc:
        # mkdir's own words ("File exists") do not say which file is in the way.
        blocker = next((p for p in (final.parent, *final.parent.parents) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise WriteError(final, exc) from exc
        raise WriteError(final, OSError(exc.errno, f"{blocker} is a file, not a folder")) from exc
    except OSError as exc:
        raise WriteError(final, exc) from exc


def _is_write_error(exc: OSError, tmp: Path) -> bool:
    if exc.errno in WRITE_ERRNOS:
        return True
    return any(name and (Path(name) == tmp or tmp in Path(name).parents) for name in (exc.filename, exc.filename2))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap `tmp` in for `final`; if the swap fails, the previous `final` is put back and `tmp` removed."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    moved = False
    try:
        if final.exists():
            final.rename(old)
            moved = True
        tmp.rename(final)
    except OSError as exc:
        if moved:
            old.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(final, exc) from exc
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary sibling and rename it over `path`: readers see the old file or the
    new one. On any failure the temporary file is removed; an OSError comes out as WriteError."""
    path = Path(path)
    fd, tmp = _make_temp(path, lambda: tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise WriteError(path, exc) from exc
        raise
    return path


def copy_file(source: str | Path, path: str | Path) -> Path:
    """Copy `source` (a small file: a report) to `path` atomically."""
    return atomic_write_bytes(path, Path(source).read_bytes())


def dumps_json(obj: Any) -> str:
    """Stable JSON: sorted keys and a trailing newline, so equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj))


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str) + "\n" for r in rows)
    return atomic_write_text(path, text)


def write_timing(path: str | Path, timing: dict[str, Any]) -> Path | None:
    """Write a stage run's timing (reports/timing/<stage>.json), which lies outside its outputs: if that
    fails, one warning line naming the file and the reason, and the stage carries on (its outputs are
    complete; DVC records them). Returns the path written, or None."""
    try:
        return write_json(path, timing)
    except WriteError as exc:
        print(f"loraline: warning: run timing not recorded: {exc} (the stage's outputs are complete)", file=sys.stderr)
        return None

"""Where an artifact came from: content hashes, the code that made it and library versions.

Two kinds of record, kept apart so that an output's bytes repeat when its inputs do:

- inside a DVC output, only what determines it: content hashes, params, library versions and
  `code_fingerprint` (the source of the stage's own modules, not the git commit, which moves with
  any unrelated change);
- outside the outputs (reports/timing/, see `run_timing`), what differs from run to run: wall times,
  rates, memory peaks, the git commit.
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "bitsandbytes", "datasets", "dvc", "loraline")
PACKAGE = "loraline"
# The folder holding the loraline package (src/ in a checkout, site-packages when installed).
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path], workers: int | None = None) -> list[str]:
    """sha256_file of each path, in order, several files at once: hashlib lets go of the GIL while it
    hashes, so an 8B model's shards (15 GB in four files) take a quarter of the time one after another."""
    workers = workers or min(8, os.cpu_count() or 1, max(len(paths), 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))


def hash_tree(root: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """One hash over every file's relative path and content, independent of listing order."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def file_hashes(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in exclude
    }


def code_revision(cwd: str | Path | None = None) -> str:
    """The git commit of the working tree, with '-dirty' when library code differs from it.

    Varies with any commit, so it belongs in the timing (reports/timing/), never inside an output."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev


def library_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# --- the code a stage runs --------------------------------------------------------------------------


def module_file(name: str, root: Path = SOURCE_ROOT) -> Path | None:
    """The source file of module `name` (`loraline.train.stage`) under `root`, or None if there is none."""
    path = root.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path = SOURCE_ROOT) -> set[str]:
    """Every loraline module the source at `path` imports, with the packages an import of it initialises.

    Read from the source (function-level imports included, since stages import heavy libraries lazily)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import x` runs pkg, and x too when x is a submodule
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                parts = name.split(".")
                out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in out if module_file(m, root) is not None}


def import_closure(module: str, root: Path = SOURCE_ROOT) -> set[Path]:
    """The source files of `module`, the packages above it and every loraline module they import, transitively."""
    parts = module.split(".")
    todo = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:
            raise ModuleNotFoundError(f"no source for {name} under {root}")
        todo.extend(imported_modules(path, root))
    return {module_file(m, root) for m in seen}


def code_fingerprint(module: str, root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """What a stage's output records as its code: one sha256 over the relative path and content of
    every file in `module`'s import closure (its entry module, `loraline.<stage>.stage`), and their
    count. Editing code the stage does not run leaves it unchanged, unlike a git commit."""
    files = sorted(import_closure(module, root), key=lambda p: p.relative_to(root).as_posix())
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return {"sha256": h.hexdigest(), "modules": len(files)}


# --- what differs between runs ----------------------------------------------------------------------


def run_timing(started: float, **measured: Any) -> dict[str, Any]:
    """A stage run's timing (reports/timing/<stage>.json): seconds since `started`
    (time.perf_counter()), when it finished (UTC: runs of concurrent tenants can be lined up), the
    stage's own measurements (`measured`), the seconds of each `phase` that began after `started`, and
    the git commit."""
    finished = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    # [name, seconds] pairs rather than a mapping: `dvc metrics show` leaves lists out, and a column per phase of
    # every stage would bury the dozen numbers people compare there.
    phases = [[name, seconds] for name, seconds in phases_since(started).items()]
    return {
        "wall_s": round(time.perf_counter() - started, 2),
        "finished_at": finished,
        **measured,
        **({"phases": phases} if phases else {}),
        "code_revision": code_revision(),
    }


# (began, name, seconds) of every phase this process timed; run_timing picks those of its own run.
_PHASES: list[tuple[float, str, float]] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a part of a stage (loading the base, hashing its files, generating the probes) for the stage's
    timing file: where a stage's minutes go, at 8B as on the tiny base, without a profiler."""
    began = time.perf_counter()
    try:
        yield
    finally:
        _PHASES.append((began, name, time.perf_counter() - began))


def phases_since(started: float) -> dict[str, float]:
    """Seconds per phase name of the phases that began at or after `started` (a repeated name adds up)."""
    totals: dict[str, float] = {}
    for began, name, seconds in _PHASES:
        if began >= started:
            totals[name] = totals.get(name, 0.0) + seconds
    return {name: round(seconds, 2) for name, seconds in totals.items()}

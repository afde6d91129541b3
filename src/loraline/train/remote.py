"""Checkpoints on the project's default DVC remote, so that a run survives losing its machine.

    <remote>/loraline-checkpoints/<tenant>/<fingerprint>/step-NNNNNNNN/
        adapter.safetensors ...   the local checkpoint's files (checkpoint.save), uploaded first
        complete.json             written last: {"step", "fingerprint", "files": {name: sha256}}

The remote is the one `dvc push` uses (.dvc/config core.remote), reached through DVC's own filesystem
(dvc.fs.get_cloud_fs), so every remote type DVC supports works: a local folder, S3, GCS, Azure, SSH...
Its content-addressed objects live under files/ (and two-hex-digit folders for DVC 2's), which
loraline-checkpoints/ never touches, and which `dvc gc --cloud` is the only thing to prune.

Invariants:
- A step is complete iff its complete.json exists; readers ignore every other step (a machine that died
  mid-upload leaves one without it, which the next push or cleanup deletes).
- A step is deleted marker first, so no reader sees a marker whose files are going.
- A downloaded step is checked against the marker's hashes before it is used, and lands in the local
  checkpoint folder atomically (io.atomic_dir): from there it resumes as a local checkpoint does.
- Nothing here changes training: uploads read the files checkpoint.save wrote, and a failing remote is a
  warning naming the remote and the step, never an error of the run.
- Without a DVC repo at the project root, a default remote or train.checkpoint_remote, nothing happens.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraline import io
from loraline.provenance import sha256_file
from loraline.train import checkpoint

PREFIX = "loraline-checkpoints"
MARKER = "complete.json"
_STEP = re.compile(r"^step-(\d+)$")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where a tenant's checkpoints go: the project (a DVC repo, or not) and the tenant. JSON-able, so that
    the data-parallel launcher hands it to its ranks."""

    root: Path
    tenant: str

    def to_dict(self) -> dict[str, str]:
        return {"root": str(self.root), "tenant": self.tenant}

    @classmethod
    def from_dict(cls, d: dict[str, str] | None) -> Target | None:
        return cls(Path(d["root"]), d["tenant"]) if d else None


def open_store(target: Target | None) -> Store | None:
    """The tenant's checkpoint store on the project's default DVC remote; None without a DVC repo at
    target.root or without a default remote (silently: a project need not have either)."""
    if target is None or not (Path(target.root) / ".dvc").is_dir():
        return None
    try:
        from dvc.config import Config
        from dvc.fs import get_cloud_fs

        config = Config(dvc_dir=str(Path(target.root) / ".dvc"))
        name = config["core"].get("remote")
        if not name:
            return None
        cls, fs_config, path = get_cloud_fs(config, name=name)
        fs = cls(**fs_config)
    except Exception as exc:  # a broken remote config must not stop a run that could train without it
        log.warning("checkpoints stay local: cannot open the DVC default remote of %s: %s", target.root, exc)
        return None
    return Store(fs, fs.join(path, PREFIX, target.tenant), f"{name} ({fs.unstrip_protocol(path)})")


@dataclass(frozen=True)
class Step:
    fingerprint: str
    step: int
    path: str
    complete: bool


class Store:
    """One tenant's checkpoints under <remote>/loraline-checkpoints/<tenant>/; every method warns on a
    remote failure instead of raising."""

    def __init__(self, fs: Any, base: str, remote: str):
        self.fs, self.base, self.remote = fs, base, remote

    def push(self, step_dir: Path, fingerprint: str) -> bool:
        """Upload one local checkpoint (files, then the marker), then drop this run's older remote steps
        beyond checkpoint.KEEP. True when the step is on the remote."""
        step = int(_STEP.match(step_dir.name).group(1))
        dest = self.fs.join(self.base, fingerprint, step_dir.name)
        try:
            files = sorted(p.name for p in step_dir.iterdir() if p.is_file())
            hashes = {name: sha256_file(step_dir / name) for name in files}
            if self.fs.exists(self.fs.join(dest, MARKER)):  # a step trained again: no reader mixes old and new files
                self.fs.rm_file(self.fs.join(dest, MARKER))
            for name in files:
                self.fs.put_file(str(step_dir / name), self.fs.join(dest, name))
            with tempfile.TemporaryDirectory(prefix="loraline-marker-") as tmp:  # put_file: whole or not at all
                marker = io.write_json(Path(tmp) / MARKER, {"step": step, "fingerprint": fingerprint, "files": hashes})
                self.fs.put_file(str(marker), self.fs.join(dest, MARKER))
        except Exception as exc:
            log.warning("checkpoint step %d was not pushed to DVC remote %s: %s", step, self.remote, exc)
            return False
        log.info("pushed checkpoint step %d to DVC remote %s", step, self.remote)
        ours = [s for s in self.steps() if s.fingerprint == fingerprint]
        keep = sorted(s.step for s in ours if s.complete)[-checkpoint.KEEP :]
        self._remove([s for s in ours if s.step not in keep])
        return True

    def fetch_newest(self, fingerprint: str, checkpoint_dir: Path, newer_than: int = -1) -> int | None:
        """Download this run's newest complete remote step after `newer_than` into checkpoint_dir (atomically,
        hashes checked); an older one when that fails. The step, or None when there is none to have."""
        complete = [s for s in self.steps() if s.fingerprint == fingerprint and s.complete and s.step > newer_than]
        for found in sorted(complete, key=lambda s: -s.step):
            try:
                self._download(found, checkpoint.step_dir(checkpoint_dir, found.step))
            except Exception as exc:
                log.warning("cannot fetch checkpoint step %d from DVC remote %s: %s", found.step, self.remote, exc)
                continue
            log.info("fetched checkpoint step %d of this run from DVC remote %s", found.step, self.remote)
            return found.step
        return None

    def remove_other_runs(self, fingerprint: str) -> None:
        """Every remote step of this tenant from a run with other params, data or base: never resumable."""
        others = [s for s in self.steps() if s.fingerprint != fingerprint]
        self._remove(others, sorted({self.fs.join(self.base, s.fingerprint) for s in others}))

    def remove_all(self) -> None:
        """Every remote step of this tenant (its adapter is written: they only repeat it)."""
        steps = self.steps()
        self._remove(steps, [self.base] if steps else [])

    def steps(self) -> list[Step]:
        """This tenant's remote steps, complete or not ([] when the remote cannot be listed)."""
        try:
            self.fs.fs.invalidate_cache()  # s3fs & co. cache listings; another machine may have written since
            files = list(self.fs.find(self.base)) if self.fs.exists(self.base) else []
        except Exception as exc:
            log.warning("cannot list checkpoints on DVC remote %s: %s", self.remote, exc)
            return []
        seen: dict[tuple[str, int], bool] = {}
        for f in files:
            parts = self.fs.relparts(f, self.base)
            m = _STEP.match(parts[1]) if len(parts) == 3 else None
            if m:
                key = (parts[0], int(m.group(1)))
                seen[key] = seen.get(key, False) or parts[2] == MARKER
        return [Step(fp, n, self.fs.join(self.base, fp, f"step-{n:08d}"), ok) for (fp, n), ok in sorted(seen.items())]

    def _download(self, found: Step, final: Path) -> None:
        marker = json.loads(self.fs.cat_file(self.fs.join(found.path, MARKER)))
        with io.atomic_dir(final) as tmp:
            for name, sha in marker["files"].items():
                self.fs.get_file(self.fs.join(found.path, name), str(tmp / name))
                if sha256_file(tmp / name) != sha:
                    raise ValueError(f"{name} does not match the sha256 its marker recorded")

    def _remove(self, steps: list[Step], folders: list[str] | None = None) -> None:
        """Delete `steps`: every marker first, then `folders` (default: the steps' own)."""
        markers = [(self.fs.join(s.path, MARKER), False) for s in steps if s.complete]
        folders = folders if folders is not None else [s.path for s in steps]
        for path, recursive in markers + [(f, True) for f in folders]:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass
            except Exception as exc:
                log.warning("cannot remove %s from DVC remote %s: %s", path, self.remote, exc)


class Pusher:
    """Uploads checkpoints off the training thread, one at a time. `submit` first waits for the upload
    before it, so a step is never pruned locally while it uploads (checkpoint.save keeps the newest
    KEEP=2: the one uploading and the one just written); `wait` before anything deletes the remote."""

    def __init__(self, store: Store, fingerprint: str):
        self.store, self.fingerprint = store, fingerprint
        self._thread: threading.Thread | None = None

    def submit(self, step_dir: Path) -> None:
        self.wait()
        self._thread = threading.Thread(
            target=self.store.push, args=(step_dir, self.fingerprint), name=f"push-{step_dir.name}", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

"""The whole pipeline through DVC: DVC decides which stages are stale and records their lineage."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def reproduce(root: str | Path = ".", force: bool = False, push: bool = True, targets: list[str] | None = None) -> list[str]:
    """Run `dvc repro` in-process (for `targets` and what they need, default every stage of dvc.yaml);
    return the names of the stages that ran.

    When the project has a default DVC remote, the outputs are pushed to it afterwards so that the
    versions recorded in dvc.lock can be fetched elsewhere (`dvc pull`).
    """
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # dvc.yaml's commands call `loraline`: make it the one from this interpreter's environment even
    # when that environment is not activated (e.g. `.venv/bin/loraline run`).
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if targets:
            stages = [s for target in targets for s in repo.reproduce(target, force=force)]
        else:
            stages = repo.reproduce(force=force)
        if push and repo.config.get("core", {}).get("remote"):
            repo.push()
    return [stage.addressing for stage in stages]

"""The whole pipeline through DVC: DVC decides which stages are stale and records their lineage."""

from __future__ import annotations

from pathlib import Path

from loraline.layout import dvc_target
from loraline.tools import use_tool_env


def reproduce(
    root: str | Path = ".", force: bool = False, push: bool = True, targets: list[str] | None = None
) -> list[str]:
    """Run `dvc repro` in-process (for `targets`, stage ids such as `gate@acme-shop`, and what they need;
    default every stage of every dvc.yaml: `dvc repro --all-pipelines`); return the ids of the stages that ran.

    When the project has a default DVC remote, the outputs are pushed to it afterwards so that the
    versions recorded in dvc.lock can be fetched elsewhere (`dvc pull`).
    """
    # dvc.yaml's commands call `loraline`: the one from this interpreter's environment even when that
    # environment is not activated (e.g. `.venv/bin/loraline run`).
    use_tool_env()
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if targets:
            stages = [s for target in targets for s in repo.reproduce(dvc_target(target), force=force)]
        else:
            stages = repo.reproduce(all_pipelines=True, force=force)
        if push and repo.config.get("core", {}).get("remote"):
            repo.push()
    return [stage.name for stage in stages]

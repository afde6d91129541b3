"""consistency.dvc_status: DVC's status of the wanted stages from one parse of the dvc.yaml and dvc.lock files
that hold them."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_helpers import dvc_project, repro

from loraline.layout import dvc_target
from loraline.registry.consistency import dvc_status

STAGES = ["train@t1", "merge@t1", "export@t1", "evaluate@t1", "gate@t1"]


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    return dvc_project(root, tmp_path / "remote")


def _dvc_targets_status(root: Path, names: list[str]) -> dict:
    """What `dvc status <stage>...` answers, target by target (DVC parses the stage's files for each)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.status(targets=[str(root / dvc_target(name)) for name in names])
    return {key.rpartition(":")[2]: changes for key, changes in found.items()}


def test_status_is_dvcs_stage_by_stage_in_the_order_wanted(project):
    root = project.resolve()
    wanted = ["gate@t1", "nope@t1", *STAGES[:-1]]  # not dvc.yaml's order; one stage it does not define
    never_ran, checked = dvc_status(root, wanted)
    assert checked == [s for s in wanted if s != "nope@t1"]
    assert list(never_ran) == checked and never_ran == _dvc_targets_status(root, checked)

    repro(root)
    assert dvc_status(root, wanted) == ({}, checked)  # everything up to date

    (root / "evaluation.json").write_text('{"models": {}}')  # evaluate's dependency: evaluate (and gate) stale
    stale, _ = dvc_status(root, wanted)
    assert list(stale) == ["evaluate@t1"] and stale == _dvc_targets_status(root, checked)
    assert "evaluation.json" in str(stale["evaluate@t1"])

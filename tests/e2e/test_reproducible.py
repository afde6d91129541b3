"""Outputs are reproducible to the byte: rebuilding a stage from the same inputs, params, code and
library versions on the same machine gives the same files, so `dvc repro -f` leaves the dvc.lock files as they were
(and the registry sees no new adapter). Run facts (wall times, rates, memory, the git commit) change,
and live outside the outputs, in reports/timing/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_project import copy_project, sh, stages_run

from loraline.dvcfiles import lock_paths
from loraline.layout import dvc_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TENANT = "acme-shop"
TARGET = f"export@{TENANT}"
# The base pretrains on every tenant's documents, so forcing it re-runs each tenant's documents stage.
UPSTREAM = {"base", "documents@globex-it"} | {
    f"{stage}@{TENANT}" for stage in ("documents", "synthesize", "prepare", "train", "merge", "export")
}


def test_rebuilding_from_the_same_inputs_leaves_dvc_lock_byte_identical(tmp_path: Path, built):
    # A copy of a finished run, at another path: the rebuild must not depend on the folder either.
    project = copy_project(built.project, tmp_path / "project")
    locks = {path: path.read_bytes() for path in lock_paths(project)}  # the root's and each tenant's
    assert len(locks) == 3
    timing = project / "reports" / "timing" / f"train@{TENANT}.json"
    facts = json.loads(timing.read_text())
    assert facts["wall_s"] > 0 and facts["tokens_per_s"] > 0 and facts["code_revision"]

    again = sh("dvc", "repro", "--force", dvc_target(TARGET), cwd=project)

    assert stages_run(again) == UPSTREAM
    assert {path: path.read_bytes() for path in lock_paths(project)} == locks
    assert json.loads(timing.read_text()) != facts  # the run facts did change, outside dvc.lock
    record = json.loads((project / "models" / "adapters" / TENANT / "train_record.json").read_text())
    assert set(record["code"]) == {"sha256", "modules"} and "code_revision" not in record

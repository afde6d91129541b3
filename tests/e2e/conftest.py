"""One tiny project after a full `dvc repro`, built once per test run: the end-to-end tests that start
from a finished run take a copy of it (e2e_project.copy_project) instead of each running every stage."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_project import make_tiny_project, sh
from filelock import FileLock


@dataclass(frozen=True)
class Built:
    project: Path  # never changed by a test: copy it
    repro_output: str  # what the first `dvc repro --all-pipelines` printed


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    # Under pytest-xdist each worker is a session of its own: the first one here builds the project
    # in the folder all workers share, the others wait for it and reuse it.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, output = root / "built", root / "built" / "repro_output.txt"
    with FileLock(str(root / "built.lock")):
        if not output.is_file():
            project = make_tiny_project(folder / "project")
            output.write_text(sh("dvc", "repro", "--all-pipelines", cwd=project))
    return Built(folder / "project", output.read_text())

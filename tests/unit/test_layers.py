"""The package's layering, as declared in pyproject.toml ([tool.importlinter]), holds.

Bottom to top: config and io, shared modelling, the stages (independent of each other), the
registry, release, the presentation module (summary), the flows and the CLI. A lower layer never
imports a higher one; no stage imports another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    return subprocess.run([str(LINT), "--no-cache"], cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_stage_importing_another_stage_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    merge = tmp_path / "src" / "loraline" / "merge" / "stage.py"
    merge.write_text(
        merge.read_text() + "\n\ndef _reach_into_train():\n    from loraline.train import model  # noqa: F401\n"
    )
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "loraline.merge.stage -> loraline.train.model" in result.stdout

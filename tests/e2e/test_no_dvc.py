"""End to end: `loraline run --no-dvc` calls every stage in this process, for every tenant, and a tenant
whose stage fails is reported and left behind while the others go through the gate (flows/direct.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from e2e_project import _env, make_tiny_project

from loraline.tools import tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# valid params, but no such layer in the base: acme-shop's train stage fails, globex-it's does not
BROKEN_TRAIN = "tenants.acme-shop.train.target_modules=[no_such_proj]"


def test_a_failed_tenant_is_reported_and_the_other_goes_through_the_gate(tmp_path: Path):
    project = make_tiny_project(tmp_path / "project")
    proc = subprocess.run(
        [tool("loraline"), "run", "--no-dvc", "--quiet", "--set", BROKEN_TRAIN],
        cwd=project,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    for stage in ("documents", "synthesize", "prepare"):
        assert any(line.startswith(f"{stage}[acme-shop]: ") for line in lines), stage
    for stage in ("documents", "synthesize", "prepare", "train", "merge", "export", "evaluate"):
        assert any(line.startswith(f"{stage}[globex-it]") for line in lines), stage
    assert any(line.startswith("base: built ") for line in lines)
    assert "gate[globex-it]: PASS" in lines
    assert not any(line.startswith(("train[acme-shop]", "gate[acme-shop]")) for line in lines)
    assert "== loraline summary ==" in lines
    assert "loraline run: train[acme-shop] failed, its later stages skipped:" in proc.stderr
    assert "loraline run: failed: [acme-shop] train.target_modules: 'no_such_proj' match no linear" in proc.stderr
    assert (project / "reports" / "globex-it" / "gate.json").is_file()
    assert not (project / "models" / "adapters" / "acme-shop").exists()
    # no DVC, no registry: nothing recorded or tagged
    git = {"cwd": project, "capture_output": True, "text": True}
    assert subprocess.run(["git", "tag"], **git).stdout == ""
    assert subprocess.run(["git", "status", "--porcelain", "dvc.lock", "pipelines"], **git).stdout == ""
    assert not (project / "reports" / "globex-it" / "release.json").exists()

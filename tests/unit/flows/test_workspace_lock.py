"""One `loraline run` per workspace: a second one names the first (pid, start time) and exits, or waits
with --wait; the lock dies with its holder, so a killed run leaves nothing to clean up."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loraline.flows.orchestrate import WorkspaceBusy, workspace_lock

HOLD = """
import sys, time
from loraline.flows.orchestrate import workspace_lock
with workspace_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.md").write_text("A document.")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tenants": {"acme": {"raw_dir": "raw"}}}))
    return tmp_path


def _holder(root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_second_run_names_the_one_holding_the_workspace_and_exits(project: Path, capsys, monkeypatch):
    from loraline.cli import main
    from loraline.cli.main import EXIT_BUSY

    holder = _holder(project, 60)
    try:
        monkeypatch.chdir(project)
        assert main(["run", "--no-prefect"]) == EXIT_BUSY
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"loraline run: another loraline run (pid {holder.pid}, started at 20")
        assert err[0].endswith("holds this workspace; wait for it to end, or pass --wait to start when it does")
    finally:
        holder.kill()
        holder.wait()


def test_wait_starts_when_the_holder_ends(project: Path):
    holder = _holder(project, 2)
    told = []
    started = time.perf_counter()
    with workspace_lock(project, wait=True, on_wait=told.append):
        waited = time.perf_counter() - started
    holder.wait()
    assert told and f"pid {holder.pid}" in told[0] and told[0].endswith("waiting for it to end")
    assert 0.5 < waited < 30


def test_a_killed_run_leaves_the_workspace_free(project: Path):
    holder = _holder(project, 60)
    with pytest.raises(WorkspaceBusy, match=f"pid {holder.pid}"):
        with workspace_lock(project):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workspace_lock(project):  # no stale lock to delete by hand
        pass

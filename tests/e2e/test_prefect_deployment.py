"""prefect.yaml for real: a local `prefect server start`, a process work pool and worker,
`prefect deploy --all`, then a triggered run of a per-tenant deployment, seen to complete."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from e2e_project import copy_project, wait_for_prefect

from loraline.tools import tool, tool_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    port = _free_port()
    env = tool_env()
    env.update(
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t.invalid",
    )
    server = subprocess.Popen(
        [tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_prefect(server, env["PREFECT_API_URL"])
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def prefect(env: dict, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [tool("prefect"), "--no-prompt", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_deploy_all_and_a_worker_completes_a_triggered_run(tmp_path: Path, env: dict, built):
    # After a finished `dvc repro` (as on a machine that ran the pipeline before): the triggered run
    # finds the stages up to date and releases.
    project = copy_project(built.project, tmp_path / "project")
    env = {**env, "PWD": str(project)}  # prefect.yaml's pull step runs flows in the deploying folder
    prefect(env, "work-pool", "create", "loraline", "--type", "process", cwd=project)
    out = prefect(env, "deploy", "--all", cwd=project)
    for name in ("nightly", "acme-shop", "globex-it"):
        assert f"Deployment 'loraline/{name}' successfully created" in " ".join(out.split()), out

    nightly = json.loads(prefect(env, "deployment", "inspect", "loraline/nightly", "--output", "json", cwd=project))
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(project)

    out = prefect(env, "deployment", "run", "loraline/globex-it", cwd=project)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    worker = subprocess.Popen(
        [tool("prefect"), "worker", "start", "--pool", "loraline", "--type", "process"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    try:
        deadline, state = time.time() + 900, None
        while time.time() < deadline:
            info = json.loads(prefect(env, "flow-run", "inspect", run_id, "--output", "json", cwd=project))
            state = info["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(5)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)  # the worker passes it on as SIGINT and waits for its runs
        try:
            log = worker.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            log = worker.communicate()[0]
    assert state == "COMPLETED", f"flow run ended {state}; worker log:\n{log[-4000:]}"
    assert json.loads((project / "reports" / "globex-it" / "release.json").read_text())["promoted"]
    tags = subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True).stdout.split()
    assert "globex-it-adapter#prod#1" in tags and not any(t.startswith("acme-shop") for t in tags)

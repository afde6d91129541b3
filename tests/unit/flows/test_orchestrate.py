"""loraline.flows.orchestrate against real DVC projects: stage order, skip/run, failures and timeouts."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from loraline.flows.orchestrate import StageFailed, StageTimeout, plan_stages, run_stage
from loraline.tools import tool, tool_env

REPO = Path(__file__).resolve().parents[3]


def test_plan_follows_dvc_graph_of_the_repository():
    plan = plan_stages(REPO, ["globex-it"])
    # the base is built from every tenant's documents, so those run first even for one tenant
    assert plan.shared == ["documents@acme-shop", "documents@globex-it", "base"]
    assert plan.per_tenant == {"globex-it": [f"{s}@globex-it" for s in
                                             ("synthesize", "prepare", "train", "merge", "export", "evaluate", "gate")]}
    both = plan_stages(REPO, ["acme-shop", "globex-it"])
    assert both.all.index("base") < both.all.index("prepare@acme-shop")
    assert not any("globex" in s for s in both.per_tenant["acme-shop"])


def test_plan_rejects_unknown_tenant():
    with pytest.raises(ValueError, match="no stages for tenant.*nobody"):
        plan_stages(REPO, ["nobody"])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([tool("dvc"), "init", "-q"], cwd=tmp_path, env=tool_env(), check=True)
    (tmp_path / "in.txt").write_text("hello\n")
    # `name@t1` addresses come from foreach, as in the real dvc.yaml
    stages = {
        "copy": {"cmd": "python -c \"import shutil; shutil.copy('in.txt', 'out.txt')\"", "deps": ["in.txt"], "outs": ["out.txt"]},
        "fail": {"cmd": "python -c \"import sys; print('line one'); print('bad row 7: field x', file=sys.stderr); sys.exit(3)\"",
                 "deps": ["out.txt"], "outs": ["never.txt"]},
        "slow": {"cmd": "python -c \"import time; print('started', flush=True); time.sleep(60)\"", "outs": ["slow.txt"]},
    }
    stages = {name: {"foreach": ["t1"], "do": body} for name, body in stages.items()}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return tmp_path


def test_run_stage_runs_then_skips(project: Path):
    first = run_stage(project, "copy@t1", echo=None)
    assert first.ran and (project / "out.txt").read_text() == "hello\n"
    again = run_stage(project, "copy@t1", echo=None)
    assert not again.ran
    (project / "in.txt").write_text("changed\n")
    assert run_stage(project, "copy@t1", echo=None).ran
    assert (project / "out.txt").read_text() == "changed\n"


def test_failed_stage_names_itself_and_keeps_its_output_tail(project: Path):
    run_stage(project, "copy@t1", echo=None)
    with pytest.raises(StageFailed) as info:
        run_stage(project, "fail@t1", echo=None)
    message = str(info.value)
    assert "stage fail@t1 failed" in message
    assert "bad row 7: field x" in message and "line one" in message
    assert not (project / "never.txt").exists()


def test_timeout_stops_the_stage_process_tree(project: Path):
    started = time.perf_counter()
    with pytest.raises(StageTimeout, match=r"stage slow@t1 timed out after 3s") as info:
        run_stage(project, "slow@t1", timeout_s=3, echo=None)
    assert time.perf_counter() - started < 30
    assert "started" in str(info.value)
    # nothing of the stage survives: a sleeping child would still hold DVC's lock
    assert run_stage(project, "copy@t1", echo=None).ran

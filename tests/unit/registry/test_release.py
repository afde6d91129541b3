"""release_tenant against a real git + DVC project (tiny stages) and real GTO tags; only the model evaluation is faked."""

from __future__ import annotations

import json
import subprocess

import pytest
from registry_helpers import build, dvc_project, git

from loraline.config import load_params
from loraline.registry.gto_registry import GtoRegistry
from loraline.release import fetch_output, release_path, release_tenant
from loraline.tools import tool, tool_env


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    return dvc_project(root, tmp_path / "remote")


def _release(root, evaluate=None, **kw):
    calls = []

    def fake(root_, params, tenant, production):
        calls.append(production.version)
        return evaluate or {"answer_loss": 1.0}

    result = release_tenant(root, load_params(root / "params.yaml"), "t1", evaluate=fake, **kw)
    return result, calls


def _artifacts_get(root, dest):
    subprocess.run([tool("dvc"), "artifacts", "get", ".", "t1-adapter", "--stage", "prod", "-o", str(dest)],
                   cwd=root, env=tool_env(), check=True, capture_output=True, text=True)
    return (dest / "adapter.bin").read_text()


def test_dvc_artifacts_get_follows_promotion_and_rollback(project, tmp_path):
    build(project, "adapter one\n")
    status_before = git(project, "status", "--porcelain")
    first, calls = _release(project)
    assert (first.version, first.registered_new, first.promoted, first.production_after) == ("v0.0.1", True, True, "v0.0.1")
    assert calls == []  # nothing in production: nothing to compare against
    assert git(project, "status", "--porcelain") == status_before and git(project, "rev-list", "--count", "HEAD") == "1"
    assert _artifacts_get(project, tmp_path / "get1") == "adapter one\n"

    build(project, "adapter two\n")
    second, calls = _release(project)
    assert (second.version, second.promoted, second.production_before, calls) == ("v0.0.2", True, "v0.0.1", ["v0.0.1"])
    assert {r["name"] for r in second.rules} >= {"no_regression_vs_prod"}
    assert _artifacts_get(project, tmp_path / "get2") == "adapter two\n"
    assert GtoRegistry(project).production("t1-onnx").version == "v0.0.2"

    GtoRegistry(project).rollback("t1-adapter")
    assert _artifacts_get(project, tmp_path / "get3") == "adapter one\n"
    v1 = GtoRegistry(project).version("t1-adapter", "v0.0.1")
    assert git(project, "show", f"{v1.lineage['git']['snapshot']}:src.txt") == "adapter one"
    # what the production comparison evaluates: the merged model as of production's commit
    merged = fetch_output(project, "models/merged/t1", v1.commit, tmp_path / "prod-merged")
    assert (merged / "adapter.bin").read_text() == "adapter one\n"


def test_release_twice_registers_and_promotes_nothing_new(project):
    build(project, "adapter one\n")
    _release(project)
    tags = git(project, "tag", "-l")
    again, calls = _release(project)
    assert (again.version, again.registered_new, again.promoted, calls) == ("v0.0.1", False, False, [])
    assert "already is production" in again.reason
    assert git(project, "tag", "-l") == tags
    assert json.loads(release_path(project, "t1").read_text())["reason"] == again.reason


def test_failed_gate_registers_but_leaves_production(project):
    build(project, "adapter one\n")
    _release(project)
    build(project, "adapter bad\n", gate_passed=False)
    result, calls = _release(project)
    assert (result.version, result.registered_new, result.promoted, result.production_after) == ("v0.0.2", True, False, "v0.0.1")
    assert "gate failed" in result.reason and "beats_base" in result.reason and calls == []
    assert GtoRegistry(project).production("t1-adapter").version == "v0.0.1"
    assert git(project, "tag", "-l", "*#prod#*").split() == ["t1-adapter#prod#1", "t1-onnx#prod#1"]


def test_regression_against_current_production_blocks_promotion(project):
    build(project, "adapter one\n")
    _release(project)
    build(project, "adapter two\n")
    result, calls = _release(project, evaluate={"answer_loss": 0.5})  # production is now measured better
    assert calls == ["v0.0.1"] and not result.promoted and result.production_after == "v0.0.1"
    assert "no_regression_vs_prod" in result.reason
    rule = next(r for r in result.rules if r["name"] == "no_regression_vs_prod")
    assert rule["passed"] is False and rule["values"]["answer_loss"] == pytest.approx(1.0)


def test_no_promote_registers_only(project):
    build(project, "adapter one\n")
    result, _ = _release(project, promote=False)
    assert result.registered_new and not result.promoted and GtoRegistry(project).production("t1-adapter") is None

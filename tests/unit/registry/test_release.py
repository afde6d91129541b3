"""release_tenant against a real git + DVC project (tiny stages) and real GTO tags; only the model evaluation is
faked."""

from __future__ import annotations

import json
import subprocess

import pytest
from registry_helpers import build, commit_new_adapter, dvc_project, git, repro

from loraline.config import load_params
from loraline.registry.base import StaleRelease
from loraline.registry.gto_registry import GtoRegistry
from loraline.registry.lineage import tenant_lineage
from loraline.release import ProductionMeasure, fetch_output, release_path, release_tenant
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
        return ProductionMeasure(evaluate or {"answer_loss": 1.0})

    result = release_tenant(root, load_params(root / "params.yaml"), "t1", evaluate=fake, **kw)
    return result, calls


def _artifacts_get(root, dest):
    subprocess.run(
        [tool("dvc"), "artifacts", "get", ".", "t1-adapter", "--stage", "prod", "-o", str(dest)],
        cwd=root,
        env=tool_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    return (dest / "adapter.bin").read_text()


def test_dvc_artifacts_get_follows_promotion_and_rollback(project, tmp_path, monkeypatch):
    from gto import api
    from gto.registry import GitRegistry

    def refuse(*_, **__):
        raise AssertionError("GTO wrote or built its state")

    for target, attr in [(GitRegistry, "get_state"), (api, "register"), (api, "assign")]:
        monkeypatch.setattr(target, attr, refuse)  # loraline writes the tags (gto_writes); DVC reads them
    build(project, "adapter one\n")
    status_before = git(project, "status", "--porcelain")
    first, calls = _release(project)
    assert (first.version, first.registered_new, first.promoted, first.production_after) == (
        "v0.0.1",
        True,
        True,
        "v0.0.1",
    )
    assert calls == []  # nothing in production: nothing to compare against
    assert (
        git(project, "status", "--porcelain") == status_before and git(project, "rev-list", "--count", "HEAD") == "1"
    )
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
    assert (result.version, result.registered_new, result.promoted, result.production_after) == (
        "v0.0.2",
        True,
        False,
        "v0.0.1",
    )
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


def _change_adapter_and_commit_train(root):
    commit_new_adapter(root, "adapter two\n")


def _train_only(root):
    """What a partial `dvc repro train@t1` leaves: a new adapter, everything after it from the old one."""
    (root / "src.txt").write_text("adapter two\n")
    repro(root, "train@t1", single_item=True)


@pytest.mark.parametrize("make_stale", [_change_adapter_and_commit_train, _train_only])
def test_a_stale_pipeline_registers_nothing_until_reproduced(project, make_stale):
    build(project, "adapter one\n")
    first, _ = _release(project)
    assert first.version == "v0.0.1" and GtoRegistry(project).version("t1-onnx", "v0.0.1").lineage["consistency"] == {
        "consistent": True,
        "problems": [],
    }
    tags = git(project, "tag", "-l")
    make_stale(project)

    with pytest.raises(StaleRelease) as err:  # not retried by the flow: only `dvc repro` changes the answer
        _release(project)
    assert err.value.tenant == "t1" and set(err.value.stages) == {"merge@t1", "evaluate@t1"}  # those using the adapter
    message = str(err.value)
    assert (
        "t1: not released, DVC reports stages out of date: merge@t1 (changed deps: models/adapters/t1 modified)"
        in message
    )
    assert "evaluate@t1 (changed deps: models/adapters/t1 modified" in message and "train@t1" not in message
    assert "Run `dvc repro pipelines/t1/dvc.yaml:gate@t1`" in message
    assert git(project, "tag", "-l") == tags  # nothing registered, nothing promoted
    with pytest.raises(StaleRelease, match="merge@t1"):
        _release(project, promote=False)

    repro(project)
    second, _ = _release(project)
    assert (second.version, second.registered_new, second.promoted) == ("v0.0.2", True, True)
    lineage = GtoRegistry(project).version("t1-onnx", "v0.0.2").lineage
    assert lineage["consistency"]["consistent"] and lineage["outputs"]["adapter"] != first_adapter(project, "v0.0.1")
    onnx = fetch_output(
        project, "models/onnx/t1", GtoRegistry(project).version("t1-onnx", "v0.0.2").commit, project.parent / "onnx2"
    )
    assert (onnx / "model.onnx").read_text() == "adapter two\n"  # t1-onnx@v0.0.2 is the new adapter's export


def first_adapter(root, version):
    return GtoRegistry(root).version("t1-adapter", version).lineage["outputs"]["adapter"]


def test_a_version_registered_from_stale_stages_is_not_reused(project):
    """A version an earlier loraline registered while merge..gate were stale: after repro the release makes a new
    one."""
    build(project, "adapter one\n")
    _release(project)
    _change_adapter_and_commit_train(project)
    stale = tenant_lineage(project, load_params(project / "params.yaml"), "t1", snapshot=None)
    assert not stale["consistency"]["consistent"]
    assert any(
        p.startswith("merge@t1 used models/adapters/t1") and "but train@t1 produced" in p
        for p in stale["consistency"]["problems"]
    )
    for name in ("t1-adapter", "t1-onnx"):
        GtoRegistry(project).register(name, "HEAD", stale, version="v0.0.2")

    repro(project)
    result, _ = _release(project)
    assert (result.version, result.registered_new) == ("v0.0.3", True)


def test_with_serve_canary_a_release_replacing_production_starts_a_canary(project):
    import yaml

    from loraline.registry.canary import is_provisional

    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "serve": {"canary": {"fraction": 0.2}}}))
    build(project, "adapter one\n")
    first, _ = _release(project)
    assert first.promoted and "canary" not in first.reason  # nothing to measure it against
    assert not is_provisional(GtoRegistry(project).history("t1-adapter")[-1].message)
    build(project, "adapter two\n")
    second, _ = _release(project)
    assert second.promoted and second.reason == "promoted v0.0.2 (was v0.0.1); on canary (serve.canary)"
    assert all(is_provisional(GtoRegistry(project).history(name)[-1].message) for name in ("t1-adapter", "t1-onnx"))

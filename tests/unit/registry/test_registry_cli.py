from __future__ import annotations

import json

import pytest
from registry_helpers import build, commit_new_adapter, dvc_project, git

from loraline.cli import main
from loraline.config import load_params
from loraline.registry.gto_registry import GtoRegistry
from loraline.registry.lineage import tenant_lineage


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    root.mkdir()
    dvc_project(root, tmp_path / "remote")
    monkeypatch.chdir(root)
    return root


def test_release_list_show_promote_rollback(project, capsys):
    assert main(["registry", "list"]) == 0
    assert "no artifacts registered yet" in capsys.readouterr().out
    build(project, "adapter one\n")
    assert main(["registry", "release"]) == 0
    assert "release[t1]: v0.0.1 registered; promoted, prod none -> v0.0.1" in capsys.readouterr().out
    build(project, "adapter two\n", gate_passed=False)
    assert main(["registry", "release", "--tenant", "t1"]) == 0
    assert "release[t1]: v0.0.2 registered; prod stays v0.0.1; gate failed" in capsys.readouterr().out

    assert main(["registry", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["artifact"], r["latest"], r["prod"]) for r in rows] == [
        ("t1-adapter", "v0.0.2", "v0.0.1"),
        ("t1-onnx", "v0.0.2", "v0.0.1"),
    ]
    assert main(["registry", "show", "t1-adapter"]) == 0
    out = capsys.readouterr().out
    assert "t1-adapter: production v0.0.1" in out and "gate FAIL (beats_base)" in out and "prod#1: v0.0.1" in out

    assert main(["registry", "promote", "t1", "v0.0.2"]) == 1
    assert "failed its gate (beats_base); pass --force" in capsys.readouterr().err
    assert main(["registry", "promote", "t1", "v0.0.2", "--force", "--reason", "hotfix"]) == 0
    assert "t1-onnx: prod v0.0.1 -> v0.0.2 (t1-onnx#prod#2)" in capsys.readouterr().out
    assert "hotfix" in git(project, "tag", "-l", "-n1", "t1-adapter#prod#2") and "--force" in git(
        project, "tag", "-l", "-n1", "t1-adapter#prod#2"
    )

    assert main(["registry", "rollback", "t1"]) == 0
    assert "t1-adapter: prod v0.0.2 -> v0.0.1 (t1-adapter#prod#3" in capsys.readouterr().out
    assert main(["registry", "show", "t1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["t1-onnx"]["production"] == "v0.0.1" and [h["version"] for h in shown["t1-onnx"]["history"]] == [
        "v0.0.1",
        "v0.0.2",
        "v0.0.1",
    ]
    assert main(["registry", "show", "nope"]) == 1
    assert "no artifact or tenant named 'nope'" in capsys.readouterr().err


def _prod_tags(root):
    return git(root, "tag", "-l", "*#prod#*").split()


def test_rollback_onto_a_gate_failed_version_needs_force(project, capsys):
    build(project, "adapter one\n")
    assert main(["registry", "release"]) == 0
    build(project, "adapter two\n", gate_passed=False)
    assert main(["registry", "release"]) == 0
    assert main(["registry", "promote", "t1", "v0.0.2", "--force", "--reason", "hotfix"]) == 0
    assert main(["registry", "rollback", "t1"]) == 0  # back onto v0.0.1, whose gate passed
    assert "Roll back t1-adapter prod from v0.0.2 to v0.0.1" in git(project, "tag", "-l", "-n1", "t1-adapter#prod#3")
    capsys.readouterr()
    tags = _prod_tags(project)

    assert main(["registry", "rollback", "t1"]) == 1  # the next rollback target is the forced v0.0.2
    assert (
        "t1-adapter v0.0.2 failed its gate (beats_base); pass --force to roll back to it anyway"
        in capsys.readouterr().err
    )
    assert _prod_tags(project) == tags and GtoRegistry(project).production("t1-onnx").version == "v0.0.1"

    assert main(["registry", "rollback", "t1", "--force"]) == 0
    assert "t1-onnx: prod v0.0.1 -> v0.0.2" in capsys.readouterr().out
    for name in ("t1-adapter", "t1-onnx"):
        message = git(project, "tag", "-l", "-n1", f"{name}#prod#4")
        assert f"Roll back {name} prod from v0.0.1 to v0.0.2" in message and "(gate FAILED, --force)" in message


def test_a_version_with_an_inconsistent_lineage_needs_force(project, capsys):
    """One registered while merge..gate described the previous adapter (as releases before this check could)."""
    build(project, "adapter one\n")
    assert main(["registry", "release"]) == 0
    commit_new_adapter(project, "adapter two\n")
    assert main(["registry", "release"]) == 1
    assert "not released, DVC reports stages out of date: merge@t1" in capsys.readouterr().err
    stale = tenant_lineage(project, load_params(project / "params.yaml"), "t1")
    for name in ("t1-adapter", "t1-onnx"):
        GtoRegistry(project).register(name, "HEAD", stale, version="v0.0.2")

    assert main(["registry", "promote", "t1", "v0.0.2"]) == 1
    err = capsys.readouterr().err
    assert "t1-adapter v0.0.2 has an inconsistent lineage (merge@t1 used models/adapters/t1" in err
    assert "but train@t1 produced" in err and "pass --force to promote it anyway" in err
    assert _prod_tags(project) == ["t1-adapter#prod#1", "t1-onnx#prod#1"]
    assert main(["registry", "promote", "t1", "v0.0.2", "--force"]) == 0
    assert "(lineage INCONSISTENT, --force)" in git(project, "tag", "-l", "-n1", "t1-adapter#prod#2")
    assert main(["registry", "rollback", "t1"]) == 0
    assert main(["registry", "rollback", "t1"]) == 1
    assert "v0.0.2 has an inconsistent lineage" in capsys.readouterr().err


def test_with_serve_canary_a_manual_promotion_is_a_canary_unless_told_otherwise(project, capsys):
    import yaml

    from loraline.registry.canary import is_provisional

    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "serve": {"canary": {"fraction": 0.2}}}))
    build(project, "adapter one\n")
    assert main(["registry", "release"]) == 0
    build(project, "adapter two\n")
    assert main(["registry", "release", "--no-promote"]) == 0
    capsys.readouterr()
    assert main(["registry", "promote", "t1", "v0.0.2", "--reason", "try it"]) == 0
    assert "t1-adapter: prod v0.0.1 -> v0.0.2 (t1-adapter#prod#2), on canary (serve.canary)" in capsys.readouterr().out
    assert is_provisional(GtoRegistry(project).history("t1-adapter")[-1].message)
    assert main(["registry", "promote", "t1", "v0.0.1", "--no-canary", "--reason", "urgent"]) == 0
    assert "on canary" not in capsys.readouterr().out
    assert not any(is_provisional(GtoRegistry(project).history(n)[-1].message) for n in ("t1-adapter", "t1-onnx"))
    assert main(["registry", "rollback", "t1"]) == 0  # a rollback is never a canary
    assert not is_provisional(GtoRegistry(project).history("t1-adapter")[-1].message)

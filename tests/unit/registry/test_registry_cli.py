from __future__ import annotations

import json

import pytest
from registry_helpers import build, dvc_project, git

from loraline.cli import main


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
    assert [(r["artifact"], r["latest"], r["prod"]) for r in rows] == [("t1-adapter", "v0.0.2", "v0.0.1"), ("t1-onnx", "v0.0.2", "v0.0.1")]
    assert main(["registry", "show", "t1-adapter"]) == 0
    out = capsys.readouterr().out
    assert "t1-adapter: production v0.0.1" in out and "gate FAIL (beats_base)" in out and "prod#1: v0.0.1" in out

    assert main(["registry", "promote", "t1", "v0.0.2"]) == 1
    assert "failed its gate (beats_base); pass --force" in capsys.readouterr().err
    assert main(["registry", "promote", "t1", "v0.0.2", "--force", "--reason", "hotfix"]) == 0
    assert "t1-onnx: prod v0.0.1 -> v0.0.2 (t1-onnx#prod#2)" in capsys.readouterr().out
    assert "hotfix" in git(project, "tag", "-l", "-n1", "t1-adapter#prod#2") and "--force" in git(project, "tag", "-l", "-n1", "t1-adapter#prod#2")

    assert main(["registry", "rollback", "t1"]) == 0
    assert "t1-adapter: prod v0.0.2 -> v0.0.1 (t1-adapter#prod#3" in capsys.readouterr().out
    assert main(["registry", "show", "t1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["t1-onnx"]["production"] == "v0.0.1" and [h["version"] for h in shown["t1-onnx"]["history"]] == ["v0.0.1", "v0.0.2", "v0.0.1"]
    assert main(["registry", "show", "nope"]) == 1
    assert "no artifact or tenant named 'nope'" in capsys.readouterr().err

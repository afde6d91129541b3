"""loraline.dvcfiles: each tenant's dvc.yaml rendered from pipelines/tenant.yaml; the dvc.lock files read as one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from loraline.cli.main import main
from loraline.config import load_params
from loraline.dvcfiles import (
    RENDERED_MARK,
    lock_paths,
    pipeline_problems,
    read_lock,
    render_tenant_pipeline,
    sync_pipelines,
)
from loraline.layout import TENANT_TEMPLATE, tenant_dvc_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pipelines").mkdir()
    shutil.copy(REPO / TENANT_TEMPLATE, tmp_path / TENANT_TEMPLATE)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_the_repository_s_tenant_files_are_rendered_from_its_template():
    assert pipeline_problems(REPO, load_params(REPO / "params.yaml").tenant_names) == []


def test_a_rendered_file_names_its_tenant_everywhere_the_template_has_the_placeholder():
    template = (REPO / TENANT_TEMPLATE).read_text()
    text = render_tenant_pipeline(template, "zeta-9")
    assert text.startswith(f"{RENDERED_MARK} {TENANT_TEMPLATE} for tenant zeta-9")
    assert "<tenant>" not in text and "${key}" not in text
    stages = yaml.safe_load(text)["stages"]
    assert set(stages) == {"documents", "synthesize", "prepare", "train", "merge", "export", "evaluate", "gate"}
    for name, spec in stages.items():
        assert spec["foreach"] == ["zeta-9"] and spec["do"]["wdir"] == "../..", name  # DVC names it name@zeta-9
        assert "tenants.zeta-9" in spec["do"].get("params", ["tenants.zeta-9"]), name
    assert stages["train"]["do"]["outs"] == ["models/adapters/zeta-9"]


def test_sync_writes_each_tenant_once_then_removes_a_dropped_tenants_files(project: Path):
    first = sync_pipelines(project, ["a", "b"])
    assert first.written == [tenant_dvc_file("a"), tenant_dvc_file("b")] and not first.removed
    assert sync_pipelines(project, ["a", "b"]).describe() == "pipelines: every tenant's dvc.yaml is up to date"
    (project / tenant_dvc_file("b", "dvc.lock")).write_text("schema: '2.0'\nstages: {}\n")
    dropped = sync_pipelines(project, ["a"])
    assert dropped.removed == [tenant_dvc_file("b")] and not (project / "pipelines" / "b").exists()
    assert (project / tenant_dvc_file("a")).is_file()


def test_a_template_edit_reaches_every_tenant_and_check_says_so_first(project: Path):
    sync_pipelines(project, ["a", "b"])
    template = project / TENANT_TEMPLATE
    template.write_text(template.read_text().replace("--quiet", "--quiet --progress"))
    problems = pipeline_problems(project, ["a", "b"])
    assert problems == [
        f"{tenant_dvc_file(t)} is missing or differs from {TENANT_TEMPLATE}: run `loraline pipelines`" for t in "ab"
    ]
    assert sync_pipelines(project, ["a", "b"], dry_run=True).written == [tenant_dvc_file("a"), tenant_dvc_file("b")]
    assert pipeline_problems(project, ["a", "b"])  # a dry run wrote nothing
    sync_pipelines(project, ["a", "b"])
    assert "--progress" in (project / tenant_dvc_file("b")).read_text() and not pipeline_problems(project, ["a", "b"])


def test_a_hand_written_dvc_yaml_under_pipelines_is_never_overwritten(project: Path):
    mine = project / tenant_dvc_file("a")
    mine.parent.mkdir(parents=True)
    mine.write_text("stages: {}\n")
    with pytest.raises(ValueError, match=r"pipelines/a/dvc.yaml: not rendered by `loraline pipelines`"):
        sync_pipelines(project, ["a"])
    assert mine.read_text() == "stages: {}\n"
    assert sync_pipelines(project, []).removed == [] and mine.is_file()  # nor removed


def test_the_cli_writes_them_and_check_refuses_a_stale_one(project: Path, capsys):
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    params = ["--params", str(project / "params.yaml")]
    assert main(["pipelines", "--check", *params]) == 1  # nothing written yet
    assert main(["check", *params]) == 2
    assert "the tenants' dvc.yaml files are out of date" in capsys.readouterr().err
    assert main(["pipelines", *params]) == 0
    assert "wrote pipelines/acme-shop/dvc.yaml, pipelines/globex-it/dvc.yaml" in capsys.readouterr().out
    assert main(["pipelines", "--check", *params]) == 0
    assert main(["check", *params]) == 0


def test_read_lock_merges_the_root_s_and_the_tenants_locks(tmp_path: Path):
    def lock(path: str, *names: str) -> None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        stages = {n: {"cmd": n, "outs": [{"path": n, "md5": "0" * 32}]} for n in names}
        (tmp_path / path).write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))

    assert read_lock(tmp_path) == {} and lock_paths(tmp_path) == []
    lock("dvc.lock", "base")
    lock(tenant_dvc_file("a", "dvc.lock"), "train@a", "gate@a")
    lock(tenant_dvc_file("b", "dvc.lock"), "train@b")
    assert set(read_lock(tmp_path)) == {"base", "train@a", "gate@a", "train@b"}
    assert set(read_lock(tmp_path, ["b"])) == {"base", "train@b"}
    assert set(read_lock(tmp_path, ["c"])) == {"base"}  # a tenant that has not run

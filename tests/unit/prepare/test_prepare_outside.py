"""Data from outside the project is read only where params.yaml allows it (tenants.<t>.allow_outside_dirs).

The project is the folder of params.yaml (and dvc.yaml). A raw file that is a symlink out of it used to be
read like any other: its rows landed in the prepared splits, and nothing said so. Real files and symlinks
in tmp; the prepare stage's `run` as the CLI calls it; DVC's own API on the repository's dvc.yaml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest
import yaml
from prepare_helpers import chat, ticket, write_jsonl

from loraline.config import OutsidePathError, TenantParams, load_params
from loraline.dvcfiles import sync_pipelines
from loraline.layout import GENERAL_TEXT, TENANT_TEMPLATE, Layout, dvc_target
from loraline.prepare import stage as prepare_stage
from loraline.prepare.readers import HF_MARKERS

REPO = Path(__file__).resolve().parents[3]
OUTSIDE_QUESTION = "Which warehouse code belongs to the outside archive, entry {i}?"


def make_project(tmp_path: Path, **tenant) -> tuple[Path, Path, Path]:
    """(project, its tenant's raw_dir, a folder outside it): params.yaml with tenant acme, tickets in raw_dir."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    raw = project / "data" / "raw" / "acme"
    write_jsonl(raw / "tickets.jsonl", [chat(*ticket(i)) for i in range(20)])
    outside.mkdir()
    # evaluate.general's default sample, which the base stage would have written (prepare tokenizes it)
    write_jsonl(project / "models" / "base" / GENERAL_TEXT, [{"text": f"General text, line {i}."} for i in range(8)])
    tenants = {"acme": {"raw_dir": "data/raw/acme", **{k: [str(p) for p in v] for k, v in tenant.items()}}}
    (project / "params.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    return project, raw, outside


def outside_rows(path: Path) -> Path:
    return write_jsonl(path, [chat(OUTSIDE_QUESTION.format(i=i), f"Archive code AX-{i:03d}.") for i in range(20)])


def files_written(project: Path, raw: Path) -> list[str]:
    return sorted(
        p.relative_to(project).as_posix()
        for p in project.rglob("*")
        if p.is_file() and not p.is_relative_to(raw) and p.name not in ("params.yaml", GENERAL_TEXT)
    )


def test_a_symlink_out_of_the_project_fails_the_stage_and_writes_nothing(tmp_path, tokenizer, monkeypatch):
    project, raw, outside = make_project(tmp_path)
    target = outside_rows(outside / "archive.jsonl")
    (raw / "archive.jsonl").symlink_to(target)
    monkeypatch.chdir(project)  # as the CLI and DVC run stages: from the project root
    params = load_params("params.yaml")  # raw_dir itself is inside the project

    with pytest.raises(OutsidePathError) as err:
        prepare_stage.run(params, Layout(), "acme", tokenizer=tokenizer)

    message = str(err.value)
    assert "tenants.acme: raw file archive.jsonl" in message
    assert f"resolves to {target.resolve()}, outside the project ({project.resolve()})" in message
    assert "tenants.acme.allow_outside_dirs" in message and f"allow_outside_dirs: [{outside.resolve()}]" in message
    assert files_written(project, raw) == []  # no dataset, rejects, stats, metrics, timing or spill files


def test_an_allowed_outside_folder_is_read(tmp_path, tokenizer, monkeypatch):
    project, raw, outside = make_project(tmp_path, allow_outside_dirs=[tmp_path / "outside"])
    (raw / "archive.jsonl").symlink_to(outside_rows(outside / "archive.jsonl"))
    monkeypatch.chdir(project)

    result = prepare_stage.run(load_params("params.yaml"), Layout(), "acme", tokenizer=tokenizer)

    assert result.stats.by_file["archive.jsonl"]["rows_in"] == 20
    users = [
        m[0]["content"]
        for split in datasets.load_from_disk(str(result.dataset_dir)).values()
        for m in split["messages"]
    ]
    assert (
        sum(u.startswith("Which warehouse code") for u in users) == result.stats.by_file["archive.jsonl"]["kept"] > 0
    )


def test_an_allowed_outside_raw_dir_is_read(tmp_path, tokenizer, monkeypatch):
    project, _, outside = make_project(tmp_path)
    outside_rows(outside / "acme" / "archive.jsonl")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"]["acme"] = {"raw_dir": str(outside / "acme"), "allow_outside_dirs": [str(outside)]}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)

    result = prepare_stage.run(load_params("params.yaml"), Layout(), "acme", tokenizer=tokenizer)

    assert list(result.stats.by_file) == ["archive.jsonl"] and result.stats.kept > 0


def test_symlinks_that_stay_inside_the_project_are_read(tmp_path, gather):
    project, raw, _ = make_project(tmp_path)
    shared = write_jsonl(project / "shared" / "common.jsonl", [chat("Where is the shared FAQ kept?", "In the wiki.")])
    (raw / "common.jsonl").symlink_to(shared)
    tenant = TenantParams(name="acme", raw_dir=raw)
    collected = gather(tenant=tenant, project=project)
    assert collected.stats.by_file["common.jsonl"]["kept"] == 1


def test_without_a_project_raw_dir_bounds_what_is_read(tmp_path, gather):
    """Params built in code name no project: a symlink out of raw_dir is refused, unless allowed."""
    _, raw, outside = make_project(tmp_path)
    (raw / "archive.jsonl").symlink_to(outside_rows(outside / "archive.jsonl"))
    with pytest.raises(OutsidePathError, match=rf"archive\.jsonl .*outside raw_dir \({raw.resolve()}\)"):
        gather(tenant=TenantParams(name="acme", raw_dir=raw))
    allowed = TenantParams(name="acme", raw_dir=raw, allow_outside_dirs=[outside])
    assert gather(tenant=allowed).stats.by_file["archive.jsonl"]["rows_in"] == 20


def fake_saved_dataset(folder: Path) -> Path:
    """A folder that reads as a `save_to_disk` dataset (its marker files); refused before it is opened."""
    folder.mkdir(parents=True)
    for name in (*HF_MARKERS, "data-00000-of-00001.arrow"):
        (folder / name).write_text("{}")
    return folder


def test_a_linked_dataset_folder_outside_is_refused_even_when_allowed(tmp_path, gather):
    """DVC hashes the files under raw_dir but does not look into a linked folder: its changes would go unseen."""
    project, raw, outside = make_project(tmp_path)
    (raw / "chats").symlink_to(fake_saved_dataset(outside / "chats"), target_is_directory=True)
    tenant = TenantParams(name="acme", raw_dir=raw, allow_outside_dirs=[outside])
    with pytest.raises(
        OutsidePathError, match=r"raw folder chats .* is a symlink to .*DVC does not look inside a linked folder"
    ):
        gather(tenant=tenant, project=project)


def test_a_file_linking_out_of_a_dataset_folder_is_refused(tmp_path, gather):
    project, raw, outside = make_project(tmp_path)
    folder = fake_saved_dataset(raw / "chats")
    (folder / "data-00000-of-00001.arrow").unlink()
    (folder / "data-00000-of-00001.arrow").symlink_to(outside_rows(outside / "rows.arrow"))
    with pytest.raises(OutsidePathError, match=r"raw file chats/data-00000-of-00001\.arrow .*outside the project"):
        gather(tenant=TenantParams(name="acme", raw_dir=raw), project=project)


def test_a_raw_dir_made_a_symlink_after_loading_is_refused_at_read_time(tmp_path, gather):
    project, raw, outside = make_project(tmp_path)
    shutil.rmtree(raw)
    raw.symlink_to(outside, target_is_directory=True)
    outside_rows(outside / "archive.jsonl")
    with pytest.raises(OutsidePathError, match=r"tenants\.acme\.raw_dir: .* resolves to .*outside the project"):
        gather(tenant=TenantParams(name="acme", raw_dir=raw), project=project)


@pytest.fixture
def dvc_project(tmp_path, monkeypatch):
    """A DVC project holding the repository's dvc.yaml, params.yaml and tenants' stage template (rendered)."""
    from dvc.repo import Repo

    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", TENANT_TEMPLATE):
        shutil.copy(REPO / name, project / name)
    sync_pipelines(project, load_params(project / "params.yaml").tenant_names)
    Repo.init(str(project), no_scm=True).close()
    monkeypatch.chdir(project)  # DVC renders dvc.yaml's templates from the current project's params.yaml
    return project


def set_tenant(project: Path, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"]["acme-shop"].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def stage_dep_paths(name: str) -> list[str]:
    from dvc.repo import Repo

    with Repo(".") as repo:
        (stage,) = repo.stage.collect(dvc_target(name))
        return [dep.def_path for dep in stage.deps]


def test_dvc_tracks_an_allowed_outside_raw_dir_as_the_stages_dependency(dvc_project, tmp_path):
    lake = tmp_path / "lake"
    (lake / "acme").mkdir(parents=True)
    set_tenant(dvc_project, raw_dir=str(lake / "acme"))
    with pytest.raises(OutsidePathError, match=r"tenants\.acme-shop\.raw_dir: .*outside the project"):
        load_params("params.yaml")

    set_tenant(dvc_project, allow_outside_dirs=[str(lake)])
    assert load_params("params.yaml").tenant_params("acme-shop").raw_dir == lake / "acme"
    for stage in ("documents@acme-shop", "prepare@acme-shop"):
        assert stage_dep_paths(stage)[0] == str(lake / "acme"), stage


def test_dvc_hashes_an_allowed_symlinked_file_by_its_content(dvc_project, tmp_path):
    """A raw file linking to an allowed folder needs no dependency of its own: raw_dir's hash covers it."""
    from dvc.repo import Repo

    lake = tmp_path / "lake"
    target = outside_rows(lake / "archive.jsonl")
    raw = dvc_project / "data" / "raw" / "acme-shop"
    raw.mkdir(parents=True)
    (raw / "archive.jsonl").symlink_to(target)
    set_tenant(dvc_project, allow_outside_dirs=[str(lake)])

    def raw_dir_hash() -> str:
        with Repo(".") as repo:
            (stage,) = repo.stage.collect(dvc_target("prepare@acme-shop"))
            assert stage.deps[0].def_path == "data/raw/acme-shop"
            return stage.deps[0].get_hash().value

    before = raw_dir_hash()
    write_jsonl(target, [chat("A changed outside question?", "A changed answer.")])
    assert raw_dir_hash() != before

from __future__ import annotations

import json

import pytest
import yaml

from loraline import documents
from loraline.config import OutsidePathError, load_params
from loraline.documents import collect_documents
from loraline.layout import DOCUMENTS_MANIFEST as MANIFEST
from loraline.layout import Layout


def test_collects_utf8_documents_and_lists_the_rest(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "policy.md").write_text("# Returns\nThirty days.", encoding="utf-8")
    (raw / "sub" / "faq.txt").write_text("Shipping takes two days.", encoding="utf-8")
    (raw / "orders.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (raw / "broken.txt").write_bytes(b"caf\xe9 latin-1")
    (raw / "empty.md").write_text("  \n")
    (raw / ".hidden.md").write_text("secret notes")
    out = tmp_path / "out"

    result = collect_documents("acme", raw, out)

    assert sorted(result.files) == ["policy.md", "sub/faq.txt"]
    assert result.skipped == {"broken.txt": "invalid UTF-8 at byte 3", "empty.md": "empty document"}
    assert (out / "sub" / "faq.txt").read_text() == "Shipping takes two days."
    assert not (out / "orders.jsonl").exists() and not (out / ".hidden.md").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == result.files and manifest["skipped"] == result.skipped


def test_rerun_is_byte_identical_and_replaces_stale_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.md").write_text("alpha")
    (raw / "b.md").write_text("beta")
    out = tmp_path / "out"
    collect_documents("t", raw, out)
    first = (out / MANIFEST).read_bytes()
    (raw / "b.md").unlink()
    collect_documents("t", raw, out)
    assert not (out / "b.md").exists()
    (raw / "b.md").write_text("beta")
    collect_documents("t", raw, out)
    assert (out / MANIFEST).read_bytes() == first


def test_missing_raw_dir_names_the_param(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tenants\.acme\.raw_dir"):
        collect_documents("acme", tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def project_with_linked_document(tmp_path):
    """(project, raw_dir, outside target): raw_dir holds policy.md and a symlink to a document outside."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    raw = project / "data" / "raw" / "acme"
    raw.mkdir(parents=True)
    outside.mkdir()
    (raw / "policy.md").write_text("Returns within thirty days.")
    target = outside / "secret.md"
    target.write_text("A document from outside the project.")
    (raw / "secret.md").symlink_to(target)
    return project, raw, target


def test_a_document_linking_out_of_the_project_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    project, raw, target = project_with_linked_document(tmp_path)
    (project / "params.yaml").write_text(yaml.safe_dump({"tenants": {"acme": {"raw_dir": "data/raw/acme"}}}))
    monkeypatch.chdir(project)
    layout = Layout()
    with pytest.raises(OutsidePathError) as err:
        documents.run(load_params("params.yaml"), layout, "acme")
    assert (
        f"tenants.acme: raw file secret.md (in data/raw/acme) resolves to {target.resolve()}, outside the project"
        in str(err.value)
    )
    assert "tenants.acme.allow_outside_dirs" in str(err.value)
    assert not (project / "data" / "documents").exists()  # checked before the output folder is made


def test_a_document_in_an_allowed_outside_folder_is_collected(tmp_path, monkeypatch):
    project, raw, target = project_with_linked_document(tmp_path)
    tenant = {"raw_dir": "data/raw/acme", "allow_outside_dirs": [str(target.parent)]}
    (project / "params.yaml").write_text(yaml.safe_dump({"tenants": {"acme": tenant}}))
    monkeypatch.chdir(project)
    result = documents.run(load_params("params.yaml"), Layout(), "acme")
    assert sorted(result.files) == ["policy.md", "secret.md"]
    assert (result.out_dir / "secret.md").read_text() == "A document from outside the project."


def test_without_a_project_raw_dir_bounds_the_documents(tmp_path):
    _, raw, target = project_with_linked_document(tmp_path)
    with pytest.raises(OutsidePathError, match=r"secret\.md .*outside raw_dir"):
        collect_documents("acme", raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(collect_documents("acme", raw, tmp_path / "out", allow_outside_dirs=[target.parent]).files) == [
        "policy.md",
        "secret.md",
    ]

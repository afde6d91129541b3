from __future__ import annotations

import json

import pytest

from loraline.documents import collect_documents
from loraline.layout import DOCUMENTS_MANIFEST as MANIFEST


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

"""Atomic writes when the disk says no: one error naming the output, the previous output intact, no
temporary file left; and run timing, outside the outputs, that warns instead of failing."""

from __future__ import annotations

import errno
import os

import pytest

from loraline import io


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_file_write_names_the_path_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    io.write_json(path, {"old": 1})
    monkeypatch.setattr(io.os, "replace", _no_space)
    with pytest.raises(io.WriteError) as info:
        io.write_json(path, {"new": 2})
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == io.dumps_json({"old": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / "reports").write_text("not a folder")
    with pytest.raises(io.WriteError, match=r"cannot write .*/reports/t/x.json: .*/reports is a file, not a folder$"):
        io.write_json(tmp_path / "reports" / "t" / "x.json", {})


def test_a_failed_folder_write_names_the_output_and_keeps_the_previous_one(tmp_path):
    final = tmp_path / "model"
    with io.atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(io.WriteError) as info, io.atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v2")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "weights"))
    assert str(info.value) == f"cannot write {final}: No space left on device"
    assert (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_read_error_inside_a_folder_write_is_not_called_a_write_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info, io.atomic_dir(tmp_path / "out"):
        (tmp_path / "missing-input.json").read_text()
    assert not isinstance(info.value, io.WriteError)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "model"
    with io.atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
    real_rename = type(final).rename

    def rename(self, target):
        if type(final)(target) == final and self.name.startswith(".model.tmp-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_rename(self, target)

    monkeypatch.setattr(type(final), "rename", rename)
    with pytest.raises(io.WriteError, match="Read-only file system"), io.atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_timing_that_cannot_be_written_is_one_warning(tmp_path, capsys):
    (tmp_path / "timing").write_text("a file where reports/timing/ should be")
    assert io.write_timing(tmp_path / "timing" / "merge@acme.json", {"wall_s": 1.0}) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("loraline: warning: run timing not recorded: cannot write ")
    assert "timing/merge@acme.json" in err[0] and "is a file, not a folder" in err[0]
    assert io.write_timing(tmp_path / "ok" / "merge@acme.json", {"wall_s": 1.0}) == tmp_path / "ok" / "merge@acme.json"

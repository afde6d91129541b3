"""loraline.flows.cache against a real DVC project: a damaged cache file is named (cache path, output,
stage) by `loraline check` and repaired by `loraline run` before DVC would silently rebuild its stage;
the run-start check re-hashes only the files written since they were verified."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from loraline.flows import cache
from loraline.flows.cache import QUARANTINE, SETTLED_NS, VERIFIED, check_cache, repair
from loraline.tools import tool, tool_env

# The stage counts its runs in runs.log (not an output): a rebuild is visible.
MAKE = (
    "python -c \"import pathlib; p = pathlib.Path('model'); p.mkdir(exist_ok=True); "
    "(p / 'weights.bin').write_text('w' * 4096); (p / 'config.json').write_text('{}'); "
    "pathlib.Path('report.json').write_text('{\\\"ok\\\": true}'); "
    "open('runs.log', 'a').write('ran\\n')\""
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([tool("dvc"), "init", "-q"], cwd=tmp_path, env=tool_env(), check=True)
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"train": {"cmd": MAKE, "outs": ["model", "report.json"]}}})
    )
    _dvc(tmp_path, "repro", "-q")
    assert (tmp_path / "runs.log").read_text() == "ran\n"
    return tmp_path


def _dvc(root: Path, *args: str) -> str:
    done = subprocess.run([tool("dvc"), *args], cwd=root, env=tool_env(), check=True, capture_output=True, text=True)
    return done.stdout


def _cache_file(root: Path, output_file: str) -> Path:
    """The cache file holding `output_file`'s bytes (found by content: DVC names it by their md5)."""
    import hashlib

    md5 = hashlib.md5((root / output_file).read_bytes()).hexdigest()
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def _damage(path: Path) -> None:
    """Flip one byte in place, keeping size and mtime: DVC's state database then still trusts it."""
    stat = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_intact_cache_passes_and_every_file_is_read(project: Path):
    check = check_cache(project)
    # report.json, the model folder's .dir manifest and its two files
    assert check.ok and check.files == 4 and check.missing == 0 and check.bytes > 4096
    assert "4 files of dvc.lock's outputs checked" in check.summary() and "intact" in check.summary()


def test_a_damaged_file_of_a_folder_output_is_named_with_its_output_and_stage(project: Path):
    cache_file = _cache_file(project, "model/weights.bin")
    _damage(cache_file)
    check = check_cache(project)
    assert [(c.cache_path, c.output, c.stage) for c in check.corrupt] == [(cache_file, "model/weights.bin", "train")]
    line = check.corrupt[0].describe(project)
    assert line.startswith(
        f"DVC cache file {cache_file.relative_to(project).as_posix()} is corrupted: its bytes hash to "
    )
    assert line.endswith("it holds model/weights.bin of stage train")


def test_run_repairs_from_the_intact_workspace_copy_and_nothing_is_rebuilt(project: Path):
    cache_file = _cache_file(project, "model/weights.bin")
    _damage(cache_file)
    lines = repair(check_cache(project))
    assert lines == [
        f"{cache_file.relative_to(project).as_posix()}: restored from the intact workspace copy model/weights.bin"
    ]
    assert check_cache(project).ok
    assert "up to date" in _dvc(project, "status")
    _dvc(project, "repro", "-q")
    assert (project / "runs.log").read_text() == "ran\n"


def test_a_damaged_file_without_a_good_copy_is_moved_aside_and_its_stage_rebuilt(project: Path):
    cache_file = _cache_file(project, "report.json")
    _damage_small(cache_file)
    (project / "report.json").write_text("edited by hand")  # the workspace copy cannot restore it either
    lines = repair(check_cache(project))
    assert len(lines) == 1 and "moved aside to .dvc/tmp/corrupted-cache/" in lines[0] and "stage train" in lines[0]
    assert not cache_file.exists() and len(list((project / QUARANTINE).iterdir())) == 1
    _dvc(project, "repro", "-q")
    assert (project / "runs.log").read_text() == "ran\nran\n"
    assert check_cache(project).ok


def _settle() -> None:
    """Let the fixture's cache files age past SETTLED_NS: a file changed less than that before it is
    hashed is not remembered (a write in the same timestamp tick would leave its stat as it was)."""
    time.sleep(SETTLED_NS / 1e9 + 0.2)


def test_the_run_start_check_re_hashes_nothing_unchanged_since_verified(project: Path):
    _settle()
    first = check_cache(project, incremental=True)
    assert first.ok and first.files == 4 and first.rehashed == 4 and (project / VERIFIED).is_file()
    again = check_cache(project, incremental=True)
    assert again.ok and again.files == 4 and again.rehashed == 0 and again.bytes == 0
    assert "4 files of dvc.lock's outputs checked, 0 re-hashed (4 unchanged since verified; 0.0 MB" in again.summary()
    full = check_cache(project)  # `loraline check`: every file, whatever VERIFIED says
    assert full.rehashed == 4 and "4 files of dvc.lock's outputs checked, all re-hashed" in full.summary()


@pytest.mark.parametrize("write", ["append", "same size in place, mtime set back"])
def test_the_run_start_check_re_hashes_a_file_written_since_verified(project: Path, write: str):
    _settle()
    assert check_cache(project, incremental=True).rehashed == 4
    cache_file = _cache_file(project, "model/weights.bin")
    before = cache_file.stat()
    if write == "append":
        os.chmod(cache_file, 0o644)
        with open(cache_file, "ab") as fh:
            fh.write(b"junk")
    else:
        _damage(cache_file)
        after = cache_file.stat()  # only ctime tells: size, mtime and inode are as they were
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    check = check_cache(project, incremental=True)
    assert check.rehashed == 1 and [(c.cache_path, c.output) for c in check.corrupt] == [
        (cache_file, "model/weights.bin")
    ]
    assert "1 re-hashed (3 unchanged since verified;" in check.summary() and "1 corrupted" in check.summary()
    repair(check)
    assert check_cache(project, incremental=True).ok  # the restored file (a new one) is hashed, not trusted


def test_loraline_run_starts_with_the_incremental_check_and_says_so(project: Path, capsys):
    from loraline.cli.main import _repair_dvc_cache

    _settle()
    _repair_dvc_cache(project)
    assert "4 files of dvc.lock's outputs checked, 4 re-hashed (0 unchanged since verified;" in capsys.readouterr().out
    _repair_dvc_cache(project)
    assert "4 files of dvc.lock's outputs checked, 0 re-hashed (4 unchanged since verified;" in capsys.readouterr().out


def test_a_file_changed_just_before_it_was_hashed_is_not_remembered(project: Path, monkeypatch):
    monkeypatch.setattr(cache, "SETTLED_NS", 3600 * 10**9)  # every fixture file is "just written"
    assert check_cache(project, incremental=True).rehashed == 4
    assert check_cache(project, incremental=True).rehashed == 4


def test_an_unreadable_record_of_verified_files_means_re_hashing_all(project: Path):
    _settle()
    check_cache(project, incremental=True)
    (project / VERIFIED).write_text("{not json")
    check = check_cache(project, incremental=True)
    assert check.ok and check.rehashed == 4
    assert check_cache(project, incremental=True).rehashed == 0  # and it is written anew


def _damage_small(path: Path) -> None:
    os.chmod(path, 0o644)
    path.write_text(path.read_text().replace("true", "ture"))


def test_loraline_check_names_the_damaged_file_and_says_what_to_do(project: Path, capsys):
    from loraline.cli import main

    (project / "params.yaml").write_text(yaml.safe_dump({"tenants": {"acme": {"raw_dir": "raw"}}}))
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc_yaml["artifacts"] = {
        f"acme-{kind}": {"path": f"models/{folder}/acme", "type": "model"}
        for kind, folder in (("adapter", "adapters"), ("onnx", "onnx"))
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    (project / "raw").mkdir()
    (project / "raw" / "a.md").write_text("A document.")
    (project / "pipelines").mkdir()
    (project / "pipelines" / "tenant.yaml").write_text("stages: {}\n")  # the tenants' stages: none here
    assert main(["pipelines", "--params", str(project / "params.yaml")]) == 0
    _settle()
    check_cache(project, incremental=True)  # a run started: every file is recorded as verified
    assert main(["check", "--params", str(project / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "4 files of dvc.lock's outputs checked, all re-hashed" in out and "intact" in out
    _damage(_cache_file(project, "model/weights.bin"))
    assert main(["check", "--params", str(project / "params.yaml")]) == 1
    captured = capsys.readouterr()
    assert "1 corrupted" in captured.out
    assert "loraline check: error: DVC cache file .dvc/cache/files/md5/" in captured.err
    assert "model/weights.bin of stage train" in captured.err and "dvc pull" in captured.err


def test_a_cache_without_the_outputs_says_there_is_nothing_to_check(project: Path):
    """A fresh clone before its first run or pull: every file dvc.lock needs is absent, none damaged."""
    import shutil

    shutil.rmtree(project / ".dvc" / "cache")
    check = check_cache(project)
    assert check.ok and check.files == 0 and check.missing == 2  # report.json and the model folder's .dir manifest
    assert (
        check.summary()
        == "DVC cache: nothing of dvc.lock's outputs is in this cache yet (2 missing; nothing to check)"
    )

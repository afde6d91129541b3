"""What outputs record as their code: a fingerprint of the stage's own modules, not the git commit."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from loraline.provenance import SOURCE_ROOT, code_fingerprint, import_closure, phase, run_timing


def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(SOURCE_ROOT / "loraline", tmp_path / "loraline", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_fingerprint_covers_the_stage_closure_and_nothing_else(tmp_path):
    root = copy_of_the_package(tmp_path)
    before = code_fingerprint("loraline.merge.stage", root)
    assert before == code_fingerprint("loraline.merge.stage")  # the same sources wherever they live
    assert before["modules"] == len(import_closure("loraline.merge.stage", root))

    # code merge does not run: the fingerprint (and so the merged output's bytes) stays
    loop = root / "loraline" / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n# an unrelated edit\n")
    assert root / "loraline" / "train" / "loop.py" not in import_closure("loraline.merge.stage", root)
    assert code_fingerprint("loraline.merge.stage", root) == before

    # code merge runs, imported lazily or not: a new fingerprint
    parity = root / "loraline" / "modelling" / "parity.py"
    parity.write_text(parity.read_text() + "\n# an edit merge runs\n")
    after = code_fingerprint("loraline.merge.stage", root)
    assert after["sha256"] != before["sha256"] and after["modules"] == before["modules"]


def test_run_timing_holds_the_wall_time_measurements_and_git_commit():
    timing = run_timing(time.perf_counter() - 1.5, tokens_per_s=12.0)
    assert timing["wall_s"] >= 1.5 and timing["tokens_per_s"] == 12.0 and timing["code_revision"]


def test_run_timing_holds_the_phases_of_its_own_run_only():
    with phase("load base"):
        time.sleep(0.01)  # an earlier stage in the same process: not this run's
    started = time.perf_counter()
    with phase("load base"):
        time.sleep(0.02)
    for _ in range(2):  # a repeated name adds up
        with phase("generate"):
            time.sleep(0.01)
    try:
        with phase("write"):
            raise OSError("disk full")
    except OSError:
        pass  # a phase that failed still took its time
    timing = run_timing(started)
    phases = dict(timing["phases"])  # [name, seconds] pairs, in the order they began
    assert [name for name, _ in timing["phases"]] == ["load base", "generate", "write"]
    assert 0.02 <= phases["load base"] < 0.03 + 0.05
    assert phases["generate"] >= 0.02
    assert sum(phases.values()) <= timing["wall_s"] + 0.01
    assert "phases" not in run_timing(time.perf_counter())  # nothing timed since: no empty key


def test_sha256_files_matches_one_at_a_time_in_order(tmp_path):
    from loraline.provenance import sha256_file, sha256_files

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(bytes([i]) * (1 << 20) * (i + 1))
    assert sha256_files(paths, workers=3) == [sha256_file(p) for p in paths]
    assert sha256_files([]) == []

"""The committed sample data: prepare finds exactly the defects its manifest lists, no more, no less."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraline.config import TenantParams

REPO = Path(__file__).resolve().parents[3]
MANIFEST = json.loads((REPO / "tools" / "sample_data_manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST["tenants"]))
def test_prepare_matches_the_sample_data_manifest(name, run):
    expected = MANIFEST["tenants"][name]
    result = run(tenant=TenantParams(name=name, raw_dir=REPO / "data" / "raw" / name))
    stats = result.stats

    rejects = [json.loads(line) for line in result.rejected_path.read_text().splitlines()]
    assert sorted((r["source_file"], r["row"], r["reason"]) for r in rejects) == sorted(
        (e["file"], e["row"], e["reason"]) for e in expected["expected_rejects"]
    )
    duplicates = [json.loads(line) for line in result.duplicates_path.read_text().splitlines()]
    assert sorted((d["source_file"], d["row"], d["duplicate_of_file"], d["duplicate_of_row"]) for d in duplicates) == sorted(
        (e["file"], e["row"], e["duplicate_of"]["file"], e["duplicate_of"]["row"]) for e in expected["expected_duplicates"]
    )
    # The manifest counts documents apart; prepare counts each document as one kept row.
    documents = len(expected["documents"])
    assert stats.documents == documents
    assert (stats.rows_in, stats.kept) == (expected["rows_in"] + documents, expected["valid_rows"] + documents)
    assert (stats.rejected, stats.duplicates) == (expected["rejected"], expected["duplicates"])
    assert sum(stats.splits.values()) == expected["valid_rows"]
    assert stats.splits["test"] >= 100, "the held-out split must be large enough to measure a gain"


def test_generator_reproduces_the_committed_files():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_sample_data.py"), "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

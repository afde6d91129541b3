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


# What the quality steps (near-dedup, decontamination, PII) find in the sample data with the default
# params. None of it is a seeded defect: the generator builds tickets from shared sentences, so some
# train/validation tickets repeat a test ticket's problem and impact sentences with only the greeting,
# sender or signature changed (they are contaminated: the model could learn the test answers), and
# one helpdesk chat repeats another minus its signature (a near-duplicate, Jaccard ~0.86). acme-shop's
# emails vary order numbers, products and wording enough that nothing is flagged. PII: the business
# addresses the tickets quote (careers@globex.com, ...) and the two acme-shop documents' help address
# are masked as <EMAIL>; no phone, card or IP in any kept row (the one IP sits in a rejected too_long log).
QUALITY = {
    "acme-shop": {"near": [], "contaminated": [], "pii": {"card": 0, "email": 2, "ip": 0, "phone": 0}, "pii_rows": 2},
    "globex-it": {
        "near": [("helpdesk_chats.jsonl", 277, "helpdesk_chats.jsonl", 56)],
        "contaminated": [
            ("helpdesk_chats.jsonl", 80, "tickets_2024_export.parquet", 270),
            ("helpdesk_chats.jsonl", 88, "tickets_2024_export.parquet", 270),
            ("helpdesk_chats.jsonl", 242, "helpdesk_chats.jsonl", 160),
            ("helpdesk_chats.jsonl", 270, "helpdesk_chats.jsonl", 58),
            ("helpdesk_chats.jsonl", 332, "helpdesk_chats.jsonl", 310),
            ("tickets_2024_export.parquet", 28, "tickets_2024_export.parquet", 418),
            ("tickets_2024_export.parquet", 32, "tickets_2024_export.parquet", 95),
            ("tickets_2024_export.parquet", 39, "helpdesk_chats.jsonl", 130),
            ("tickets_2024_export.parquet", 144, "tickets_2024_export.parquet", 6),
            ("tickets_2024_export.parquet", 162, "tickets_2024_export.parquet", 73),
            ("tickets_2024_export.parquet", 223, "tickets_2024_export.parquet", 67),
            ("tickets_2024_export.parquet", 284, "tickets_2024_export.parquet", 73),
            ("tickets_2024_export.parquet", 317, "tickets_2024_export.parquet", 342),
            ("tickets_2024_export.parquet", 382, "tickets_2024_export.parquet", 203),
            ("tickets_2024_export.parquet", 392, "helpdesk_chats.jsonl", 254),
        ],
        "pii": {"card": 0, "email": 14, "ip": 0, "phone": 0},
        "pii_rows": 14,
    },
}


@pytest.mark.parametrize("name", sorted(MANIFEST["tenants"]))
def test_prepare_matches_the_sample_data_manifest(name, run):
    expected, quality = MANIFEST["tenants"][name], QUALITY[name]
    result = run(tenant=TenantParams(name=name, raw_dir=REPO / "data" / "raw" / name))
    stats = result.stats

    rejects = [json.loads(line) for line in result.rejected_path.read_text().splitlines()]
    assert sorted((r["source_file"], r["row"], r["reason"]) for r in rejects) == sorted(
        (e["file"], e["row"], e["reason"]) for e in expected["expected_rejects"]
    )
    duplicates = [json.loads(line) for line in result.duplicates_path.read_text().splitlines()]
    pairs = {
        kind: sorted(
            (d["source_file"], d["row"], d["duplicate_of_file"], d["duplicate_of_row"])
            for d in duplicates
            if d["kind"] == kind
        )
        for kind in ("exact", "near")
    }
    assert pairs["exact"] == sorted(
        (e["file"], e["row"], e["duplicate_of"]["file"], e["duplicate_of"]["row"])
        for e in expected["expected_duplicates"]
    )
    assert pairs["near"] == sorted(quality["near"])
    contaminated = [json.loads(line) for line in result.contaminated_path.read_text().splitlines()]
    assert sorted(
        (c["source_file"], c["row"], c["matched_test_file"], c["matched_test_row"]) for c in contaminated
    ) == sorted(quality["contaminated"])
    assert all(c["overlap"] >= 0.5 and c["split"] in ("train", "validation") for c in contaminated)
    # The manifest counts documents apart; prepare counts each document as one kept row.
    documents = len(expected["documents"])
    removed = len(quality["near"]) + len(quality["contaminated"])
    assert stats.documents == documents
    assert (stats.rows_in, stats.kept) == (
        expected["rows_in"] + documents,
        expected["valid_rows"] + documents - removed,
    )
    assert (stats.rejected, stats.duplicates) == (expected["rejected"], expected["duplicates"])
    assert (stats.near_duplicates, stats.contaminated) == (len(quality["near"]), len(quality["contaminated"]))
    assert (stats.pii, stats.pii_rows) == (quality["pii"], quality["pii_rows"])
    assert sum(stats.splits.values()) == expected["valid_rows"] - removed
    assert stats.splits["test"] >= 100, "the held-out split must be large enough to measure a gain"


def test_generator_reproduces_the_committed_files():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_sample_data.py"), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("extra", [[], ["--check"]])
def test_another_data_size_needs_its_own_folder(extra, tmp_path):
    """--acme-q2-rows other than the committed size is refused unless --out names where it goes.
    The tool runs from a copy, so that a regression would write into tmp_path, not the repo's data/raw."""
    tool = tmp_path / "tools" / "make_sample_data.py"
    tool.parent.mkdir()
    tool.write_bytes((REPO / "tools" / "make_sample_data.py").read_bytes())
    proc = subprocess.run(
        [sys.executable, str(tool), "--acme-q2-rows", "400", *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--acme-q2-rows 400 is not the committed data (800): give --out DIR" in proc.stderr
    assert not (tmp_path / "data").exists()

"""The dataset card and the reconciliation across every outcome."""

from __future__ import annotations

import json

import pytest
from prepare_helpers import chat, synthetic, write_jsonl

from loraline.config import PiiParams, PrepareParams
from loraline.provenance import code_fingerprint, hash_tree, sha256_file


def test_card_lists_sources_counts_filters_and_hashes(raw_dir, tmp_path, run):
    write_jsonl(
        raw_dir / "a.jsonl",
        [chat(f"Question number {i} about item {i * 7}", f"Answer {i}") for i in range(20)]
        + [chat("Mail bob@example.com", "ok"), "{broken"],
    )
    (raw_dir / "guide.md").write_text("# Guide\nCall 020 7946 0958.\n")
    synth = write_jsonl(
        tmp_path / "syn" / "rows.jsonl",
        [synthetic(f"Synthetic question {i}", f"Synthetic answer {i}", i, model="teacher-1b") for i in range(12)],
    )
    result = run(synthetic_rows=synth)
    card = result.card_path.read_text()
    s = result.stats
    assert card.startswith("# Dataset card: acme")
    assert (
        "`a.jsonl`" in card and sha256_file(raw_dir / "a.jsonl") in card and sha256_file(raw_dir / "guide.md") in card
    )
    assert "| offline | teacher-1b |" in card and sha256_file(synth) in card
    assert (f"{s.rows_in} = {s.kept} + {s.rejected} + {s.duplicates} + {s.near_duplicates} + {s.contaminated}") in card
    assert (
        f"train {s.splits['train']} + validation {s.splits['validation']} + test {s.splits['test']} + documents 1"
        in card
    )
    assert f"synthetic: 12 in, {s.by_source['synthetic']['kept']} kept (quota {s.synthetic_quota})" in card
    assert "PII (mask): 2 rows; card 0, email 1, ip 0, phone 1" in card
    assert "malformed_json 1" in card and "over_mix_ratio" in card
    for expected in (
        "threshold=0.85",
        "num_perm=128",
        "8-word n-grams",
        "overlap >= 0.5",
        "synthetic_ratio=0.5",
        "seed=1234",
        "types=['email', 'phone', 'card', 'ip']",
    ):
        assert expected in card, expected
    assert s.data_hash in card and s.tokenizer_hash in card and hash_tree(result.dataset_dir) in card
    assert f"code: `{code_fingerprint('loraline.prepare.stage')['sha256']}`" in card  # not the git commit


def test_card_without_synthetic_rows(raw_dir, run):
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world")])
    card = run().card_path.read_text()
    assert "Synthetic rows: none" in card


def test_every_outcome_reconciles_per_file_and_in_total(raw_dir, tmp_path, gather):
    base = "the order arrived late and the driver left it at the wrong door so please send a new one today"
    rows = [
        chat(f"{base} ticket {i} {'alpha beta gamma'.split()[i % 3]} {i * 13}", f"Sorted ticket {i}.")
        for i in range(40)
    ]
    rows += [chat(f"{base} ticket 3 beta 39", "Sorted ticket 3."), chat("Email me at z@example.com", "ok"), "{oops"]
    write_jsonl(raw_dir / "a.jsonl", rows)
    synth = write_jsonl(tmp_path / "rows.jsonl", [synthetic(f"{base} synthetic {i}", "fine", i) for i in range(30)])
    out = gather(params=PrepareParams(pii=PiiParams(mode="drop")), synthetic_rows=synth)
    s = out.stats
    assert s.near_duplicates + s.contaminated > 0 and s.rejected_by_reason["pii"] == 1
    assert s.rows_in == 43 + 30 == s.kept + s.rejected + s.duplicates + s.near_duplicates + s.contaminated
    for key in ("rows_in", "kept", "rejected", "duplicates", "near_duplicates", "contaminated"):
        assert sum(c[key] for c in s.by_file.values()) == getattr(s, key), key
    kept_ids = {r["id"] for split in out.splits.values() for r in split}
    assert all(d["duplicate_of_id"] in kept_ids for d in out.duplicates if d["kind"] == "near")


def test_a_lost_row_fails_before_anything_is_written(raw_dir, monkeypatch, run, tmp_path):
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world"), chat("Hello", "Hello world")])

    def lose_duplicates(out, *_):
        out.duplicates = []

    monkeypatch.setattr("loraline.prepare.stage.follow_removed_originals", lose_duplicates)
    with pytest.raises(RuntimeError, match="do not reconcile"):
        run()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json*"))
    json.dumps({})

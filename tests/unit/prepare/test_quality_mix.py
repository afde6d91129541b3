"""Synthetic rows: train only, provenance kept, mixed by ratio with a seeded draw, every row accounted for."""

from __future__ import annotations

import json
import random

import datasets
import pytest
from prepare_helpers import chat, synthetic, write_jsonl

from loraline.config import PrepareParams, TenantParams, parse_params
from loraline.prepare.quality.mix import quota

WORDS = [
    f"{a}{b}"
    for a in ("ka", "lo", "mi", "nu", "po", "ri", "su", "te", "vo", "wa")
    for b in ("b", "d", "g", "k", "m", "n", "p", "r", "s", "t")
]


def sentence(seed: int, n: int) -> str:
    return " ".join(random.Random(seed).choices(WORDS, k=n))


def real_rows(n: int) -> list[dict]:
    return [chat(sentence(i, 14), sentence(10_000 + i, 6)) for i in range(n)]


def synthetic_rows(n: int, offset: int = 50_000) -> list[dict]:
    return [synthetic(sentence(offset + i, 12), sentence(offset + 90_000 + i, 5), i) for i in range(n)]


@pytest.fixture
def synth_path(tmp_path):
    return tmp_path / "synthetic" / "acme" / "rows.jsonl"


def test_quota():
    assert (
        quota(10, 0.5) == 5
        and quota(11, 0.5) == 5
        and quota(3, 0.1) == 0
        and quota(10, 0.3) == 3
        and quota(7, 2) == 14
    )


def test_synthetic_rows_join_train_only_with_provenance_up_to_the_ratio(raw_dir, synth_path, gather):
    write_jsonl(raw_dir / "a.jsonl", real_rows(60))
    write_jsonl(synth_path, synthetic_rows(100))
    out = gather(synthetic_rows=synth_path)
    real_train = sum(1 for r in out.splits["train"] if r["source"] == "real")
    synth = [r for r in out.splits["train"] if r["source"] == "synthetic"]
    assert len(synth) == quota(real_train, 0.5) == out.stats.synthetic_quota > 0
    assert all(r["source"] == "real" for s in ("validation", "test") for r in out.splits[s])
    provenance = json.loads(synth[0]["provenance"])
    assert (
        provenance["generator"] == "offline" and provenance["id"].startswith("syn-") and provenance["span"] == [0, 10]
    )
    over = [r for r in out.rejects if r.reason.value == "over_mix_ratio"]
    assert len(over) == 100 - len(synth) and all(r.source_file == "synthetic:rows.jsonl" for r in over)
    stats = out.stats
    assert stats.by_source == {"real": {"rows_in": 60, "kept": 60}, "synthetic": {"rows_in": 100, "kept": len(synth)}}
    assert stats.by_file["synthetic:rows.jsonl"]["rows_in"] == 100 and stats.reconciles
    assert [e["path"] for e in stats.sources] == ["(detected)", "synthetic:rows.jsonl"]
    assert sum(e["rows_in"] for e in stats.sources) == stats.rows_in == 160
    assert len(stats.synthetic_hash) == 64


def test_the_draw_is_seeded_and_independent_of_file_order(raw_dir, synth_path, gather):
    write_jsonl(raw_dir / "a.jsonl", real_rows(40))
    rows = synthetic_rows(60)
    write_jsonl(synth_path, rows)

    def chosen(seed):
        out = gather(params=PrepareParams(seed=seed), synthetic_rows=synth_path)
        return sorted(r["id"] for r in out.splits["train"] if r["source"] == "synthetic")

    first = chosen(1)
    assert chosen(1) == first
    write_jsonl(synth_path, list(reversed(rows)))
    assert chosen(1) == first
    assert chosen(2) != first


def test_ratio_zero_and_tenant_override(raw_dir, synth_path, gather, tmp_path):
    write_jsonl(raw_dir / "a.jsonl", real_rows(20))
    write_jsonl(synth_path, synthetic_rows(10))
    out = gather(params=PrepareParams(synthetic_ratio=0), synthetic_rows=synth_path)
    assert out.stats.rejected_by_reason["over_mix_ratio"] == 10 and out.stats.by_source["synthetic"]["kept"] == 0
    params = parse_params({"tenants": {"acme": {"raw_dir": str(raw_dir), "synthetic_ratio": 2.0}}, "seed": 9})
    prepare = params.prepare_for("acme")
    assert (prepare.synthetic_ratio, prepare.seed) == (2.0, 9)
    out = gather(params=prepare, synthetic_rows=synth_path)
    assert out.stats.by_source["synthetic"]["kept"] == 10


def test_absent_file_means_no_synthetic_rows(raw_dir, synth_path, gather):
    write_jsonl(raw_dir / "a.jsonl", real_rows(5))
    out = gather(synthetic_rows=synth_path)  # never written
    assert out.stats.by_source["synthetic"] == {"rows_in": 0, "kept": 0} and out.stats.synthetic_hash == ""


def test_synthetic_rows_pass_the_same_quality_steps(raw_dir, synth_path, gather):
    real = real_rows(40)
    write_jsonl(raw_dir / "a.jsonl", real)
    bad = synthetic("q", "a", 99)
    del bad["provenance"]
    rows = [
        synthetic(real[0]["messages"][0]["content"], real[0]["messages"][1]["content"], 1),  # exact copy of a real row
        synthetic(sentence(7, 30) + " mail me at x@example.com", sentence(8, 5), 2),  # PII, masked
        synthetic(sentence(7, 30) + " mail me at y@example.com", sentence(8, 5), 3),  # same once masked
        bad,
        "{broken",
    ]
    write_jsonl(synth_path, rows)
    out = gather(params=PrepareParams(synthetic_ratio=5), synthetic_rows=synth_path)
    synth = [r for r in out.splits["train"] if r["source"] == "synthetic"]
    assert len(synth) == 1 and "<EMAIL>" in synth[0]["messages"][0]["content"]
    reasons = sorted((r.row, r.reason.value) for r in out.rejects)
    assert reasons == [(4, "missing_field"), (5, "malformed_json")]
    dups = sorted((d["row"], d["kind"]) for d in out.duplicates if d["source_file"].startswith("synthetic:"))
    # Row 1 copies a real row; of rows 2 and 3 (equal once masked) the seeded draw keeps one.
    assert dups[0] == (1, "exact") and dups[1:] in ([(2, "exact")], [(3, "exact")])
    assert out.stats.reconciles and out.stats.by_file["synthetic:rows.jsonl"]["rows_in"] == 5


def test_dataset_has_source_and_provenance_columns(raw_dir, synth_path, run):
    write_jsonl(raw_dir / "a.jsonl", real_rows(30))
    write_jsonl(synth_path, synthetic_rows(5))
    result = run(synthetic_rows=synth_path)
    ds = datasets.load_from_disk(str(result.dataset_dir))
    assert set(ds["train"]["source"]) == {"real", "synthetic"}
    assert set(ds["test"]["source"]) <= {"real"} and set(ds["validation"]["source"]) <= {"real"}
    assert all(p == "null" for p, s in zip(ds["train"]["provenance"], ds["train"]["source"]) if s == "real")


def test_tenant_params_reject_a_negative_ratio():
    with pytest.raises(ValueError):
        TenantParams(name="acme", raw_dir=".", synthetic_ratio=-1)

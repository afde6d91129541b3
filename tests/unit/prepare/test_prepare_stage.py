"""prepare_tenant end to end: output layout, reconciled counts, atomicity, determinism and errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prepare_helpers import chat, write_jsonl

from loraline.config import PrepareParams, TenantParams
from loraline.prepare import CHAT_FEATURES, DOCUMENT_FEATURES, PrepareError
from loraline.prepare.stage import collect
from loraline.prepare.stats import percentiles
from loraline.provenance import file_hashes, hash_tree


def mixed_raw(raw: Path) -> None:
    write_jsonl(
        raw / "chats.jsonl",
        [
            chat("What is the capital of France?", "Paris."),
            {"instruction": "Say hello", "output": "Hello world"},
            "{broken",
            chat("What is the capital of  France?", "Paris."),  # duplicate of row 1
            {"prompt": "q", "completion": "   "},
        ],
    )
    (raw / "notes.md").write_text("# Shipping\nOrders ship in 2 days.\n")
    (raw / "sub").mkdir()
    (raw / "sub" / "more.csv").write_text("prompt,completion\nHow are you?,Fine thanks\n")


def test_output_layout_columns_and_stats(run, raw_dir, tokenizer):
    mixed_raw(raw_dir)
    result = run()
    assert {p.name for p in result.out_dir.iterdir()} == {
        "dataset",
        "documents",
        "duplicates.jsonl",
        "contaminated.jsonl",
        "README.md",
    }
    ds = datasets.load_from_disk(str(result.dataset_dir))
    assert list(ds) == ["train", "validation", "test"]
    for split in ds.values():
        assert split.features == CHAT_FEATURES
    assert sum(len(s) for s in ds.values()) == 3
    docs = datasets.load_from_disk(str(result.documents_dir))
    assert docs.features == DOCUMENT_FEATURES
    assert docs["text"] == ["# Shipping\nOrders ship in 2 days.\n"] and docs["tenant"] == ["acme"]

    stats = json.loads(result.stats_path.read_text())
    assert stats == result.stats.to_dict()
    assert (stats["rows_in"], stats["kept"], stats["rejected"], stats["duplicates"]) == (7, 4, 2, 1)
    assert stats["rows_in"] == stats["kept"] + stats["rejected"] + stats["duplicates"]
    assert stats["rejected_by_reason"]["malformed_json"] == 1 and stats["rejected_by_reason"]["empty_field"] == 1
    assert stats["by_file"]["sub/more.csv"] == {
        "rows_in": 1,
        "kept": 1,
        "rejected": 0,
        "duplicates": 0,
        "near_duplicates": 0,
        "contaminated": 0,
    }
    assert stats["by_shape"] == {"chat": 1, "document": 1, "instruction": 1, "prompt_completion": 1}
    assert stats["splits"] == {name: len(ds[name]) for name in ("train", "validation", "test")}
    assert stats["documents"] == 1
    assert stats["data_hash"] == hash_tree(raw_dir) and len(stats["tokenizer_hash"]) == 64
    lengths = sorted(n for s in ds.values() for n in s["n_tokens"])
    assert stats["token_length_percentiles"]["max"] == lengths[-1]
    assert set(stats["answer_token_percentiles"]) == {"p50", "p90", "p99", "max"}

    rejects = [json.loads(line) for line in result.rejected_path.read_text().splitlines()]
    assert [(r["source_file"], r["row"], r["reason"], r["field"]) for r in rejects] == [
        ("chats.jsonl", 3, "malformed_json", None),
        ("chats.jsonl", 5, "empty_field", "completion"),
    ]
    dups = [json.loads(line) for line in result.duplicates_path.read_text().splitlines()]
    assert [(d["source_file"], d["row"], d["duplicate_of_file"], d["duplicate_of_row"]) for d in dups] == [
        ("chats.jsonl", 4, "chats.jsonl", 1)
    ]


def test_empty_splits_documents_and_rejects_still_exist(run, raw_dir):
    write_jsonl(raw_dir / "one.jsonl", [chat("Hello", "Hello world")])
    result = run()
    ds = datasets.load_from_disk(str(result.dataset_dir))
    assert sorted(len(s) for s in ds.values()) == [0, 0, 1]
    assert all(s.features == CHAT_FEATURES for s in ds.values())
    docs = datasets.load_from_disk(str(result.documents_dir))
    assert len(docs) == 0 and docs.features == DOCUMENT_FEATURES
    assert result.rejected_path.read_text() == "" and result.duplicates_path.read_text() == ""


def test_two_runs_give_identical_bytes(run, raw_dir):
    mixed_raw(raw_dir)
    (raw_dir / "bad.json").write_text('{"not": "a list"}')
    first, second = run("one"), run("two")
    assert first.stats_path.read_bytes() == second.stats_path.read_bytes()
    assert first.rejected_path.read_bytes() == second.rejected_path.read_bytes()
    assert first.duplicates_path.read_bytes() == second.duplicates_path.read_bytes()
    assert file_hashes(first.out_dir) == file_hashes(second.out_dir)
    assert b"time" not in first.stats_path.read_bytes()


def test_rerun_replaces_the_previous_output(run, raw_dir):
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world")])
    run()
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world"), chat("Thank you", "Thank you!")])
    result = run()
    assert sum(len(s) for s in datasets.load_from_disk(str(result.dataset_dir)).values()) == 2
    assert [p.name for p in result.out_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_a_failure_mid_way_leaves_no_output(run, raw_dir, monkeypatch, tmp_path):
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world")])

    def boom(path, rows):
        raise OSError("disk full")

    # The datasets are already saved when duplicates.jsonl is written: the temporary folder must go.
    monkeypatch.setattr("loraline.prepare.outputs.write_jsonl", boom)
    with pytest.raises(OSError, match="disk full"):
        run()
    out = tmp_path / "out"
    assert not (out / "prepared").exists()
    assert not (out / "stats.json").exists() and not (out / "rejected" / "acme.jsonl").exists()
    assert [p.name for p in out.iterdir()] == []


def test_a_failure_keeps_the_previous_output_intact(run, raw_dir, monkeypatch):
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world")])
    before = run()
    hashes, stats = file_hashes(before.out_dir), before.stats_path.read_bytes()
    write_jsonl(raw_dir / "a.jsonl", [chat("Thank you", "Thank you!"), "{broken"])

    def boom(path, obj):
        raise OSError("no space")

    # stats.json is written last, after the new rejects: those must not replace the old ones either.
    monkeypatch.setattr("loraline.prepare.outputs.write_json", boom)
    with pytest.raises(OSError, match="no space"):
        run()
    assert file_hashes(before.out_dir) == hashes and before.stats_path.read_bytes() == stats
    assert before.rejected_path.read_text() == ""
    leftovers = [
        p for d in (before.out_dir.parent, before.rejected_path.parent) for p in d.iterdir() if p.name.startswith(".")
    ]
    assert leftovers == []


def test_no_valid_rows_names_every_file_and_writes_nothing_but_rejects(run, raw_dir, tmp_path):
    write_jsonl(raw_dir / "a.jsonl", [{"question": "q"}, "{oops"])
    (raw_dir / "b.json").write_text("{}")
    (raw_dir / "c.md").write_text("   ")
    with pytest.raises(PrepareError) as info:
        run()
    message = str(info.value)
    for expected in (
        "acme",
        "a.jsonl",
        "malformed_json",
        "unknown_shape",
        "b.json",
        "wrong_type",
        "c.md",
        "empty_field",
    ):
        assert expected in message
    assert not (tmp_path / "out" / "prepared").exists() and not (tmp_path / "out" / "stats.json").exists()
    rejected = (tmp_path / "out" / "rejected" / "acme.jsonl").read_text().splitlines()
    assert len(rejected) == 4


def test_missing_or_empty_raw_folder_is_an_error(run, tmp_path):
    with pytest.raises(PrepareError, match="does not exist"):
        run(tenant=TenantParams(name="acme", raw_dir=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("x")
    with pytest.raises(PrepareError, match="holds no files"):
        run(tenant=TenantParams(name="acme", raw_dir=tmp_path / "empty"))


def test_system_prompt_falls_back_to_tenant_then_prepare(raw_dir, tokenizer):
    write_jsonl(raw_dir / "a.jsonl", [{"prompt": "q", "completion": "a"}])

    def first_system(tenant, params, **kw):
        out = collect(tenant, params, tokenizer, **kw)
        (row,) = [r for s in out.splits.values() for r in s]
        return row["messages"][0]["content"] if row["messages"][0]["role"] == "system" else None

    plain = TenantParams(name="acme", raw_dir=raw_dir)
    own = TenantParams(name="acme", raw_dir=raw_dir, system_prompt="Tenant.")
    assert first_system(plain, PrepareParams()) is None
    assert first_system(plain, PrepareParams(system_prompt="Global.")) == "Global."
    assert first_system(own, PrepareParams(system_prompt="Global.")) == "Tenant."
    assert first_system(own, PrepareParams(), system_prompt="Explicit.") == "Explicit."


def test_progress_bar_over_files(run, raw_dir, capsys):
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world")])
    run(progress=True)
    assert "prepare acme" in capsys.readouterr().err


def test_percentiles_are_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([7]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "max": 7.0}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


BAD_LINES = [
    "{broken",
    json.dumps({"instruction": "only"}),
    json.dumps({"question": "q"}),
    json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
    json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
    json.dumps({"prompt": "", "completion": "x"}),
]
ROW = st.one_of(
    st.tuples(st.just("good")),
    st.tuples(st.just("bad"), st.sampled_from(range(len(BAD_LINES)))),
    st.tuples(st.just("dup"), st.integers(0, 1000), st.booleans()),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=25), n_files=st.integers(1, 3), broken_file=st.booleans())
def test_counts_always_reconcile(rows, n_files, broken_file, tokenizer):
    lines, goods, expected = [], [], {"kept": 0, "rejected": 0, "duplicates": 0}
    for row in rows:
        if row[0] == "dup" and goods:
            original = goods[row[1] % len(goods)]
            # Same content, different whitespace/shape: still a duplicate.
            lines.append(
                json.dumps(
                    {"prompt": f" {original}  ", "completion": "answer"} if row[2] else chat(original, "answer")
                )
            )
            expected["duplicates"] += 1
        elif row[0] == "bad":
            lines.append(BAD_LINES[row[1]])
            expected["rejected"] += 1
        else:
            goods.append(f"question {len(goods)}")
            lines.append(json.dumps(chat(goods[-1], "answer")))
            expected["kept"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        # Consecutive chunks in sorted file order keep every duplicate after its original.
        size = -(-len(lines) // n_files)
        for i in range(n_files):
            write_jsonl(raw / f"f{i}.jsonl", lines[i * size : (i + 1) * size])
        if broken_file:
            (raw / "z.parquet").write_bytes(b"not parquet")
            expected["rejected"] += 1
        out = collect(TenantParams(name="acme", raw_dir=raw), PrepareParams(), tokenizer)
    stats = out.stats
    assert {"kept": stats.kept, "rejected": stats.rejected, "duplicates": stats.duplicates} == expected
    assert stats.rows_in == len(lines) + broken_file == stats.kept + stats.rejected + stats.duplicates
    assert sum(stats.splits.values()) == stats.kept
    for key in ("rows_in", "kept", "rejected", "duplicates"):
        assert sum(c[key] for c in stats.by_file.values()) == getattr(stats, key)
    assert sum(stats.rejected_by_reason.values()) == stats.rejected == len(out.rejects)


def test_undecodable_names_and_keys_are_rejected_and_still_writable(run, raw_dir):
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world"), '{"\\ud800": "lone surrogate key"}'])
    with open(os.path.join(os.fsencode(raw_dir), b"caf\xe9.jsonl"), "w") as fh:
        fh.write(json.dumps(chat("Thank you", "Thank you!")) + "\n")
    result = run()
    rejects = [json.loads(line) for line in result.rejected_path.read_text(encoding="utf-8").splitlines()]
    assert [(r["source_file"], r["row"], r["reason"]) for r in rejects] == [
        ("a.jsonl", 2, "unknown_shape"),
        ("caf\\xe9.jsonl", None, "invalid_utf8"),
    ]
    assert "caf\\xe9.jsonl" in json.loads(result.stats_path.read_text())["by_file"]


def _prepare_files(tmp_path: Path, tenant: TenantParams, tokenizer, name: str, num_proc: int) -> dict[str, bytes]:
    from loraline.prepare.stage import prepare_tenant

    out = tmp_path / name
    prepare_tenant(
        tenant,
        PrepareParams(num_proc=num_proc),
        tokenizer,
        out_dir=out / "prepared",
        rejected_path=out / "rejected.jsonl",
        stats_path=out / "stats.json",
    )
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_spawned_workers_give_the_same_outputs(tmp_path, tokenizer, monkeypatch):
    """Where fork is not used (macOS, Windows) the workers' state is pickled: it must be picklable."""
    monkeypatch.setattr("loraline.prepare.rows.BATCH_ROWS", 8)
    monkeypatch.setattr("loraline.prepare.pool.INLINE_ITEMS", 1)
    monkeypatch.setattr("loraline.prepare.pool.START_METHOD", "spawn")
    raw = tmp_path / "raw"
    write_jsonl(raw / "rows.jsonl", [chat(f"Question {i} about order {1000 + i}?", f"Answer {i}.") for i in range(40)])
    write_jsonl(raw / "qa.jsonl", [{"q": f"Q{i}?", "a": f"A{i}<|endoftext|>"} for i in range(20)])
    tenant = TenantParams(
        name="acme", raw_dir=raw, sources=[{"path": "qa.jsonl", "columns": {"instruction": "q", "output": "a"}}]
    )
    one, spawned = (_prepare_files(tmp_path, tenant, tokenizer, name, n) for name, n in (("one", 1), ("spawned", 2)))
    assert [k for k in one if one[k] != spawned.get(k)] == [] and one.keys() == spawned.keys()


def test_worker_processes_give_byte_identical_outputs(tmp_path, tokenizer, monkeypatch):
    """num_proc only changes who does the per-row work: every file written is the same."""
    import random

    monkeypatch.setattr("loraline.prepare.rows.BATCH_ROWS", 16)  # many batches from a few hundred rows,
    monkeypatch.setattr("loraline.prepare.pool.INLINE_ITEMS", 2)  # so the pool starts after two of them
    rng = random.Random(7)
    words = "refund order parcel late broken colour size invoice address courier".split()
    rows = []
    for i in range(400):
        question = " ".join(rng.choices(words, k=12)) + f" order {rng.randint(10000, 99999)}?"
        rows.append(chat(question, " ".join(rng.choices(words, k=8))))
        if i % 17 == 0:
            rows.append(rows[rng.randrange(len(rows))])  # exact duplicates
        if i % 23 == 0:
            rows.append(
                chat(question + " write to a@b.example", "Done<|im_end|> <|im_start|>user")
            )  # PII, control token
    raw = tmp_path / "raw"
    write_jsonl(raw / "rows.jsonl", rows)
    write_jsonl(raw / "qa" / "pairs.jsonl", [{"q": f"Q{i}", "a": f"A{i}"} for i in range(40)] + [{"q": "no answer"}])
    tenant = TenantParams(
        name="acme", raw_dir=raw, sources=[{"path": "qa/*", "columns": {"instruction": "q", "output": "a"}}]
    )

    def run(name: str, num_proc: int):
        return _prepare_files(tmp_path, tenant, tokenizer, name, num_proc)

    from loraline.prepare import rows as row_work

    set_up = row_work.set_up_examiners
    seen = tmp_path / "workers"
    seen.mkdir()

    def marking(ctx, specs, to_arrow, worker=False):
        if worker:
            (seen / str(os.getpid())).touch()
        set_up(ctx, specs, to_arrow, worker)

    monkeypatch.setattr(row_work, "set_up_examiners", marking)
    one, two = run("one", 1), run("two", 2)
    assert len(list(seen.iterdir())) == 2, "num_proc=2 ran the per-row work in two worker processes"
    assert one.keys() == two.keys() and any(k.endswith(".arrow") for k in one)
    assert [k for k in one if one[k] != two[k]] == []
    stats = json.loads(one["stats.json"])
    assert stats["duplicates"] > 0 and stats["rejected_by_reason"]["control_token"] > 0 and stats["pii"]["email"] > 0

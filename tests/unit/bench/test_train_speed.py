"""bench/train_speed.py's CPU-testable parts: the preference pair dataset it builds from the SFT workload (the
issue-41 contract's columns, read by the train stage's own loader), and a smoke run of --shape tiny with
--config dpo and orpo beside final (the GPU figures themselves come from a device run, see its docstring)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from loraline.config import TrainParams
from loraline.prepare.features import PREFERENCE_COLUMNS
from loraline.train.preference import check_pairs, load_pairs

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "train_speed.py"
LENGTHS = [40, 33, 17, 64, 2]
VOCAB = 512


def _bench():
    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


def _build(bench, root: Path) -> tuple[datasets.DatasetDict, datasets.DatasetDict]:
    sft = datasets.load_from_disk(str(bench.make_dataset(LENGTHS, VOCAB, root)))
    pairs = datasets.load_from_disk(str(bench.make_pair_dataset(LENGTHS, VOCAB, root)))
    return sft, pairs


def test_pairs_hold_the_contract_columns_around_the_sft_examples(bench, tmp_path):
    sft, pairs = _build(bench, tmp_path)
    for split, n_rows in (("train", len(LENGTHS)), ("validation", 1)):
        ds = pairs[split]
        assert ds.column_names == ["input_ids", "labels", *PREFERENCE_COLUMNS]
        assert ds.features["rejected_input_ids"].feature.dtype == "int32"
        assert ds.features["n_rejected_tokens"].dtype == "int32"
        assert ds.num_rows == n_rows
        assert ds["input_ids"] == sft[split]["input_ids"]  # the chosen conversation is SFT's example
        for row in ds:
            ids, n = row["input_ids"], len(row["input_ids"])
            context = min(n - 1, max(1, int(n * bench.PAIR_CONTEXT_SHARE)))
            answer, rejected = ids[context:], row["rejected_input_ids"][context:]
            assert len(row["rejected_input_ids"]) == row["n_rejected_tokens"] == n
            assert row["rejected_input_ids"][:context] == ids[:context]
            assert len(rejected) == len(answer) >= 1
            assert all(a != r and 0 <= r < VOCAB for a, r in zip(answer, rejected))
            assert row["labels"] == [-100] * context + answer
            assert row["rejected_labels"] == [-100] * context + rejected
            assert row["rejected"] == " ".join(map(str, rejected))
    assert [len(x) for x in pairs["train"]["input_ids"]] == LENGTHS


def test_pairs_repeat_exactly(bench, tmp_path):
    _, first = _build(bench, tmp_path / "a")
    _, again = _build(bench, tmp_path / "b")
    for split in ("train", "validation"):
        assert first[split].to_dict() == again[split].to_dict()


def test_the_train_stage_reads_every_row_as_a_pair(bench, tmp_path):
    _, pairs = _build(bench, tmp_path)
    splits = load_pairs(tmp_path / "pairs", "dpo")
    check_pairs(splits, TrainParams(objective="dpo", max_seq_len=256), tmp_path / "pairs")
    assert splits.sft_rows == {"train": 0, "validation": 0}
    assert len(splits.train) == len(LENGTHS) and len(splits.validation) == 1
    for pair, row in zip(splits.train, pairs["train"]):
        answer_tokens = sum(label != -100 for label in row["labels"])
        assert pair.chosen.n_targets == pair.rejected.n_targets == answer_tokens
        assert pair.n_tokens == 2 * len(row["input_ids"])


@pytest.mark.slow
def test_a_tiny_run_measures_dpo_and_orpo_beside_sft(tmp_path):
    env = {**os.environ, "BENCH_TMP": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--examples", "6"]
    cmd += ["--config", "final", "--config", "dpo", "--config", "orpo", "--out", str(tmp_path / "bench.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "bench.jsonl").read_text().splitlines()]
    runs = {r["config"]: r for r in lines if r["recipe"] == "loraline"}
    sft, dpo, orpo = runs["final"], runs["dpo"], runs["orpo"]
    assert (sft["objective"], dpo["objective"], orpo["objective"]) == ("sft", "dpo", "orpo")
    lengths = _bench().workload("tiny", Path("unused"), 6)
    assert sft["useful_tokens"] == sft["tokens_seen"] == sum(lengths)
    for run in (dpo, orpo):  # chosen + rejected, each as long as the example, every one fed to a step
        assert run["useful_tokens"] == run["tokens_seen"] == 2 * sum(lengths)
        assert run["peak_gib"] > 0 and run["useful_tokens_per_s"] > 0 and run["mfu"] is None
    # The first step's policy is the reference (LoRA B = 0): DPO's loss is log 2, so the reference pass ran
    assert math.isclose(dpo["train_losses"][0], math.log(2), abs_tol=1e-3)
    assert dpo["reference_s"] > 0 and "reference_s" not in orpo
    versus = {r["config"]: r for r in lines if r["recipe"] == "preference-vs-sft"}
    assert set(versus) == {"dpo", "orpo"}
    for name, run in (("dpo", dpo), ("orpo", orpo)):
        assert versus[name]["speed_vs_sft"] == round(run["useful_tokens_per_s"] / sft["useful_tokens_per_s"], 3)
        assert versus[name]["memory_vs_sft"] == round(run["peak_gib"] / sft["peak_gib"], 3)
    assert "| tiny | loraline (dpo) | 1 |" in proc.stdout and "dpo against SFT (final), tiny" in proc.stdout

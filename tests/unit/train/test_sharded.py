"""Sharded base weights (train.sharding: fsdp): real torchrun processes, FSDP2 over gloo, on CPU."""

from __future__ import annotations

import csv

import pytest
import torch
from train_helpers import adapter_tensors, tiny_train

from loraline.config import TrainParams
from loraline.train.stage import train_adapter

# As in test_distributed: two ranks add partial sums in another order than one process does.
LOSS_TOL = 1e-5


def _losses(path) -> list[float]:
    with open(path, newline="") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh)]


@pytest.fixture
def cpu_ranks(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_two_processes_sharding_the_base_train_what_one_process_does(setup, tmp_path, cpu_ranks, quantization):
    common = dict(lora_dropout=0.0, quantization=quantization)
    one = train_adapter(tiny_train(batch_size=4, **common), out_dir=tmp_path / "one", **setup.kwargs())
    two = train_adapter(tiny_train(batch_size=2, devices=2, sharding="fsdp", **common), out_dir=tmp_path / "two", **setup.kwargs())

    assert two.record["params"]["sharding"] == "fsdp" and two.record["devices"] == 2
    facts = two.record["sharding"]
    assert facts["sharded_layers"] == 2  # the tiny base's two decoder layers
    # each rank holds half of every layer's frozen weights (up to FSDP's padding of a shard)
    assert facts["layer_bytes"] > 0 and abs(facts["layer_bytes_held"] - facts["layer_bytes"] / 2) <= 64 * 2, facts
    assert two.record["tokens_seen"] == one.record["tokens_seen"]
    a, b = _losses(one.train_curve), _losses(two.train_curve)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL, (a, b)
    assert abs(one.record["loss"]["base_val"] - two.record["loss"]["base_val"]) < 1e-5
    ta, tb = adapter_tensors(one.out_dir), adapter_tensors(two.out_dir)
    assert ta.keys() == tb.keys()
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5
    assert (a[0] - a[-1]) > 0.1

"""train.cpu_bf16: the CUDA precision recipe (bf16 autocast, bf16 non-quantized weights) on CPU."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_train

from loraline.modelling.device import autocast, compute_dtype
from loraline.provenance import sha256_file
from loraline.train import train_adapter

CPU = torch.device("cpu")


def test_precision_switch():
    assert compute_dtype(CPU) is torch.float32 and compute_dtype(CPU, cpu_bf16=True) is torch.bfloat16
    x = torch.randn(4, 4)
    with autocast(CPU):
        assert (x @ x).dtype is torch.float32
    with autocast(CPU, cpu_bf16=True):
        assert (x @ x).dtype is torch.bfloat16


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_bf16_on_cpu_learns_like_fp32_and_repeats_exactly(setup, tmp_path, quantization):
    common = dict(quantization=quantization, max_steps=12, learning_rate=2e-2, eval_every=6, lora_dropout=0.0)
    bf16 = train_adapter(tiny_train(cpu_bf16=True, **common), out_dir=tmp_path / "bf16", **setup.kwargs())
    fp32 = train_adapter(tiny_train(**common), out_dir=tmp_path / "fp32", **setup.kwargs())
    again = train_adapter(tiny_train(cpu_bf16=True, **common), out_dir=tmp_path / "again", **setup.kwargs())
    assert bf16.record["compute_dtype"] == "bfloat16" and fp32.record["compute_dtype"] == "float32"
    b, f = bf16.record["loss"], fp32.record["loss"]
    assert b["final_val"] < 0.9 * b["base_val"]  # it learns
    # bf16 rounding, not another model: the base's loss and the trained one agree with fp32's closely
    assert b["base_val"] == pytest.approx(f["base_val"], rel=0.02)
    assert b["final_val"] == pytest.approx(f["final_val"], rel=0.1)
    assert sha256_file(again.adapter_weights) == sha256_file(bf16.adapter_weights)  # deterministic on CPU

"""The same code on an NVIDIA GPU with bitsandbytes' CUDA kernels (skipped without CUDA)."""

from __future__ import annotations

import csv

import pytest
import torch
from train_helpers import tiny_train

from loraline.train import train_adapter


@pytest.mark.cuda
def test_nf4_with_paged_8bit_adamw_trains_on_cuda_and_stock_peft_loads_it(setup, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = train_adapter(
        tiny_train(
            quantization="nf4",
            optimizer="paged_adamw_8bit",
            max_steps=30,
            learning_rate=2e-2,
            eval_every=10,
            gradient_checkpointing=True,
        ),
        out_dir=tmp_path / "o",
        checkpoint_dir=tmp_path / "ck",
        **setup.kwargs(),
    )
    rec = res.record
    assert rec.device.startswith("cuda") and rec.compute_dtype == "bfloat16"
    assert rec.optimizer == bnb.optim.PagedAdamW8bit.__name__
    assert res.timing["peak_memory"]["kind"] == "cuda_max_memory_allocated" and res.timing["peak_memory"]["bytes"] > 0
    assert rec.loss.final_val < 0.9 * rec.loss.base_val, rec.loss
    rows = list(csv.DictReader(res.train_curve.open()))
    assert float(rows[-1]["train_loss"]) < float(rows[1]["train_loss"])

    base = AutoModelForCausalLM.from_pretrained(setup.base_dir, dtype=torch.float32, device_map={"": "cuda"})
    model = PeftModel.from_pretrained(base, res.out_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 17, 42, 99]], device="cuda")).logits
    assert torch.isfinite(logits).all()


@pytest.mark.cuda
def test_resume_on_cuda_continues_from_the_checkpoint(setup, tmp_path):
    """On CUDA resume is exact only up to kernel nondeterminism; it must resume and end close."""
    from train_helpers import adapter_tensors

    params = tiny_train(quantization="nf4", optimizer="paged_adamw_32bit")
    full = train_adapter(params, out_dir=tmp_path / "full", checkpoint_dir=tmp_path / "ck", **setup.kwargs())
    again = train_adapter(params, out_dir=tmp_path / "again", checkpoint_dir=tmp_path / "ck", **setup.kwargs())
    assert again.timing["resumed_from_step"] == 9
    a, b = adapter_tensors(full.out_dir), adapter_tensors(again.out_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2


@pytest.mark.cuda
def test_auto_batch_fills_the_gpu_and_trains_like_the_batch_given(setup, tmp_path):
    """train.batch_size auto on the GPU: more rows than the CPU's 2, within the GPU's memory; the probe steps
    leave no trace, so the run trains as one given the resolved number (up to CUDA kernel nondeterminism)."""
    from train_helpers import train_losses

    params = tiny_train(
        batch_size="auto", quantization="nf4", optimizer="paged_adamw_32bit", max_steps=4, grad_accum=1
    )
    auto = train_adapter(params, out_dir=tmp_path / "auto", **setup.kwargs())
    batch = auto.record.batch
    total = torch.cuda.get_device_properties(0).total_memory
    assert batch.how == "probe" and batch.rows > 2, batch
    assert 0 < batch.peak_bytes <= batch.budget_bytes < total, batch
    assert auto.timing["peak_memory"]["bytes"] < total and auto.timing["batch"]["rows"] == batch.rows
    assert auto.record.params["batch_size"] == "auto" and batch.note.startswith(f"auto: {batch.rows} rows, peak ")
    given = train_adapter(
        params.model_copy(update={"batch_size": batch.rows}), out_dir=tmp_path / "given", **setup.kwargs()
    )
    assert given.record.steps == auto.record.steps
    a, b = train_losses(auto.train_curve), train_losses(given.train_curve)
    assert len(a) == len(b) and max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-2, (a, b)

"""Data-parallel training (train.devices): real torchrun processes on the gloo backend, on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import adapter_tensors, tiny_train, train_losses

from loraline.train.distributed import World, shard
from loraline.train.errors import TrainError
from loraline.train.stage import train_adapter

# Two gloo ranks add their partial sums in another order than one process does: float32 rounding,
# compounded over 12 Adam steps. Measured on 2 CPU cores: the same losses as train_loss.csv writes
# them, adapter weights within 2e-7. The bounds leave room for other CPUs' kernels.
LOSS_TOL = 1e-5


def test_shards_cover_a_micro_batch_once_in_order():
    rows = list(range(7))
    parts = [shard(rows, World(3, r, r)) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert [shard(rows[:1], World(2, r, r)) for r in range(2)] == [[0], []]  # a rank may get nothing
    assert shard(rows, World()) == rows


def test_two_processes_train_what_one_does_with_the_same_global_batch(setup, tmp_path, cpu_ranks):
    one = train_adapter(tiny_train(lora_dropout=0.0, batch_size=4), out_dir=tmp_path / "one", **setup.kwargs())
    two = train_adapter(
        tiny_train(lora_dropout=0.0, batch_size=2, devices=2), out_dir=tmp_path / "two", **setup.kwargs()
    )

    assert two.record.devices == 2 and one.record.devices == 1
    assert two.timing["peak_memory"]["ranks"] == 2
    # the same examples in the same steps: the same token counts, whatever the split
    assert two.record.tokens_seen == one.record.tokens_seen
    assert two.record.steps == one.record.steps
    a, b = train_losses(one.train_curve), train_losses(two.train_curve)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL, (a, b)
    assert abs(one.record.loss.final_val - two.record.loss.final_val) < LOSS_TOL
    assert abs(one.record.loss.base_val - two.record.loss.base_val) < 1e-5  # sharded evaluation
    ta, tb = adapter_tensors(one.out_dir), adapter_tensors(two.out_dir)
    assert ta.keys() == tb.keys()
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5
    assert (a[0] - a[-1]) > 0.1  # it learnt: the comparison is not between two untrained adapters


def test_a_checkpoint_written_by_two_processes_resumes_on_two_to_the_same_adapter(setup, tmp_path, cpu_ranks):
    params = tiny_train(batch_size=2, devices=2)  # dropout on: every rank's RNG stream must resume
    ck = tmp_path / "ck"
    first = train_adapter(params, out_dir=tmp_path / "first", checkpoint_dir=ck, **setup.kwargs())
    state = json.loads((ck / "step-00000009" / "state.json").read_text())
    assert len(state["rng"]) == 2  # one RNG state per rank

    again = train_adapter(params, out_dir=tmp_path / "again", checkpoint_dir=ck, **setup.kwargs())
    assert again.timing["resumed_from_step"] == 9
    ta, tb = adapter_tensors(first.out_dir), adapter_tensors(again.out_dir)
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) == 0.0  # exact on CPU
    assert again.train_curve.read_text() == first.train_curve.read_text()


def test_launched_processes_must_match_train_devices(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(TrainError, match="train.devices is 2 but 3 processes were launched"):
        train_adapter(tiny_train(devices=2), out_dir=tmp_path / "out", **setup.kwargs())


def test_a_failing_rank_fails_the_launch_with_its_output(setup, tmp_path, cpu_ranks):
    bad = setup.kwargs() | {"dataset_dir": tmp_path / "missing"}
    with pytest.raises(
        TrainError, match=r"data-parallel training on 2 processes failed \(exit 1\): TrainError: .*missing"
    ):
        train_adapter(tiny_train(devices=2), out_dir=tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.cuda
@two_gpus
def test_qlora_on_two_gpus_over_nccl_trains_what_one_gpu_does(setup, tmp_path):
    """NF4 + paged AdamW on 2 GPUs (NCCL) against 1 GPU with the same global batch. bf16 autocast
    and 4-bit kernels are not bit-exact across different row splits: the bound is bf16's."""
    common = dict(
        quantization="nf4", optimizer="paged_adamw_32bit", lora_dropout=0.0, max_steps=20, learning_rate=1e-2
    )
    one = train_adapter(tiny_train(batch_size=4, **common), out_dir=tmp_path / "one", **setup.kwargs())
    two = train_adapter(
        tiny_train(batch_size=2, devices=2, **common),
        out_dir=tmp_path / "two",
        checkpoint_dir=tmp_path / "ck",
        **setup.kwargs(),
    )
    assert two.record.devices == 2 and two.record.device.startswith("cuda")
    assert two.record.tokens_seen == one.record.tokens_seen
    a, b = train_losses(one.train_curve), train_losses(two.train_curve)
    assert max(abs(x - y) / max(abs(x), 1e-3) for x, y in zip(a, b)) < 0.05, (a, b)
    assert b[-1] < 0.8 * b[0]  # it learnt
    again = train_adapter(
        tiny_train(batch_size=2, devices=2, **common),
        out_dir=tmp_path / "again",
        checkpoint_dir=tmp_path / "ck",
        **setup.kwargs(),
    )
    assert again.timing["resumed_from_step"] is not None  # a checkpoint written by 2 GPUs resumes on 2
    assert (
        train_losses(again.train_curve)[: again.timing["resumed_from_step"]] == b[: again.timing["resumed_from_step"]]
    )

"""train.batch_size auto: 2 on the CPU (the same adapter as an explicit 2), the fit on CUDA measured with the
loaded model (the fitting logic against a fake measurer here, the real probe in test_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import adapter_tensors, tiny_train

from loraline.records import Batch
from loraline.train import autobatch, train_adapter
from loraline.train.errors import TrainError

GIB = 2**30


class FakeGPU:
    """peak(rows) = fixed + rows x per_row; an OutOfMemoryError above `oom_from` rows (when set)."""

    def __init__(self, fixed: int, per_row: int, oom_from: int | None = None):
        self.fixed, self.per_row, self.oom_from, self.calls = fixed, per_row, oom_from, []

    def __call__(self, rows: int) -> int:
        self.calls.append(rows)
        if self.oom_from is not None and rows >= self.oom_from:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return self.fixed + rows * self.per_row


def test_fit_takes_the_most_rows_under_the_budget_from_two_probes_and_one_check():
    gpu = FakeGPU(fixed=10 * GIB, per_row=4 * GIB)
    rows, peak = autobatch.fit_rows(gpu, budget=60 * GIB, fixed_extra=1 * GIB, cap=32)
    assert rows == 12 and peak == 58 * GIB  # (60 - 1 - 10) // 4
    assert gpu.calls == [1, 2, 12]


def test_fit_is_capped():
    gpu = FakeGPU(fixed=1 * GIB, per_row=GIB // 10)
    assert autobatch.fit_rows(gpu, budget=60 * GIB, fixed_extra=0, cap=16)[0] == 16
    assert autobatch.fit_rows(FakeGPU(GIB, GIB), budget=60 * GIB, fixed_extra=0, cap=1) == (1, 2 * GIB)


def test_an_oom_on_the_check_halves_the_batch():
    gpu = FakeGPU(fixed=10 * GIB, per_row=4 * GIB, oom_from=9)
    rows, peak = autobatch.fit_rows(gpu, budget=60 * GIB, fixed_extra=0, cap=32)
    assert rows == 6 and peak == 34 * GIB
    assert gpu.calls == [1, 2, 12, 6]


def test_a_peak_over_the_budget_on_the_check_halves_the_batch():
    """Memory that grows faster than linearly: the extrapolated 12 rows measure over the budget."""
    calls = []

    def measure(rows: int) -> int:
        calls.append(rows)
        return 10 * GIB + rows * 4 * GIB + (8 * GIB if rows > 8 else 0)

    assert autobatch.fit_rows(measure, budget=60 * GIB, fixed_extra=0, cap=32) == (6, 34 * GIB)
    assert calls == [1, 2, 12, 6]


def test_an_oom_at_two_rows_keeps_one():
    assert autobatch.fit_rows(FakeGPU(10 * GIB, 4 * GIB, oom_from=2), budget=60 * GIB, fixed_extra=0, cap=32) == (
        1,
        14 * GIB,
    )


@pytest.mark.parametrize("oom_from", [1, None])
def test_one_row_that_does_not_fit_says_to_checkpoint(oom_from):
    gpu = FakeGPU(fixed=50 * GIB, per_row=20 * GIB, oom_from=oom_from)
    with pytest.raises(
        TrainError, match="train.batch_size: auto: one packed row .*train.gradient_checkpointing: true"
    ):
        autobatch.fit_rows(gpu, budget=60 * GIB, fixed_extra=0, cap=32)


def test_auto_is_refused_on_several_gpus_naming_the_keys():
    cuda = torch.device("cuda")
    with pytest.raises(TrainError, match=r"train.batch_size: auto .* train.devices 2 .* per-device batch as a number"):
        autobatch.check_auto_allowed("auto", 2, "none", cuda)
    with pytest.raises(TrainError, match="train.sharding fsdp"):
        autobatch.check_auto_allowed("auto", 2, "fsdp", cuda)
    autobatch.check_auto_allowed("auto", 2, "none", torch.device("cpu"))  # the CPU default: 2 per process
    autobatch.check_auto_allowed(8, 2, "fsdp", cuda)


def test_a_resumed_auto_run_takes_its_recorded_batch_without_probing():
    def probe():
        raise AssertionError("a resumed run must not probe")

    recorded = autobatch.BatchChoice(12, "auto", "probe", "auto: 12 rows, peak 61.2 GiB of 79.1", 61, 70).to_dict()
    got = autobatch.resolve("auto", torch.device("cuda"), resumed=recorded, probe=probe)
    assert (got.rows, got.how) == (12, "checkpoint") and got.note.startswith("auto: 12 rows")
    assert autobatch.resolve(5, torch.device("cuda"), resumed=recorded, probe=probe).rows == 5


def test_auto_on_the_cpu_trains_exactly_like_an_explicit_two(setup, tmp_path):
    auto = train_adapter(tiny_train(batch_size="auto", max_steps=4), out_dir=tmp_path / "auto", **setup.kwargs())
    two = train_adapter(tiny_train(batch_size=2, max_steps=4), out_dir=tmp_path / "two", **setup.kwargs())
    a, b = adapter_tensors(auto.out_dir), adapter_tensors(two.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert auto.record.loss == two.record.loss
    assert auto.record.params["batch_size"] == "auto" and two.record.params["batch_size"] == 2
    assert auto.record.batch == Batch(
        rows=2, requested="auto", how="cpu", note="auto: 2 rows (the CPU default)", peak_bytes=None, budget_bytes=None
    )
    assert auto.timing["batch"]["rows"] == 2 and two.record.batch.how == "given"


def test_a_resumed_auto_run_reuses_the_checkpoints_batch_and_ends_identical(setup, tmp_path):
    params = tiny_train(batch_size="auto", max_steps=6, save_every=2, eval_every=3)
    full = train_adapter(params, out_dir=tmp_path / "full", checkpoint_dir=tmp_path / "ck", **setup.kwargs())
    again = train_adapter(params, out_dir=tmp_path / "again", checkpoint_dir=tmp_path / "ck", **setup.kwargs())
    assert again.timing["resumed_from_step"] == 4
    assert again.record.batch.how == "checkpoint" and again.record.batch.rows == 2
    a, b = adapter_tensors(full.out_dir), adapter_tensors(again.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)

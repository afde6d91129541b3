"""train.batch_size: auto -- the micro-batch (packed rows per device) that fills the device.

On the CPU auto is CPU_ROWS (2: what the 2-core default run was tuned for), so CPU runs train exactly
as with an explicit 2. On CUDA the batch is measured, not modelled: with the model loaded and LoRA
attached, one forward+backward of 1 and of 2 of the dataset's fullest packed rows gives the peak
memory per row (torch.cuda.max_memory_allocated, with checkpointing as train.gradient_checkpointing /
checkpoint_fraction set it: auto never changes those); the largest batch whose extrapolated peak, plus
the optimizer state still to come, stays within MEMORY_SHARE of the memory this process can have is
then verified by one real forward+backward, halving on torch.cuda.OutOfMemoryError or on a peak above
the budget. Capped by MAX_ROWS and by the dataset's packed rows.

The probes leave no trace on training: gradients are dropped, the optimizer never steps and every
RNG (python, numpy, torch CPU and CUDA: dropout) is restored, so a run with auto trains exactly like
one given the resolved number. auto changes the micro-batch only: grad_accum still multiplies it, so
the tokens per optimizer step scale with the device (and with them the number of steps of an epoch).
A resumed run takes the batch its checkpoint recorded and does not probe again.

Single device only on CUDA: with train.devices > 1 or sharding fsdp the per-device batch must be given
as a number (each rank would have to probe in lockstep and agree); on the CPU auto is 2 there too.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from loraline.train import checkpoint
from loraline.train.errors import TrainError

AUTO = "auto"
CPU_ROWS = 2  # the CPU default (2 cores): unchanged results for CPU runs
MAX_ROWS = 16  # beyond this the GPU is busy anyway; more rows only mean fewer, larger steps
MEMORY_SHARE = 0.85  # of the memory this process can have: room for the allocator's fragmentation
GIB = 2**30


@dataclass(frozen=True)
class BatchChoice:
    """The micro-batch a run trains with and how it came about (recorded in train_record.json and the timing)."""

    rows: int
    requested: int | str  # train.batch_size as given
    how: str  # "given", "cpu", "probe" or "checkpoint"
    note: str  # e.g. "auto: 12 rows, peak 61.2 GiB of 79.1"
    peak_bytes: int | None = None  # the verified probe's peak (probe only)
    budget_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Measure = Callable[[int], int]  # rows -> peak bytes of one forward+backward; raises torch.cuda.OutOfMemoryError


def check_auto_allowed(batch_size: int | str, devices: int, sharding: str, device: torch.device) -> None:
    """auto probes one GPU: refuse it, naming the key, where several devices would each have to agree."""
    if batch_size == AUTO and device.type == "cuda" and (devices > 1 or sharding != "none"):
        raise TrainError(
            f"train.batch_size: auto sizes the micro-batch on one GPU; with train.devices {devices} and "
            f"train.sharding {sharding} give the per-device batch as a number (e.g. train.batch_size: 8)"
        )


def resolve(
    batch_size: int | str,
    device: torch.device,
    *,
    resumed: dict[str, Any] | None,
    probe: Callable[[], BatchChoice],
) -> BatchChoice:
    """The batch for this run: a number as given; auto from a resumed checkpoint's record, CPU_ROWS on the
    CPU, else `probe()` (fit_rows on the loaded model)."""
    if batch_size != AUTO:
        return BatchChoice(int(batch_size), batch_size, "given", f"given: {batch_size} rows")
    if resumed is not None:
        return BatchChoice(
            resumed["rows"],
            AUTO,
            "checkpoint",
            f"{resumed['note']} (from the checkpoint resumed)",
            resumed.get("peak_bytes"),
            resumed.get("budget_bytes"),
        )
    if device.type != "cuda":
        return BatchChoice(CPU_ROWS, AUTO, "cpu", f"auto: {CPU_ROWS} rows (the CPU default)")
    return probe()


def fit_rows(measure: Measure, *, budget: int, fixed_extra: int, cap: int) -> tuple[int, int]:
    """(rows, verified peak bytes): the largest batch up to `cap` whose peak plus `fixed_extra` (memory still
    to come, e.g. the optimizer state) fits `budget`, extrapolated linearly from batches of 1 and 2 and
    verified by one more measurement, halving on OOM or on a peak over the budget."""
    try:
        one = measure(1)
    except torch.cuda.OutOfMemoryError:
        raise TrainError(
            "train.batch_size: auto: one packed row does not fit the GPU; set train.gradient_checkpointing: true "
            "(or a smaller train.max_seq_len)"
        ) from None
    if one + fixed_extra > budget:
        raise TrainError(
            f"train.batch_size: auto: one packed row peaks at {one / GIB:.1f} GiB, over the budget of "
            f"{budget / GIB:.1f} GiB; set train.gradient_checkpointing: true (or a smaller train.max_seq_len)"
        )
    if cap < 2:
        return 1, one
    try:
        two = measure(2)
    except torch.cuda.OutOfMemoryError:
        return 1, one
    per_row = max(two - one, 1)
    rows = max(1, min(cap, (budget - fixed_extra - (one - per_row)) // per_row))
    peaks = {1: one, 2: two}
    while rows > 1:
        try:
            peak = peaks[rows] if rows in peaks else measure(rows)
        except torch.cuda.OutOfMemoryError:
            rows //= 2
            continue
        if peak + fixed_extra <= budget:
            return rows, peak
        rows //= 2
    return 1, one


def probe_choice(measure: Measure, *, device: torch.device, optimizer_bytes: int, cap: int) -> BatchChoice:
    """fit_rows against this process's share of the GPU: what it has reserved plus what is free, times MEMORY_SHARE."""
    free, total = torch.cuda.mem_get_info(device)
    budget = int((free + torch.cuda.memory_reserved(device)) * MEMORY_SHARE)
    rows, peak = fit_rows(measure, budget=budget, fixed_extra=optimizer_bytes, cap=cap)
    note = f"auto: {rows} rows, peak {peak / GIB:.1f} GiB of {total / GIB:.1f} (budget {budget / GIB:.1f}, cap {cap})"
    return BatchChoice(rows, AUTO, "probe", note, peak, budget)


@contextlib.contextmanager
def untouched(model: torch.nn.Module, trainable: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Probe steps in training mode that leave the run as it was: RNG states restored, gradients dropped."""
    meta, tensors = checkpoint.capture_rng_state()
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        for p in trainable.values():
            p.grad = None
        model.train(was_training)
        checkpoint.restore_rng(meta, tensors)
        gc.collect()
        torch.cuda.empty_cache()


def cuda_measure(step: Callable[[int], torch.Tensor], device: torch.device) -> Measure:
    """measure(rows): the peak allocated bytes of step(rows) (a loss) and its backward."""

    def measure(rows: int) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step(rows).backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    return measure

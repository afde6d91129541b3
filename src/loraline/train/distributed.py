"""Data-parallel training: one process per GPU (NCCL), or per CPU share (gloo), launched by torchrun.

Why by hand rather than wrapping the model in DistributedDataParallel: the trainable parameters are
the LoRA matrices, a few MB, so one all-reduce of their gradients per optimizer step costs little
next to the step, and it works whatever path computes the loss (the fused cross-entropy calls the
decoder and the head directly, which DDP's forward hooks would not see).

What makes N processes train what one process trains:
- the step plan is built for the global micro-batch (batch_size x N rows); each rank takes its
  contiguous share of every micro-batch, so the data order and a checkpoint's data position do not
  depend on N;
- each rank divides its summed token loss by the answer tokens of the whole step (all ranks), and
  the gradients are summed across ranks: exactly the single-process objective, up to float sums;
- LoRA's initial weights come from the shared seed (the same on every rank); dropout draws from a
  per-rank stream (seed + rank), which a checkpoint carries for every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Never let NCCL use NVLink multicast (NVLS): on shared hosts a program that does can take the GPUs
# out of service. Set in every launch, over whatever the caller's environment says.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (size 1: not distributed)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The world torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(world: World, use_cuda: bool, *, single: bool = False) -> Iterator[None]:
    """Join the process group (NCCL on CUDA, gloo on CPU) for the duration; pins this rank's GPU.
    With `single`, a one-process world gets a group of its own too (FSDP needs one even unsharded)."""
    if not world.distributed and not single:
        yield
        return
    owns = not dist.is_initialized()
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    if owns:
        backend = "nccl" if use_cuda else "gloo"
        device_id = torch.device("cuda", world.local_rank) if use_cuda else None
        if world.distributed:
            dist.init_process_group(backend, device_id=device_id)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    try:
        yield
    finally:
        if owns:
            dist.destroy_process_group()


def shard(rows: Sequence[Any], world: World) -> list[Any]:
    """This rank's contiguous share of a global micro-batch (sizes differ by at most one)."""
    n, size = len(rows), world.size
    start = world.rank * (n // size) + min(world.rank, n % size)
    return list(rows[start : start + n // size + (1 if world.rank < n % size else 0)])


def sum_across(tensors: list[torch.Tensor], world: World) -> None:
    """Sum `tensors` over all ranks in place, in one collective (flattened into one buffer)."""
    if not world.distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_grads(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum the gradients over ranks; a rank whose share of the step was empty contributes zeros."""
    if not world.distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sum_across([p.grad for p in params], world)


def sum_numbers(values: list[float], world: World, device: torch.device) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order (a collective: every rank must call it)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


# ---- launching -------------------------------------------------------------------------------


def launch_env(devices: int, use_cuda: bool) -> dict[str, str]:
    env = {**os.environ, **SAFE_NCCL_ENV}
    if not use_cuda and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would pin every process to one thread; split the cores instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
    return env


def launch(spec: dict[str, Any], devices: int, use_cuda: bool) -> dict[str, Any]:
    """Run the train stage in `devices` processes through torchrun; returns rank 0's result.

    `spec` holds what `worker` needs to call train_adapter (params as JSON, folders); rank 0 writes
    the run's timing to a file the launcher reads back. A failing rank fails the launch, with the
    processes' last output in the error.
    """
    from loraline.train.errors import TrainError

    with tempfile.TemporaryDirectory(prefix="loraline-ddp-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}), encoding="utf-8")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={devices}",
            "-m",
            "loraline.train.worker",
            str(spec_path),
        ]
        log.info("training on %d %s processes: %s", devices, "CUDA" if use_cuda else "CPU (gloo)", " ".join(cmd))
        proc = subprocess.Popen(cmd, env=launch_env(devices, use_cuda), stderr=subprocess.PIPE, text=True)
        tail: deque[str] = deque(maxlen=40)
        assert proc.stderr is not None
        for line in proc.stderr:  # progress bars and logs pass through; the tail explains a failure
            sys.stderr.write(line)
            tail.append(line.rstrip("\n").split("\r")[-1])
        returncode = proc.wait()
        if returncode != 0 or not result_path.is_file():
            errors = sorted(Path(tmp).glob("error-rank*.txt"))
            why = errors[0].read_text(encoding="utf-8") if errors else "\n".join(tail)
            raise TrainError(f"data-parallel training on {devices} processes failed (exit {returncode}): {why}")
        return json.loads(result_path.read_text(encoding="utf-8"))

"""Which device and dtype a stage computes in."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 on CUDA: tensor-core speed and fp32's exponent range, so no loss scaling is needed.
    # fp32 on CPU: many CPUs have no fast bf16 matmul, and fp32 keeps CPU runs exact enough for the
    # resume / determinism / packing-equivalence guarantees (tested to 1e-6 and below).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the standard mixed-precision recipe); a no-op context on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)

"""Which device and dtype a stage computes in."""

from __future__ import annotations

import torch

from loraline.config import ConfigError


def resolve_device(setting: str, key: str) -> torch.device:
    """The device a stage's `device: auto|cpu|cuda` setting names (the base stage's convention): auto is
    CUDA when torch sees a GPU, else the CPU. `key` (e.g. "merge.device") names the setting in the error
    when cuda is asked for on a machine without one."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{key} is {setting!r}; allowed: auto, cpu, cuda")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"{key} is cuda but torch sees no CUDA device (torch {torch.__version__}, {build}); "
            f"set {key}: auto to use the CPU here"
        )
    return torch.device("cuda", torch.cuda.current_device())


def device_facts(device: torch.device) -> dict[str, str]:
    """What a stage records about where it ran: {"device": "cuda"|"cpu"} and, on CUDA, the GPU's name."""
    if device.type == "cuda":
        return {"device": "cuda", "device_name": torch.cuda.get_device_name(device)}
    return {"device": device.type}


def pick_device() -> torch.device:
    return resolve_device("auto", "device")


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

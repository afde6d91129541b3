"""Causal attention over runs of consecutive tokens (variable-length sequences laid end to end).

On CUDA, torch's flash varlen kernel (torch.nn.attention.varlen) does all runs in one call; elsewhere
each run goes through SDPA on its own, which costs the sum of the runs' squares rather than the
square of the whole row. Used by packed training (train.speed) and by S2-Attn (modelling.s2attn).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F


def varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flash_varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and varlen_fn() is not None


_kwargs_cache: dict[str, Any] | None = None


def varlen_kwargs() -> dict[str, Any]:
    """Causal masking and GQA keywords for the installed torch's varlen_attn (its signature moved
    between releases: torch 2.11 has window_size but no enable_gqa)."""
    global _kwargs_cache
    if _kwargs_cache is None:
        names = inspect.signature(varlen_fn()).parameters
        extra: dict[str, Any] = {}
        if "is_causal" in names:
            extra["is_causal"] = True
        elif "window_size" in names:
            extra["window_size"] = (-1, 0)
        else:
            raise RuntimeError("torch.nn.attention.varlen.varlen_attn offers no causal masking here")
        if "enable_gqa" in names:
            extra["enable_gqa"] = True
        _kwargs_cache = extra
    return _kwargs_cache


def causal_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: list[int] | torch.Tensor,
    scaling: float | None,
    longest: int | None = None,
) -> torch.Tensor:
    """query (N, Hq, D), key/value (N, Hkv, D), runs [cu[i], cu[i+1]) -> (N, Hq, D), causal within each run."""
    hq, hkv = query.shape[1], key.shape[1]
    if flash_varlen_available(query.device):
        cu_t = torch.as_tensor(cu, dtype=torch.int32, device=query.device)
        if longest is None:
            longest = int((cu_t[1:] - cu_t[:-1]).max().item())
        extra = varlen_kwargs()
        dtype = (
            query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        )  # flash: half precision only
        q, k, v = (x.to(dtype) for x in (query, key, value))
        if hkv != hq and not extra.get("enable_gqa"):
            k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
        return varlen_fn()(q, k, v, cu_t, cu_t, longest, longest, scale=scaling, **extra).to(query.dtype)
    bounds = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
    sizes = [e - a for a, e in zip(bounds[:-1], bounds[1:])]
    # split, not slices: split's backward concatenates the runs' gradients, where every slice's
    # backward would zero-fill a gradient as large as the whole input (7% of a CPU step).
    outs = [
        F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            is_causal=True,
            scale=scaling,
            enable_gqa=hkv != hq,
        ).transpose(0, 1)
        for q, k, v in zip(query.split(sizes), key.split(sizes), value.split(sizes))
        if q.shape[0]
    ]
    return torch.cat(outs, dim=0)

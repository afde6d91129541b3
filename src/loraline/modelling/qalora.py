"""QA-LoRA's arithmetic: group-wise low-bit weights, the pooled LoRA layer, and the exact merge.

QA-LoRA (Xu et al., 2023) quantizes each linear weight W (out x in) group-wise along the input:
every run of `group_size` input channels of a row gets its own scale s and zero point z, and
W ~= s * (q - z) with integer codes q in [0, 2^bits - 1]. Its LoRA A matrix sees the input averaged
over each group (in / group_size features instead of in), so the update B A P (P the averaging)
is constant within a group and folds into the zero points exactly:

    s * (q - z) + c * (B A)[o, g] / G  =  s * (q - (z - c * (B A)[o, g] / (G * s)))

(c the LoRA scaling, G the group size). The merged model keeps the same codes and scales; only the
zero points move, so it is the same low-bit model with no quantization after training. This is why
the zero points here are real numbers, not integers: an integer zero point could not absorb the
update without rounding it.

Pure torch (CPU and CUDA); the train, merge and export stages build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128)


@dataclass
class GroupQuantized:
    """W ~= scales * (codes - zeros), one scale and zero point per (row, group of input channels)."""

    codes: torch.Tensor  # uint8 (out, in): values in [0, 2^bits - 1]
    scales: torch.Tensor  # float32 (out, in // group_size)
    zeros: torch.Tensor  # float32 (out, in // group_size), real-valued
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n = self.codes.shape
        q = self.codes.to(torch.float32).view(out, n // self.group_size, self.group_size)
        w = (q - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1)
        return w.view(out, n).to(dtype)


def quantize_groupwise(weight: torch.Tensor, bits: int, group_size: int) -> GroupQuantized:
    """Round-to-nearest asymmetric quantization per (row, group): the group's min and max map to
    codes 0 and 2^bits - 1, so every weight is within half a step of its dequantized value."""
    if bits not in BITS:
        raise ValueError(f"qalora.bits must be one of {BITS}, got {bits}")
    out, n = weight.shape
    if n % group_size:
        raise ValueError(f"in_features {n} is not a multiple of qalora.group_size {group_size}")
    w = weight.detach().to(torch.float32).view(out, n // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    levels = 2**bits - 1
    scales = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    zeros = -lo / scales
    codes = torch.clamp(torch.round(w / scales.unsqueeze(-1) + zeros.unsqueeze(-1)), 0, levels).to(torch.uint8)
    return GroupQuantized(codes.view(out, n), scales, zeros, bits, group_size)


class GroupQuantizedLinear(nn.Module):
    """A frozen group-quantized linear layer (what a merged QA-LoRA model is made of)."""

    def __init__(self, quantized: GroupQuantized, bias: torch.Tensor | None) -> None:
        super().__init__()
        out, n = quantized.shape
        self.bits, self.group_size, self.in_features, self.out_features = quantized.bits, quantized.group_size, n, out
        self.register_buffer("codes", quantized.codes)
        self.register_buffer("scales", quantized.scales)
        self.register_buffer("zeros", quantized.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> GroupQuantized:
        return GroupQuantized(self.codes, self.scales, self.zeros, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QALoRALinear(GroupQuantizedLinear):
    """A frozen group-quantized linear layer with QA-LoRA's pooled adapter beside it.

    y = x W~^T + bias + c * B(A(dropout(pool(x)))), pool averaging each group of input channels.
    """

    def __init__(self, quantized: GroupQuantized, bias: torch.Tensor | None, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(quantized, bias)
        self.lora_A = nn.Linear(self.in_features // quantized.group_size, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # starts as the quantized base exactly
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.in_features // self.group_size, self.group_size).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        update = self.lora_B(self.lora_A(self.dropout(self.pool(x)).to(self.lora_A.weight.dtype)))
        return base + (update * self.scaling).to(base.dtype)

    @torch.no_grad()
    def merged(self) -> GroupQuantized:
        """The same codes and scales with the adapter folded into the zero points (exact)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling / self.group_size  # (out, groups)
        return GroupQuantized(self.codes.clone(), self.scales.clone(), self.zeros - delta / self.scales, self.bits, self.group_size)


def matmul_nbits_initializers(q: GroupQuantized) -> dict:
    """onnxruntime's MatMulNBits inputs for a 4-bit GroupQuantized weight: B packed two codes a byte
    (low nibble first) as [N, K / block, block / 2], and per-block scales and *float* zero points
    (the op dequantizes (code - zero) * scale, so a merged QA-LoRA's real-valued zero points are
    served exactly), plus the node's attributes."""
    import numpy as np

    if q.bits != 4:
        raise ValueError(f"MatMulNBits export takes 4-bit weights; this one has {q.bits} bits (qalora.bits: 4 for ONNX)")
    out, n = q.shape
    codes = q.codes.cpu().numpy().reshape(out, n // q.group_size, q.group_size)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return {
        "B": packed,
        "scales": q.scales.cpu().numpy().reshape(-1).astype(np.float32),
        "zero_points": q.zeros.cpu().numpy().reshape(-1).astype(np.float32),
        "attributes": {"K": n, "N": out, "bits": 4, "block_size": q.group_size},
    }


def _swap(model: nn.Module, make) -> list[str]:
    """Replace every nn.Linear but the output head by make(linear); returns the replaced names."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child is not head:
                setattr(module, child_name, make(child))
                done.append(f"{name}.{child_name}" if name else child_name)
    return done


def apply_qalora(model: nn.Module, *, bits: int, group_size: int, r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Quantize every linear layer but the head group-wise and give it a pooled adapter, in place.
    Everything else is frozen; returns the adapted layers' names."""
    for p in model.parameters():
        p.requires_grad_(False)
    return _swap(model, lambda lin: QALoRALinear(quantize_groupwise(lin.weight, bits, group_size), lin.bias, r, alpha, dropout))


def merge_qalora(model: nn.Module) -> int:
    """Fold every QA-LoRA adapter into its layer's zero points, in place; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QALoRALinear):
                setattr(module, child_name, GroupQuantizedLinear(child.merged(), child.bias))
                count += 1
    return count

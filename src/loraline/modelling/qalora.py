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

Torch and peft (CPU and CUDA): peft's LoRA layer and its QA-LoRA variant on our quantized layer, so the
adapter is an ordinary peft adapter; the train, merge and export stages build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.variants import QALoraLinearVariant
from torch import nn

BITS = (2, 3, 4)


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
    """A frozen group-quantized linear layer: what QA-LoRA trains on and what its merge writes.
    The codes are the `qweight` buffer (peft finds a quantized base layer's device by that name)."""

    def __init__(self, quantized: GroupQuantized, bias: torch.Tensor | None) -> None:
        super().__init__()
        out, n = quantized.shape
        self.bits, self.group_size, self.in_features, self.out_features = quantized.bits, quantized.group_size, n, out
        self.register_buffer("qweight", quantized.codes)
        self.register_buffer("scales", quantized.scales)
        self.register_buffer("zeros", quantized.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> GroupQuantized:
        return GroupQuantized(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class QALoraGroupLinear(nn.Module, LoraLayer):
    """peft's LoRA layer on a GroupQuantizedLinear, with peft's own QA-LoRA variant (its A matrix sees
    the input averaged over each group). Registered with LoraConfig._register_custom_module, so the
    adapter is saved and loaded by peft in its own format (use_qalora, qalora_group_size)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs
    ) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("QA-LoRA does not combine with DoRA (train.use_dora)")
        if config.lora_bias:
            raise ValueError("QA-LoRA folds into zero points; a LoRA bias would not fold")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        return QALoraLinearVariant()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            dtype = result.dtype
            cast = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
            result = self.lora_variant[name].forward(self, active_adapter=name, x=cast, result=result).to(dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


@torch.no_grad()
def fold_adapter(layer: nn.Module, adapter: str = "default") -> GroupQuantized:
    """The layer's quantized base with its QA-LoRA adapter folded into the zero points (exact): the
    same codes and scales. peft's variant adds scaling * (n_groups * mean_g(x)) A^T B^T, so every weight
    of group g in row o moves by scaling * n_groups * (B A)[o, g] / G."""
    base = layer.get_base_layer().quantized
    groups = base.shape[1] // base.group_size
    ba = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()  # (out, groups)
    delta = ba * (layer.scaling[adapter] * groups / base.group_size)
    return GroupQuantized(
        base.codes.clone(), base.scales.clone(), base.zeros - delta / base.scales, base.bits, base.group_size
    )


# onnxruntime's MatMulNBits has 2-, 4- and 8-bit kernels: 3-bit codes travel in 4-bit blobs (same values).
MATMUL_NBITS_BITS = {2: 2, 3: 4, 4: 4}


def matmul_nbits_initializers(q: GroupQuantized) -> dict:
    """onnxruntime's MatMulNBits inputs for a GroupQuantized weight, plus the exact correction its
    integer zero points leave over.

    MatMulNBits dequantizes (code - zero) * scale. Its fast kernels take integer zero points; float
    ones run about ten times slower on CPU. A merged QA-LoRA's zero points are real numbers, so each is
    split as z = round(z) + f: MatMulNBits takes the integer part, and the rest, s * f, is constant
    within a group, so its share of the output is (x summed over each group) @ correction, with
    correction[g, o] = scales[o, g] * f[o, g]: y = MatMulNBits(x) - pooled(x) @ correction, exact.

    B is packed along K, low bits first (two 4-bit or four 2-bit codes a byte) as
    [N, K / block, block * bits / 8]; zero points are packed the same way per row. 3-bit codes travel
    in 4-bit blobs: onnxruntime has no 3-bit kernel."""
    import numpy as np

    if q.bits not in MATMUL_NBITS_BITS:
        raise ValueError(
            f"MatMulNBits export takes {sorted(MATMUL_NBITS_BITS)}-bit weights; this one has {q.bits} bits"
        )
    bits = MATMUL_NBITS_BITS[q.bits]
    per_byte = 8 // bits
    out, n = q.shape
    codes = q.codes.cpu().numpy().astype(np.uint8).reshape(out, n // q.group_size, q.group_size // per_byte, per_byte)
    zeros = q.zeros.cpu().numpy().astype(np.float64)
    whole = np.clip(np.round(zeros), 0, 2**bits - 1)
    blocks = zeros.shape[1]
    padded = np.zeros((out, -(-blocks // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :blocks] = whole.astype(np.uint8)
    return {
        "B": _pack(codes, bits),
        "scales": q.scales.cpu().numpy().reshape(-1).astype(np.float32),
        "zero_points": _pack(padded.reshape(out, -1, per_byte), bits).reshape(-1),
        "correction": (q.scales.cpu().numpy().astype(np.float64) * (zeros - whole)).T.astype(
            np.float32
        ),  # [K / block, N]
        "attributes": {"K": n, "N": out, "bits": bits, "block_size": q.group_size},
    }


def _pack(values, bits: int):
    """[..., per_byte] small integers -> [...] bytes, the first in the low bits."""
    import numpy as np

    packed = np.zeros(values.shape[:-1], dtype=np.uint8)
    for i in range(values.shape[-1]):
        packed |= values[..., i] << (bits * i)
    return packed


# The merged low-bit model's own numbers (layout.QALORA_QUANTIZED beside the dequantized weights in the
# merged folder): what the export stage builds its MatMulNBits graph from (floats do not give the codes back exactly).
QUANTIZED_FORMAT = "loraline-qalora-groupwise-v1"


def quantized_layers(model: nn.Module) -> dict[str, GroupQuantized]:
    """Every GroupQuantizedLinear of `model`, by its module name."""
    return {name: m.quantized for name, m in model.named_modules() if isinstance(m, GroupQuantizedLinear)}


def save_quantized_layers(layers: dict[str, GroupQuantized], path) -> None:
    """codes (uint8), scales and zero points (float32) per layer, with bits and group size in the
    header: safetensors, readable without loraline."""
    from safetensors.torch import save_file

    if not layers:
        raise ValueError("no group-quantized layers to save")
    bits = {q.bits for q in layers.values()}
    groups = {q.group_size for q in layers.values()}
    if len(bits) != 1 or len(groups) != 1:
        raise ValueError(
            f"one bit width and group size per model, got bits {sorted(bits)}, group sizes {sorted(groups)}"
        )
    tensors = {}
    for name, q in sorted(layers.items()):
        tensors[f"{name}.qweight"] = q.codes.contiguous().cpu()
        tensors[f"{name}.scales"] = q.scales.contiguous().cpu()
        tensors[f"{name}.zeros"] = q.zeros.contiguous().cpu()
    save_file(
        tensors,
        str(path),
        metadata={"format": QUANTIZED_FORMAT, "bits": str(bits.pop()), "group_size": str(groups.pop())},
    )


def load_quantized_layers(path) -> dict[str, GroupQuantized]:
    """What save_quantized_layers wrote; a file of another format is refused by name."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != QUANTIZED_FORMAT:
            raise ValueError(f"{path} is not a {QUANTIZED_FORMAT} file (format {meta.get('format')!r})")
        bits, group = int(meta["bits"]), int(meta["group_size"])
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        return {
            n: GroupQuantized(
                f.get_tensor(f"{n}.qweight"), f.get_tensor(f"{n}.scales"), f.get_tensor(f"{n}.zeros"), bits, group
            )
            for n in names
        }


def quantize_linears(model: nn.Module, *, bits: int, group_size: int) -> list[str]:
    """Replace every nn.Linear but the output head by its GroupQuantizedLinear (round to nearest,
    from the float32 weights, so every device gets the same codes), frozen; returns their names.
    A layer whose input width the group size does not divide is refused, by name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child is not head:
                full = f"{name}.{child_name}" if name else child_name
                if child.in_features % group_size:
                    raise ValueError(
                        f"qalora.group_size {group_size} does not divide the "
                        f"input width {child.in_features} of layer {full}"
                    )
                layer = GroupQuantizedLinear(quantize_groupwise(child.weight.float(), bits, group_size), child.bias)
                setattr(module, child_name, layer.to(child.weight.device))
                done.append(full)
    for p in model.parameters():
        p.requires_grad_(False)
    return done


def register_with(config) -> None:
    """Let peft put QA-LoRA layers on GroupQuantizedLinear bases (a LoraConfig with use_qalora)."""
    config._register_custom_module({GroupQuantizedLinear: QALoraGroupLinear})


def load_qalora_adapter(base: nn.Module, adapter_dir, *, bits: int, group_size: int) -> nn.Module:
    """A trained QA-LoRA adapter on `base`, quantized in place as training quantized it (the base must
    be loaded in float32 for the same codes): peft's model, ready for inference or merge_qalora."""
    from peft import LoraConfig, PeftModel

    quantize_linears(base, bits=bits, group_size=group_size)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    register_with(config)
    return PeftModel.from_pretrained(base, str(adapter_dir), config=config, is_trainable=False)


def merge_qalora(model: nn.Module, adapter: str = "default") -> int:
    """Fold every QA-LoRA layer of a peft model into its base's zero points and put the plain
    GroupQuantizedLinear back, in place; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QALoraGroupLinear):
                base = child.get_base_layer()
                setattr(module, child_name, GroupQuantizedLinear(fold_adapter(child, adapter), base.bias))
                count += 1
    return count


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every GroupQuantizedLinear by an nn.Linear holding its dequantized weight, in place, so
    that any loader reads the model; returns how many. At float32 the weights are the low-bit model's
    own values (codes, scales and folded zero points give them exactly, up to float32 rounding)."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, GroupQuantizedLinear):
                plain = nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    dtype=dtype,
                    device=child.qweight.device,
                )
                with torch.no_grad():
                    plain.weight.copy_(child.quantized.dequantize(dtype))
                    if child.bias is not None:
                        plain.bias.copy_(child.bias.to(dtype))
                plain.requires_grad_(False)
                setattr(module, child_name, plain)
                count += 1
    return count

"""A merged QA-LoRA model as a safetensors checkpoint that transformers loads through torchao.

The fold needs real-valued zero points, which GPTQ, AWQ and compressed-tensors' packed format cannot
hold (they store integer ones). torchao's `IntxUnpackedToInt8Tensor` (weight-only, any group size,
2 to 8 bits) dequantizes as (codes - zero_point) * scale, our own order of operations, takes a float32
zero point, and transformers saves and loads it as safetensors with `TorchAoConfig`. So the folder
this writes loads with a plain

    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)   # with torchao installed

and its weights are the merged low-bit model's, bit for bit. Two things to know:
- the codes are stored one per int8 byte (torchao's format), so the file is not 4-bit on disk: at
  groups of 32 a weight takes 8 bits plus 2 x 32 / 32 for its group's scale and zero point, against
  32 in float32. The packed low-bit artifact is export's ONNX graph (MatMulNBits);
- our codes are unsigned (0 .. 2^bits - 1) and torchao's signed, so each tensor declares one bit more
  (int5 for 4-bit codes) rather than shifting codes and zero points by 2^(bits-1), which would round
  the zero points: the codes still take `bits` bits' worth of values (the merge report checks it).
Load it in float32: torchao keeps these weights in the dtype they were saved with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loraline.modelling.qalora import GroupQuantized

LOADER = "transformers AutoModelForCausalLM.from_pretrained (TorchAoConfig) with torchao's IntxUnpackedToInt8Tensor"


def _torchao() -> Any:
    import torchao  # its import-time warnings are silenced in loraline/__init__.py
    import torchao.quantization as Q

    return torchao, Q


def save_torchao_checkpoint(merged_dir: Path, layers: dict[str, GroupQuantized], out_dir: Path) -> dict[str, Any]:
    """Write the float32 model in `merged_dir` with every layer of `layers` as its codes, scales and
    zero points (torchao's IntxUnpackedToInt8Tensor) to `out_dir` via save_pretrained (safetensors)."""
    from transformers import AutoModelForCausalLM, TorchAoConfig

    torchao, Q = _torchao()
    bits = {q.bits for q in layers.values()}.pop()
    group = {q.group_size for q in layers.values()}.pop()
    config = Q.IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"), granularity=Q.PerGroup(group), mapping_type=Q.MappingType.ASYMMETRIC
    )
    plain = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    head = [n for n, m in plain.named_modules() if m is plain.get_output_embeddings()]
    del plain
    # torchao converts every linear layer but the head on load (its own rounding); each is then given our codes.
    model = AutoModelForCausalLM.from_pretrained(
        str(merged_dir),
        dtype=torch.float32,
        quantization_config=TorchAoConfig(config, modules_to_not_convert=head),
    )
    converted = {
        n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Q.IntxUnpackedToInt8Tensor)
    }
    if converted != set(layers):
        raise ValueError(
            f"torchao converted other layers than the merged model's quantized ones: "
            f"{sorted(converted ^ set(layers))[:4]}"
        )
    declared = getattr(torch, f"int{bits + 1}")  # unsigned codes in a signed range, see the module's docstring
    for name, q in layers.items():
        module = model.get_submodule(name)
        weight = Q.IntxUnpackedToInt8Tensor(
            qdata=q.codes.to(torch.int8),
            scale=q.scales.clone(),
            zero_point=q.zeros.clone(),
            target_dtype=declared,
            block_size=[1, group],
            dtype=torch.float32,
            activation_quantization=None,
        )
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    size = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
    return {"loader": LOADER, "torchao": torchao.__version__, "bits": bits, "group_size": group, "bytes": size}


def load_torchao_checkpoint(folder: Path) -> Any:
    """What a user runs: transformers' own loader (torchao must be installed), in float32."""
    from transformers import AutoModelForCausalLM

    _torchao()
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def max_weight_diff(model: Any, layers: dict[str, GroupQuantized]) -> float:
    """Largest |loaded weight - codes dequantized| over `layers` (0.0: bit for bit)."""
    _, Q = _torchao()
    worst = 0.0
    for name, q in layers.items():
        weight = model.get_submodule(name).weight
        if not isinstance(weight, Q.IntxUnpackedToInt8Tensor):
            raise ValueError(f"layer {name} loaded as {type(weight).__name__}, not torchao's IntxUnpackedToInt8Tensor")
        worst = max(worst, (weight.dequantize() - q.dequantize(torch.float32)).abs().max().item())
    return worst

"""QA-LoRA against QLoRA in a QA-LoRA tenant's own evaluation (train.qalora.reference).

The train stage trains the tenant's QLoRA reference (same data, steps and seed, train.method lora) into
<adapter>/qlora_reference. The evaluation scores, on the same test rows and in the same way as its
other models:

  qalora_merged          (a) the candidate: the QA-LoRA adapter folded into the zero points of the
                             group-wise low-bit base (the merge stage's model)
  qlora_merged_float     (b) the reference on the float base, unmerged: what a full-precision merge serves
  qlora_rounded_after    (c) (b) merged, then every linear layer but the head rounded to nearest at the
                             candidate's bits and group size (the same quantizer as QA-LoRA's base):
                             the usual way to get a low-bit model out of QLoRA

with the bytes each model's weights take as shipped: float32 for (b); for (a) and (c) the codes
packed as export's MatMulNBits graph packs them (3-bit codes in 4 bits), a float32 scale and zero
point per group, and every other tensor in float32. The QA-LoRA paper's claim is (a) above (c),
most at low bit widths; the table says whether this tenant shows it.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from loraline.layout import QALORA_QUANTIZED

QALORA = "qalora_merged"
FLOAT_MERGE = "qlora_merged_float"
ROUNDED_AFTER = "qlora_rounded_after"
# The differences worth reading at a glance: (a) minus (c), per metric (positive: (a) is better,
# except for answer_loss, where negative is better).
COMPARED = ("answer_loss", "exact_match", "token_f1", "json_field_accuracy")


class LowBitComparisonError(ValueError):
    """A QLoRA reference was given for a candidate that is not a merged QA-LoRA model."""


def candidate_quantization(candidate_dir: Path) -> tuple[int, int]:
    """(bits, group_size) of a merged QA-LoRA model, from the header of its quantized layers' file."""
    from safetensors import safe_open

    from loraline.modelling.qalora import QUANTIZED_FORMAT

    path = Path(candidate_dir) / QALORA_QUANTIZED
    if not path.is_file():
        raise LowBitComparisonError(
            f"{candidate_dir} has no {QALORA_QUANTIZED}: a QLoRA reference compares only with a merged QA-LoRA "
            "candidate (train.method qalora)"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != QUANTIZED_FORMAT:
        raise LowBitComparisonError(f"{path} is not a {QUANTIZED_FORMAT} file (format {meta.get('format')!r})")
    return int(meta["bits"]), int(meta["group_size"])


def weight_bytes(model: torch.nn.Module, bits: int | None = None) -> int:
    """Bytes of `model`'s weights as shipped: float32, or (bits given) with its group-quantized linear
    layers packed as export's MatMulNBits packs them plus a float32 scale and zero point per group."""
    from loraline.modelling.qalora import MATMUL_NBITS_BITS, GroupQuantizedLinear

    total, seen = 0, set()  # tied tensors (embeddings and head) count once
    for module in model.modules():
        if bits is not None and isinstance(module, GroupQuantizedLinear):
            q = module.quantized
            out, n = q.shape
            total += math.ceil(out * n * MATMUL_NBITS_BITS[bits] / 8) + 2 * 4 * q.scales.numel()
        for p in module.parameters(recurse=False):  # the quantized layers' buffers are counted above
            if id(p) not in seen:
                seen.add(id(p))
                total += 4 * p.numel()
    return total


@contextmanager
def rounded_after_training(
    base_path: str,
    base_kwargs: dict[str, Any],
    adapter: Path,
    bits: int,
    group_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[tuple[Any, int, int]]:
    """(c): the reference merged into the float32 base, then rounded to nearest at `bits` per group; yields
    (the model in eval mode on `device`, its float32 bytes, its low-bit bytes)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraline.modelling.qalora import dequantize_linears, quantize_linears

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **base_kwargs)
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    float_bytes = weight_bytes(model)
    quantize_linears(model, bits=bits, group_size=group_size)  # from float32, as QA-LoRA's base is quantized
    lowbit_bytes = weight_bytes(model, bits)
    dequantize_linears(model, dtype)
    model.to(device=device, dtype=dtype).eval()
    try:
        yield model, float_bytes, lowbit_bytes
    finally:
        del model, base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def comparison(
    *,
    bits: int,
    group_size: int,
    scores: dict[str, dict[str, float | None]],
    float_bytes: int,
    lowbit_bytes: int,
    reference: Path,
) -> dict[str, Any]:
    """The comparison's entry of metrics.json, from the three models' scores (keys QALORA, FLOAT_MERGE,
    ROUNDED_AFTER)."""
    sizes = {QALORA: lowbit_bytes, FLOAT_MERGE: float_bytes, ROUNDED_AFTER: lowbit_bytes}
    models = {
        name: {**scores[name], "weight_bytes": sizes[name], "size_vs_float": round(sizes[name] / float_bytes, 4)}
        for name in (QALORA, FLOAT_MERGE, ROUNDED_AFTER)
    }
    gap = {}
    for key in COMPARED:
        a, c = scores[QALORA].get(key), scores[ROUNDED_AFTER].get(key)
        if a is not None and c is not None:
            gap[key] = round(a - c, 6)
    # The reference's folder relative to the adapter's: no machine's paths in a metrics file.
    return {
        "bits": bits,
        "group_size": group_size,
        "reference_adapter": reference.name,
        "models": models,
        "qalora_minus_rounded_after": gap,
    }


def summary_line(section: dict[str, Any]) -> str:
    """One line for the end-of-run summary: the headline metric of (a), (b) and (c)."""
    key = next(
        (k for k in ("json_field_accuracy", "exact_match") if section["models"][QALORA].get(k) is not None),
        "answer_loss",
    )
    a, b, c = (section["models"][n].get(key) for n in (QALORA, FLOAT_MERGE, ROUNDED_AFTER))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (
        f"QA-LoRA INT{section['bits']} {key}: {fmt(a)}, QLoRA float {fmt(b)}, QLoRA rounded after {fmt(c)} "
        f"(size {section['models'][QALORA]['size_vs_float']:.2f}x float)"
    )


def render(section: dict[str, Any]) -> list[str]:
    """report.md's section: the three models side by side."""
    labels = {
        QALORA: "(a) QA-LoRA merged",
        FLOAT_MERGE: "(b) QLoRA, float merge",
        ROUNDED_AFTER: "(c) (b) rounded after",
    }
    keys = [
        k
        for k in ("answer_loss", "exact_match", "token_f1", "json_field_accuracy", "weight_bytes", "size_vs_float")
        if any(k in m for m in section["models"].values())
    ]
    lines = [
        "",
        f"## QA-LoRA against QLoRA (INT{section['bits']}, groups of {section['group_size']})",
        "",
        "The same data, steps and seed; (c) is rounded to nearest with the same bits and group size. "
        "Weight bytes: as export's low-bit graph stores them ((b): float32).",
        "",
        "| metric | " + " | ".join(labels.values()) + " | (a) − (c) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in keys:
        cells = []
        for name in labels:
            value = section["models"][name].get(key)
            cells.append("n/a" if value is None else (f"{value:,}" if key == "weight_bytes" else f"{value:.4f}"))
        gap = section["qalora_minus_rounded_after"].get(key)
        label = f"{key} ↓" if key == "answer_loss" else key
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if gap is None else f'{gap:+.4f}'} |")
    return lines

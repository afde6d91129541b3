"""Low-level ONNX export of a causal LM with its KV cache in the graph, and int8 dynamic quantization."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from loraline.export.wrapper import CacheLayout, KVCacheWrapper

# Above this many parameter bytes the graph goes to external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def dynamic_axes(layout: CacheLayout) -> tuple[Any, ...]:
    """Dynamic shapes for KVCacheWrapper's (input_ids, attention_mask, *past), as torch.export wants them.

    past and current lengths are separate dims; the attention mask has its own ("total" = past + seq,
    torch.export cannot take a sum of two dims as an input's size).
    """
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    past, total = torch.export.Dim("past"), torch.export.Dim("total")
    cache = tuple({0: batch, 2: past} for _ in range(2 * layout.num_layers))
    return ({0: batch, 1: seq}, {0: batch, 1: total}, cache)


def example_inputs(layout: CacheLayout, vocab_size: int, dtype: torch.dtype) -> tuple[Any, ...]:
    # Sizes > 1 and all different, so that no dim gets specialised to a constant.
    batch, seq, past = 2, 5, 3
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    shape = (batch, layout.num_kv_heads, past, layout.head_dim)
    cache = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2 * layout.num_layers)]
    return (ids, mask, *cache)


def export_model(model: torch.nn.Module, path: Path, opset: int | None = None) -> dict[str, Any]:
    """Export `model` (a transformers causal LM, eval mode) wrapped in KVCacheWrapper to `path`."""
    return save_graph(trace_model(model, opset), model, path)


def trace_model(model: torch.nn.Module, opset: int | None = None) -> Any:
    """torch.onnx's program of `model` wrapped in KVCacheWrapper, traced and not yet optimised (so each
    linear layer is still `MatMul(x, Transpose(weight))` under the weight's own name: export.int4 reads
    that). The program refers to the model's parameters; it copies none."""
    wrapper = KVCacheWrapper(model).eval()
    layout = wrapper.layout
    dtype = next(model.parameters()).dtype
    args = example_inputs(layout, model.config.get_text_config().vocab_size, dtype)
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=layout.input_names(),
            output_names=layout.output_names(),
            dynamic_shapes=dynamic_axes(layout),
            verbose=False,
            optimize=False,
            **kwargs,
        )


def save_graph(program: Any, model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Optimise `program` (constant folding; in place) and save it at the model's precision to `path`,
    its weights in `<path>.data` past EXTERNAL_DATA_BYTES. Returns the graph's facts for the report."""
    layout = KVCacheWrapper(model).layout
    external = parameter_bytes(model) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program.optimize()
        for node in program.model.graph:  # the tracer's per-node notes (source stack traces): no use to a runtime
            node.metadata_props.clear()
        program.save(str(path), external_data=external)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "file": path.name,
        "external_data": external,
        "opset": opset_used,
        "inputs": layout.input_names(),
        "outputs": layout.output_names(),
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """onnxruntime dynamic quantization: int8 weights for MatMul/Gather, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = any(p.name != src.name for p in src.parent.glob(src.name + "*"))
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=False,
        reduce_range=False,
        use_external_data_format=external,
    )
    return {
        "file": dst.name,
        "weight_type": "QInt8",
        "method": "onnxruntime.quantization.quantize_dynamic",
        "external_data": external,
    }


def graph_bytes(folder: Path, file: str) -> int:
    """A graph's size on disk, its external data included."""
    return sum(p.stat().st_size for p in folder.glob(file + "*") if p.is_file())

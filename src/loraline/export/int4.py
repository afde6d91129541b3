"""A weight-only int4 ONNX graph built from the merged model's own float weights, for models too big to
carry a float32 graph: every linear layer of the decoder becomes onnxruntime's MatMulNBits (4-bit codes,
a float32 scale and an integer zero point per block of `block_size` input channels, round to nearest);
embeddings, norms and the output head stay float32.

The graph is assembled from the exporter's traced program without ever writing its float32 twin: the
program is saved without initializers (a few MB at any size), each `MatMul(x, Transpose(W))` of a linear
weight W becomes `MatMulNBits(x, codes, scales, zero_points)`, and the remaining initializers are
streamed one at a time into one external-data file. Peak memory is the model plus one layer's codes.

What it computes is exactly the merged model with each linear weight replaced by its dequantized codes
(`dequantized_twin`), which is what the export's parity check compares it with at float32's tolerance;
its distance from the unquantized model is the quantization's, reported beside it.

Quantization runs on the CPU, so the graph is the same bytes on any machine (as the traced graph is).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraline.export import onnx_export
from loraline.export.lowbit import MS_DOMAIN, matmul_nbits_nodes
from loraline.modelling.qalora import GroupQuantized

_ALIGN = 4096  # external tensors start on a page: onnxruntime can map them without copying


def write_int4_graph(
    program: Any, model: torch.nn.Module, dst: Path, block_size: int
) -> tuple[dict[str, Any], dict[str, GroupQuantized]]:
    """Write `program` (torch.onnx's traced, unoptimised program of KVCacheWrapper(model)) to `dst` with
    every quantizable linear layer as MatMulNBits. Returns the facts for the report and the layers'
    quantized weights (keyed by module name in `model`), from which `dequantized_twin` builds the
    PyTorch model the graph must reproduce."""
    import onnx

    skeleton = _skeleton(program, dst)
    weights = linear_weights(model, block_size)
    transposed = {
        n.output[0]: n.input[0] for n in skeleton.graph.node if n.op_type == "Transpose" and n.input[0] in weights
    }
    layers: dict[str, GroupQuantized] = {}
    nodes, new_arrays = [], {}
    for node in skeleton.graph.node:
        if node.op_type == "Transpose" and node.input[0] in weights:
            continue
        weight = transposed.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None:
            nodes.append(node)
            continue
        name = weights[weight]
        q = quantize_rtn(model.get_submodule(name).weight, block_size)
        layers[name] = q
        layer_nodes, arrays = _matmul_nbits(node, q, name)
        nodes.extend(layer_nodes)
        new_arrays.update(arrays)
    missing = sorted(set(weights.values()) - set(layers))
    if missing:
        raise ValueError(f"{len(missing)} linear layers have no MatMul in the traced graph: {', '.join(missing[:5])}")
    for node in nodes:  # the tracer's per-node notes (source stack traces, ~30 KB a node): no use to a runtime
        del node.metadata_props[:]
    del skeleton.graph.node[:]
    skeleton.graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in skeleton.opset_import):
        skeleton.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    used = {name for node in nodes for name in node.input}
    floats = {name: v for name, v in _program_initializers(program).items() if name in used and name not in weights}
    external = _write(skeleton, dst, floats, new_arrays)
    facts = {
        "file": dst.name,
        "op": f"{MS_DOMAIN}.MatMulNBits",
        "bits": 4,
        "block_size": block_size,
        "method": "round to nearest, asymmetric, integer zero points",
        "layers": len(layers),
        "float_layers": sorted(set(_all_linears(model)) - set(layers)),
        "external_data": external,
    }
    return facts, layers


def linear_weights(model: torch.nn.Module, block_size: int) -> dict[str, str]:
    """The traced program's name of each quantizable linear weight -> the module's name in `model`.
    Quantizable: a decoder linear layer whose input width is a multiple of `block_size`. The output head
    stays float (its error lands on every logit directly), as do layers of another width."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        f"model.{name}.weight": name
        for name, module in _all_linears(model).items()
        if module is not head and module.in_features % block_size == 0
    }


def _all_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def quantize_rtn(weight: torch.Tensor, block_size: int) -> GroupQuantized:
    """4-bit round to nearest per (row, block of input channels) with an integer zero point, the form
    MatMulNBits' fast kernels take: the block's min and max map (after rounding the zero) to codes 0..15."""
    out, n = weight.shape
    w = weight.detach().to("cpu", torch.float32).view(out, n // block_size, block_size)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # 0 stays exact: a zero weight stays zero
    scales = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    zeros = torch.clamp(torch.round(-lo / scales), 0, 15)
    codes = torch.clamp(torch.round(w / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, 15).to(torch.uint8)
    return GroupQuantized(codes.view(out, n), scales.contiguous(), zeros.contiguous(), 4, block_size)


def dequantized_twin(model: torch.nn.Module, layers: dict[str, GroupQuantized]) -> None:
    """Replace, in place, each quantized layer's weight with its dequantized codes: the PyTorch model
    the int4 graph computes."""
    with torch.no_grad():
        for name, q in layers.items():
            weight = model.get_submodule(name).weight
            weight.copy_(q.dequantize(torch.float32).to(weight.device, weight.dtype))


def _matmul_nbits(node: Any, q: GroupQuantized, name: str) -> tuple[list, dict[str, np.ndarray]]:
    """The MatMulNBits nodes replacing `node` (x @ W.T), and their arrays by initializer name."""
    from loraline.modelling.qalora import matmul_nbits_initializers

    init = matmul_nbits_initializers(q)
    nodes, protos, _ = matmul_nbits_nodes(node.input[0], "", init, name)
    nbits = nodes[0]
    del nbits.output[:]
    nbits.output.append(node.output[0])  # integer zero points: no rest to subtract, MatMulNBits alone
    # MatMulNBits' own inputs, by the initializer names the nodes read (the arrays, not copies of them)
    return [nbits], {proto.name: init[part] for proto, part in zip(protos, ("B", "scales", "zero_points"))}


def _skeleton(program: Any, dst: Path) -> Any:
    """The traced graph without its initializers (small at any model size)."""
    import onnx

    path = dst.with_name(dst.name + ".skeleton")
    try:
        program.save(str(path), include_initializers=False)
        return onnx.load(str(path), load_external_data=False)
    finally:
        path.unlink(missing_ok=True)


def _program_initializers(program: Any) -> dict[str, Any]:
    """The traced program's initializers (onnx_ir tensors over the model's own parameters: read only when written)."""
    return {
        name: value.const_value
        for name, value in program.model.graph.initializers.items()
        if value.const_value is not None
    }


def _write(model: Any, dst: Path, floats: dict[str, Any], arrays: dict[str, np.ndarray]) -> bool:
    """Save `model` with the initializers, streamed into `<dst>.data` when they pass onnx_export.EXTERNAL_DATA_BYTES
    (one tensor in memory at a time), else inside the file. Returns whether external data was used."""
    import onnx
    from onnx import numpy_helper

    names = sorted(floats) + sorted(arrays)
    size = sum(int(f.nbytes) for f in floats.values()) + sum(a.nbytes for a in arrays.values())
    external = size > onnx_export.EXTERNAL_DATA_BYTES
    data_path = dst.with_name(dst.name + ".data")
    with open(data_path, "wb") if external else contextlib.nullcontext() as data:
        for name in names:
            array = floats[name].numpy() if name in floats else arrays[name]
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
            if external:
                _move_to_file(tensor, data, data_path.name)
            model.graph.initializer.append(tensor)
    onnx.save_model(model, str(dst))
    return external


def _move_to_file(tensor: Any, data: Any, location: str) -> None:
    from onnx.external_data_helper import set_external_data

    offset = -(-data.tell() // _ALIGN) * _ALIGN
    data.seek(offset)
    raw = tensor.raw_data
    data.write(raw)
    set_external_data(tensor, location=location, offset=offset, length=len(raw))
    tensor.ClearField("raw_data")

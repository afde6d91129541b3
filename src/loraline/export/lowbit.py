"""A QA-LoRA model's low-bit ONNX graph: the exported float graph with every group-quantized linear
layer's MatMul replaced by onnxruntime's MatMulNBits on the layer's own codes and scales (the whole
part of each folded zero point, its exact rest in a small matmul beside it), so the graph computes the
merged low-bit model itself rather than a re-quantization of it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraline.export.onnx_export import EXTERNAL_DATA_BYTES
from loraline.modelling.qalora import MATMUL_NBITS_BITS, GroupQuantized, matmul_nbits_initializers

MS_DOMAIN = "com.microsoft"


def lowbit_file(bits: int) -> str:
    return f"model.int{bits}.onnx"


def weight_key(array: np.ndarray) -> str:
    """A float weight's identity: its shape and the sha256 of its float32 bytes."""
    return f"{array.shape}:{hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()}"


def _match_layers(initializers: dict[str, np.ndarray], layers: dict[str, GroupQuantized]) -> dict[str, str]:
    """initializer name -> layer name. The exporter folds each linear weight into a transposed
    initializer [K, N] under a generated name, so a layer is found by value: first by the exact bytes
    of its dequantized weight (a float32 merge), then, for a merge written at lower precision, as the
    one same-shaped initializer within that precision's rounding."""
    wanted = {name: q.dequantize(torch.float32).T.contiguous().numpy() for name, q in layers.items()}
    by_bytes = {weight_key(w): name for name, w in wanted.items()}
    found: dict[str, str] = {}
    for init_name, array in initializers.items():
        layer = by_bytes.get(weight_key(array)) if array.dtype == np.float32 else None
        if layer is not None:
            found[init_name] = layer
    missing = set(wanted) - set(found.values())
    for layer in sorted(missing):
        w = wanted[layer]
        scale = float(np.abs(w).max()) or 1.0
        close = [
            n
            for n, a in initializers.items()
            if n not in found and a.shape == w.shape and float(np.abs(a.astype(np.float32) - w).max()) <= 1e-2 * scale
        ]
        if len(close) == 1:
            found[close[0]] = layer
    return found


def matmul_nbits_nodes(a: str, y: str, init: dict[str, Any], prefix: str) -> tuple[list, list, tuple[int, int]]:
    """y = MatMulNBits(a) - (a @ pool) @ correction: the low-bit layer with integer zero points and
    the exact rest of its real-valued ones (modelling.qalora.matmul_nbits_initializers). Returns the
    nodes, the layer's initializers and the (K, block) of the pooling matrix it reads: one
    pool_initializer per (K, block), shared by the layers of that width and group size."""
    from onnx import helper, numpy_helper

    k, block = init["attributes"]["K"], init["attributes"]["block_size"]
    pool_name = _pool_name(k, block)
    names = {part: f"{prefix}.nbits.{part}" for part in ("B", "scales", "zero_points", "correction")}
    nodes = [
        helper.make_node(
            "MatMulNBits",
            [a, names["B"], names["scales"], names["zero_points"]],
            [f"{prefix}.nbits.out"],
            name=f"{prefix}.MatMulNBits",
            domain=MS_DOMAIN,
            **init["attributes"],
        ),
        helper.make_node("MatMul", [a, pool_name], [f"{prefix}.nbits.pooled"], name=f"{prefix}.pool"),
        helper.make_node(
            "MatMul", [f"{prefix}.nbits.pooled", names["correction"]], [f"{prefix}.nbits.rest"], name=f"{prefix}.rest"
        ),
        helper.make_node(
            "Sub", [f"{prefix}.nbits.out", f"{prefix}.nbits.rest"], [y], name=f"{prefix}.zero_point_rest"
        ),
    ]
    inits = [numpy_helper.from_array(init[part], name) for part, name in names.items()]
    return nodes, inits, (k, block)


def pool_initializer(k: int, block: int) -> Any:
    """The [K, K / block] matrix that sums each group of `block` inputs."""
    from onnx import numpy_helper

    pool = np.zeros((k, k // block), dtype=np.float32)
    pool[np.arange(k), np.arange(k) // block] = 1.0
    return numpy_helper.from_array(pool, _pool_name(k, block))


def _pool_name(k: int, block: int) -> str:
    return f"qalora.pool.{k}.{block}"


def write_matmul_nbits(src: Path, dst: Path, layers: dict[str, GroupQuantized]) -> dict[str, Any]:
    """Rewrite the float graph `src` into `dst` with MatMulNBits for every layer in `layers`.
    Raises ValueError naming the layers whose weight is not found in the graph."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) == 2}
    found = _match_layers(initializers, layers)
    unmatched = sorted(set(layers) - set(found.values()))
    if unmatched:
        raise ValueError(f"{len(unmatched)} quantized layers have no weight in {src.name}: {', '.join(unmatched[:5])}")
    nodes, new_inits, replaced, consumers = _replace_matmuls(graph, found, layers)
    if set(replaced) != set(layers):
        missing = sorted(set(layers) - set(replaced))
        raise ValueError(
            f"no MatMul reads the weight of {len(missing)} quantized layers in {src.name}: {', '.join(missing[:5])}"
        )
    kept = [t for t in graph.initializer if consumers.get(t.name, 1) > 0]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    external = _save(model, dst)
    q = next(iter(layers.values()))
    return {
        "file": dst.name,
        "op": f"{MS_DOMAIN}.MatMulNBits",
        "bits": q.bits,
        "stored_bits": MATMUL_NBITS_BITS[q.bits],
        "block_size": q.group_size,
        "layers": len(replaced),
        "external_data": external,
    }


def _replace_matmuls(
    graph: Any, found: dict[str, str], layers: dict[str, GroupQuantized]
) -> tuple[list, list, dict[str, int], dict[str, int]]:
    """The graph's nodes with each MatMul on a found weight replaced by its layer's MatMulNBits nodes: (nodes, the
    initializers they add, MatMuls replaced per layer, readers left per input name)."""
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_inits, nodes, replaced, pools = [], [], {}, set()
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight not in found:
            nodes.append(node)
            continue
        layer = found[weight]
        init = matmul_nbits_initializers(layers[layer])
        layer_nodes, layer_inits, pool = matmul_nbits_nodes(node.input[0], node.output[0], init, layer)
        nodes.extend(layer_nodes)
        new_inits.extend(layer_inits)
        if pool not in pools:
            pools.add(pool)
            new_inits.append(pool_initializer(*pool))
        replaced[layer] = replaced.get(layer, 0) + 1
        consumers[weight] -= 1
    return nodes, new_inits, replaced, consumers


def _save(model: Any, dst: Path) -> bool:
    """The graph into `dst`, its weights in dst.data beside it when they are large; True when they are."""
    import onnx
    from onnx import numpy_helper

    size = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    external = size > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(
            model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data"
        )
    else:
        onnx.save_model(model, str(dst))
    return external

"""QA-LoRA's arithmetic: group-wise quantization, the pooled adapter, and the exact fold into the zero points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraline.modelling.qalora import (
    GroupQuantizedLinear,
    QALoraGroupLinear,
    fold_adapter,
    quantize_groupwise,
    register_with,
)


def _weight(out=48, n=256, seed=0):
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_weight_is_within_half_a_step_of_its_code(bits):
    w = _weight()
    q = quantize_groupwise(w, bits, 32)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    err = (q.dequantize() - w).abs().view(48, 8, 32)
    assert (err <= q.scales.unsqueeze(-1) / 2 + 1e-7).all()
    # a group's extremes are represented exactly (codes 0 and 2^bits - 1)
    assert torch.allclose(q.dequantize().view(48, 8, 32).amax(-1), w.view(48, 8, 32).amax(-1), atol=1e-6)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="qalora.bits must be one of"):
        quantize_groupwise(_weight(), 8, 32)
    with pytest.raises(ValueError, match="not a multiple of qalora.group_size 64"):
        quantize_groupwise(_weight(n=96), 4, 64)


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer
        self.norm = nn.LayerNorm(8)  # a model has some float parameter (peft places adapters by it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _qalora_layer(bits: int, group: int, bias: torch.Tensor | None, r: int = 8, alpha: int = 16):
    """One GroupQuantizedLinear in a module, with peft's QA-LoRA layer on it: (peft model, the layer)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"], use_qalora=True, qalora_group_size=group
    )
    register_with(config)
    model = get_peft_model(_One(GroupQuantizedLinear(quantize_groupwise(_weight(), bits, group), bias)), config)
    return model, model.base_model.model.proj


def _trained_layer(bits: int, group: int):
    bias = torch.randn(48) * 0.1
    model, layer = _qalora_layer(bits, group, bias)
    x = torch.randn(64, 256)
    # a change the pooled adapter can express: low rank, constant within each group of inputs
    shift = (torch.randn(48, 2) @ torch.randn(2, 256 // group)).repeat_interleave(group, dim=1) * 0.01
    base = layer.get_base_layer().quantized.dequantize()
    target = F.linear(x, base + shift, bias)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(60):
        loss = F.mse_loss(model(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first  # the pooled adapter learns it
    return model, layer, x, bias


def test_only_the_adapter_trains_and_a_fresh_layer_is_the_quantized_base():
    model, layer = _qalora_layer(4, 32, None, r=4, alpha=8)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.model.proj.lora_A.default.weight",
        "base_model.model.proj.lora_B.default.weight",
    }
    assert layer.lora_A["default"].weight.shape == (4, 256 // 32)  # A sees one feature per group
    x = torch.randn(5, 256)
    assert torch.equal(model(x), x @ layer.get_base_layer().quantized.dequantize().T)


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 64), (2, 128)])
def test_the_merge_folds_the_adapter_into_the_zero_points_exactly(bits, group):
    model, layer, x, bias = _trained_layer(bits, group)
    merged = fold_adapter(layer)
    base = layer.get_base_layer()
    assert torch.equal(merged.codes, base.qweight) and torch.equal(
        merged.scales, base.scales
    )  # the same low-bit model
    with torch.no_grad():
        want = model(x)
        got = F.linear(x, merged.dequantize(), bias)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item() + 1e-6
    # the update is constant within each group of input channels, as pooling makes it
    delta = (merged.dequantize() - base.quantized.dequantize()).view(48, 256 // group, group)
    assert (delta - delta[..., :1]).abs().max().item() < 1e-6
    assert delta.abs().max().item() > 1e-4  # and it is not nothing


@pytest.mark.parametrize("bits, stored", [(4, 4), (3, 4), (2, 2)])
def test_a_merged_layer_runs_in_onnxruntime_matmulnbits_as_it_does_in_torch(bits, stored):
    """MatMulNBits on the merged layer's own codes and the whole part of its zero points, plus the
    exact rest of them on the group-summed input, computes what torch does; 3-bit codes travel in
    4-bit blobs (onnxruntime has 2-, 4- and 8-bit kernels)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from loraline.export.lowbit import matmul_nbits_nodes, pool_initializer
    from loraline.modelling.qalora import matmul_nbits_initializers

    _, layer, x, _ = _trained_layer(bits, 32)
    merged = fold_adapter(layer)
    init = matmul_nbits_initializers(merged)
    assert init["attributes"]["bits"] == stored
    assert init["zero_points"].dtype == np.uint8 and init["zero_points"].nbytes == 48 * (256 // 32) * stored // 8
    assert np.abs(init["correction"]).max() > 0  # the folded zero points are not whole numbers
    nodes, inits, pool = matmul_nbits_nodes("x", "y", init, "layer")
    graph = helper.make_graph(
        nodes,
        "qalora",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])],
        initializer=[*inits, pool_initializer(*pool)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    want = x @ merged.dequantize().T
    assert np.abs(y - want.numpy()).max() < 1e-5 * float(want.abs().max())
    assert init["B"].nbytes == 48 * 256 * stored // 8


def test_low_bit_layers_round_trip_through_their_file_and_another_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    from loraline.modelling.qalora import load_quantized_layers, save_quantized_layers

    layers = {"a.proj": quantize_groupwise(_weight(), 3, 64), "b.proj": quantize_groupwise(_weight() * 2, 3, 64)}
    save_quantized_layers(layers, tmp_path / "q.safetensors")
    back = load_quantized_layers(tmp_path / "q.safetensors")
    assert set(back) == set(layers)
    for name, q in layers.items():
        assert (back[name].bits, back[name].group_size) == (3, 64)
        assert torch.equal(back[name].dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="one bit width and group size per model"):
        save_quantized_layers({**layers, "c": quantize_groupwise(_weight(), 4, 64)}, tmp_path / "mixed.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors is not a loraline-qalora-groupwise-v1 file"):
        load_quantized_layers(tmp_path / "other.safetensors")


def test_a_whole_model_trains_with_qalora_and_merges_to_the_same_logits():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraline.modelling.qalora import merge_qalora, quantize_linears

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    names = quantize_linears(model, bits=4, group_size=32)
    assert len(names) == 2 * 7 and "lm_head" not in names  # q, k, v, o, gate, up, down per layer
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=names, use_qalora=True, qalora_group_size=32)
    register_with(lora)
    peft_model = get_peft_model(model, lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names)
    ids = torch.randint(0, 128, (4, 16))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = peft_model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.1
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        assert merge_qalora(peft_model) == len(names)
        after = peft_model.base_model.model(input_ids=ids).logits
    assert sum(isinstance(m, GroupQuantizedLinear) for m in model.modules()) == len(names)
    assert not any(isinstance(m, QALoraGroupLinear) for m in model.modules())
    assert (after - before).abs().max().item() < 1e-4
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_a_group_size_that_does_not_divide_a_layer_is_refused_by_name():
    from loraline.modelling.qalora import quantize_linears

    with pytest.raises(ValueError, match="does not divide the input width 48 of layer proj"):
        quantize_linears(_One(nn.Linear(48, 8)), bits=4, group_size=32)


def test_the_matmulnbits_rewrite_finds_layers_by_their_weights_and_refuses_a_missing_one(tmp_path):
    """export.lowbit: the exporter names folded weights arbitrarily, so layers are found by value;
    a layer whose weight is not in the graph is refused by name, not silently left in float."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from loraline.export.lowbit import write_matmul_nbits

    q = quantize_groupwise(_weight(), 4, 32)
    w_t = q.dequantize().T.contiguous().numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "val_7"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])],
        initializer=[numpy_helper.from_array(w_t, "val_7")],
    )
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "model.onnx")
    )
    facts = write_matmul_nbits(tmp_path / "model.onnx", tmp_path / "model.int4.onnx", {"layers.0.proj": q})
    assert facts["layers"] == 1 and facts["bits"] == 4
    low = onnx.load(str(tmp_path / "model.int4.onnx"))
    assert [n.op_type for n in low.graph.node] == ["MatMulNBits", "MatMul", "MatMul", "Sub"]
    assert not [t for t in low.graph.initializer if t.name == "val_7"]
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "model.int4.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    assert np.abs(y - x @ w_t).max() < 1e-5
    other = quantize_groupwise(_weight(seed=1), 4, 32)
    with pytest.raises(ValueError, match="1 quantized layers have no weight in model.onnx: layers.1.proj"):
        write_matmul_nbits(tmp_path / "model.onnx", tmp_path / "x.onnx", {"layers.0.proj": q, "layers.1.proj": other})

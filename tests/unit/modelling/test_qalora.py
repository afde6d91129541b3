"""QA-LoRA's arithmetic: group-wise quantization, the pooled adapter, and the exact fold into the zero points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraline.modelling.qalora import QALoRALinear, quantize_groupwise


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


def _trained_layer(bits: int, group: int) -> tuple[QALoRALinear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w, bias = _weight(), torch.randn(48) * 0.1
    layer = QALoRALinear(quantize_groupwise(w, bits, group), bias, r=8, alpha=16)
    x = torch.randn(64, 256)
    # a change the pooled adapter can express: low rank, constant within each group of inputs
    shift = (torch.randn(48, 2) @ torch.randn(2, 256 // group)).repeat_interleave(group, dim=1) * 0.01
    target = F.linear(x, layer.quantized.dequantize() + shift, bias)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(60):
        loss = F.mse_loss(layer(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first  # the pooled adapter learns it
    return layer, x, bias


def test_only_the_adapter_trains_and_a_fresh_layer_is_the_quantized_base():
    layer = QALoRALinear(quantize_groupwise(_weight(), 4, 32), None, r=4, alpha=8)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (4, 256 // 32)  # A sees one feature per group
    x = torch.randn(5, 256)
    assert torch.equal(layer(x), x @ layer.quantized.dequantize().T)


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 64), (2, 128)])
def test_the_merge_folds_the_adapter_into_the_zero_points_exactly(bits, group):
    layer, x, bias = _trained_layer(bits, group)
    merged = layer.merged()
    assert torch.equal(merged.codes, layer.codes) and torch.equal(merged.scales, layer.scales)  # still the same low-bit model
    with torch.no_grad():
        want = layer(x)
        got = F.linear(x, merged.dequantize(), bias)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item() + 1e-6
    # the update is constant within each group of input channels, as pooling makes it
    delta = (merged.dequantize() - layer.quantized.dequantize()).view(48, 256 // group, group)
    assert (delta - delta[..., :1]).abs().max().item() < 1e-6
    assert delta.abs().max().item() > 1e-4  # and it is not nothing


def test_a_merged_4bit_layer_runs_in_onnxruntime_matmulnbits_as_it_does_in_torch():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from loraline.modelling.qalora import matmul_nbits_initializers

    layer, x, _ = _trained_layer(4, 32)
    merged = layer.merged()
    init = matmul_nbits_initializers(merged)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zero_points"], ["y"], domain="com.microsoft", **init["attributes"])
    graph = helper.make_graph(
        [node], "qalora", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])],
        initializer=[numpy_helper.from_array(init[k], k) for k in ("B", "scales", "zero_points")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    want = x @ merged.dequantize().T
    assert np.abs(y - want.numpy()).max() < 1e-5 * float(want.abs().max())
    assert init["B"].nbytes == 48 * 256 // 2  # 4 bits a weight
    with pytest.raises(ValueError, match="takes 4-bit weights"):
        matmul_nbits_initializers(quantize_groupwise(_weight(), 3, 32))


def test_a_whole_model_trains_with_qalora_and_merges_to_the_same_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraline.modelling.qalora import GroupQuantizedLinear, apply_qalora, merge_qalora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    names = apply_qalora(model, bits=4, group_size=32, r=4, alpha=8)
    assert len(names) == 2 * 7 and "lm_head" not in names  # q, k, v, o, gate, up, down per layer
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names)
    ids = torch.randint(0, 128, (4, 16))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.1
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert merge_qalora(model) == len(names)
        after = model(input_ids=ids).logits
    assert not any(p.requires_grad for p in model.parameters())
    assert sum(isinstance(m, GroupQuantizedLinear) for m in model.modules()) == len(names)
    assert (after - before).abs().max().item() < 1e-4
    assert torch.equal(after.argmax(-1), before.argmax(-1))

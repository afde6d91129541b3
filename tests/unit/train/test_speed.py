"""The speed options change how the loss is computed, never what it is: exactness on CPU (fp32)."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_train

from loraline.modelling.constants import IGNORE_INDEX
from loraline.records import Speed
from loraline.train import speed, train_adapter
from loraline.train.data import load_splits
from loraline.train.model import attach_lora, load_base_model
from loraline.train.packing import collate
from loraline.train.speed import chunked_linear_cross_entropy, segments_from_positions

CPU = torch.device("cpu")


@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_cross_entropy_equals_plain_loss_and_gradients(weight_grad):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    weight = torch.randn(300, 16, generator=g).mul_(0.5).requires_grad_(weight_grad)
    targets = torch.randint(0, 300, (2, 37), generator=g)
    targets[0, :5] = IGNORE_INDEX
    targets[1, -3:] = IGNORE_INDEX

    logits = hidden @ weight.t()
    keep = targets != IGNORE_INDEX
    plain = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    (plain / 7).backward()
    plain_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if weight_grad else [])
    hidden.grad = weight.grad = None

    fused = chunked_linear_cross_entropy(hidden, weight, targets, chunk=8)  # 8 does not divide 66 targets
    (fused / 7).backward()
    fused_grads = [hidden.grad] + ([weight.grad] if weight_grad else [])
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for a, b in zip(plain_grads, fused_grads):
        assert (a - b).abs().max().item() < 1e-5 * max(a.abs().max().item(), 1.0)
    with torch.no_grad():  # evaluation: the same value, no gradient work
        assert chunked_linear_cross_entropy(hidden, weight, targets, chunk=8).item() == pytest.approx(
            plain.item(), rel=1e-6
        )


def test_collated_segments_match_the_position_ids(setup):
    examples = load_splits(setup.dataset_dir).train[:7]
    batch = collate([examples[:4], examples[4:6], examples[6:]], pad_id=0, packed=True)
    cu, longest = segments_from_positions(batch.position_ids)
    assert cu.tolist() == batch.cu_seqlens.tolist() and longest == batch.max_seqlen
    assert cu[-1].item() == batch.input_ids.numel()


def test_varlen_attention_gives_the_same_logits_as_the_block_diagonal_mask(setup, monkeypatch):
    """The plumbing (segments, layouts, GQA, transformers' attention interface) checked on CPU, where
    causal_varlen runs SDPA run by run in place of flash varlen (test_cuda checks the kernel)."""
    examples = load_splits(setup.dataset_dir).train[:6]
    params = tiny_train(lora_dropout=0.0)
    model = attach_lora(params, load_base_model(params, setup.base_dir, CPU)).eval()
    batch = collate([examples[:4], examples[4:]], pad_id=0, packed=True)
    with torch.no_grad():
        masked = model(**batch.model_inputs(), use_cache=False).logits
        assert speed.use_varlen_attention(model)
        varlen = model(**batch.model_inputs(varlen=True), use_cache=False).logits
        derived = model(**batch.model_inputs(), use_cache=False).logits  # segments from position_ids
        flat = collate([examples[:4], examples[4:]], pad_id=0, packed=True, flat=True)  # one row, no pads
        flat_logits = model(**flat.model_inputs(varlen=True), use_cache=False).logits
    keep = batch.targets != IGNORE_INDEX  # the pad segment's outputs are never used
    assert (masked[keep] - varlen[keep]).abs().max().item() < 1e-5
    assert (varlen - derived).abs().max().item() == 0.0
    assert flat.input_ids.shape[0] == 1 and flat.n_tokens == flat.input_ids.numel() == batch.n_tokens
    assert (flat_logits[flat.targets != IGNORE_INDEX] - masked[keep]).abs().max().item() < 1e-5


def test_fused_head_only_for_a_plain_linear_head(setup):
    from loraline.train.speed import fused_head

    plain = tiny_train()
    model = attach_lora(plain, load_base_model(plain, setup.base_dir, CPU))
    decoder, head = fused_head(model)
    assert head is model.get_base_model().lm_head and decoder is model.get_base_model().model
    biased = attach_lora(plain, load_base_model(plain, setup.base_dir, CPU))
    biased.get_base_model().lm_head.bias = torch.nn.Parameter(
        torch.zeros(biased.get_base_model().lm_head.out_features)
    )
    assert fused_head(biased) is None  # a head with a bias keeps the plain path


@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens"]])
def test_fused_loss_reads_the_trained_head_copy_and_the_base_head_when_disabled(setup, saved):
    """modules_to_save on the head (directly, or through tied embeddings) wraps it in peft's copy: the
    fused loss must read the copy while the adapter is on and the base's head when it is off."""
    from loraline.train.loop import loss_sum
    from loraline.train.speed import fused_head

    params = tiny_train(modules_to_save=saved, lora_dropout=0.0)
    model = attach_lora(params, load_base_model(params, setup.base_dir, CPU)).eval()
    fused = fused_head(model)
    assert fused is not None
    with torch.no_grad():  # as if trained: the copy differs from the base's head
        model.get_base_model().get_output_embeddings().weight.add_(0.05)
    batch = collate([load_splits(setup.dataset_dir).train[:3]], pad_id=0, packed=True)
    with torch.no_grad():
        on = (loss_sum(model, batch, CPU, fused=fused).item(), loss_sum(model, batch, CPU).item())
        with model.disable_adapter():
            off = (loss_sum(model, batch, CPU, fused=fused).item(), loss_sum(model, batch, CPU).item())
    assert on[0] == pytest.approx(on[1], rel=1e-5) and off[0] == pytest.approx(off[1], rel=1e-5)
    assert abs(on[1] - off[1]) > 1e-3 * off[1]  # the copy really is another head


def _curve(res):
    return [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(res.train_curve.open())]


def test_training_with_the_speed_options_on_matches_training_with_them_off(setup, tmp_path):
    """Loss agreement: the same 8 steps (grad_accum 2) with per-example attention, fused
    cross-entropy and selective checkpointing on, and with every option off; tolerance 1e-5 relative
    (fp32 CPU). Dropout is off: per-example attention lays each micro-batch out as one row, so
    dropout would draw its masks for another shape and the two runs would differ by design."""
    common = dict(max_steps=8, eval_every=4, save_every=100, lora_dropout=0.0)
    on = train_adapter(
        tiny_train(fused_cross_entropy=True, gradient_checkpointing=True, checkpoint_fraction=0.5, **common),
        out_dir=tmp_path / "on",
        **setup.kwargs(),
    )
    off = train_adapter(
        tiny_train(fused_cross_entropy=False, varlen_attention=False, gradient_checkpointing=False, **common),
        out_dir=tmp_path / "off",
        **setup.kwargs(),
    )
    assert on.record.speed == Speed(attention="loraline_varlen", fused_cross_entropy=True, checkpointed_layers=1)
    assert off.record.speed.attention == "sdpa"
    assert off.record.speed.fused_cross_entropy is False
    a, b = _curve(on), _curve(off)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    assert a[-1][1] < a[0][1]  # it learns
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5)
    assert on.record.loss.final_val == pytest.approx(off.record.loss.final_val, rel=1e-5)


@pytest.mark.cuda
def test_speed_options_on_cuda_learn_the_same_as_the_plain_path(setup, tmp_path):
    """On the GPU (bf16, NF4): varlen attention + fused cross-entropy + bf16 non-quantized weights
    against all three off, 30 steps, same data and seed: both learn, and the final validation
    losses agree within 5% (bf16 rounding differs between the paths and compounds over steps)."""
    common = dict(
        quantization="nf4",
        optimizer="paged_adamw_32bit",
        max_steps=30,
        learning_rate=2e-2,
        eval_every=10,
        save_every=100,
        lora_dropout=0.0,
    )
    on = train_adapter(tiny_train(**common), out_dir=tmp_path / "on", **setup.kwargs())
    off = train_adapter(
        tiny_train(fused_cross_entropy=False, varlen_attention=False, upcast_non_quantized=True, **common),
        out_dir=tmp_path / "off",
        **setup.kwargs(),
    )
    assert on.record.speed.attention == speed.VARLEN and on.record.speed.fused_cross_entropy
    assert off.record.speed.attention == "sdpa"
    a, b = on.record.loss, off.record.loss
    assert a.base_val == pytest.approx(b.base_val, rel=1e-2), (a, b)
    assert a.final_val < 0.9 * a.base_val and b.final_val < 0.9 * b.base_val, (a, b)
    assert a.final_val == pytest.approx(b.final_val, rel=5e-2), (a, b)
    print("cuda loss agreement", a, b)

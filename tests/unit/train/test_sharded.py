"""Sharded base weights (train.sharding: fsdp): real torchrun processes, FSDP2 over gloo, on CPU."""

from __future__ import annotations

import pytest
import torch
from train_helpers import adapter_tensors, tiny_train, train_losses

from loraline.config import TrainParams
from loraline.train.errors import TrainError
from loraline.train.stage import train_adapter

# As in test_distributed: two ranks add partial sums in another order than one process does.
LOSS_TOL = 1e-5


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_two_processes_sharding_the_base_train_what_one_process_does(setup, tmp_path, cpu_ranks, quantization):
    common = dict(lora_dropout=0.0, quantization=quantization)
    one = train_adapter(tiny_train(batch_size=4, **common), out_dir=tmp_path / "one", **setup.kwargs())
    two = train_adapter(
        tiny_train(batch_size=2, devices=2, sharding="fsdp", **common), out_dir=tmp_path / "two", **setup.kwargs()
    )

    assert two.record.params["sharding"] == "fsdp" and two.record.devices == 2
    facts = two.record.sharding
    assert facts.sharded_layers == 2  # the tiny base's two decoder layers
    # each rank holds half of every layer's frozen weights (up to FSDP's padding of a shard)
    assert facts.layer_bytes > 0 and abs(facts.layer_bytes_held - facts.layer_bytes / 2) <= 64 * 2, facts
    assert two.record.tokens_seen == one.record.tokens_seen
    a, b = train_losses(one.train_curve), train_losses(two.train_curve)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL, (a, b)
    assert abs(one.record.loss.base_val - two.record.loss.base_val) < 1e-5
    ta, tb = adapter_tensors(one.out_dir), adapter_tensors(two.out_dir)
    assert ta.keys() == tb.keys()
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5
    assert (a[0] - a[-1]) > 0.1


def test_one_process_loading_layer_by_layer_trains_what_transformers_loading_does(setup, tmp_path):
    """train.sharding fsdp on one device: the layer-by-layer loader (a world of one) against
    from_pretrained; the same weights and LoRA init give the same adapter, up to float sums."""
    plain = train_adapter(tiny_train(max_steps=4), out_dir=tmp_path / "plain", **setup.kwargs())
    streamed = train_adapter(tiny_train(max_steps=4, sharding="fsdp"), out_dir=tmp_path / "streamed", **setup.kwargs())
    assert streamed.record.sharding.sharded_layers == 2
    a, b = train_losses(plain.train_curve), train_losses(streamed.train_curve)
    assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL, (a, b)


def test_a_checkpoint_missing_a_tensor_is_refused_by_name(setup, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(setup.base_dir, base)
    weights = load_file(base / "model.safetensors")
    dropped = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    save_file(
        {k: v for k, v in weights.items() if k != dropped}, base / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(TrainError, match=rf"lacks 1 tensor\(s\) the model needs, e.g. {dropped}"):
        train_adapter(tiny_train(sharding="fsdp"), out_dir=tmp_path / "out", **(setup.kwargs() | {"base_dir": base}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(use_dora=True), "does not support use_dora"),
        (dict(upcast_non_quantized=True), "set upcast_non_quantized: false"),
    ],
)
def test_settings_sharding_cannot_honour_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainParams(sharding="fsdp", **bad)


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.cuda
@two_gpus
def test_qlora_with_the_base_sharded_over_two_gpus_trains_what_one_gpu_does(setup, tmp_path):
    """NF4 + paged AdamW, FSDP2 over NCCL, against one GPU holding the whole base: the bound is
    bf16's, as for the unsharded two-GPU test; a checkpoint written sharded resumes sharded."""
    common = dict(
        quantization="nf4", optimizer="paged_adamw_32bit", lora_dropout=0.0, max_steps=20, learning_rate=1e-2
    )
    one = train_adapter(tiny_train(batch_size=4, **common), out_dir=tmp_path / "one", **setup.kwargs())
    params = tiny_train(batch_size=2, devices=2, sharding="fsdp", **common)
    two = train_adapter(params, out_dir=tmp_path / "two", checkpoint_dir=tmp_path / "ck", **setup.kwargs())
    assert two.record.device.startswith("cuda") and two.record.sharding.sharded_layers == 2
    a, b = train_losses(one.train_curve), train_losses(two.train_curve)
    assert max(abs(x - y) / max(abs(x), 1e-3) for x, y in zip(a, b)) < 0.05, (a, b)
    assert b[-1] < 0.8 * b[0]
    again = train_adapter(params, out_dir=tmp_path / "again", checkpoint_dir=tmp_path / "ck", **setup.kwargs())
    assert again.timing["resumed_from_step"] is not None
    n = again.timing["resumed_from_step"]
    assert train_losses(again.train_curve)[:n] == b[:n]

"""Trained embeddings on a base that ties them to the output head (the default base does) stay tied."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from train_helpers import tiny_train

from loraline.config import TrainParams
from loraline.merge.stage import merge_adapter
from loraline.train import train_adapter
from loraline.train.model import load_base_model, trains_tied_embeddings

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("saved", "tied"),
    [([], False), (["embed_tokens"], True), (["lm_head"], True), (["model.embed_tokens"], True), (["norm"], False)],
)
def test_which_settings_train_the_tied_matrix(setup, saved, tied):
    model = load_base_model(tiny_train(), setup.base_dir, CPU)
    assert model.config.tie_word_embeddings
    assert trains_tied_embeddings(TrainParams(modules_to_save=saved), model) is tied


def test_untied_base_keeps_peft_default(setup):
    model = load_base_model(tiny_train(), setup.base_dir, CPU)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert not trains_tied_embeddings(TrainParams(modules_to_save=["embed_tokens"]), model)


def test_trained_embeddings_serve_as_the_head_and_merge_into_a_tied_model(setup, tmp_path):
    res = train_adapter(tiny_train(modules_to_save=["embed_tokens"], max_steps=3), out_dir=tmp_path / "a", **setup.kwargs())
    assert json.loads(res.adapter_config.read_text())["ensure_weight_tying"] is True
    with safe_open(res.out_dir / "adapter_model.safetensors", "pt") as f:
        embed = f.get_tensor("base_model.model.model.embed_tokens.weight")
        head = f.get_tensor("base_model.model.lm_head.weight")
    base = load_base_model(tiny_train(), setup.base_dir, CPU)
    assert torch.equal(embed, head)  # one trained matrix, both roles
    assert not torch.equal(embed, base.get_input_embeddings().weight)  # and it was trained

    merged = merge_adapter(base_dir=setup.base_dir, base_params=setup.base_params, adapter_dir=res.out_dir,
                           out_dir=tmp_path / "m", quantized_reference=False)
    assert merged.passed and merged.report["reload"]["max_abs_logit_diff"] < 1e-5
    config = json.loads((merged.out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(merged.out_dir / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), embed)
        assert "lm_head.weight" not in f.keys()  # stored once, as the base stores it

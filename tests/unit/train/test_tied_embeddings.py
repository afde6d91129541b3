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
    res = train_adapter(
        tiny_train(modules_to_save=["embed_tokens"], max_steps=3), out_dir=tmp_path / "a", **setup.kwargs()
    )
    assert json.loads(res.adapter_config.read_text())["ensure_weight_tying"] is True
    with safe_open(res.out_dir / "adapter_model.safetensors", "pt") as f:
        embed = f.get_tensor("base_model.model.model.embed_tokens.weight")
        head = f.get_tensor("base_model.model.lm_head.weight")
    base = load_base_model(tiny_train(), setup.base_dir, CPU)
    assert torch.equal(embed, head)  # one trained matrix, both roles
    assert not torch.equal(embed, base.get_input_embeddings().weight)  # and it was trained

    merged = merge_adapter(
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        adapter_dir=res.out_dir,
        out_dir=tmp_path / "m",
        quantized_reference=False,
    )
    assert merged.passed and merged.report.reload.max_abs_logit_diff < 1e-5
    config = json.loads((merged.out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(merged.out_dir / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), embed)
        assert "lm_head.weight" not in f.keys()  # stored once, as the base stores it


def test_trained_embeddings_and_norms_load_in_stock_peft_and_merge(setup, tmp_path):
    """LongLoRA's trainables (embeddings and every RMSNorm beside the LoRA matrices) go through the
    stage in peft's own format: stock PeftModel.from_pretrained reproduces the adapter, and the merge
    folds the trained norms into the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "model.norm"]
    res = train_adapter(
        tiny_train(modules_to_save=saved, max_steps=3, learning_rate=2e-2), out_dir=tmp_path / "a", **setup.kwargs()
    )
    with safe_open(res.out_dir / "adapter_model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    norms = {k: v for k, v in stored.items() if k.endswith("norm.weight")}
    base = AutoModelForCausalLM.from_pretrained(setup.base_dir)
    n_layers = base.config.num_hidden_layers
    assert len(norms) == 2 * n_layers + 1, sorted(norms)  # two per decoder layer, and the final one
    assert all(not torch.equal(v, torch.ones_like(v)) for v in norms.values())  # trained away from their init

    ids = torch.tensor([[5, 17, 42, 9, 33, 7]])
    stock = PeftModel.from_pretrained(base, res.out_dir).eval()
    with torch.no_grad():
        ours = stock(input_ids=ids).logits
    merged = merge_adapter(
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        adapter_dir=res.out_dir,
        out_dir=tmp_path / "m",
        quantized_reference=False,
    )
    assert merged.passed, merged.report
    folded = AutoModelForCausalLM.from_pretrained(merged.out_dir).eval()
    with torch.no_grad():
        assert torch.allclose(folded(input_ids=ids).logits, ours, atol=1e-4)
    final = next(v for k, v in norms.items() if k.endswith("model.norm.weight"))
    assert torch.equal(folded.model.norm.weight, final)

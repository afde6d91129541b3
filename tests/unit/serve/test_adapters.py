"""Trained embeddings re-expressed as LoRA for vLLM: the same function, LoRA-only files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraline.serve.adapters import VLLM_RANKS, ServeAdapterError, check_same_function, make_servable

RECORDS = Path(__file__).resolve().parents[2] / "data" / "records"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("base") / "base"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _adapter(base_dir, out, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **lora),
    )
    with torch.no_grad():  # a "trained" adapter: B away from zero, embeddings moved
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


# The served form gives embed_tokens and lm_head LoRA deltas of their own (ensure_weight_tying off on purpose,
# serve/adapters.py); loading it back through peft to compare functions makes peft warn about the tied base.
_SERVED_FORM_ON_A_TIED_BASE = pytest.mark.filterwarnings(
    "ignore:Model has `tie_word_embeddings=True` and a tied layer is part of the adapter:UserWarning:peft"
)


@_SERVED_FORM_ON_A_TIED_BASE
def test_trained_tied_embeddings_become_lora_with_the_same_function(base_dir, tmp_path):
    original = _adapter(base_dir, tmp_path / "orig", modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    served = make_servable(original, base_dir, tmp_path / "served")
    assert served.converted and served.modules == ["lm_head", "model.embed_tokens"]
    assert served.rank in VLLM_RANKS and served.rank >= 32  # the delta of a 96 x 32 matrix: rank 32
    config = json.loads((served.path / "adapter_config.json").read_text())
    assert not config["modules_to_save"] and config["r"] == served.rank
    assert {"embed_tokens", "lm_head", "q_proj"} <= set(config["target_modules"])
    from safetensors.torch import load_file

    assert all(".lora_" in k for k in load_file(served.path / "adapter_model.safetensors"))  # LoRA only
    diff = check_same_function(base_dir, original, served.path, list(range(1, 40)))
    assert diff < 1e-4, diff


def test_an_untied_trained_head_is_measured_against_its_own_base_weight(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    base = tmp_path / "untied"
    LlamaForCausalLM(cfg).save_pretrained(base)
    original = _adapter(base, tmp_path / "orig", modules_to_save=["lm_head"])
    served = make_servable(original, base, tmp_path / "served")
    assert served.modules == ["lm_head"]
    assert check_same_function(base, original, served.path, list(range(1, 30))) < 1e-4


def test_a_lora_only_adapter_is_served_as_it_is(base_dir, tmp_path):
    original = _adapter(base_dir, tmp_path / "orig")
    served = make_servable(original, base_dir, tmp_path / "served")
    assert not served.converted and served.rank == 8  # r=4 rounds up to vLLM's smallest rank
    assert (served.path / "adapter_model.safetensors").read_bytes() == (
        original / "adapter_model.safetensors"
    ).read_bytes()


def test_other_trained_modules_are_refused_by_name(base_dir, tmp_path):
    original = _adapter(base_dir, tmp_path / "orig", modules_to_save=["norm"])
    with pytest.raises(
        ServeAdapterError,
        match=r"orig: trained module model\.layers\.0\.input_layernorm is neither the embedding nor the head",
    ):
        make_servable(original, base_dir, tmp_path / "served")
    assert not (tmp_path / "served").exists()


def test_a_long_context_adapter_is_refused_with_what_to_do_instead(base_dir, tmp_path):
    original = _adapter(base_dir, tmp_path / "orig")  # LoRA-only files: only the record says long context
    record = json.loads((RECORDS / "train_lora.json").read_text())  # a real train record, made long-context
    record["long_context"] = {
        "original_context": 64,
        "target_len": 256,
        "rope_scaling": "linear",
        "s2_attn": True,
        "group_size": 64,
        "trainable": ["embed", "norm"],
        "config_overrides": {"rope_parameters": {"factor": 4.0, "original_max_position_embeddings": 64}},
    }
    (original / "train_record.json").write_text(json.dumps(record))
    with pytest.raises(ServeAdapterError, match=r"long-context adapter .*64 -> 256 tokens.*serve its merged model"):
        make_servable(original, base_dir, tmp_path / "served")
    assert not (tmp_path / "served").exists()


@_SERVED_FORM_ON_A_TIED_BASE
def test_a_qalora_adapter_becomes_plain_lora_computing_the_same_update(tmp_path):
    """The pooled A re-expressed per input channel: on the base QA-LoRA trained on (the dequantized
    low-bit weights) the plain adapter gives the QA-LoRA model's logits; on the float base it is the
    same update on the unquantized weights."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from loraline.modelling.qalora import dequantize_linears, load_qalora_adapter, quantize_linears, register_with

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    names = quantize_linears(model, bits=4, group_size=32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=names,
        use_qalora=True,
        qalora_group_size=32,
        modules_to_save=["embed_tokens"],
        ensure_weight_tying=True,
    )
    register_with(lora)
    trained = get_peft_model(model, lora)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trained.save_pretrained(tmp_path / "qalora")

    served = make_servable(tmp_path / "qalora", tmp_path / "base", tmp_path / "served")
    config = json.loads((served.path / "adapter_config.json").read_text())
    assert served.converted and not config["use_qalora"] and served.modules == ["lm_head", "model.embed_tokens"]

    ids = torch.randint(1, 96, (1, 24))
    with torch.no_grad():
        qalora = load_qalora_adapter(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
            tmp_path / "qalora",
            bits=4,
            group_size=32,
        ).eval()
        want = qalora(input_ids=ids).logits
        low_bit = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        quantize_linears(low_bit, bits=4, group_size=32)
        dequantize_linears(low_bit)
        got = PeftModel.from_pretrained(low_bit, str(served.path)).eval()(input_ids=ids).logits
        with qalora.disable_adapter():
            untrained = qalora(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (want - untrained).abs().max().item() > 1e-2  # the adapter does something

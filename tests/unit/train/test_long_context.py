"""train.long_context (LongLoRA): validated params, rope scaling on the base, S2-Attn in training,
trainable embeddings and norms, and a merge whose config carries the extended context."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from train_helpers import tiny_train, write_general_sample

from loraline.config import LongContextParams, Params, TrainParams
from loraline.merge.stage import merge_adapter
from loraline.modelling.loading import load_base_causal_lm, load_base_config
from loraline.modelling.long_context import rope_overrides, trainable_module_names
from loraline.modelling.s2attn import S2_ATTN
from loraline.train import train_adapter
from loraline.train.errors import TrainError


def long_train(**lc) -> TrainParams:
    fields = {"target_len": 512, **lc}
    return tiny_train(
        max_seq_len=fields["target_len"],
        max_steps=3,
        batch_size=2,
        grad_accum=1,
        learning_rate=2e-2,
        long_context=fields,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_len": 1000, "group_ratio": 0.3}, "does not divide target_len 1000"),
        ({"target_len": 96, "group_ratio": 0.25}, "greater than or equal to 128"),
        ({"target_len": 4096, "group_ratio": 1 / 3}, "does not divide"),
        ({"target_len": 4096, "rope_scaling": "ntk"}, "rope_scaling"),
        ({"target_len": 4096, "trainable": ["embed", "embed"]}, "twice"),
        ({"target_len": 4096, "trainable": ["head"]}, "trainable"),
        ({"target_len": 4096, "s2_attn": False, "reference": True}, "itself trains with full attention"),
    ],
)
def test_bad_long_context_params_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        LongContextParams(**fields)


def test_max_seq_len_must_reach_the_target():
    with pytest.raises(ValueError, match="set max_seq_len to at least target_len"):
        TrainParams(max_seq_len=1024, long_context={"target_len": 4096})
    assert TrainParams(max_seq_len=4096, long_context={"target_len": 4096}).long_context.group_size == 1024


def test_a_tenants_long_context_raises_its_too_long_limit():
    params = Params.model_validate(
        {
            "tenants": {
                "long": {
                    "raw_dir": "data/raw/long",
                    "train": {"max_seq_len": 4096, "long_context": {"target_len": 4096}},
                },
                "short": {"raw_dir": "data/raw/short"},
            }
        }
    )
    assert params.prepare_for("long").max_tokens == 4096
    assert params.prepare_for("short").max_tokens == params.prepare.max_tokens


def test_rope_overrides_refuse_a_target_within_the_base_context(setup):
    config = load_base_config(setup.base_dir)
    assert config.max_position_embeddings == 256
    with pytest.raises(ValueError, match=r"target_len \(256\) must be above the base's context \(256 tokens\)"):
        rope_overrides(config, LongContextParams(target_len=256))
    over = rope_overrides(config, LongContextParams(target_len=1024, rope_scaling="yarn"))
    assert over["max_position_embeddings"] == 1024
    assert over["rope_parameters"]["rope_type"] == "yarn" and over["rope_parameters"]["factor"] == 4.0
    assert over["rope_parameters"]["original_max_position_embeddings"] == 256


def test_a_base_without_rope_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="no rotary position embeddings"):
        rope_overrides(GPT2Config(), LongContextParams(target_len=4096))


def test_trainable_names_cover_the_embeddings_and_every_norm(setup):
    model = load_base_causal_lm(setup.base_dir, "cpu", torch.float32)
    names = trainable_module_names(model, ["embed", "norm"])
    layers = model.config.num_hidden_layers
    assert names[0] == "model.embed_tokens"
    assert len(names) == 1 + 2 * layers + 1 and "model.norm" in names
    assert trainable_module_names(model, ["embed"]) == ["model.embed_tokens"]
    from loraline.train.model import with_long_context_trainables

    params = tiny_train(max_seq_len=512, modules_to_save=["embed_tokens"], long_context={"target_len": 512})
    saved = with_long_context_trainables(params, model).modules_to_save
    assert saved[0] == "embed_tokens" and "model.embed_tokens" not in saved and len(saved) == 1 + 2 * layers + 1


@pytest.fixture(scope="module")
def long_run(setup, tmp_path_factory):
    """A long-context adapter on the tiny base (256 tokens extended to 512), and its merge."""
    tmp = tmp_path_factory.mktemp("long")
    torch.set_num_threads(1)
    res = train_adapter(long_train(), out_dir=tmp / "a", **setup.kwargs())
    merged = merge_adapter(
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        adapter_dir=res.out_dir,
        out_dir=tmp / "m",
        quantized_reference=False,
    )
    return res, merged


def test_train_a_long_context_adapter_and_merge_it_at_the_extended_length(setup, long_run):
    """The base (256 tokens) extended to 512: S2-Attn in training, embeddings and norms trained and
    saved in peft's format, and a merged model whose config carries the rope scaling, agreeing with
    the adapter on its scaled base at positions beyond the base's own context."""
    from peft import PeftModel

    res, merged = long_run
    lc = res.record.long_context
    assert lc.target_len == 512 and lc.original_context == 256 and lc.group_size == 128
    assert lc.config_overrides["rope_parameters"]["factor"] == 2.0
    assert res.record.speed.attention == S2_ATTN

    saved = json.loads(res.adapter_config.read_text())["modules_to_save"]
    assert "model.embed_tokens" in saved and "model.norm" in saved
    with safe_open(res.out_dir / "adapter_model.safetensors", "pt") as f:
        norms = [k for k in f.keys() if k.endswith("norm.weight")]
        assert len(norms) == 2 * 2 + 1  # two per decoder layer of the tiny base, and the final one
        assert not torch.equal(f.get_tensor("base_model.model.model.norm.weight"), torch.ones(64))

    assert merged.passed, merged.report
    config = json.loads((merged.out_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 512
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0

    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 400, (1, 480), generator=torch.Generator().manual_seed(0))
    scaled_base = load_base_causal_lm(setup.base_dir, "cpu", torch.float32, config_overrides=lc.config_overrides)
    adapter = PeftModel.from_pretrained(scaled_base, res.out_dir).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(merged.out_dir).eval()
    assert reloaded.config._attn_implementation != S2_ATTN  # inference attends in full
    with torch.no_grad():
        want, got = adapter(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert (want[0, 300:] - got[0, 300:]).abs().max() < 1e-3  # positions past the base's 256


def test_train_refuses_a_target_the_base_already_has(setup, tmp_path):
    with pytest.raises(TrainError, match="must be above the base's context"):
        train_adapter(long_train(target_len=256), out_dir=tmp_path / "a", **setup.kwargs())
    assert not (tmp_path / "a").exists()


def test_evaluate_reports_perplexity_by_length_and_passkey_for_a_long_context_candidate(setup, long_run, tmp_path):
    from loraline.evaluate.stage import LONG_CONTEXT, evaluate_tenant

    res, merged = long_run
    common = dict(
        tenant="t",
        dataset_dir=setup.dataset_dir,
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        production_dir=None,
        max_new_tokens=8,
        max_examples=40,
    )
    evaluate_tenant(candidate_dir=merged.out_dir, out_dir=tmp_path / "ev", **common)
    report = json.loads((tmp_path / "ev" / LONG_CONTEXT).read_text())
    assert report["original_context"] == 256 and report["extended_context"] == 512 and report["lengths"] == [256, 512]
    assert set(report["models"]) == {"base", "base_rope_scaled", "candidate"}
    for name, m in report["models"].items():
        assert set(m["perplexity"]) == {"256", "512"}, name
        assert m["perplexity"]["512"]["windows"] >= 1 and m["perplexity"]["512"]["perplexity"] > 1
        assert len(m["passkey"]["cells"]) == 2 * 3 and 0 <= m["passkey"]["by_length"]["512"] <= 1
    # rope scaling alone changes the base's predictions; the trained candidate changes them again
    ppl = {n: m["perplexity"]["512"]["perplexity"] for n, m in report["models"].items()}
    assert len(set(ppl.values())) == 3, ppl
    # the gate's metric: perplexity at the extended context, the base's taken with the rope scaling alone
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["models"]
    assert metrics["candidate"]["long_context_perplexity"] == ppl["candidate"]
    assert metrics["base"]["long_context_perplexity"] == ppl["base_rope_scaled"]
    # the same models give the same report
    evaluate_tenant(candidate_dir=merged.out_dir, out_dir=tmp_path / "ev2", **common)
    assert json.loads((tmp_path / "ev2" / LONG_CONTEXT).read_text()) == report


def test_a_candidate_of_the_base_context_gets_no_long_context_report(setup, tmp_path):
    from loraline.evaluate.stage import LONG_CONTEXT, evaluate_tenant

    res = train_adapter(tiny_train(max_steps=2), out_dir=tmp_path / "a", **setup.kwargs())
    merged = merge_adapter(
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        adapter_dir=res.out_dir,
        out_dir=tmp_path / "m",
        quantized_reference=False,
    )
    evaluate_tenant(
        tenant="t",
        dataset_dir=setup.dataset_dir,
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        candidate_dir=merged.out_dir,
        production_dir=None,
        out_dir=tmp_path / "ev",
        max_new_tokens=4,
        max_examples=5,
    )
    assert (tmp_path / "ev" / "metrics.json").is_file() and not (tmp_path / "ev" / LONG_CONTEXT).exists()


def test_passkey_prompt_hides_the_key_at_the_depth_asked():
    from loraline.evaluate.long_context import lengths_between, passkey_prompt

    assert lengths_between(1024, 4096) == [1024, 2048, 4096] and lengths_between(1000, 3000) == [1000, 2000, 3000]

    class Tok:  # one token per character: depths and lengths are exact to check
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    ids = passkey_prompt(Tok(), 600, 0.5, 12345)
    text = "".join(map(chr, ids))
    assert len(ids) == 600 and text.endswith("What is the pass key? The pass key is")
    at = text.index("The pass key is 12345")
    assert 250 < at < 300  # the middle of the filler


def test_the_onnx_export_keeps_parity_past_the_base_context(long_run, tmp_path):
    from loraline.export.build import export_onnx

    _, merged = long_run
    result = export_onnx(model_dir=merged.out_dir, out_dir=tmp_path / "onnx", max_new_tokens=8)
    probe = result.report.long_context_probe
    assert (probe.tokens, probe.original_context, probe.max_position_embeddings) == (256 + 64, 256, 512)
    long_entry = result.report.fp32.per_probe[-1]
    assert long_entry.max_abs_logit_diff < 1e-3 and long_entry.decode_max_abs_logit_diff < 1e-3
    assert long_entry.greedy_equal and result.report.passed


def test_a_full_attention_reference_is_trained_alike_and_reported_beside_the_candidate(setup, tmp_path):
    """train.long_context.reference through the train and evaluate stages: the same budget with full
    attention, in the adapter's folder, set beside the S2-Attn candidate on the same rope-scaled base.
    Groups of 32 tokens, so that the toy rows are longer than a group and S2-Attn differs from full attention."""
    import shutil

    from loraline.evaluate.stage import LONG_CONTEXT
    from loraline.evaluate.stage import run as evaluate_stage
    from loraline.layout import TRAIN_RECORD, Layout
    from loraline.modelling.long_context import FULL_ATTENTION_REFERENCE
    from loraline.records import TrainRecord
    from loraline.train.stage import run as train_stage
    from loraline.train.stage import train_full_attention_reference

    layout = Layout(tmp_path)
    shutil.copytree(setup.dataset_dir, layout.prepared_dataset_dir("t"))
    train = long_train(group_ratio=0.0625, reference=True)
    params = Params.model_validate(
        {
            "base": setup.base_params.model_dump(),
            "evaluate": {"max_new_tokens": 4, "max_examples": 20},
            "tenants": {"t": {"raw_dir": "data/raw/t", "train": train.model_dump(exclude_defaults=True)}},
        }
    )
    res = train_stage(params, layout, "t", base_dir=setup.base_dir, checkpoints=False)
    ref_dir = res.out_dir / FULL_ATTENTION_REFERENCE
    ref = TrainRecord.read(ref_dir / TRAIN_RECORD)
    assert ref.speed.attention != S2_ATTN and ref.long_context.s2_attn is False
    assert ref.steps == res.record.steps and ref.data == res.record.data and ref.seed == res.record.seed
    assert ref.config_overrides == res.record.config_overrides
    assert ref.loss.final_train != res.record.loss.final_train  # S2 groups did cut the rows
    metrics = json.loads(layout.metrics_path("train", "t").read_text())
    assert metrics["full_attention_reference_val_loss"] == ref.loss.final_val

    merge_adapter(
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        adapter_dir=res.out_dir,
        out_dir=layout.merged_dir("t"),
        quantized_reference=False,
    )
    write_general_sample(params, layout, setup.base_dir, "t")
    evaluate_stage(params, layout, "t", base_dir=setup.base_dir)
    report = json.loads((layout.evaluation_dir("t") / LONG_CONTEXT).read_text())
    assert set(report["models"]) == {"base", "base_rope_scaled", "candidate", "full_attention_reference"}
    ppl = {n: m["perplexity"]["512"]["perplexity"] for n, m in report["models"].items()}
    assert (
        ppl["full_attention_reference"] != ppl["candidate"]
        and ppl["full_attention_reference"] < ppl["base_rope_scaled"]
    )
    comparison = report["s2_attn_against_full_attention"]
    assert comparison["at"] == 512 and comparison["perplexity_ratio"] == pytest.approx(
        ppl["candidate"] / ppl["full_attention_reference"]
    )

    with pytest.raises(TrainError, match="only for an S2-Attn long-context adapter"):
        train_full_attention_reference(long_train(s2_attn=False), adapter_dir=tmp_path / "x", **setup.kwargs())

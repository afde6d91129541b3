"""train.method qalora: validated params, a group-quantized base with peft's pooled QA-LoRA layers,
an adapter in peft's format that folds into the base's zero points exactly, and the train stage's
guarantees (determinism, exact resume) kept."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_helpers import tiny_train, write_general_sample

from loraline.config import TrainParams
from loraline.train import train_adapter
from loraline.train.errors import TrainError


def qalora_train(**overrides) -> TrainParams:
    fields = dict(
        method="qalora",
        qalora={"bits": 4, "group_size": 32},
        lora_dropout=0.0,
        learning_rate=2e-2,
        max_steps=8,
        save_every=3,
        eval_every=4,
    )
    fields.update(overrides)
    return tiny_train(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "qalora", "use_dora": True}, "does not combine with use_dora"),
        ({"method": "qalora", "sharding": "fsdp", "devices": 2}, "not supported with sharding fsdp"),
        ({"method": "qalora", "qalora": {"bits": 8}}, "bits"),
        ({"method": "qalora", "qalora": {"group_size": 48}}, "group_size"),
        ({"method": "qlora"}, "method"),
    ],
)
def test_bad_qalora_params_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainParams(**fields)


@pytest.fixture(scope="module")
def qalora_run(setup, tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("qalora")
    return train_adapter(qalora_train(), out_dir=tmp / "a", checkpoint_dir=tmp / "ck", **setup.kwargs()), tmp


def _adapter_on_quantized_base(setup, adapter_dir):
    """What the merge does: the base quantized the same way, the adapter loaded by peft onto it."""
    from loraline.modelling.loading import load_base_causal_lm
    from loraline.modelling.qalora import load_qalora_adapter

    record = json.loads((adapter_dir / "train_record.json").read_text())["qalora"]
    model = load_base_causal_lm(setup.base_dir, "cpu", torch.float32)
    return load_qalora_adapter(model, adapter_dir, bits=record["bits"], group_size=record["group_size"]).eval()


def test_a_qalora_adapter_trains_on_the_quantized_base_and_is_a_peft_adapter(setup, qalora_run):
    res, _ = qalora_run
    facts = res.record.qalora
    assert facts.bits == 4 and facts.group_size == 32
    assert facts.quantized_layers == facts.adapted_layers == 2 * 7  # every linear layer but the head
    config = json.loads(res.adapter_config.read_text())
    assert config["use_qalora"] is True and config["qalora_group_size"] == 32 and config["peft_type"] == "LORA"
    from safetensors.torch import load_file

    tensors = load_file(res.adapter_weights)
    a = [t for k, t in tensors.items() if "lora_A" in k]
    assert a and all(t.shape[1] in (64 // 32, 128 // 32) for t in a)  # A sees one feature per group of inputs
    assert res.record.loss.final_val < res.record.loss.base_val  # it learnt


def test_the_adapter_folds_into_the_zero_points_exactly(setup, qalora_run):
    from loraline.modelling.qalora import GroupQuantizedLinear, QALoraGroupLinear, merge_qalora

    res, _ = qalora_run
    model = _adapter_on_quantized_base(setup, res.out_dir)
    ids = torch.randint(5, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert merge_qalora(model) == 14
        merged = model.base_model.model
        after = merged(input_ids=ids).logits
    assert not any(isinstance(m, QALoraGroupLinear) for m in merged.modules())
    assert sum(isinstance(m, GroupQuantizedLinear) for m in merged.modules()) == 14
    assert (after - before).abs().max().item() < 1e-4
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_qalora_training_is_deterministic_and_resumes_exactly(setup, qalora_run, tmp_path):
    res, tmp = qalora_run
    again = train_adapter(qalora_train(), out_dir=tmp_path / "again", **setup.kwargs())
    assert again.record.files == res.record.files  # the same bytes from the same inputs
    ck = tmp_path / "ck"
    shutil.copytree(tmp / "ck", ck)
    resumed = train_adapter(qalora_train(), out_dir=tmp_path / "resumed", checkpoint_dir=ck, **setup.kwargs())
    assert resumed.timing["resumed_from_step"] == 6
    assert resumed.record.files == res.record.files


def test_qalora_adapts_only_the_targets_and_quantizes_every_linear_layer(setup, tmp_path):
    res = train_adapter(
        qalora_train(target_modules=["q_proj", "v_proj"], max_steps=2), out_dir=tmp_path / "a", **setup.kwargs()
    )
    assert res.record.qalora.quantized_layers == 14 and res.record.qalora.adapted_layers == 4


def test_a_group_size_that_does_not_divide_a_layer_fails_naming_it(setup, tmp_path):
    with pytest.raises(
        TrainError, match="train.qalora: qalora.group_size 128 does not divide the input width 64 of layer"
    ):
        train_adapter(qalora_train(qalora={"bits": 4, "group_size": 128}), out_dir=tmp_path / "a", **setup.kwargs())
    assert not (tmp_path / "a").exists()


def test_the_merge_stage_folds_a_qalora_adapter_into_the_same_low_bit_model(setup, qalora_run, tmp_path):
    """merge: the adapter folded into the zero points of the base quantized as training saw it; the
    merged folder (dequantized, any loader reads it) agrees with the unmerged adapter, and its weights
    are still the base's codes and scales, with only the zero points moved."""
    from transformers import AutoModelForCausalLM

    from loraline.merge.stage import merge_adapter
    from loraline.modelling.loading import load_base_causal_lm
    from loraline.modelling.qalora import quantize_groupwise

    res, _ = qalora_run
    merged = merge_adapter(
        base_dir=setup.base_dir, base_params=setup.base_params, adapter_dir=res.out_dir, out_dir=tmp_path / "m"
    )
    report = merged.report
    assert merged.passed and report.qalora.bits == 4 and report.qalora.layers == 14
    assert report.merged_vs_unmerged.max_abs_logit_diff < 1e-4
    assert report.merged_vs_unmerged.greedy_agreement == 1.0
    assert report.adapter.quantization == "qalora" and report.vs_4bit.skipped
    assert report.reload.max_abs_logit_diff < 1e-5

    model = AutoModelForCausalLM.from_pretrained(merged.out_dir)
    base = load_base_causal_lm(setup.base_dir, "cpu", torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    w = dict(model.named_parameters())[name].detach()
    q = quantize_groupwise(dict(base.named_parameters())[name].detach(), 4, 32)
    offset = (w.view(w.shape[0], -1, 32) / q.scales.unsqueeze(-1)) - q.codes.view(w.shape[0], -1, 32).float()
    assert (offset - offset[..., :1]).abs().max().item() < 1e-3  # same codes and scales: one zero point per group
    assert not torch.allclose(offset[..., 0], -q.zeros, atol=1e-4)  # and the zero points did move


@pytest.fixture(scope="module")
def qalora_merged(setup, qalora_run, tmp_path_factory):
    from loraline.merge.stage import merge_adapter

    res, _ = qalora_run
    return merge_adapter(
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        adapter_dir=res.out_dir,
        out_dir=tmp_path_factory.mktemp("qalora-merged") / "m",
    )


def test_the_merged_folder_carries_the_low_bit_codes_its_float_weights_are_made_of(qalora_merged):
    from safetensors.torch import load_file

    from loraline.layout import QALORA_QUANTIZED
    from loraline.modelling.qalora import load_quantized_layers

    layers = load_quantized_layers(qalora_merged.out_dir / QALORA_QUANTIZED)
    assert len(layers) == 14 and {(q.bits, q.group_size) for q in layers.values()} == {(4, 32)}
    assert QALORA_QUANTIZED in qalora_merged.report.files
    weights = load_file(str(qalora_merged.out_dir / "model.safetensors"))
    for name, q in layers.items():
        assert int(q.codes.max()) <= 15
        assert torch.equal(weights[f"{name}.weight"], q.dequantize(torch.float32))  # float32 merge: bit for bit


def test_the_merge_writes_a_torchao_checkpoint_that_transformers_loads_bit_for_bit(qalora_merged):
    """<merged>/torchao: the low-bit model as safetensors that transformers' own loader reads (torchao's
    IntxUnpackedToInt8Tensor, float zero points): the loaded weights are the codes dequantized, exactly,
    and the model answers as the float32 merged folder does."""
    from safetensors import safe_open
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from transformers import AutoModelForCausalLM

    from loraline.layout import QALORA_QUANTIZED, QALORA_TORCHAO
    from loraline.modelling.qalora import load_quantized_layers

    facts = qalora_merged.report.qalora.torchao
    assert facts.passed and facts.max_abs_weight_diff == 0.0 and (facts.bits, facts.group_size) == (4, 32)
    assert facts.vs_unmerged.max_abs_logit_diff < 1e-4 and facts.vs_unmerged.greedy_agreement == 1.0
    folder = qalora_merged.out_dir / QALORA_TORCHAO
    assert not [f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]  # no pickles
    layers = load_quantized_layers(qalora_merged.out_dir / QALORA_QUANTIZED)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        codes = {k: f.get_tensor(k) for k in f.keys() if k.endswith("_weight_qdata")}
    assert len(codes) == len(layers) == 14 and all(
        c.dtype == torch.int8 and 0 <= c.min() and c.max() <= 15 for c in codes.values()
    )

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()  # no loraline involved
    merged = AutoModelForCausalLM.from_pretrained(str(qalora_merged.out_dir), dtype=torch.float32).eval()
    for name, q in layers.items():
        weight = loaded.get_submodule(name).weight
        assert isinstance(weight, IntxUnpackedToInt8Tensor)
        assert torch.equal(weight.dequantize(), q.dequantize(torch.float32))
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item() < 1e-5


def test_export_writes_the_merged_qalora_model_as_matmulnbits_and_it_matches_the_merged_model(
    qalora_merged, tmp_path, capsys
):
    """export: the low-bit graph carries the merged model's own 4-bit codes and folded zero points
    (MatMulNBits), agrees with PyTorch as strictly as the float graph, and is smaller."""
    import onnx
    from onnx import numpy_helper

    from loraline.export.build import export_onnx
    from loraline.export.lowbit import weight_key
    from loraline.export.stage import export_metrics
    from loraline.layout import QALORA_QUANTIZED
    from loraline.modelling.qalora import load_quantized_layers

    result = export_onnx(model_dir=qalora_merged.out_dir, out_dir=tmp_path / "onnx", max_new_tokens=8)
    low = result.report.lowbit
    assert result.report.passed and low.file == "model.int4.onnx" and low.layers == 14
    assert low.max_abs_logit_diff < 1e-3 and low.decode_max_abs_logit_diff < 1e-3
    assert low.greedy_agreement == 1.0
    # 4 bytes a weight -> half a byte of code, an eighth of fp32 scale, a sixty-fourth of zero point and
    # an eighth of the zero points' float rest (groups of 32), saving 0.81 of the float bytes; the embeddings
    # and the head stay float; at this toy size the four new nodes per layer and their names cost ~5% more
    layers = load_quantized_layers(qalora_merged.out_dir / QALORA_QUANTIZED)
    linear_float_bytes = sum(q.codes.numel() * 4 for q in layers.values())
    assert low.float_bytes - low.bytes > 0.7 * linear_float_bytes
    graph = onnx.load(str(result.out_dir / "model.int4.onnx"))
    assert [n.op_type for n in graph.graph.node].count("MatMulNBits") == 14
    float_weights = {weight_key(q.dequantize().T.contiguous().numpy()) for q in layers.values()}
    assert not any(
        weight_key(numpy_helper.to_array(t)) in float_weights for t in graph.graph.initializer if len(t.dims) == 2
    )
    assert export_metrics(result.report)["lowbit"]["bits"] == 4

    # `loraline generate --onnx --lowbit` runs that graph: the merged model's greedy answer
    from loraline.cli import main
    from loraline.export.runtime import OnnxGenerator

    messages = [{"role": "user", "content": "colour=blue size=4"}]
    expected = OnnxGenerator(result.out_dir, "model.int4.onnx").generate(messages, max_new_tokens=8)
    assert expected == OnnxGenerator(result.out_dir).generate(messages, max_new_tokens=8)  # greedy: as the float graph
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--onnx",
                str(result.out_dir),
                "--lowbit",
                "--prompt",
                "colour=blue size=4",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    (result.out_dir / "export_report.json").write_text('{"passed": true}')  # a LoRA model's: no low-bit graph
    with pytest.raises(SystemExit, match="has no low-bit graph"):
        main(["generate", "--onnx", str(result.out_dir), "--lowbit", "--prompt", "hi"])


def test_serving_takes_a_trained_qalora_adapter_as_plain_lora_with_the_same_function(setup, qalora_run, tmp_path):
    """The train stage's adapter made servable for vLLM's shared base: on the low-bit base's weights it
    is the QA-LoRA model (so what the shared float base adds is the trained update, nothing else)."""
    from peft import PeftModel

    from loraline.modelling.loading import load_base_causal_lm
    from loraline.modelling.qalora import dequantize_linears, quantize_linears
    from loraline.serve.adapters import make_servable

    res, _ = qalora_run
    served = make_servable(res.out_dir, setup.base_dir, tmp_path / "s")
    assert served.converted and not json.loads((served.path / "adapter_config.json").read_text())["use_qalora"]
    record = json.loads((res.out_dir / "train_record.json").read_text())["qalora"]
    ids = torch.arange(3, 40).unsqueeze(0)
    low_bit = load_base_causal_lm(setup.base_dir, "cpu", torch.float32)
    quantize_linears(low_bit, bits=record["bits"], group_size=record["group_size"])
    dequantize_linears(low_bit)
    with torch.no_grad():
        want = _adapter_on_quantized_base(setup, res.out_dir)(input_ids=ids).logits
        got = PeftModel.from_pretrained(low_bit, str(served.path)).eval()(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4


def test_a_qlora_reference_is_trained_alike_and_the_evaluation_compares_it_low_bit(setup, tmp_path):
    """train.qalora.reference through the train, merge and evaluate stages: the tenant's QLoRA reference
    (NF4, same data, steps and seed) in the adapter's folder, and the evaluation's comparison of
    (a) the merged QA-LoRA model, (b) the reference merged in float and (c) (b) rounded after training at
    the same bits and groups, with the bytes each model's weights take."""
    import shutil

    from loraline.config import Params
    from loraline.evaluate import lowbit
    from loraline.evaluate.stage import EvaluateError, evaluate_model, evaluate_tenant
    from loraline.evaluate.stage import run as evaluate_stage
    from loraline.layout import QLORA_REFERENCE, TRAIN_RECORD, Layout
    from loraline.merge.stage import merge_adapter
    from loraline.modelling.loading import load_base_causal_lm
    from loraline.records import TrainRecord
    from loraline.summary import collect_summary, render_text
    from loraline.train.stage import run as train_stage
    from loraline.train.stage import train_qlora_reference

    layout = Layout(tmp_path)
    shutil.copytree(setup.dataset_dir, layout.prepared_dataset_dir("t"))
    train = qalora_train(qalora={"bits": 4, "group_size": 32, "reference": True}, quantization="nf4", max_steps=6)
    params = Params.model_validate(
        {
            "base": setup.base_params.model_dump(),
            "evaluate": {"max_new_tokens": 8, "max_examples": 24},
            "tenants": {"t": {"raw_dir": "data/raw/t", "train": train.model_dump(exclude_defaults=True)}},
        }
    )
    res = train_stage(params, layout, "t", base_dir=setup.base_dir, checkpoints=False)
    reference = TrainRecord.read(res.out_dir / QLORA_REFERENCE / TRAIN_RECORD)
    assert (reference.params["method"], reference.params["quantization"], reference.qalora) == ("lora", "nf4", None)
    assert res.record.qalora.bits == 4
    assert reference.steps == res.record.steps and reference.data == res.record.data
    assert reference.seed == res.record.seed
    metrics = json.loads(layout.metrics_path("train", "t").read_text())
    assert metrics["qlora_reference_val_loss"] == reference.loss.final_val

    merge_adapter(
        base_dir=setup.base_dir, base_params=setup.base_params, adapter_dir=res.out_dir, out_dir=layout.merged_dir("t")
    )
    write_general_sample(params, layout, setup.base_dir, "t")
    result = evaluate_stage(params, layout, "t", base_dir=setup.base_dir)
    section = result.metrics["qalora_comparison"]
    models = section["models"]
    assert (section["bits"], section["group_size"]) == (4, 32) and set(models) == {
        lowbit.QALORA,
        lowbit.FLOAT_MERGE,
        lowbit.ROUNDED_AFTER,
    }
    candidate = result.metrics["models"]["candidate"]
    assert {k: models[lowbit.QALORA][k] for k in candidate} == candidate  # (a) is the candidate, scored once
    # rounding did move it
    assert models[lowbit.ROUNDED_AFTER]["answer_loss"] != models[lowbit.FLOAT_MERGE]["answer_loss"]
    for key, gap in section["qalora_minus_rounded_after"].items():
        assert gap == pytest.approx(models[lowbit.QALORA][key] - models[lowbit.ROUNDED_AFTER][key], abs=1e-6)

    # (b) as a full-precision merge would serve it: the reference merged into a float32 folder, scored alike.
    float_merge = merge_adapter(
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        adapter_dir=res.out_dir / QLORA_REFERENCE,
        out_dir=tmp_path / "reference-merged",
    ).out_dir
    alone = evaluate_model(
        model_dir=float_merge,
        dataset_dir=layout.prepared_dataset_dir("t"),
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        max_new_tokens=8,
        max_examples=24,
    )
    assert models[lowbit.FLOAT_MERGE]["answer_loss"] == pytest.approx(alone["answer_loss"], rel=1e-4)
    assert models[lowbit.FLOAT_MERGE]["exact_match"] == alone["exact_match"]

    # Sizes, counted here from the base's shapes: 14 layers at 4 bits with a float32 scale and zero per 32 weights.
    base = load_base_causal_lm(setup.base_dir, "cpu", torch.float32)
    head = base.get_output_embeddings()
    linears = [m for m in base.modules() if type(m) is torch.nn.Linear and m is not head]
    float_bytes = 4 * sum(p.numel() for p in base.parameters())
    low = float_bytes - sum(
        4 * m.weight.numel() - m.weight.numel() // 2 - 2 * 4 * m.weight.numel() // 32 for m in linears
    )
    assert len(linears) == 14 and models[lowbit.FLOAT_MERGE]["weight_bytes"] == float_bytes
    assert models[lowbit.QALORA]["weight_bytes"] == models[lowbit.ROUNDED_AFTER]["weight_bytes"] == low

    rows = [json.loads(line) for line in result.generations_path.read_text().splitlines()]
    assert len(rows) == 24 and all(set(r["predictions"]) >= {lowbit.FLOAT_MERGE, lowbit.ROUNDED_AFTER} for r in rows)
    assert "## QA-LoRA against QLoRA (INT4, groups of 32)" in result.report_path.read_text()
    dvc_metric = json.loads(layout.metrics_path("evaluate", "t").read_text())["qalora_comparison"]
    assert dvc_metric[lowbit.ROUNDED_AFTER]["answer_loss"] == models[lowbit.ROUNDED_AFTER]["answer_loss"]
    assert dvc_metric[lowbit.QALORA]["weight_bytes"] == low and section["reference_adapter"] == QLORA_REFERENCE
    text = render_text(collect_summary(params, layout))
    assert f"QA-LoRA INT4 json_field_accuracy: {models[lowbit.QALORA]['json_field_accuracy']:.3f}, QLoRA float" in text

    with pytest.raises(
        EvaluateError,
        match="has no qalora_quantized.safetensors: a QLoRA reference compares only with a merged QA-LoRA",
    ):
        evaluate_tenant(
            tenant="t",
            dataset_dir=layout.prepared_dataset_dir("t"),
            base_dir=setup.base_dir,
            base_params=setup.base_params,
            candidate_dir=float_merge,
            production_dir=None,
            out_dir=tmp_path / "never",
            qlora_reference=res.out_dir / QLORA_REFERENCE,
        )
    assert not (tmp_path / "never").exists()
    with pytest.raises(TrainError, match="only for a QA-LoRA adapter"):
        train_qlora_reference(tiny_train(), adapter_dir=tmp_path / "x", **setup.kwargs())
    with pytest.raises(
        ValueError, match="qalora.reference trains a QLoRA adapter to compare a QA-LoRA adapter with; method is 'lora'"
    ):
        TrainParams(qalora={"reference": True})


@pytest.mark.cuda
def test_qalora_trains_on_cuda_and_folds_there_too(setup, tmp_path):
    """The same stage on CUDA (bf16 compute, paged AdamW, gradient checkpointing): the quantized base
    and its adapters on the GPU, the loss falls, and the fold agrees with the unmerged adapter."""
    from loraline.modelling.qalora import merge_qalora

    res = train_adapter(
        qalora_train(optimizer="paged_adamw_32bit", max_steps=30, eval_every=10, gradient_checkpointing=True),
        out_dir=tmp_path / "a",
        **setup.kwargs(),
    )
    rec = res.record
    assert rec.device.startswith("cuda") and rec.compute_dtype == "bfloat16"
    assert rec.qalora.adapted_layers == 14
    assert rec.loss.final_val < 0.9 * rec.loss.base_val, rec.loss
    model = _adapter_on_quantized_base(setup, res.out_dir).to("cuda")
    ids = torch.randint(5, 500, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merge_qalora(model)
        after = model.base_model.model(input_ids=ids).logits
    assert (after - before).abs().max().item() < 1e-3

"""export.graphs: fp16 and weight-only int4 (MatMulNBits from the merged weights) beside fp32 and int8,
each checked against PyTorch at a tolerance that fits its precision, each runnable by `loraline generate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loraline.export import ExportError, ExportResult, OnnxGenerator, export_onnx
from loraline.export.int4 import dequantized_twin, linear_weights, quantize_rtn
from loraline.export.runtime import GRAPH_FILES
from loraline.export.stage import export_metrics
from loraline.records import ExportReport

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROBES = [
    [{"role": "user", "content": "Ticket 1003 from Ana: the printer is down. Please route it."}],
    [{"role": "user", "content": "Hello! Who are you?"}],
]


@pytest.fixture(scope="module")
def int4_export(random_llama: Path, tmp_path_factory) -> ExportResult:
    return export_onnx(
        model_dir=random_llama,
        out_dir=tmp_path_factory.mktemp("int4") / "onnx",
        graphs=["int4"],
        probes=PROBES,
        max_new_tokens=12,
        tolerance=1e-4,
        device="cpu",
    )


def test_int4_graph_computes_the_dequantized_model(int4_export: ExportResult):
    int4 = int4_export.report.int4
    assert int4.max_abs_logit_diff <= 1e-4 and int4.decode_max_abs_logit_diff <= 1e-4
    assert int4.greedy_agreement == 1.0
    # the quantization's own error is measured against the float model and reported, not hidden
    assert int4.vs_float.max_abs_logit_diff > 1e-3 and int4.vs_float.greedy_agreement is not None
    assert int4.layers == 14 and int4.float_layers == ["lm_head"] and int4.bits == 4


def test_int4_folder_holds_no_float32_graph_and_is_small(int4_export: ExportResult, random_llama: Path):
    import onnx

    out = int4_export.out_dir
    assert not (out / "model.onnx").exists() and (out / "model.int4.onnx").is_file()
    graph = onnx.load(str(out / "model.int4.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulNBits") == 14
    linear_bytes = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) * 4
    assert int4_export.report.int4.bytes < 2 * 400 * 64 * 4 + linear_bytes / 4 + 64_000  # embeddings, head, int4 codes
    metrics = export_metrics(int4_export.report)
    assert metrics["max_abs_logit_diff"] == int4_export.report.int4.max_abs_logit_diff  # what the gate reads
    assert metrics["int4"]["vs_float"]["greedy_agreement"] == int4_export.report.int4.vs_float.greedy_agreement


def test_rtn_is_within_half_a_step_and_keeps_zero():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[0, :32] = 0.0
    q = quantize_rtn(w, 32)
    back = q.dequantize()
    step = q.scales.repeat_interleave(32, dim=1)
    assert torch.all((back - w).abs() <= step / 2 + 1e-6)
    assert torch.all(back[0, :32] == 0) and q.codes.max() <= 15


def test_dequantized_twin_replaces_only_the_quantized_layers(random_llama: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(random_llama), dtype=torch.float32)
    names = linear_weights(model, 32)
    assert "model.lm_head.weight" not in names and len(names) == 14
    head = model.lm_head.weight.clone()
    first = next(iter(names.values()))
    layers = {first: quantize_rtn(model.get_submodule(first).weight, 32)}
    dequantized_twin(model, layers)
    assert torch.equal(model.get_submodule(first).weight, layers[first].dequantize())
    assert torch.equal(model.lm_head.weight, head)


def test_fp16_graph_within_its_bound_and_runs_with_a_half_cache(random_llama: Path, tmp_path: Path):
    out = tmp_path / "onnx"
    report = export_onnx(
        model_dir=random_llama,
        out_dir=out,
        graphs=["fp32", "fp16"],
        probes=PROBES,
        max_new_tokens=8,
        tolerance=1e-4,
        fp16_tolerance=0.1,
        device="cpu",
    ).report
    fp16 = report.fp16
    assert 1e-5 < fp16.max_abs_logit_diff <= 0.1  # really half precision, and within its bound
    assert report.fp16.bytes < 0.6 * report.fp32.bytes
    gen = OnnxGenerator(out, GRAPH_FILES["fp16"])
    assert gen.past_dtype == np.float16 and gen.generate_ids([1, 5, 9], max_new_tokens=4)
    with pytest.raises(ExportError, match="fp16 logits .* differ from PyTorch") as err:
        export_onnx(
            model_dir=random_llama,
            out_dir=tmp_path / "tight",
            graphs=["fp32", "fp16"],
            probes=PROBES[:1],
            max_new_tokens=2,
            tolerance=1e-4,
            fp16_tolerance=1e-7,
            device="cpu",
        )
    assert not (tmp_path / "tight").exists() and err.value.report.fp32.max_abs_logit_diff < 1e-4


def test_int4_with_external_data(random_llama: Path, tmp_path: Path, monkeypatch):
    import loraline.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "onnx"
    report = export_onnx(
        model_dir=random_llama,
        out_dir=out,
        graphs=["int4"],
        probes=PROBES[:1],
        max_new_tokens=4,
        tolerance=1e-4,
        device="cpu",
    ).report
    assert report.int4.external_data is True and (out / "model.int4.onnx.data").is_file()
    assert (out / "model.int4.onnx").stat().st_size < 100_000  # the weights are beside it
    assert report.int4.greedy_agreement == 1.0 and "model.int4.onnx.data" in report.files


@pytest.mark.parametrize(
    "graphs, message",
    [
        (["int8"], "needs fp32 or int4"),
        (["fp16"], "needs fp32 or int4"),
        (["int4", "int8"], "int8 is quantized from the fp32 graph"),
        (["fp32", "fp32"], "twice"),
        (["fp32", "bf16"], "Input should be 'fp32'"),
    ],
)
def test_bad_graph_lists_name_the_key(graphs: list[str], message: str):
    from pydantic import ValidationError

    from loraline.config import ExportParams

    with pytest.raises(ValidationError, match=message) as err:
        ExportParams(graphs=graphs)
    assert "graphs" in str(err.value)


def test_export_refuses_bad_graph_lists_before_writing(random_llama: Path, tmp_path: Path):
    with pytest.raises(ExportError, match="unknown 'bf16'"):
        export_onnx(model_dir=random_llama, out_dir=tmp_path / "x", graphs=["fp32", "bf16"], device="cpu")
    assert not (tmp_path / "x").exists()


def test_cli_generate_runs_each_graph(int4_export: ExportResult, capsys):
    from loraline.cli import main

    gen = OnnxGenerator(int4_export.out_dir, GRAPH_FILES["int4"])
    expected = gen.generate([{"role": "user", "content": "Hello"}], max_new_tokens=6)
    assert (
        main(
            [
                "generate",
                "--onnx",
                str(int4_export.out_dir),
                "--graph",
                "int4",
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit, match="has no fp32 graph .*it has: int4"):
        main(["generate", "--onnx", str(int4_export.out_dir), "--prompt", "Hello"])
    assert json.loads((int4_export.out_dir / "export_report.json").read_text())["graphs"] == ["int4"]


@pytest.mark.cuda
def test_int4_and_fp16_with_the_reference_on_cuda(int4_export: ExportResult, random_llama: Path, tmp_path: Path):
    """export.device cuda: the float and twin references run on the GPU, the graphs are still built on the CPU
    (the int4 file is the same bytes as the CPU export's), and onnxruntime agrees with the GPU's numbers."""
    report = export_onnx(
        model_dir=random_llama,
        out_dir=tmp_path / "onnx",
        graphs=["fp16", "int4"],
        probes=PROBES,
        max_new_tokens=12,
        tolerance=1e-3,
        fp16_tolerance=0.1,
        device="cuda",
    ).report
    assert report.device == "cuda" and report.int4.greedy_agreement == 1.0
    assert report.int4.max_abs_logit_diff <= 1e-3 and report.fp16.max_abs_logit_diff <= 0.1
    assert report.files["model.int4.onnx"] == int4_export.report.files["model.int4.onnx"]


def test_a_graph_that_generates_otherwise_fails_on_greedy_agreement():
    from loraline.export.build import _enforce

    numbers = {
        "file": "model.fp16.onnx",
        "max_abs_logit_diff": 0.01,
        "decode_max_abs_logit_diff": 0.01,
        "greedy_agreement": 0.5,
    }
    report = ExportReport(passed=True, fp16=numbers)
    _enforce(report, "fp16", 0.05, 0.5)
    assert report.passed is True
    with pytest.raises(
        ExportError,
        match=r"fp16 \(model.fp16.onnx\) generates what PyTorch generates on 50% of the "
        r"probes < export.min_greedy_agreement 75%",
    ):
        _enforce(report, "fp16", 0.05, 0.75)
    assert report.passed is False
    report = ExportReport(passed=True, int8={**numbers, "greedy_agreement": 0.0})
    _enforce(report, "int8", 0.05, 0.75)  # reported only
    assert report.passed is True

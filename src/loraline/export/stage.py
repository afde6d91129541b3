"""The export stage: a plain Hugging Face causal-LM folder -> a self-contained ONNX folder.

out_dir (replaced atomically; nothing is left when a check fails):
    model.onnx (+ model.onnx.data when large)   KV cache in the graph (see loraline.export.wrapper)
    model.int8.onnx                             optional, onnxruntime dynamic int8 quantization
    model.int<bits>.onnx                        a merged QA-LoRA model: its own codes in MatMulNBits (export.lowbit)
    config.json, generation_config.json
    tokenizer.json, tokenizer_config.json       chat_template inside tokenizer_config.json
    export_report.json                          parity vs PyTorch for fp32 and int8, tolerance, pass

Parity, on a probe set of chat conversations (rendered with the model's chat template; the built-in ones: the
graph's arithmetic is what is checked here, while the tenant's own prompts, merge.probes, check what serving
answers, and onnxruntime's greedy decoding on the CPU would make each of them cost seconds to minutes at 8B):
- prompt pass: max abs logit difference over every prompt position;
- cached decoding: a few steps fed one token at a time (PyTorch's greedy tokens, so both sides see the
  same inputs) with present -> past; max abs logit difference per step;
- greedy generation through onnxruntime vs transformers' generate: agreement fraction.
fp32 must stay within `tolerance` (else ExportError); int8 numbers are reported only.

Where: the PyTorch reference (prompt logits, cached decoding, greedy generation) runs on `device`
(export.device: auto, cpu or cuda, as base.build.device; the probes batched on CUDA). The graph itself is
traced on the CPU whatever the device: tracing does no heavy matrix work, so a GPU would save little; the
graph runs on onnxruntime's CPU provider; and traced on the CPU it is the same bytes whatever machine
exports it, which a graph traced on CUDA is not promised to be (tensors made on the device, the attention
kernel chosen and constant folding can differ there). The report and the timing file record the device.

Without `onnx` in deploy.targets, `run` exports nothing: out_dir holds export_report.json alone, saying
`"onnx": "not built (deploy.targets)"` (DVC needs the declared folder to exist), and the metrics say the same.

The folder is the same bytes for the same merged model, params, code and library versions. `run` also
writes the parity numbers people compare (reports/<tenant>/metrics/export.json, a DVC metric the gate
reads) and the run's timing (reports/timing/export@<tenant>.json).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraline import io
from loraline.config import Params
from loraline.export.runtime import INT8_FILE, MODEL_FILE
from loraline.layout import EXPORT_REPORT, NOT_BUILT, Layout
from loraline.modelling.parity_numbers import ParityError, headline
from loraline.provenance import run_timing
from loraline.records import ExportReport, GraphReport

# Graphs that compute exactly what a float32 PyTorch model computes (the fp32 graph: the merged model;
# int4: the merged model with its linear weights dequantized), held to the float32 tolerance.
EXACT_GRAPHS = ("fp32", "int4")


def run(params: Params, layout: Layout, tenant: str) -> ExportResult:
    """The export stage for one tenant: its merged model to models/onnx/<tenant>, the report also
    copied to reports/<tenant>/export_report.json, its parity numbers to reports/<tenant>/metrics/export.json
    and the run's timing to reports/timing/export@<tenant>.json."""
    started = time.perf_counter()
    e = params.export
    if not params.deploy_for(tenant).builds("onnx"):
        result = _not_built(layout.onnx_dir(tenant), params.deploy_for(tenant).targets)
        io.copy_file(result.report_path, layout.export_report_path(tenant))
        io.write_json(layout.metrics_path("export", tenant), export_metrics(result.report))
        io.write_timing(layout.timing_path("export", tenant), run_timing(started))
        return result
    from loraline.export.build import export_onnx  # torch, onnx: only when a graph is built

    result = export_onnx(
        model_dir=layout.merged_dir(tenant),
        out_dir=layout.onnx_dir(tenant),
        graphs=e.graphs,
        opset=e.opset,
        max_new_tokens=e.max_new_tokens,
        tolerance=params.gate_for(tenant).max_export_logit_diff,
        fp16_tolerance=e.fp16_max_logit_diff,
        int4_block_size=e.int4_block_size,
        min_greedy_agreement=e.min_greedy_agreement,
        device=e.device,
    )
    io.copy_file(result.report_path, layout.export_report_path(tenant))
    io.write_json(layout.metrics_path("export", tenant), export_metrics(result.report))
    where = result.report.model_dump(include={"device", "device_name"}, exclude_unset=True)
    io.write_timing(layout.timing_path("export", tenant), run_timing(started, **where))
    return result


class ExportError(ParityError):
    """The exported graph does not reproduce the PyTorch model (or the input cannot be exported)."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    report_path: Path
    report: ExportReport

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    @property
    def int8_path(self) -> Path | None:
        path = self.out_dir / INT8_FILE
        return path if path.is_file() else None


def _not_built(out_dir: Path, targets: list[str]) -> ExportResult:
    """deploy.targets without onnx: the folder DVC expects, holding only a report that says so."""
    report = ExportReport(passed=True, onnx=NOT_BUILT, targets=list(targets))
    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        report.write(tmp / EXPORT_REPORT)
    return ExportResult(out_dir, out_dir / EXPORT_REPORT, report)


def export_metrics(report: ExportReport) -> dict[str, Any]:
    """What people compare across runs (`dvc metrics diff`), and what the gate decides export parity on:
    `max_abs_logit_diff`, the worst prompt-pass difference of the graphs with an exact float32 twin (fp32
    against the merged model, int4 against its dequantized twin); then each graph's own numbers."""
    if report.graph is None:  # not built (deploy.targets): no graph, so no parity to measure
        return {"passed": report.passed, "onnx": report.onnx or NOT_BUILT}
    exact = [graph for name in EXACT_GRAPHS if (graph := getattr(report, name)) is not None]
    out: dict[str, Any] = {
        "passed": report.passed,
        "max_abs_logit_diff": max(e.max_abs_logit_diff for e in exact),
        "greedy_agreement": min(e.greedy_agreement for e in exact),
        "decode_max_abs_logit_diff": max(e.decode_max_abs_logit_diff for e in exact),
    }
    for name in report.graphs if report.graphs is not None else ["fp32", "int8"]:
        graph: GraphReport | None = getattr(report, name, None)
        if graph is not None:  # sizes stay in the report: `dvc metrics show` has a column per key
            out[name] = headline(graph.model_dump())
            if graph.vs_float is not None:
                out[name]["vs_float"] = headline(graph.vs_float.model_dump())
    if report.lowbit is not None:
        low = report.lowbit
        out["lowbit"] = {**headline(low.model_dump()), "bits": low.bits, "size_vs_float": low.size_vs_float}
    return out

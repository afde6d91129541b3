"""The export stage: a plain Hugging Face causal-LM folder -> a self-contained ONNX folder.

out_dir (replaced atomically; nothing is left when a check fails):
    model.onnx (+ model.onnx.data when large)   KV cache in the graph (see loraline.export.wrapper)
    model.int8.onnx                             optional, onnxruntime dynamic int8 quantization
    model.int<bits>.onnx                        a merged QA-LoRA model: its own codes in MatMulNBits (export.lowbit)
    config.json, generation_config.json
    tokenizer.json, tokenizer_config.json       chat_template inside tokenizer_config.json
    export_report.json                          parity vs PyTorch for fp32 and int8, tolerance, pass

Parity, on a probe set of chat conversations (rendered with the model's chat template):
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

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraline import io
from loraline.config import Params
from loraline.layout import NOT_BUILT, QALORA_QUANTIZED, Layout
from loraline.export.onnx_export import export_model, quantize_int8
from loraline.export.runtime import INT8_FILE, MODEL_FILE, OnnxGenerator, eos_ids
from loraline.modelling.chat import save_tokenizer
from loraline.modelling.device import device_facts, resolve_device
from loraline.modelling.long_context import extended_context
from loraline.modelling.parity import (
    DEFAULT_PROBES,
    ParityError,
    common_prefix,
    encode_probe,
    greedy_tokens,
    headline,
    probe_batch_size,
    prompt_logits,
    summarize,
)
from loraline.provenance import code_fingerprint, library_versions, run_facts, sha256_file

REPORT = "export_report.json"
DECODE_STEPS = 4


class ExportError(ParityError):
    """The exported graph does not reproduce the PyTorch model (or the input cannot be exported)."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    report_path: Path
    report: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    @property
    def int8_path(self) -> Path | None:
        path = self.out_dir / INT8_FILE
        return path if path.is_file() else None


@dataclass
class _Reference:
    prompt_logits: list[np.ndarray]  # per probe [prompt_len, vocab]
    decode_tokens: list[list[int]]  # per probe: tokens fed in the cached steps
    decode_logits: list[list[np.ndarray]]  # per probe, per step [vocab]
    greedy: list[list[int]]


def export_onnx(
    *, model_dir: Path, out_dir: Path, int8: bool = False, opset: int | None = None,
    probes: list[list[dict]] | None = None, max_new_tokens: int = 32, tolerance: float = 1e-3, device: str = "auto",
) -> ExportResult:
    """Export `model_dir` to ONNX in `out_dir`, check it against PyTorch (run on `device`: auto, cpu or
    cuda), optionally add an int8 copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    probes = DEFAULT_PROBES if probes is None else probes
    if not probes:
        raise ExportError("the probe set is empty: parity cannot be checked")
    where = resolve_device(device, "export.device")
    if out_dir.exists():  # an export of an older model must not pass for this one's
        shutil.rmtree(out_dir)

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if not tok.chat_template:
        raise ExportError(f"{model_dir}: the tokenizer has no chat template; export needs one to be self-contained")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, device_map={"": "cpu"})
    model.eval()
    stop = eos_ids(model_dir, tok)
    inputs = [encode_probe(tok, p, ExportError) for p in probes]
    config = model.config
    long_probe = _long_context_probe(config, inputs, max_new_tokens)
    if long_probe is not None:  # a LongLoRA model: parity must hold past the base's own context too
        inputs.append(long_probe)
    model.to(where)  # a no-op on the CPU; on CUDA the weights go there and back unchanged, bit for bit
    ref = _reference(model, tok, inputs, max_new_tokens, stop)
    model.to("cpu")  # traced on the CPU (see the module's docstring)
    if where.type == "cuda":
        torch.cuda.empty_cache()

    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        graph = export_model(model, tmp / MODEL_FILE, opset=opset)
        model.config.save_pretrained(str(tmp))
        gen_config = model.generation_config if model.generation_config is not None else GenerationConfig()
        gen_config.save_pretrained(str(tmp))
        save_tokenizer(tok, tmp, model_dir)
        del model
        gc.collect()

        fp32 = _parity(OnnxGenerator(tmp, MODEL_FILE), inputs, ref, max_new_tokens)
        report: dict[str, Any] = {
            "model_dir": str(model_dir),
            **device_facts(where),
            "graph": graph,
            "tolerance": tolerance,
            "probes": probes,
            "max_new_tokens": max_new_tokens,
            "decode_steps": DECODE_STEPS,
            "eos_token_ids": stop,
            "fp32": fp32,
            "reference_greedy_texts": [tok.decode(g, skip_special_tokens=True) for g in ref.greedy],
        }
        if long_probe is not None:  # the last entry of per_probe
            report["long_context_probe"] = {
                "tokens": len(long_probe), "original_context": extended_context(config)[0],
                "max_position_embeddings": config.max_position_embeddings,
            }
        worst = max(fp32["max_abs_logit_diff"], fp32["decode_max_abs_logit_diff"])
        report["passed"] = bool(worst <= tolerance)
        if not report["passed"]:
            raise ExportError(
                f"ONNX fp32 logits differ from PyTorch by {worst:.3g} > tolerance {tolerance:g} "
                f"(prompt {fp32['max_abs_logit_diff']:.3g}, cached decoding {fp32['decode_max_abs_logit_diff']:.3g})",
                report,
            )
        if int8:
            quant = quantize_int8(tmp / MODEL_FILE, tmp / INT8_FILE)
            report["int8"] = {**quant, **_parity(OnnxGenerator(tmp, INT8_FILE), inputs, ref, max_new_tokens)}
        if (model_dir / QALORA_QUANTIZED).is_file():  # a merged QA-LoRA model: its own low-bit graph, checked as strictly
            report["lowbit"] = _lowbit(model_dir, tmp, inputs, ref, max_new_tokens)
            worst = max(report["lowbit"]["max_abs_logit_diff"], report["lowbit"]["decode_max_abs_logit_diff"])
            if worst > tolerance:
                report["passed"] = False
                raise ExportError(
                    f"the low-bit graph {report['lowbit']['file']} differs from the merged model by {worst:.3g} "
                    f"> tolerance {tolerance:g}", report,
                )
        report["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        report["code"] = code_fingerprint(__name__)
        report["library_versions"] = _versions()
        io.write_json(tmp / REPORT, report)
    return ExportResult(out_dir, out_dir / REPORT, report)


def _lowbit(model_dir: Path, tmp: Path, inputs: list[list[int]], ref: _Reference, max_new_tokens: int) -> dict[str, Any]:
    """The merged QA-LoRA model as onnxruntime MatMulNBits (its codes, scales and folded zero points),
    against the PyTorch merged model, whose float weights are exactly those codes dequantized."""
    from loraline.export.lowbit import graph_bytes, lowbit_file, write_matmul_nbits  # peft's tuners: only when needed
    from loraline.modelling.qalora import load_quantized_layers

    try:
        layers = load_quantized_layers(model_dir / QALORA_QUANTIZED)
        facts = write_matmul_nbits(tmp / MODEL_FILE, tmp / lowbit_file(next(iter(layers.values())).bits), layers)
    except ValueError as exc:
        raise ExportError(f"{model_dir}: {exc}") from exc
    facts["bytes"] = graph_bytes(tmp, facts["file"])
    facts["float_bytes"] = graph_bytes(tmp, MODEL_FILE)
    facts["size_vs_float"] = round(facts["bytes"] / facts["float_bytes"], 4)
    return {**facts, **_parity(OnnxGenerator(tmp, facts["file"]), inputs, ref, max_new_tokens)}


# --- reference (PyTorch) --------------------------------------------------------------------------


def _long_context_probe(config: Any, inputs: list[list[int]], max_new_tokens: int) -> list[int] | None:
    """For a model whose rope extends its base's context: the probes' tokens repeated to 64 tokens past
    the original context (within the extended one), so the prompt pass and the cached steps run at
    positions the base never had. None for other models."""
    span = extended_context(config)
    if span is None:
        return None
    original, extended = span
    length = min(original + 64, extended - max_new_tokens - DECODE_STEPS - 1)
    if length <= original:
        return None
    stream = [t for ids in inputs for t in ids]
    return (stream * (length // len(stream) + 1))[:length]


def _cache_kwarg(model: Any) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _reference(model: Any, tok: Any, inputs: list[list[int]], max_new_tokens: int, stop: list[int]) -> _Reference:
    """PyTorch's numbers on the probes, on the model's device: prompt logits and greedy generations (one
    probe at a time on the CPU, batched on CUDA), and the cached decoding steps, one probe at a time."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stop[0] if stop else 0)
    batch = probe_batch_size(model.device)
    ref = _Reference([], [], [], [])
    ref.prompt_logits = [x.numpy() for x in prompt_logits(model, inputs, pad, batch)]
    for ids in inputs:
        tokens, steps = _decode_steps(model, ids)
        ref.decode_tokens.append(tokens)
        ref.decode_logits.append(steps)
    ref.greedy = greedy_tokens(model, inputs, max_new_tokens, pad, stop or None, batch)
    return ref


def _decode_steps(model: Any, ids: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Cached decoding: the prompt once, then DECODE_STEPS greedy tokens one a step with transformers' own
    cache; (the tokens fed, the logits [vocab] after each)."""
    from transformers import DynamicCache

    key = _cache_kwarg(model)
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    attn = torch.ones_like(x)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=x, attention_mask=attn, use_cache=True, **{key: cache})
    tokens, steps = [], []
    for _ in range(DECODE_STEPS):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        attn = torch.ones(1, attn.shape[1] + 1, dtype=torch.long, device=model.device)
        out = model(input_ids=torch.tensor([[token]], device=model.device), attention_mask=attn, use_cache=True,
                    **{key: cache})
        steps.append(out.logits[0, -1].float().cpu().numpy())
    return tokens, steps


# --- parity (onnxruntime) -------------------------------------------------------------------------


def _parity(gen: OnnxGenerator, inputs: list[list[int]], ref: _Reference, max_new_tokens: int) -> dict[str, Any]:
    per_probe, texts = [], []
    for i, ids in enumerate(inputs):
        x = np.asarray([ids], dtype=np.int64)
        mask = np.ones_like(x)
        logits, past = gen.forward(x, mask, gen.empty_past(1))
        prompt_diff = np.abs(logits[0].astype(np.float64) - ref.prompt_logits[i])
        step_diffs = []
        for token, expected in zip(ref.decode_tokens[i], ref.decode_logits[i], strict=True):
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            logits, past = gen.forward(np.asarray([[token]], dtype=np.int64), mask, past)
            step_diffs.append(float(np.abs(logits[0, -1].astype(np.float64) - expected).max()))
        greedy = gen.generate_ids(ids, max_new_tokens=max_new_tokens)
        texts.append(gen.tokenizer.decode(greedy, skip_special_tokens=True))
        per_probe.append({
            "max_abs_logit_diff": float(prompt_diff.max()),
            "mean_abs_logit_diff": float(prompt_diff.mean()),
            "decode_max_abs_logit_diff": max(step_diffs),
            "decode_step_diffs": step_diffs,
            "next_token_equal": bool(int(logits.argmax(-1)[0, -1]) == int(ref.decode_logits[i][-1].argmax())),
            "greedy_equal": greedy == ref.greedy[i],
            "greedy_common_prefix": common_prefix(greedy, ref.greedy[i]),
            "greedy_tokens": len(greedy),
        })
    return {
        **summarize(per_probe),
        "decode_max_abs_logit_diff": max(p["decode_max_abs_logit_diff"] for p in per_probe),
        "per_probe": per_probe,
        "greedy_texts": texts,
    }


def _versions() -> dict[str, Any]:
    versions = dict(library_versions())
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None
    return versions


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
        io.write_timing(layout.timing_path("export", tenant), run_facts(started))
        return result
    result = export_onnx(
        model_dir=layout.merged_dir(tenant), out_dir=layout.onnx_dir(tenant), int8=e.int8, opset=e.opset,
        max_new_tokens=e.max_new_tokens, tolerance=params.gate_for(tenant).max_export_logit_diff, device=e.device,
    )
    io.copy_file(result.report_path, layout.export_report_path(tenant))
    io.write_json(layout.metrics_path("export", tenant), export_metrics(result.report))
    where = {k: result.report[k] for k in ("device", "device_name") if k in result.report}
    io.write_timing(layout.timing_path("export", tenant), run_facts(started, **where))
    return result


def _not_built(out_dir: Path, targets: list[str]) -> ExportResult:
    """deploy.targets without onnx: the folder DVC expects, holding only a report that says so."""
    report = {"passed": True, "onnx": NOT_BUILT, "targets": list(targets)}
    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        io.write_json(tmp / REPORT, report)
    return ExportResult(out_dir, out_dir / REPORT, report)


def export_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """What people compare across runs (`dvc metrics diff`), and what the gate decides export parity on
    (`max_abs_logit_diff`, fp32 on the prompt pass): fp32 ONNX vs PyTorch, and int8 when exported."""
    if "fp32" not in report:  # not built (deploy.targets): no graph, so no parity to measure
        return {"passed": bool(report["passed"]), "onnx": report.get("onnx", NOT_BUILT)}
    fp32 = report["fp32"]
    out: dict[str, Any] = {
        "passed": bool(report["passed"]), **headline(fp32), "decode_max_abs_logit_diff": fp32["decode_max_abs_logit_diff"],
    }
    if report.get("int8"):
        out["quantized"] = headline(report["int8"])
    if report.get("lowbit"):
        low = report["lowbit"]
        out["lowbit"] = {**headline(low), "bits": low["bits"], "size_vs_float": low["size_vs_float"]}
    return out

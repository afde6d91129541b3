"""The ONNX export itself (export/stage.py's module docstring says what it writes and checks): trace the merged
model, write each graph, and compare it with the PyTorch reference. Kept apart from the stage's entry so that
a tenant without onnx in deploy.targets never imports torch or onnx for its report."""

from __future__ import annotations

import gc
import inspect
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraline import io
from loraline.config import export_graphs_problem
from loraline.export.onnx_export import graph_bytes, quantize_int8, save_graph, trace_model
from loraline.export.runtime import GRAPH_FILES, GRAPHS, MODEL_FILE, OnnxGenerator, eos_ids
from loraline.export.stage import EXACT_GRAPHS, ExportError, ExportResult
from loraline.layout import EXPORT_REPORT, QALORA_QUANTIZED
from loraline.modelling.chat import save_tokenizer
from loraline.modelling.device import device_facts, resolve_device
from loraline.modelling.long_context import extended_context
from loraline.modelling.parity import (
    DEFAULT_PROBES,
    common_prefix,
    encode_probe,
    greedy_tokens,
    probe_batch_size,
    prompt_logits,
)
from loraline.modelling.parity_numbers import summarize
from loraline.provenance import code_fingerprint, library_versions, sha256_file
from loraline.records import ExportReport, GraphReport, LongContextProbe

DECODE_STEPS = 4


@dataclass
class _Reference:
    prompt_logits: list[np.ndarray]  # per probe [prompt_len, vocab]
    decode_tokens: list[list[int]]  # per probe: tokens fed in the cached steps
    decode_logits: list[list[np.ndarray]]  # per probe, per step [vocab]
    greedy: list[list[int]]


def export_onnx(
    *,
    model_dir: Path,
    out_dir: Path,
    graphs: Sequence[str] = ("fp32",),
    opset: int | None = None,
    probes: list[list[dict]] | None = None,
    max_new_tokens: int = 32,
    tolerance: float = 1e-3,
    fp16_tolerance: float = 0.05,
    int4_block_size: int = 32,
    min_greedy_agreement: float = 0.75,
    device: str = "auto",
) -> ExportResult:
    """Export `model_dir` to ONNX in `out_dir` as each of `graphs` (fp32, fp16, int8, int4; see GRAPHS),
    and check each against PyTorch (run on `device`: auto, cpu or cuda)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    graphs = check_graphs(graphs)
    probes = DEFAULT_PROBES if probes is None else probes
    if not probes:
        raise ExportError("the probe set is empty: parity cannot be checked")
    where = resolve_device(device, "export.device")
    _refuse_requantizing(model_dir, graphs)
    if out_dir.exists():  # an export of an older model must not pass for this one's
        shutil.rmtree(out_dir)
    tok, model = _load(model_dir, torch.float32)
    stop = eos_ids(model_dir, tok)
    inputs = [encode_probe(tok, p, ExportError) for p in probes]
    config = model.config
    long_probe = _long_context_probe(config, inputs, max_new_tokens)
    if long_probe is not None:  # a LongLoRA model: parity must hold past the base's own context too
        inputs.append(long_probe)
    ref = _reference_on(model, where, tok, inputs, max_new_tokens, stop)
    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        written, int4_layers = _write_float_and_int4(model, tmp, graphs, opset, int4_block_size)
        _save_companions(model, tok, model_dir, tmp)
        twin = _int4_reference(model, int4_layers, where, tok, inputs, max_new_tokens, stop)
        del model
        gc.collect()
        if "fp16" in graphs:
            written["fp16"] = _write_fp16(model_dir, tmp / GRAPH_FILES["fp16"], opset)
        report = ExportReport(
            model_dir=str(model_dir),
            **device_facts(where),
            graph=written[graphs[0]],
            graphs=list(graphs),
            **_settings(tolerance, fp16_tolerance, min_greedy_agreement, probes, max_new_tokens),
            eos_token_ids=stop,
            reference_greedy_texts=[tok.decode(g, skip_special_tokens=True) for g in ref.greedy],
            **_long_context_facts(config, long_probe),
            passed=True,
        )
        checks = _Checks(
            tmp, model_dir, inputs, ref, twin, max_new_tokens, tolerance, fp16_tolerance, min_greedy_agreement
        )
        _check_graphs(report, checks, graphs, written)
        report.files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        report.code = code_fingerprint("loraline.export.stage")  # the stage's closure, this module included
        report.library_versions = _versions()
        report.write(tmp / EXPORT_REPORT)
    return ExportResult(out_dir, out_dir / EXPORT_REPORT, report)


def _int4_reference(
    model: Any, int4_layers: Any, where: Any, tok: Any, inputs: list[list[int]], max_new_tokens: int, stop: list[int]
) -> _Reference | None:
    """With an int4 graph: the PyTorch model it computes (the weights dequantized in place), its reference numbers."""
    if int4_layers is None:
        return None
    from loraline.export.int4 import dequantized_twin

    dequantized_twin(model, int4_layers)
    return _reference_on(model, where, tok, inputs, max_new_tokens, stop)


def _settings(
    tolerance: float, fp16_tolerance: float, min_greedy_agreement: float, probes: list, max_new_tokens: int
) -> dict[str, Any]:
    return {
        "tolerance": tolerance,
        "fp16_tolerance": fp16_tolerance,
        "min_greedy_agreement": min_greedy_agreement,
        "probes": probes,
        "max_new_tokens": max_new_tokens,
        "decode_steps": DECODE_STEPS,
    }


@dataclass(frozen=True)
class _Checks:
    """What every graph is checked against, and how strictly."""

    tmp: Path
    model_dir: Path
    inputs: list[list[int]]
    ref: _Reference
    twin: _Reference | None
    max_new_tokens: int
    tolerance: float
    fp16_tolerance: float
    min_greedy_agreement: float


def _check_graphs(report: ExportReport, c: _Checks, graphs: tuple[str, ...], written: dict[str, Any]) -> None:
    """Each written graph's parity into `report` (ExportError at the first out of bounds); a merged QA-LoRA model's
    own low-bit graph, rewritten from the fp32 one, checked as strictly as fp32."""
    for name in graphs:
        setattr(report, name, _check_graph(name, c.tmp, written, c.inputs, c.ref, c.twin, c.max_new_tokens))
        _enforce(report, name, c.tolerance if name in EXACT_GRAPHS else c.fp16_tolerance, c.min_greedy_agreement)
    if not (c.model_dir / QALORA_QUANTIZED).is_file():
        return
    if "fp32" not in graphs:
        raise ExportError(
            f"{c.model_dir} is a merged QA-LoRA model: its low-bit graph is rewritten from the "
            "fp32 graph, so export.graphs must include fp32",
            report,
        )
    report.lowbit = _lowbit(c.model_dir, c.tmp, c.inputs, c.ref, c.max_new_tokens)
    _enforce(report, "lowbit", c.tolerance, c.min_greedy_agreement)


def _refuse_requantizing(model_dir: Path, graphs: tuple[str, ...]) -> None:
    if "int4" in graphs and (model_dir / QALORA_QUANTIZED).is_file():
        raise ExportError(
            f"{model_dir} is a merged QA-LoRA model, which carries its own low-bit graph: drop int4 "
            "from export.graphs (re-quantizing its weights to nearest would lose what QA-LoRA trained for)"
        )


def _long_context_facts(config: Any, long_probe: list[int] | None) -> dict[str, Any]:
    """The report's long_context_probe (the last entry of per_probe), for a LongLoRA model."""
    if long_probe is None:
        return {}
    probe = LongContextProbe(
        tokens=len(long_probe),
        original_context=extended_context(config)[0],
        max_position_embeddings=config.max_position_embeddings,
    )
    return {"long_context_probe": probe}


def check_graphs(graphs: Sequence[str]) -> tuple[str, ...]:
    """`graphs` in GRAPHS order, refused with the reason when it cannot be built or checked."""
    problem = export_graphs_problem(tuple(graphs))
    if problem:
        raise ExportError(f"export.graphs: {problem}")
    return tuple(g for g in GRAPHS if g in graphs)


def _load(model_dir: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if not tok.chat_template:
        raise ExportError(f"{model_dir}: the tokenizer has no chat template; export needs one to be self-contained")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map={"": "cpu"})
    return tok, model.eval()


def _reference_on(
    model: Any, where: torch.device, tok: Any, inputs: list[list[int]], max_new_tokens: int, stop: list[int]
) -> _Reference:
    """PyTorch's numbers on `where`; the model is back on the CPU after (graphs are traced there)."""
    model.to(where)  # a no-op on the CPU; on CUDA the weights go there and back unchanged, bit for bit
    ref = _reference(model, tok, inputs, max_new_tokens, stop)
    model.to("cpu")
    if where.type == "cuda":
        torch.cuda.empty_cache()
    return ref


def _write_float_and_int4(
    model: Any, tmp: Path, graphs: tuple[str, ...], opset: int | None, block_size: int
) -> tuple[dict[str, dict[str, Any]], dict | None]:
    """One trace of the float32 model, written as the int4 graph and/or the fp32 graph (the int4 graph is
    assembled from the unoptimised program, so it comes first). Returns each graph's facts and the int4
    layers' quantized weights (None without int4)."""
    program = trace_model(model, opset)
    written: dict[str, dict[str, Any]] = {}
    layers = None
    if "int4" in graphs:
        from loraline.export.int4 import write_int4_graph  # peft's tuners (via qalora): only when needed

        try:
            written["int4"], layers = write_int4_graph(program, model, tmp / GRAPH_FILES["int4"], block_size)
        except ValueError as exc:
            raise ExportError(f"int4 graph: {exc}") from exc
    if "fp32" in graphs:
        written["fp32"] = save_graph(program, model, tmp / GRAPH_FILES["fp32"])
    if "int8" in graphs:
        written["int8"] = quantize_int8(tmp / GRAPH_FILES["fp32"], tmp / GRAPH_FILES["int8"])
    del program
    gc.collect()
    return written, layers


def _write_fp16(model_dir: Path, path: Path, opset: int | None) -> dict[str, Any]:
    """The model loaded again at float16 (a second trace: the graph's activations are float16 too)."""
    _, half = _load(model_dir, torch.float16)
    facts = save_graph(trace_model(half, opset), half, path)
    del half
    gc.collect()
    return facts


def _save_companions(model: Any, tok: Any, model_dir: Path, tmp: Path) -> None:
    from transformers import GenerationConfig

    model.config.save_pretrained(str(tmp))
    gen_config = model.generation_config if model.generation_config is not None else GenerationConfig()
    gen_config.save_pretrained(str(tmp))
    save_tokenizer(tok, tmp, model_dir)


def _check_graph(
    name: str,
    tmp: Path,
    written: dict[str, dict[str, Any]],
    inputs: list[list[int]],
    ref: _Reference,
    twin: _Reference | None,
    max_new_tokens: int,
) -> dict[str, Any]:
    """A graph's file facts, size and parity: int4 against its dequantized twin (and, reported, against the
    float model: the quantization's own error), the others against the float model."""
    facts = {**written[name], "bytes": graph_bytes(tmp, written[name]["file"])}
    gen = OnnxGenerator(tmp, written[name]["file"])
    if name == "int4":
        return {**facts, **_parity(gen, inputs, twin, max_new_tokens, float_ref=ref)}
    return {**facts, **_parity(gen, inputs, ref, max_new_tokens)}


def _enforce(report: ExportReport, name: str, tolerance: float, min_greedy_agreement: float) -> None:
    """Fail the export (ExportError, nothing written) when graph `name` is past its logit bound or its
    greedy generations agree with its reference on fewer than `min_greedy_agreement` of the probes
    (an argmax near a tie may flip on rounding, so not all); int8 is reported only (dynamic activation
    quantization has no exact twin to hold it to)."""
    if name == "int8":
        return
    numbers: GraphReport = getattr(report, name)
    worst = max(numbers.max_abs_logit_diff, numbers.decode_max_abs_logit_diff)
    against = "its dequantized float32 twin" if name == "int4" else "PyTorch"
    if worst > tolerance:
        report.passed = False
        raise ExportError(
            f"ONNX {name} logits ({numbers.file}) differ from {against} by {worst:.3g} > tolerance {tolerance:g} "
            f"(prompt {numbers.max_abs_logit_diff:.3g}, cached "
            f"decoding {numbers.decode_max_abs_logit_diff:.3g})",
            report,
        )
    if numbers.greedy_agreement < min_greedy_agreement:
        report.passed = False
        raise ExportError(
            f"ONNX {name} ({numbers.file}) generates what {against} generates on {numbers.greedy_agreement:.0%} "
            f"of the probes < export.min_greedy_agreement {min_greedy_agreement:.0%}",
            report,
        )


def _lowbit(
    model_dir: Path, tmp: Path, inputs: list[list[int]], ref: _Reference, max_new_tokens: int
) -> dict[str, Any]:
    """The merged QA-LoRA model as onnxruntime MatMulNBits (its codes, scales and folded zero points),
    against the PyTorch merged model, whose float weights are exactly those codes dequantized."""
    from loraline.export.lowbit import lowbit_file, write_matmul_nbits  # peft's tuners: only when needed
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
        out = model(
            input_ids=torch.tensor([[token]], device=model.device), attention_mask=attn, use_cache=True, **{key: cache}
        )
        steps.append(out.logits[0, -1].float().cpu().numpy())
    return tokens, steps


# --- parity (onnxruntime) -------------------------------------------------------------------------


def _parity(
    gen: OnnxGenerator,
    inputs: list[list[int]],
    ref: _Reference,
    max_new_tokens: int,
    float_ref: _Reference | None = None,
) -> dict[str, Any]:
    """The graph against `ref` on every probe (prompt logits, cached decoding fed ref's tokens, greedy
    generation); with `float_ref`, also its prompt logits and greedy tokens against that model
    (`vs_float`: a quantized graph's distance from the unquantized model)."""
    per_probe, texts, drift = [], [], []
    for i, ids in enumerate(inputs):
        x = np.asarray([ids], dtype=np.int64)
        mask = np.ones_like(x)
        logits, past = gen.forward(x, mask, gen.empty_past(1))
        prompt = logits[0].astype(np.float64)
        prompt_diff = np.abs(prompt - ref.prompt_logits[i])
        step_diffs = []
        for token, expected in zip(ref.decode_tokens[i], ref.decode_logits[i], strict=True):
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            logits, past = gen.forward(np.asarray([[token]], dtype=np.int64), mask, past)
            step_diffs.append(float(np.abs(logits[0, -1].astype(np.float64) - expected).max()))
        greedy = gen.generate_ids(ids, max_new_tokens=max_new_tokens)
        texts.append(gen.tokenizer.decode(greedy, skip_special_tokens=True))
        per_probe.append(
            {
                "max_abs_logit_diff": float(prompt_diff.max()),
                "mean_abs_logit_diff": float(prompt_diff.mean()),
                "decode_max_abs_logit_diff": max(step_diffs),
                "decode_step_diffs": step_diffs,
                "next_token_equal": bool(int(logits.argmax(-1)[0, -1]) == int(ref.decode_logits[i][-1].argmax())),
                "greedy_equal": greedy == ref.greedy[i],
                "greedy_common_prefix": common_prefix(greedy, ref.greedy[i]),
                "greedy_tokens": len(greedy),
            }
        )
        if float_ref is not None:
            diff = np.abs(prompt - float_ref.prompt_logits[i])
            drift.append(
                {
                    "max_abs_logit_diff": float(diff.max()),
                    "mean_abs_logit_diff": float(diff.mean()),
                    "next_token_equal": bool(prompt[-1].argmax() == float_ref.prompt_logits[i][-1].argmax()),
                    "greedy_equal": greedy == float_ref.greedy[i],
                    "greedy_common_prefix": common_prefix(greedy, float_ref.greedy[i]),
                    "greedy_tokens": len(greedy),
                }
            )
    out = {
        **summarize(per_probe),
        "decode_max_abs_logit_diff": max(p["decode_max_abs_logit_diff"] for p in per_probe),
        "per_probe": per_probe,
        "greedy_texts": texts,
    }
    if float_ref is not None:
        out["vs_float"] = {**summarize(drift), "per_probe": drift}
    return out


def _versions() -> dict[str, Any]:
    versions = dict(library_versions())
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None
    return versions

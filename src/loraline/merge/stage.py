"""The `merge` stage: a trained LoRA/QLoRA adapter + its base -> one standalone Hugging Face model.

Recipe (peft's advice for QLoRA): reload the base in full precision (fp32 by default, bf16/fp16 on
request), apply the adapter with stock PeftModel.from_pretrained, merge_and_unload(). Merging into a
4-bit layer would re-quantize and drift, so the 4-bit model is only ever a *reference* here.

Where: `device` (merge.device: auto, cpu or cuda, as the base stage's base.build.device): the base and
adapter load there, merge there and answer the probes there (batched on CUDA, one at a time on the CPU);
the 4-bit reference runs there too (bitsandbytes' CUDA kernels, or its CPU ones), and so does the reload
check. The merged weights are moved to the CPU to be written, at `dtype` either way; on the CPU the merge
is the same bytes as ever. The report and the timing file record the device.

Checked on a probe set (chat conversations rendered with the base's chat template and add_generation_prompt:
the built-in ones, and merge.probes prompts drawn from the tenant's test split, loraline.merge.probes)
before anything is written:

- merged vs base+adapter unmerged at the same precision: max abs logit difference (must not exceed
  `tolerance`, else MergeError and no out_dir) and greedy-generation agreement;
- merged vs the 4-bit model the adapter was trained against (the train record's quantization
  settings, loaded with loraline.modelling.loading.load_base_causal_lm): the quantization gap, reported only;
- the written folder reloaded with plain AutoModelForCausalLM: logits must match the in-memory merge.

out_dir (replaced atomically, safe to re-run):
    config.json, generation_config.json, model.safetensors   plain AutoModelForCausalLM loads it
    qalora_quantized.safetensors                             QA-LoRA only: the codes, scales and folded zero points
    torchao/                                                 QA-LoRA only: the same low-bit model, which transformers
                                                             loads through torchao (modelling/qalora_torchao.py),
                                                             loaded back and checked before anything is written
    tokenizer.json, tokenizer_config.json (chat_template inside)
    merge_report.json                                        numbers, tolerance, pass/fail, hashes, code

Without `merged` in deploy.targets (`merged=False`), nothing full-size is written: the base and adapter load at
`dtype` (the precision serve.dtype `merge` serves at), the probes run on base + adapter unmerged, and out_dir
holds merge_report.json alone, with those answers as probe_reference (what `loraline serve`'s deployment check
compares with) and `"merged": "not built (deploy.targets)"`. DVC needs the declared folder to exist, hence the
small folder rather than none.

`run` also writes the parity numbers people compare (reports/<tenant>/metrics/merge.json, a DVC metric
the gate reads) and the run's timing (reports/timing/merge@<tenant>.json).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraline import io
from loraline.config import BaseParams, Params
from loraline.layout import ADAPTER_CONFIG, ADAPTER_FILES, MERGE_REPORT, NOT_BUILT, TRAIN_RECORD, Layout
from loraline.merge.probes import ProbeSet, TenantDraw, probe_set, probe_set_logits, run_probe_set
from loraline.modelling.chat import save_tokenizer
from loraline.modelling.device import compute_dtype, device_facts, resolve_device
from loraline.modelling.loading import (
    base_model_hash,
    base_record,
    load_base_causal_lm,
    load_base_tokenizer,
    resolve_base_model_path,
)
from loraline.modelling.parity import DEFAULT_PROBES, ProbeOutputs, compare
from loraline.modelling.parity_numbers import ParityError, headline
from loraline.modelling.variants import MergedCheck, Variants
from loraline.provenance import code_fingerprint, library_versions, phase, run_timing, sha256_file
from loraline.records import BaseRecord, MergeReport, ProbeReference, QuantizedGap, ReloadCheck, TrainRecord

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Logits of the reloaded folder vs the in-memory merge: the same weights, so only save/load bugs
# (tied weights, dtype casts) can make them differ.
RELOAD_TOLERANCE = 1e-5


class MergeError(ParityError):
    """The merged model does not reproduce base+adapter within tolerance (or the inputs are unusable)."""


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    report_path: Path
    report: MergeReport

    @property
    def passed(self) -> bool:
        return self.report.passed


@dataclass(frozen=True)
class _Merge:
    """One merge's settings and inputs, as its reports record them."""

    where: torch.device
    dtype: str
    tolerance: float
    probes: list[list[dict[str, str]]]  # the built-in ones (merge_adapter's `probes`)
    drawn: ProbeSet  # every probe, the built-in ones and the tenant's
    max_new_tokens: int
    adapter_dir: Path
    train_record: TrainRecord | None
    base_dir: Path
    base_record: BaseRecord
    tok: Any

    def save_tokenizer(self, folder: Path) -> None:
        """The base's tokenizer (chat template inside) into a written model folder, without peft's model card."""
        local = resolve_base_model_path(self.base_dir) if self.base_record.source != "hub" else None
        save_tokenizer(self.tok, folder, local)
        (folder / "README.md").unlink(missing_ok=True)


def run(params: Params, layout: Layout, tenant: str, *, base_dir: Path | None = None) -> MergeResult:
    """The merge stage for one tenant: its adapter merged into models/merged/<tenant>, the report
    also copied to reports/<tenant>/merge_report.json, its parity numbers to
    reports/<tenant>/metrics/merge.json and the run's timing to reports/timing/merge@<tenant>.json."""
    started = time.perf_counter()
    m = params.merge
    draw = TenantDraw(layout.prepared_dataset_dir(tenant), tenant, params.seed, m.probes, m.probe_max_tokens)
    result = merge_adapter(
        base_dir=base_dir or layout.base_dir,
        base_params=params.base,
        adapter_dir=layout.adapter_dir(tenant),
        out_dir=layout.merged_dir(tenant),
        dtype=m.dtype,
        tolerance=params.gate_for(tenant).max_merge_logit_diff,
        tenant_probes=draw,
        max_new_tokens=m.max_new_tokens,
        quantized_reference=m.quantized_reference,
        check_reload=m.check_reload,
        device=m.device,
        merged=params.deploy_for(tenant).builds("merged"),
    )
    io.copy_file(result.report_path, layout.merge_report_path(tenant))
    io.write_json(layout.metrics_path("merge", tenant), merge_metrics(result.report))
    where = result.report.model_dump(include={"device", "device_name"}, exclude_unset=True)
    io.write_timing(layout.timing_path("merge", tenant), run_timing(started, **where))
    return result


def merge_adapter(
    *,
    base_dir: Path,
    base_params: BaseParams,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str = "float32",
    tolerance: float = 1e-3,
    probes: list[list[dict[str, str]]] | None = None,
    tenant_probes: TenantDraw | None = None,
    max_new_tokens: int = 32,
    quantized_reference: bool = True,
    check_reload: bool = True,
    device: str = "auto",
    merged: bool = True,
) -> MergeResult:
    """Merge `adapter_dir` into the base at `dtype` on `device` (auto, cpu or cuda) and write a standalone
    model into `out_dir`; `merged=False` (deploy.targets without merged): only the report, with the reference
    answers of base + adapter unmerged (module docstring). The probes: `probes` (default: the built-in ones),
    then those `tenant_probes` draws from the tenant's test split. The adapter's variants (QA-LoRA, long
    context: modelling/variants.py) load the base, put the adapter on it and merge it their way.

    Raises MergeError (nothing written; a previous out_dir is removed so that no stale merge of an
    older adapter survives) when merged and unmerged logits differ by more than `tolerance`.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    settings = (dtype, tolerance, probes, tenant_probes, max_new_tokens, device)
    with phase("tokenizer and probes"):
        m, variants = _inputs(Path(base_dir), base_params, adapter_dir, *settings)
    where, tok, drawn = m.where, m.tok, m.drawn
    load_dtype = variants.load_dtype(DTYPES[dtype])
    with phase("load base and adapter"):
        base = load_base_causal_lm(m.base_dir, where, load_dtype, config_overrides=variants.config_overrides())
        model = variants.attach(base, adapter_dir)
    model.eval()
    with phase("generate (unmerged)"):  # without merged, the reference answers alone: no logits to compare
        unmerged = run_probe_set(model, tok, drawn, max_new_tokens, logits=merged)
    if not merged:
        del model, base
        _release(where)
        return _reference_only(out_dir, unmerged, m)
    with phase("merge"):
        merged_model = variants.merge(model, DTYPES[dtype])
    merged_model.eval()
    with phase("generate (merged)"):
        merged_outputs = run_probe_set(merged_model, tok, drawn, max_new_tokens)
    del model, base
    merged_model.to("cpu")  # written from the CPU; the GPU is free for the references (a no-op on the CPU)
    _release(where)

    report = _merge_report(m, merged_outputs, compare(merged_outputs, unmerged)).assign(variants.merge_report(dtype))
    _refuse_drift(out_dir, m, report)
    with io.atomic_dir(out_dir) as tmp:
        with phase("write merged"):
            _write_merged(tmp, out_dir, merged_model, m, variants, unmerged, report)
        del merged_model
        gc.collect()
        with phase("4-bit reference"):
            report.vs_4bit = _vs_4bit(m, variants, merged_outputs, quantized_reference)
        if check_reload:
            with phase("reload check"):
                _check_reload(tmp, out_dir, m, merged_outputs, report)
        files = sorted(f for f in tmp.iterdir() if f.is_file() and f.name != MERGE_REPORT)
        report.files = {f.name: sha256_file(f) for f in files}
        report.write(tmp / MERGE_REPORT)
    return MergeResult(out_dir, out_dir / MERGE_REPORT, report)


def _inputs(
    base_dir: Path,
    base_params: BaseParams,
    adapter_dir: Path,
    dtype: str,
    tolerance: float,
    probes: list[list[dict[str, str]]] | None,
    tenant_probes: TenantDraw | None,
    max_new_tokens: int,
    device: str,
) -> tuple[_Merge, Variants]:
    """The merge's settings checked, its inputs read and its probes drawn; the adapter's variants."""
    _check_settings(adapter_dir, dtype, tolerance, max_new_tokens)
    probes = [list(p) for p in (probes if probes is not None else DEFAULT_PROBES)]
    where = resolve_device(device, "merge.device")
    base = base_record(base_dir)
    train_record = _read_train_record(adapter_dir)
    variants = _variants(train_record, adapter_dir)
    tok = load_base_tokenizer(base_dir, base_params)
    drawn = probe_set(tok, probes, tenant_probes, MergeError)
    if not drawn.probes:
        raise MergeError("the probe set is empty: at least one conversation is needed to check the merge")
    facts = (where, dtype, tolerance, probes, drawn, max_new_tokens, adapter_dir, train_record, base_dir, base)
    return _Merge(*facts, tok), variants


def _check_settings(adapter_dir: Path, dtype: str, tolerance: float, max_new_tokens: int) -> None:
    if dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not tolerance >= 0:
        raise MergeError(f"tolerance must be >= 0, got {tolerance}")
    if max_new_tokens < 1:
        raise MergeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise MergeError(f"{adapter_dir} is not a trained adapter: {', '.join(missing)} missing (run the train stage)")


def _write_merged(
    tmp: Path,
    out_dir: Path,
    merged_model: Any,
    m: _Merge,
    variants: Variants,
    unmerged: ProbeOutputs,
    report: MergeReport,
) -> None:
    """The merged model and the base's tokenizer into `tmp`, and what the variants write beside them (checked
    there; MergeError and no out_dir when it does not load back to the merge); their facts join `report`."""
    tmp.chmod(0o755)
    merged_model.save_pretrained(tmp, safe_serialization=True)
    m.save_tokenizer(tmp)
    check = MergedCheck(m.save_tokenizer, lambda loaded: _vs(loaded, m, unmerged), m.tolerance)
    try:
        variants.write_merged(tmp, check)
    except ValueError as exc:
        _discard(out_dir)
        raise MergeError(str(exc), report.assign(variants.merge_report(m.dtype))) from None
    report.assign(variants.merge_report(m.dtype))


def _vs(model: Any, m: _Merge, unmerged: ProbeOutputs) -> dict[str, Any]:
    """A loaded model's probe outputs against the unmerged adapter's."""
    return compare(run_probe_set(model, m.tok, m.drawn, m.max_new_tokens), unmerged)


def _common_report(m: _Merge) -> dict[str, Any]:
    """The fields both reports have: where and how the merge ran, the probes, the adapter and the base."""
    return {
        **device_facts(m.where),
        "dtype": m.dtype,
        "max_new_tokens": m.max_new_tokens,
        "probes": _probe_facts(m.drawn, m.probes),
        "adapter": {
            "dir": str(m.adapter_dir),
            "files": {f: sha256_file(m.adapter_dir / f) for f in ADAPTER_FILES},
            "train_fingerprint": m.train_record.fingerprint if m.train_record else None,
            "quantization": m.train_record.quantization if m.train_record else None,
        },
        "base": {
            "dir": str(m.base_dir),
            "source": m.base_record.source,
            "model_ref": m.base_record.model_ref,
            "sha256": base_model_hash(m.base_record),
        },
        "code": code_fingerprint(__name__),
        "library_versions": library_versions(),
    }


def _merge_report(m: _Merge, merged: ProbeOutputs, vs_unmerged: dict[str, Any]) -> MergeReport:
    return MergeReport(
        **_common_report(m),
        passed=vs_unmerged["max_abs_logit_diff"] <= m.tolerance,
        tolerance=m.tolerance,
        # The merged model's greedy answers to the probes, as token ids: what serving must reproduce
        # (the deployment check of loraline serve sends these prompts through the server).
        probe_reference=ProbeReference(
            **_reference_prompts(m.drawn),
            greedy=merged.greedy,
            texts=merged.texts,
            max_new_tokens=m.max_new_tokens,
        ),
        merged_vs_unmerged=vs_unmerged,
    )


def _refuse_drift(out_dir: Path, m: _Merge, report: MergeReport) -> None:
    """MergeError (and no out_dir) for an adapter trained on another base, or a merge that drifts from it."""
    _refuse_other_base(out_dir, m, report)
    if not report.passed:
        _discard(out_dir)
        vs_unmerged = report.merged_vs_unmerged
        raise MergeError(
            f"merged model drifts from base+adapter at {m.dtype}: max abs logit diff "
            f"{vs_unmerged.max_abs_logit_diff:.3g} > tolerance {m.tolerance:.3g} "
            f"(mean {vs_unmerged.mean_abs_logit_diff:.3g}, "
            f"greedy agreement {vs_unmerged.greedy_agreement:.2f}); nothing written. "
            "Merge at float32, or raise the tolerance if this precision is intended.",
            report,
        )


def _refuse_other_base(out_dir: Path, m: _Merge, report: MergeReport) -> None:
    trained_base = m.train_record.base.sha256 if m.train_record else None
    if trained_base and trained_base != report.base.sha256:
        _discard(out_dir)
        raise MergeError(
            f"the adapter in {m.adapter_dir} was trained on a different base (sha256 {trained_base[:12]}...) than "
            f"{m.base_dir} ({report.base.sha256[:12]}...): rerun the train stage on this base",
            report,
        )


def _check_reload(tmp: Path, out_dir: Path, m: _Merge, merged: ProbeOutputs, report: MergeReport) -> None:
    report.reload = _reload_check(tmp, m.drawn, merged, m.tok.pad_token_id, m.where)
    if report.reload.max_abs_logit_diff > RELOAD_TOLERANCE:
        _discard(out_dir)
        raise MergeError(
            f"the saved merged model does not reload to the same logits "
            f"(max abs diff {report.reload.max_abs_logit_diff:.3g}); nothing written",
            report,
        )


def _reference_only(out_dir: Path, unmerged: ProbeOutputs, m: _Merge) -> MergeResult:
    """deploy.targets without merged: out_dir holds the report alone, whose probe_reference is base + adapter's
    answers (what serving reproduces). Refused, as a merge is, when the adapter was trained on another base."""
    report = MergeReport(
        **_common_report(m),
        passed=True,
        merged=NOT_BUILT,
        probe_reference=ProbeReference(
            **_reference_prompts(m.drawn),
            greedy=unmerged.greedy,
            texts=unmerged.texts,
            max_new_tokens=m.max_new_tokens,
            model="base + adapter, unmerged",
        ),
    )
    _refuse_other_base(out_dir, m, report)
    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        report.write(tmp / MERGE_REPORT)
    return MergeResult(out_dir, out_dir / MERGE_REPORT, report)


def _probe_facts(drawn: ProbeSet, builtin: list[list[dict[str, str]]]) -> dict[str, Any]:
    return {**drawn.facts(), "default": builtin == DEFAULT_PROBES}


def _reference_prompts(drawn: ProbeSet) -> dict[str, Any]:
    """The probes as the deployment check replays them: token ids, and where each comes from (parallel lists)."""
    return {"prompts": drawn.prompts, "sources": [p.origin() for p in drawn.probes]}


# --- references -----------------------------------------------------------------------------------


def _vs_4bit(m: _Merge, variants: Variants, merged: ProbeOutputs, measured: bool) -> QuantizedGap:
    """The report's vs_4bit: as the variants decide it (QA-LoRA: no 4-bit model), else the quantized gap."""
    decided = variants.quantized_reference()
    if decided is None:
        decided = _quantized_gap(m, variants, merged) if measured else {"skipped": "quantized_reference=False"}
    return QuantizedGap(**decided)


def _quantized_gap(m: _Merge, variants: Variants, merged: ProbeOutputs) -> dict[str, Any]:
    """Merged model vs the 4-bit base + adapter it was trained against (what training optimised), on merge.device:
    bitsandbytes' CUDA kernels in bfloat16 on a GPU, as training ran there; its CPU ones in float32 otherwise."""
    from peft import PeftModel

    from loraline.config import TrainParams

    if m.train_record is None:
        return {"skipped": f"no {TRAIN_RECORD} in the adapter folder: its quantization settings are unknown"}
    try:
        params = TrainParams.model_validate(m.train_record.params)
    except Exception as exc:  # noqa: BLE001 -- an old record the current schema rejects: report, don't fail
        return {"skipped": f"{TRAIN_RECORD} params do not validate with this loraline version: {exc}"}
    if params.quantization == "none":
        return {"skipped": "adapter trained with quantization none: there is no 4-bit model to compare against"}
    device = m.where
    model = load_base_causal_lm(
        m.base_dir,
        device,
        compute_dtype(device),
        params.quantization,
        params.double_quant,
        variants.config_overrides(),
    )
    model = PeftModel.from_pretrained(model, str(m.adapter_dir), is_trainable=False)
    model.eval()
    ref = run_probe_set(model, m.tok, m.drawn, m.max_new_tokens)
    del model
    _release(device)
    gap = compare(merged, ref)
    gap.pop("merged_greedy_texts")
    gap["quantization"] = {
        "type": params.quantization,
        "double_quant": params.double_quant,
        "compute_dtype": str(compute_dtype(device)).removeprefix("torch."),
    }
    return gap


def _reload_check(
    folder: Path, probes: ProbeSet, merged: ProbeOutputs, pad_token_id: int | None, device: torch.device
) -> ReloadCheck:
    """The written folder loaded with plain transformers on `device`, its prompt logits computed exactly as
    the merged model's were (same device, same batches): only a save/load bug can make them differ."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": str(device)})
    model.eval()
    logits = probe_set_logits(model, probes, pad_token_id)
    worst = max(float((a - b).abs().max()) for a, b in zip(logits, merged.logits, strict=True))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    del model
    _release(device)
    return ReloadCheck(max_abs_logit_diff=worst, loaded_dtype=dtype)


def _release(device: torch.device) -> None:
    """Free what the dropped models held (and, on CUDA, the allocator's cache, for the next model)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- files ----------------------------------------------------------------------------------------


def _read_train_record(adapter_dir: Path) -> TrainRecord | None:
    path = adapter_dir / TRAIN_RECORD
    return TrainRecord.read(path) if path.is_file() else None


def _variants(train_record: TrainRecord | None, adapter_dir: Path) -> Variants:
    """The adapter's variants, as its train_record.json names them (plain LoRA without one). A QA-LoRA adapter
    whose record does not say how the base was quantized cannot be folded: refused."""
    qalora = train_record is not None and train_record.qalora is not None
    if not qalora and json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("use_qalora"):
        raise MergeError(
            f"{adapter_dir} is a QA-LoRA adapter but its {TRAIN_RECORD} does not say how the base was "
            "quantized (qalora.bits, qalora.group_size): retrain it with this loraline"
        )
    return Variants.from_record(train_record)


def _discard(out_dir: Path) -> None:
    """Remove a previous output: a merge of an older adapter must not pass for this one's."""
    if out_dir.exists():
        shutil.rmtree(out_dir)


def merge_metrics(report: MergeReport) -> dict[str, Any]:
    """What people compare across runs (`dvc metrics diff`), and what the gate decides merge parity on:
    merged vs base+adapter, and (when measured) the gap to the 4-bit model the adapter was trained on."""
    if report.merged_vs_unmerged is None:  # deploy.targets without merged: no merge, so no parity to measure
        return {"passed": report.passed, "merged": report.merged or NOT_BUILT}
    out: dict[str, Any] = {"passed": report.passed, **headline(report.merged_vs_unmerged.model_dump())}
    quantized = report.vs_4bit
    if quantized is not None and quantized.skipped is None and quantized.max_abs_logit_diff is not None:
        out["quantized"] = headline(quantized.model_dump())
    return out

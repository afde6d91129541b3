"""The `merge` stage: a trained LoRA/QLoRA adapter + its base -> one standalone Hugging Face model.

Recipe (peft's advice for QLoRA): reload the base in full precision (fp32 by default, bf16/fp16 on
request), apply the adapter with stock PeftModel.from_pretrained, merge_and_unload(). Merging into a
4-bit layer would re-quantize and drift, so the 4-bit model is only ever a *reference* here.

Checked on a fixed probe set (chat conversations rendered with the base's chat template and
add_generation_prompt) before anything is written:

- merged vs base+adapter unmerged at the same precision: max abs logit difference (must not exceed
  `tolerance`, else MergeError and no out_dir) and greedy-generation agreement;
- merged vs the 4-bit model the adapter was trained against (the train record's quantization
  settings, loaded with loraline.train.model.load_base_model): the quantization gap, reported only;
- the written folder reloaded with plain AutoModelForCausalLM: logits must match the in-memory merge.

out_dir (replaced atomically, safe to re-run):
    config.json, generation_config.json, model.safetensors   plain AutoModelForCausalLM loads it
    tokenizer.json, tokenizer_config.json (chat_template inside)
    merge_report.json                                        numbers, tolerance, pass/fail, hashes
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
from loraline.base.stage import base_load_kwargs, load_base_tokenizer, read_base_record, resolve_base_model_path
from loraline.config import BaseParams
from loraline.provenance import code_revision, library_versions, sha256_file

REPORT = "merge_report.json"
TRAIN_RECORD = "train_record.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Logits of the reloaded folder vs the in-memory merge: the same weights, so only save/load bugs
# (tied weights, dtype casts) can make them differ.
RELOAD_TOLERANCE = 1e-5

DEFAULT_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "Summarise in one sentence: the printer on floor 2 is down again."},
    ],
    [{"role": "user", "content": 'Turn this into JSON: name=Ana, team=network, priority=P2'}],
    [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 4?"},
    ],
]


class MergeError(ValueError):
    """The merged model does not reproduce base+adapter within tolerance (or the inputs are unusable)."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    report_path: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def merge_adapter(
    *,
    base_dir: Path,
    base_params: BaseParams,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str = "float32",
    tolerance: float = 1e-3,
    probes: list[list[dict[str, str]]] | None = None,
    max_new_tokens: int = 32,
    quantized_reference: bool = True,
    check_reload: bool = True,
) -> MergeResult:
    """Merge `adapter_dir` into the base at `dtype` and write a standalone model into `out_dir`.

    Raises MergeError (nothing written; a previous out_dir is removed so that no stale merge of an
    older adapter survives) when merged and unmerged logits differ by more than `tolerance`.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not tolerance >= 0:
        raise MergeError(f"tolerance must be >= 0, got {tolerance}")
    if max_new_tokens < 1:
        raise MergeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise MergeError(f"{adapter_dir} is not a trained adapter: {', '.join(missing)} missing (run the train stage)")
    probes = [list(p) for p in (probes if probes is not None else DEFAULT_PROBES)]
    if not probes:
        raise MergeError("probes is empty: at least one conversation is needed to check the merge")

    started = time.perf_counter()
    torch_dtype = DTYPES[dtype]
    base_record = read_base_record(base_dir)
    train_record = _read_train_record(adapter_dir)
    tok = load_base_tokenizer(base_dir, base_params)
    inputs = [_encode(tok, conv) for conv in probes]

    base = AutoModelForCausalLM.from_pretrained(
        resolve_base_model_path(base_dir), dtype=torch_dtype, device_map={"": "cpu"}, **base_load_kwargs(base_dir)
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    unmerged = _run_probes(model, tok, inputs, max_new_tokens)
    merged_model = model.merge_and_unload()
    merged_model.eval()
    merged = _run_probes(merged_model, tok, inputs, max_new_tokens)
    vs_unmerged = _compare(merged, unmerged)
    del model, base
    gc.collect()

    report: dict[str, Any] = {
        "passed": vs_unmerged["max_abs_logit_diff"] <= tolerance,
        "dtype": dtype,
        "tolerance": tolerance,
        "max_new_tokens": max_new_tokens,
        "probes": {"count": len(probes), "default": probes == DEFAULT_PROBES, "prompt_tokens": [len(x) for x in inputs]},
        "merged_vs_unmerged": vs_unmerged,
        "adapter": {
            "dir": str(adapter_dir),
            "files": {f: sha256_file(adapter_dir / f) for f in ADAPTER_FILES},
            "train_fingerprint": (train_record or {}).get("fingerprint"),
            "quantization": _quantization(train_record),
        },
        "base": {
            "dir": str(base_dir),
            "source": base_record.get("source"),
            "model_ref": base_record.get("model_ref"),
            "sha256": _base_hash(base_record),
        },
        "code_revision": code_revision(),
        "library_versions": library_versions(),
    }
    trained_base = ((train_record or {}).get("base") or {}).get("sha256")
    if trained_base and trained_base != report["base"]["sha256"]:
        _discard(out_dir)
        raise MergeError(
            f"the adapter in {adapter_dir} was trained on a different base (sha256 {trained_base[:12]}...) than "
            f"{base_dir} ({report['base']['sha256'][:12]}...): rerun the train stage on this base",
            report,
        )
    if not report["passed"]:
        _discard(out_dir)
        raise MergeError(
            f"merged model drifts from base+adapter at {dtype}: max abs logit diff "
            f"{vs_unmerged['max_abs_logit_diff']:.3g} > tolerance {tolerance:.3g} "
            f"(mean {vs_unmerged['mean_abs_logit_diff']:.3g}, greedy agreement {vs_unmerged['greedy_agreement']:.2f}); "
            "nothing written. Merge at float32, or raise the tolerance if this precision is intended.",
            report,
        )

    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        merged_model.save_pretrained(tmp, safe_serialization=True)
        _save_tokenizer(tok, tmp, base_record)
        (tmp / "README.md").unlink(missing_ok=True)
        del merged_model
        gc.collect()
        report["vs_4bit"] = (
            _quantized_gap(train_record, base_dir, adapter_dir, tok, inputs, max_new_tokens, merged)
            if quantized_reference
            else {"skipped": "quantized_reference=False"}
        )
        if check_reload:
            report["reload"] = _reload_check(tmp, inputs, merged)
            if report["reload"]["max_abs_logit_diff"] > RELOAD_TOLERANCE:
                _discard(out_dir)
                raise MergeError(
                    f"the saved merged model does not reload to the same logits "
                    f"(max abs diff {report['reload']['max_abs_logit_diff']:.3g}); nothing written",
                    report,
                )
        report["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name != REPORT}
        report["wall_s"] = round(time.perf_counter() - started, 2)
        io.write_json(tmp / REPORT, report)
    return MergeResult(out_dir, out_dir / REPORT, report)


# --- probes ---------------------------------------------------------------------------------------


@dataclass
class _Outputs:
    logits: list[torch.Tensor]  # per probe: [prompt_len, vocab] float32
    greedy: list[list[int]]  # per probe: generated token ids (prompt excluded)
    texts: list[str]


def _encode(tok: Any, conversation: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MergeError(f"probe {conversation!r} renders to no tokens")
    return list(ids)


@torch.no_grad()
def _run_probes(model: Any, tok: Any, inputs: list[list[int]], max_new_tokens: int) -> _Outputs:
    out = _Outputs([], [], [])
    for ids in inputs:
        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        attn = torch.ones_like(x)
        out.logits.append(model(input_ids=x, attention_mask=attn, use_cache=False).logits[0].float().cpu())
        gen = model.generate(
            input_ids=x, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, temperature=None, top_p=None, top_k=None, use_cache=True,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        new = gen[0, len(ids):].tolist()
        out.greedy.append(new)
        out.texts.append(tok.decode(new, skip_special_tokens=True))
    return out


def _compare(a: _Outputs, b: _Outputs) -> dict[str, Any]:
    per_probe = []
    for la, lb, ga, gb in zip(a.logits, b.logits, a.greedy, b.greedy, strict=True):
        diff = (la - lb).abs()
        per_probe.append({
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "next_token_equal": bool(la[-1].argmax() == lb[-1].argmax()),
            "greedy_equal": ga == gb,
            "greedy_common_prefix": _common_prefix(ga, gb),
        })
    n = len(per_probe)
    return {
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in per_probe),
        "mean_abs_logit_diff": sum(p["mean_abs_logit_diff"] for p in per_probe) / n,
        "greedy_agreement": sum(p["greedy_equal"] for p in per_probe) / n,
        "next_token_agreement": sum(p["next_token_equal"] for p in per_probe) / n,
        "per_probe": per_probe,
        "merged_greedy_texts": a.texts,
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- references -----------------------------------------------------------------------------------


def _quantized_gap(
    train_record: dict[str, Any] | None, base_dir: Path, adapter_dir: Path, tok: Any,
    inputs: list[list[int]], max_new_tokens: int, merged: _Outputs,
) -> dict[str, Any]:
    """Merged model vs the 4-bit base + adapter it was trained against (what training optimised)."""
    from peft import PeftModel

    from loraline.config import TrainParams
    from loraline.train.model import load_base_model

    if train_record is None:
        return {"skipped": f"no {TRAIN_RECORD} in the adapter folder: its quantization settings are unknown"}
    try:
        params = TrainParams.model_validate(train_record["params"])
    except Exception as exc:  # noqa: BLE001 -- an old record the current schema rejects: report, don't fail
        return {"skipped": f"{TRAIN_RECORD} params do not validate with this loraline version: {exc}"}
    if params.quantization == "none":
        return {"skipped": "adapter trained with quantization none: there is no 4-bit model to compare against"}
    model = load_base_model(params, base_dir, torch.device("cpu"))
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    ref = _run_probes(model, tok, inputs, max_new_tokens)
    del model
    gc.collect()
    gap = _compare(merged, ref)
    gap.pop("merged_greedy_texts")
    gap["quantization"] = {"type": params.quantization, "double_quant": params.double_quant, "compute_dtype": "float32"}
    return gap


def _reload_check(folder: Path, inputs: list[list[int]], merged: _Outputs) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for ids, ref in zip(inputs, merged.logits, strict=True):
            x = torch.tensor([ids], dtype=torch.long)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float()
            worst = max(worst, float((logits - ref).abs().max()))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    del model
    gc.collect()
    return {"max_abs_logit_diff": worst, "loaded_dtype": dtype}


# --- files ----------------------------------------------------------------------------------------


def _read_train_record(adapter_dir: Path) -> dict[str, Any] | None:
    path = adapter_dir / TRAIN_RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _quantization(train_record: dict[str, Any] | None) -> str | None:
    return ((train_record or {}).get("params") or {}).get("quantization")


def _base_hash(base_record: dict[str, Any]) -> str:
    from loraline.train.record import base_model_hash

    return base_model_hash(base_record)


def _save_tokenizer(tok: Any, folder: Path, base_record: dict[str, Any]) -> None:
    if base_record.get("source") == "built":
        from loraline.base.tokenizer import save_tokenizer

        save_tokenizer(tok, folder)
    else:
        # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
        tok.save_pretrained(str(folder), save_jinja_files=False)


def _discard(out_dir: Path) -> None:
    """Remove a previous output: a merge of an older adapter must not pass for this one's."""
    if out_dir.exists():
        shutil.rmtree(out_dir)

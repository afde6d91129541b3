"""The `base` stage: decide which base model every adapter sits on, and record it.

- base.model unset: build loraline's own small model offline (corpus -> tokenizer -> pretraining)
  and save it in Hugging Face format in the stage's output folder.
- base.model a local folder or a Hugging Face id: validate and record it, never download. Later
  stages load it through loraline.modelling.loading.

Either way the folder also holds general_text.jsonl (layout.GENERAL_TEXT), evaluate.general's default
sample for measuring forgetting: {"text": ...} rows of Python standard-library docstrings. For a built base
they come from the files after those its pretraining read (corpus.held_out_docstrings): the corpus's own
kind of prose, never trained on, and the model's bytes are the same as without them. A base of your own
gets the same docstrings, which it has likely seen: a loss before vs after, not a held-out one.

The output folder always holds base_record.json. For a built model, every file, the record
included, is byte-deterministic for the same documents, params, seed, code (the record's `code`
fingerprint) and library versions; wall-clock times and rates go to reports/timing/base.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraline import io
from loraline.base.corpus import build_corpus, held_out_docstrings, python_version
from loraline.base.pretrain import make_model, pretrain, special_ids, tokenize_corpus
from loraline.base.tokenizer import train_tokenizer
from loraline.config import BaseParams, BuildParams, ConfigError, Params
from loraline.layout import GENERAL_TEXT, Layout
from loraline.modelling.chat import CHAT_TEMPLATE, DOC_SEPARATOR, save_tokenizer
from loraline.modelling.loading import RECORD, chat_template
from loraline.provenance import code_fingerprint, library_versions, run_facts, sha256_file, sha256_files

LOSS_CSV = "pretrain_loss.csv"
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
GENERAL_TEXT_ROWS = 1024  # docstrings written to general_text.jsonl (~230k characters); evaluate.general.rows picks from them


@dataclass(frozen=True)
class BaseResult:
    out_dir: Path
    source: str  # built | local | hub
    model_ref: str  # what from_pretrained gets: the out_dir, the local folder, or the hub id
    record: dict[str, Any]
    timing: dict[str, Any] = field(default_factory=dict)  # what differs between identical runs (rates)


def build_base(params: BaseParams, seed: int, raw_dirs: list[Path], out_dir: Path, progress: bool = False) -> BaseResult:
    """Run the base stage into `out_dir` (replaced atomically)."""
    out_dir = Path(out_dir)
    if params.model is None:
        return _build_own(params, seed, [Path(d) for d in raw_dirs], out_dir, progress)
    return _record_external(params, out_dir)


# --- built -------------------------------------------------------------------------------------


def build_device(p: BuildParams) -> torch.device:
    """Where the base is pretrained: CUDA when present (device auto) or asked for."""
    if p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("base.build.device is cuda but torch sees no CUDA device")
        # cuBLAS needs this for deterministic algorithms; it must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _build_own(params: BaseParams, seed: int, raw_dirs: list[Path], out_dir: Path, progress: bool) -> BaseResult:
    device = build_device(params.build)
    p = params.build.for_device(device.type)
    corpus = build_corpus(
        raw_dirs, stdlib=p.stdlib_docstrings, max_stdlib_chars=p.max_stdlib_chars, exercises=p.exercises, seed=seed,
        drills=drill_count(p),
    )
    all_texts = [t for name, texts in corpus.sources().items() if name != "drills" for t in texts]
    if not all_texts:
        raise ValueError(
            "nothing to pretrain the base model on: no .txt/.md documents under the tenants' raw folders, "
            "base.build.stdlib_docstrings is false and base.build.exercises is 0"
        )
    tokenizer = train_tokenizer(all_texts, p.vocab_size)
    by_source, composition = tokenize_corpus(tokenizer, corpus)
    mixed = ("documents", "stdlib", "exercises")
    main = ([x for name in mixed for x in by_source[name][0]], [x for name in mixed for x in by_source[name][1]])
    separator = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR)

    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if p.num_threads:
            torch.set_num_threads(p.num_threads)
        torch.use_deterministic_algorithms(True)
        model = make_model(p, tokenizer, seed).to(device)
        result = pretrain(model, main, separator, p, seed, progress=progress, drills=by_source["drills"])
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)

    model = model.to("cpu")
    n_params = sum(t.numel() for t in model.parameters())
    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the published folder should be readable like any other
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        io.atomic_write_text(tmp / LOSS_CSV, "step,loss\n" + "".join(f"{i + 1},{x:.6f}\n" for i, x in enumerate(result.losses)))
        general_text = _write_general_text(tmp, p.max_stdlib_chars if p.stdlib_docstrings else 0)
        record = {
            "source": "built",
            "model_ref": ".",
            "architecture": "LlamaForCausalLM",
            "parameters": n_params,
            "seed": seed,
            "params": params.model_dump(mode="json"),
            # Which device built it, and the shape and budget used there (base.build with on_cuda applied).
            "built_on": {
                "device": device.type,
                "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "build": p.model_dump(mode="json", exclude={"on_cuda"}),
            },
            "corpus": {
                "sha256": corpus.sha256(),
                "composition": composition,
                "document_files": corpus.document_files,
                "python_version": python_version(),  # the stdlib docstrings depend on it
            },
            "tokenizer": {"vocab_size": len(tokenizer), "special_tokens": special_ids(tokenizer)},
            "general_text": general_text,
            "chat_template_sha256": _sha(CHAT_TEMPLATE),
            "pretraining": {
                "steps": p.max_steps,
                "copy_drill_steps": result.drill_steps,
                "tokens_seen": result.tokens_seen,
                "loss": "all tokens of documents and docstrings; answer tokens only of exercises",
                "epochs": round(result.epochs, 3),
                "final_loss": _tail_mean(result.losses),
                "loss_curve": _curve_summary(result.losses),
                "threads": p.num_threads or prev_threads,
            },
            "files": {f: sha256_file(tmp / f) for f in sorted(os.listdir(tmp)) if f != RECORD},
            "code": code_fingerprint(__name__),
            "library_versions": library_versions(),
        }
        missing = [f for f in MODEL_FILES if f not in record["files"]]
        if missing:  # a transformers upgrade that renames an output must fail here, not in a later stage
            raise RuntimeError(f"saving the base model did not write {', '.join(missing)}")
        io.write_json(tmp / RECORD, record)
    timing = {"tokens_per_s": round(result.tokens_seen / max(result.wall_s, 1e-9), 1)}  # of pretraining
    return BaseResult(out_dir=out_dir, source="built", model_ref=str(out_dir), record=record, timing=timing)


def _write_general_text(folder: Path, pretrained_chars: int) -> dict[str, Any]:
    """general_text.jsonl in `folder`: stdlib docstrings after the first `pretrained_chars` worth (those the
    base pretrained on); what it holds, for the record."""
    texts = held_out_docstrings(pretrained_chars, GENERAL_TEXT_ROWS)
    io.write_jsonl(folder / GENERAL_TEXT, [{"text": t} for t in texts])
    held_out = "after the docstrings pretraining read" if pretrained_chars else "none of which the build read"
    return {"file": GENERAL_TEXT, "rows": len(texts), "source": f"Python {python_version()} standard-library docstrings, {held_out}"}


def drill_count(p: BuildParams) -> int:
    """Copy drills for p.copy_drill_steps: about four passes over them (a drill is ~25 tokens)."""
    return p.copy_drill_steps * p.batch_size * p.seq_len // 100


def _tail_mean(losses: list[float], n: int = 10) -> float:
    tail = losses[-n:]
    return round(sum(tail) / len(tail), 4)


def _curve_summary(losses: list[float]) -> dict[str, float]:
    """Loss (mean of up to 10 steps) at the start, each quarter and the end of pretraining."""
    out = {"first": round(losses[0], 4), "min": round(min(losses), 4)}
    for q in (25, 50, 75, 100):
        end = max(1, len(losses) * q // 100)
        out[f"at_{q}pct"] = _tail_mean(losses[:end])
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- external (local folder or hub id) ----------------------------------------------------------


def _record_external(params: BaseParams, out_dir: Path) -> BaseResult:
    ref = params.model
    assert ref is not None
    path = Path(ref).expanduser()
    if path.exists():
        record = _inspect_local(path.resolve(), params)
    else:
        record = _inspect_hub(ref, params)
    record["params"] = params.model_dump(mode="json", exclude={"build"})
    record["code"] = code_fingerprint(__name__)
    record["library_versions"] = library_versions()
    with io.atomic_dir(out_dir) as tmp:
        record["general_text"] = _write_general_text(tmp, 0)
        io.write_json(tmp / RECORD, record)
    return BaseResult(out_dir=out_dir, source=record["source"], model_ref=record["model_ref"], record=record)


def _inspect_local(path: Path, params: BaseParams) -> dict[str, Any]:
    if not path.is_dir():
        raise ConfigError(f"base.model: {path} is a file; point it at the model's folder (with config.json)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"base.model: {path} has no config.json; is it a Hugging Face model folder?")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"base.model: {path} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    record = {"source": "local", "model_ref": str(path), "revision": None}
    record.update(_describe(str(path), params, {}))
    # Hash what is there (not copied: the record pins the content, so a changed folder is detectable).
    files = [p for p in sorted(path.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    record["files"] = dict(zip((p.relative_to(path).as_posix() for p in files), sha256_files(files), strict=True))
    record["parameters"] = _safetensors_parameters(path)
    return record


def _inspect_hub(ref: str, params: BaseParams) -> dict[str, Any]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or (os.sep != "/" and os.sep in ref)
    try:
        if looks_like_path:
            raise HFValidationError("a path")
        validate_repo_id(ref)
    except HFValidationError:
        raise ConfigError(
            f"base.model: {ref!r} is neither an existing local folder nor a valid Hugging Face model id "
            "(like 'org/name'); fix the path, or set base.model to null to build loraline's own base model"
        ) from None
    revision = params.revision or "main"
    record: dict[str, Any] = {
        "source": "hub",
        "model_ref": ref,
        "revision": revision,
        # A branch name can move; only a commit hash makes the base reproducible.
        "revision_pinned": bool(_COMMIT.match(revision)),
    }
    try:
        # local_files_only: look in the HF cache, never download (the base stage works offline).
        snapshot = snapshot_download(ref, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 -- any miss means "not cached", which is allowed here
        snapshot = None
    record["cached"] = snapshot is not None
    if snapshot is not None:
        record.update(_describe(snapshot, params, {"revision": revision}))
        record["parameters"] = _safetensors_parameters(Path(snapshot))
    else:
        record["note"] = "not in the local Hugging Face cache; config and chat template are checked when a later stage loads it"
        record["chat_template_source"] = "params" if params.chat_template else "unverified"
        record["chat_template_sha256"] = _sha(params.chat_template) if params.chat_template else None
    return record


def _describe(ref: str, params: BaseParams, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Architecture and chat template of a loadable model (config and tokenizer only, no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=params.trust_remote_code, **kwargs)
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=params.trust_remote_code, **kwargs)
    except Exception as exc:
        raise ConfigError(f"base.model: cannot load the config/tokenizer of {ref}: {exc}") from exc
    template, source = chat_template(tok, params)
    return {
        "architecture": (getattr(config, "architectures", None) or [config.__class__.__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "vocab_size": len(tok),
        "chat_template_source": source,
        "chat_template_sha256": _sha(template),
    }


def _safetensors_parameters(path: Path) -> int | None:
    """Parameter count from the safetensors headers (a few KB read, no weights loaded)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= d
                total += count
    return total


def run(
    params: Params, layout: Layout, *, docs: list[Path] | None = None, out_dir: Path | None = None, progress: bool = False
) -> BaseResult:
    """The base stage: pretrain on `docs` (default: the tenants' raw folders), or record base.model;
    the run's wall time and rate into reports/timing/base.json."""
    started = time.perf_counter()
    docs = list(docs) if docs else [params.tenant(n).raw_dir for n in params.tenant_names]
    result = build_base(params.base, seed=params.seed, raw_dirs=docs, out_dir=out_dir or layout.base_dir, progress=progress)
    io.write_timing(layout.timing_path("base"), run_facts(started, **result.timing))
    return result

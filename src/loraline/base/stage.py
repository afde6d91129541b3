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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraline import io
from loraline.base.corpus import held_out_docstrings, python_version
from loraline.config import BaseParams, ConfigError, Params
from loraline.layout import BASE_RECORD, GENERAL_TEXT, Layout
from loraline.modelling.loading import chat_template
from loraline.provenance import code_fingerprint, library_versions, phase, run_timing, sha256_files
from loraline.records import BaseRecord, GeneralText

LOSS_CSV = "pretrain_loss.csv"
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
GENERAL_TEXT_ROWS = (
    1024  # docstrings written to general_text.jsonl (~230k characters); evaluate.general.rows picks from them
)


@dataclass(frozen=True)
class BaseResult:
    out_dir: Path
    source: str  # built | local | hub
    model_ref: str  # what from_pretrained gets: the out_dir, the local folder, or the hub id
    record: BaseRecord
    timing: dict[str, Any] = field(default_factory=dict)  # what differs between identical runs (rates)


def run(
    params: Params,
    layout: Layout,
    *,
    docs: list[Path] | None = None,
    out_dir: Path | None = None,
    progress: bool = False,
) -> BaseResult:
    """The base stage: pretrain on `docs` (default: the tenants' raw folders), or record base.model;
    the run's wall time and rate into reports/timing/base.json."""
    started = time.perf_counter()
    docs = list(docs) if docs else [params.tenant_params(n).raw_dir for n in params.tenant_names]
    result = build_base(
        params.base, seed=params.seed, raw_dirs=docs, out_dir=out_dir or layout.base_dir, progress=progress
    )
    io.write_timing(layout.timing_path("base"), run_timing(started, **result.timing))
    return result


def build_base(
    params: BaseParams, seed: int, raw_dirs: list[Path], out_dir: Path, progress: bool = False
) -> BaseResult:
    """Run the base stage into `out_dir` (replaced atomically)."""
    out_dir = Path(out_dir)
    if params.model is None:
        # Imported here: pretraining needs torch and transformers' modelling (about 4 s of imports) that
        # recording a user's own folder does not.
        from loraline.base.build import build_own

        return build_own(params, seed, [Path(d) for d in raw_dirs], out_dir, progress)
    return _record_external(params, out_dir)


def _write_general_text(folder: Path, pretrained_chars: int) -> GeneralText:
    """general_text.jsonl in `folder`: stdlib docstrings after the first `pretrained_chars` worth (those the
    base pretrained on); what it holds, for the record."""
    texts = held_out_docstrings(pretrained_chars, GENERAL_TEXT_ROWS)
    io.write_jsonl(folder / GENERAL_TEXT, [{"text": t} for t in texts])
    held_out = "after the docstrings pretraining read" if pretrained_chars else "none of which the build read"
    return GeneralText(
        file=GENERAL_TEXT,
        rows=len(texts),
        source=f"Python {python_version()} standard-library docstrings, {held_out}",
    )


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
    record.params = params.model_dump(mode="json", exclude={"build"})
    record.code = code_fingerprint(__name__)
    record.library_versions = library_versions()
    with io.atomic_dir(out_dir) as tmp, phase("general text"):
        record.general_text = _write_general_text(tmp, 0)
        record.write(tmp / BASE_RECORD)
    return BaseResult(out_dir=out_dir, source=record.source, model_ref=record.model_ref, record=record)


def _inspect_local(path: Path, params: BaseParams) -> BaseRecord:
    if not path.is_dir():
        raise ConfigError(f"base.model: {path} is a file; point it at the model's folder (with config.json)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"base.model: {path} has no config.json; is it a Hugging Face model folder?")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"base.model: {path} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    # Hash what is there (not copied: the record pins the content, so a changed folder is detectable). The
    # hashing (reads and hashlib, which let go of the GIL) runs beside the import of transformers and the tokenizer
    # load: at 8B, 15 GB of shards take about as long as those imports.
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    with ThreadPoolExecutor(1) as pool:
        hashing = pool.submit(_timed_hashes, files)
        with phase("config and tokenizer"):
            described = _describe(str(path), params, {})
        hashes = hashing.result()
    record = BaseRecord(source="local", model_ref=str(path), revision=None, **described)
    record.files = dict(zip((p.relative_to(path).as_posix() for p in files), hashes, strict=True))
    record.parameters = _safetensors_parameters(path)
    return record


def _timed_hashes(files: list[Path]) -> list[str]:
    with phase("hash files"):
        return sha256_files(files)


def _inspect_hub(ref: str, params: BaseParams) -> BaseRecord:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = (
        ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or (os.sep != "/" and os.sep in ref)
    )
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
    record = BaseRecord(
        source="hub",
        model_ref=ref,
        revision=revision,
        # A branch name can move; only a commit hash makes the base reproducible.
        revision_pinned=bool(_COMMIT.match(revision)),
    )
    try:
        # local_files_only: look in the HF cache, never download (the base stage works offline).
        snapshot = snapshot_download(ref, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 -- any miss means "not cached", which is allowed here
        snapshot = None
    record.cached = snapshot is not None
    if snapshot is not None:
        record.assign(_describe(snapshot, params, {"revision": revision}))
        record.parameters = _safetensors_parameters(Path(snapshot))
    else:
        record.note = (
            "not in the local Hugging Face cache; config and chat template are checked when a later stage loads it"
        )
        record.chat_template_source = "params" if params.chat_template else "unverified"
        record.chat_template_sha256 = _sha(params.chat_template) if params.chat_template else None
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
        "tokenizer_class": type(tok).__name__,
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

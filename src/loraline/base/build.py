"""The base stage's own build: corpus -> tokenizer -> pretraining of loraline's small Llama, saved in
Hugging Face format with base_record.json (see loraline.base.stage, which calls build_own when base.model
is unset and keeps this module's torch and transformers imports off a user's own base)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from loraline import io
from loraline.base import stage
from loraline.base.corpus import Corpus, build_corpus, python_version
from loraline.base.pretrain import PretrainResult, TokenLists, make_model, pretrain, special_ids, tokenize_corpus
from loraline.base.tokenizer import train_tokenizer
from loraline.config import BaseParams, BuildParams, ConfigError
from loraline.layout import BASE_RECORD
from loraline.modelling.chat import CHAT_TEMPLATE, DOC_SEPARATOR, save_tokenizer
from loraline.provenance import code_fingerprint, library_versions, sha256_file
from loraline.records import BaseRecord, BuiltOn, GeneralText, Pretraining, TokenizerFacts
from loraline.records import Corpus as CorpusFacts


def build_own(params: BaseParams, seed: int, raw_dirs: list[Path], out_dir: Path, progress: bool) -> stage.BaseResult:
    """Build the base into `out_dir` (atomically): corpus, tokenizer, deterministic pretraining, record."""
    device = build_device(params.build)
    p = params.build.for_device(device.type)
    corpus = build_corpus(
        raw_dirs,
        stdlib=p.stdlib_docstrings,
        max_stdlib_chars=p.max_stdlib_chars,
        exercises=p.exercises,
        seed=seed,
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
    model, result, threads = _pretrain_deterministic(
        p, tokenizer, seed, device, main, separator, by_source["drills"], progress
    )

    model = model.to("cpu")
    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the published folder should be readable like any other
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        io.atomic_write_text(
            tmp / stage.LOSS_CSV, "step,loss\n" + "".join(f"{i + 1},{x:.6f}\n" for i, x in enumerate(result.losses))
        )
        general_text = stage._write_general_text(tmp, p.max_stdlib_chars if p.stdlib_docstrings else 0)
        record = _record(
            tmp,
            params,
            p,
            seed=seed,
            device=device,
            model=model,
            corpus=corpus,
            composition=composition,
            tokenizer=tokenizer,
            general_text=general_text,
            result=result,
            threads=threads,
        )
        missing = [f for f in stage.MODEL_FILES if f not in record.files]
        if missing:  # a transformers upgrade that renames an output must fail here, not in a later stage
            raise RuntimeError(f"saving the base model did not write {', '.join(missing)}")
        record.write(tmp / BASE_RECORD)
    timing = {"tokens_per_s": round(result.tokens_seen / max(result.wall_s, 1e-9), 1)}  # of pretraining
    return stage.BaseResult(out_dir=out_dir, source="built", model_ref=str(out_dir), record=record, timing=timing)


def build_device(p: BuildParams) -> torch.device:
    """Where the base is pretrained: CUDA when present (device auto) or asked for."""
    if p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("base.build.device is cuda but torch sees no CUDA device")
        # cuBLAS needs this for deterministic algorithms; it must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pretrain_deterministic(
    p: BuildParams,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    device: torch.device,
    main: TokenLists,
    separator: int,
    drills: TokenLists,
    progress: bool,
) -> tuple[LlamaForCausalLM, PretrainResult, int]:
    """(model, pretrain's result, threads used): pretraining with deterministic algorithms and
    base.build.num_threads, the process's torch settings restored afterwards."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if p.num_threads:
            torch.set_num_threads(p.num_threads)
        torch.use_deterministic_algorithms(True)
        model = make_model(p, tokenizer, seed).to(device)
        result = pretrain(model, main, separator, p, seed, progress=progress, drills=drills)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    return model, result, p.num_threads or prev_threads


def _record(
    tmp: Path,
    params: BaseParams,
    p: BuildParams,
    *,
    seed: int,
    device: torch.device,
    model: LlamaForCausalLM,
    corpus: Corpus,
    composition: dict,
    tokenizer: PreTrainedTokenizerFast,
    general_text: GeneralText,
    result: PretrainResult,
    threads: int,
) -> BaseRecord:
    """base_record.json of the build being written in `tmp` (its files hashed as they are now)."""
    return BaseRecord(
        source="built",
        model_ref=".",
        architecture="LlamaForCausalLM",
        parameters=sum(t.numel() for t in model.parameters()),
        seed=seed,
        params=params.model_dump(mode="json"),
        # Which device built it, and the shape and budget used there (base.build with on_cuda applied).
        built_on=BuiltOn(
            device=device.type,
            name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            build=p.model_dump(mode="json", exclude={"on_cuda"}),
        ),
        corpus=CorpusFacts(
            sha256=corpus.sha256(),
            composition=composition,
            document_files=corpus.document_files,
            python_version=python_version(),  # the stdlib docstrings depend on it
        ),
        tokenizer=TokenizerFacts(vocab_size=len(tokenizer), special_tokens=special_ids(tokenizer)),
        general_text=general_text,
        chat_template_sha256=stage._sha(CHAT_TEMPLATE),
        pretraining=Pretraining(
            steps=p.max_steps,
            copy_drill_steps=result.drill_steps,
            tokens_seen=result.tokens_seen,
            loss="all tokens of documents and docstrings; answer tokens only of exercises",
            epochs=round(result.epochs, 3),
            final_loss=_tail_mean(result.losses),
            loss_curve=_curve_summary(result.losses),
            threads=threads,
        ),
        files={f: sha256_file(tmp / f) for f in sorted(os.listdir(tmp)) if f != BASE_RECORD},
        code=code_fingerprint(stage.__name__),  # the stage module's closure, as a recorded base has
        library_versions=library_versions(),
    )


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

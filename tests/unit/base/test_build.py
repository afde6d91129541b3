"""The offline base build: files, loading (fp32 and bitsandbytes 4-bit), record, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from base_helpers import DOC_TEXT, MARKER, tiny_build
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from loraline.base.corpus import build_corpus, held_out_docstrings, read_documents, stdlib_docstrings
from loraline.base.stage import GENERAL_TEXT_ROWS, LOSS_CSV, MODEL_FILES, build_base
from loraline.config import BaseParams
from loraline.layout import GENERAL_TEXT
from loraline.modelling.chat import IM_END
from loraline.modelling.loading import RECORD, resolve_base_model_path
from loraline.provenance import sha256_file


def test_files_written_and_loadable(built):
    _, result = built
    out = result.out_dir
    for name in (*MODEL_FILES, RECORD, LOSS_CSV):
        assert (out / name).is_file(), name
    assert result.source == "built" and resolve_base_model_path(out) == str(out)

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.vocab_size == len(tok)
    eos = tok.convert_tokens_to_ids(IM_END)
    assert tok.eos_token_id == eos == model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.do_sample is False
    # The chat template lives inside tokenizer_config.json, not in a separate .jinja file.
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert not list(out.glob("*.jinja"))

    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Copy 4711."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
    generated = model.generate(**enc, max_new_tokens=4)
    assert generated.shape[1] <= enc["input_ids"].shape[1] + 4


def test_loads_in_4bit_and_runs_forward(built):
    _, result = built
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(result.out_dir, quantization_config=bnb, device_map="cpu")
    import bitsandbytes as bnb_lib

    assert isinstance(model.model.layers[0].mlp.down_proj, bnb_lib.nn.Linear4bit)
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_record(built):
    params, result = built
    record = json.loads((result.out_dir / RECORD).read_text())
    assert record == json.loads(json.dumps(result.record.to_json()))
    assert record["source"] == "built" and record["seed"] == 7
    assert record["params"] == params.model_dump(mode="json")
    for name in MODEL_FILES:
        assert record["files"][name] == sha256_file(result.out_dir / name)
    comp = record["corpus"]["composition"]
    assert set(comp) == {"documents", "stdlib", "exercises", "drills"}
    assert comp["documents"]["texts"] == 2 and comp["exercises"]["texts"] == 60
    assert 0 < comp["stdlib"]["chars"] <= 20_000
    pre = record["pretraining"]
    assert pre["steps"] == 20 and pre["tokens_seen"] == 20 * 4 * 64
    assert record["parameters"] == sum(
        t.numel() for t in AutoModelForCausalLM.from_pretrained(result.out_dir).parameters()
    )
    assert record["library_versions"]["torch"] and len(record["code"]["sha256"]) == 64
    assert (
        "wall_s" not in record and "wall_s" not in pre and "code_revision" not in record
    )  # run facts: reports/timing/
    assert result.timing["tokens_per_s"] > 0
    lines = (result.out_dir / LOSS_CSV).read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == 21


def test_general_text_is_held_out_from_pretraining(built):
    """models/base/general_text.jsonl, evaluate.general's default sample: stdlib docstrings pretraining never read,
    the same bytes every build, recorded with the other files."""
    params, result = built
    path = result.out_dir / GENERAL_TEXT
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    pretrained = stdlib_docstrings(params.build.max_stdlib_chars)
    assert len(texts) == GENERAL_TEXT_ROWS == result.record.general_text.rows and len(set(texts)) == len(texts)
    assert not set(texts) & set(pretrained)
    assert not any(t.startswith(pretrained[-1]) for t in texts)  # nor the rest of the docstring the cap cut
    assert texts == held_out_docstrings(params.build.max_stdlib_chars, GENERAL_TEXT_ROWS)
    assert "after the docstrings pretraining read" in result.record.general_text.source
    assert result.record.files[GENERAL_TEXT] == sha256_file(path)


def test_loss_decreases(built):
    _, result = built
    curve = result.record.pretraining.loss_curve
    assert result.record.pretraining.final_loss < curve["first"] - 0.3


def test_same_seed_same_files_other_seed_other_model(built, raw_dirs, tmp_path):
    params, first = built
    again = build_base(params, seed=7, raw_dirs=raw_dirs, out_dir=tmp_path / "again")
    other = build_base(params, seed=8, raw_dirs=raw_dirs, out_dir=tmp_path / "other")
    for name in (*MODEL_FILES, GENERAL_TEXT):
        assert sha256_file(again.out_dir / name) == sha256_file(first.out_dir / name), name
    assert sha256_file(other.out_dir / "model.safetensors") != sha256_file(first.out_dir / "model.safetensors")


def test_corpus_has_documents_not_instruction_rows(raw_dirs):
    texts, names = read_documents(raw_dirs)
    assert names == ["tenant-a/docs/shipping.md", "tenant-b/handbook.txt"]
    corpus = build_corpus(raw_dirs, stdlib=True, max_stdlib_chars=5000, exercises=10, seed=1)
    everything = "\n".join(t for ts in corpus.sources().values() for t in ts)
    assert DOC_TEXT in everything
    assert MARKER not in everything


def test_stdlib_docstrings_capped_and_deterministic():
    first = stdlib_docstrings(30_000)
    assert first == stdlib_docstrings(30_000)
    assert 25_000 < sum(map(len, first)) <= 30_000
    assert len(first) == len(set(first)) and len(first) > 10
    assert stdlib_docstrings(0) == []


def test_empty_corpus_fails_and_leaves_nothing(tmp_path):
    params = BaseParams(build=tiny_build(stdlib_docstrings=False, exercises=0))
    with pytest.raises(ValueError, match="nothing to pretrain"):
        build_base(params, seed=1, raw_dirs=[tmp_path / "none"], out_dir=tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_exercise_loss_is_on_answers_only(raw_dirs):
    from loraline.base.exercises import make_exercises
    from loraline.base.pretrain import tokenize_corpus
    from loraline.base.tokenizer import train_tokenizer
    from loraline.modelling.constants import IGNORE_INDEX as IGNORE

    corpus = build_corpus(raw_dirs, stdlib=False, max_stdlib_chars=0, exercises=20, seed=5)
    tok = train_tokenizer(corpus.documents + corpus.exercises, 400)
    by_source, comp = tokenize_corpus(tok, corpus)
    ids, labels = by_source["documents"]
    assert all(lab == i for i, lab in zip(ids, labels, strict=True))  # documents: every token
    ids, labels = by_source["exercises"]
    for (_, messages), i, lab in zip(make_exercises(20, seed=5), ids, labels, strict=True):
        kept = [t for t, x in zip(i, lab, strict=True) if x != IGNORE]
        assert tok.decode(kept) == messages[-1]["content"] + IM_END + "\n"
    assert comp["exercises"]["loss_tokens"] < comp["exercises"]["tokens"] / 2


def test_copy_drills_come_first_and_are_recorded(raw_dirs, tmp_path):
    """The first copy_drill_steps batches are copy drills only; the record counts them."""
    import unittest.mock as um

    from loraline.base.exercises import make_copy_drills

    seen: list[torch.Tensor] = []
    original = torch.nn.Module.__call__

    def spy(module, *args, **kwargs):
        if (
            "input_ids" in kwargs and type(module).__name__ == "LlamaModel"
        ):  # the decoder: pretrain runs the head itself
            seen.append(kwargs["input_ids"].clone())
        return original(module, *args, **kwargs)

    params = BaseParams(build=tiny_build(copy_drill_steps=5, max_steps=8, stdlib_docstrings=False))
    with um.patch.object(torch.nn.Module, "__call__", spy):
        result = build_base(params, seed=3, raw_dirs=raw_dirs, out_dir=tmp_path / "base")
    assert result.record.pretraining.copy_drill_steps == 5
    comp = result.record.corpus.composition
    assert comp["drills"]["texts"] == 5 * 4 * 64 // 100 and comp["drills"]["loss_tokens"] < comp["drills"]["tokens"]
    assert len(seen) == 8
    tok = AutoTokenizer.from_pretrained(result.out_dir)
    drill_text = tok.decode(seen[0][0])
    assert "Repeat" in drill_text or "Number:" in drill_text or "Repeat the number above" in drill_text
    # Drill rows hold no mixed-corpus text (no exercise keys, no documents); later rows do.
    later = " ".join(tok.decode(s[0]) for s in seen[5:])
    assert all("{" not in tok.decode(s[i]) for s in seen[:5] for i in range(s.shape[0]))
    assert "{" in later or "Shipping" in later or "Printers" in later
    assert make_copy_drills(3, 1) == make_copy_drills(3, 1) != make_copy_drills(3, 2)


def test_on_cuda_keys_are_validated_and_applied_only_on_cuda():
    from loraline.base.build import build_device
    from loraline.config import BuildParams, ConfigError

    with pytest.raises(ValueError, match="on_cuda: unknown key"):
        BuildParams(on_cuda={"hiden_size": 512})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BuildParams(on_cuda={"hidden_size": 510})
    p = BuildParams(on_cuda={"hidden_size": 512, "num_layers": 8})
    assert p.for_device("cpu") is p
    big = p.for_device("cuda")
    assert (big.hidden_size, big.num_layers, big.num_heads) == (512, 8, p.num_heads)
    if not torch.cuda.is_available():
        assert build_device(BuildParams()).type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA device"):
            build_device(BuildParams(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_base_builds_on_cuda_with_the_cuda_shape(raw_dirs, tmp_path):
    params = BaseParams(build=tiny_build(on_cuda={"hidden_size": 128, "intermediate_size": 256}))
    result = build_base(params, seed=3, raw_dirs=raw_dirs, out_dir=tmp_path / "base")
    assert result.record.built_on.device == "cuda"
    assert result.record.built_on.build["hidden_size"] == 128
    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    assert model.config.hidden_size == 128

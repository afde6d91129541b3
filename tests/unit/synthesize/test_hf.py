"""The transformers generator with a tiny random local model: the plumbing, not the quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synth_helpers import FAQ, POLICY

from loraline.config import BuildParams, SeedTask, SynthesizeParams
from loraline.synthesize import synthesize_tenant
from loraline.synthesize.hf import HFGenerator
from loraline.synthesize.passages import make_document
from loraline.synthesize.prompt import TEMPLATE_SHA256, build_messages, passages

SEEDS = [SeedTask(instruction="Customer email: can I return a lamp?", output="Yes, within 30 days.")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with the offline base's tokenizer and chat template, saved like a Hub folder."""
    from loraline.base.pretrain import make_model
    from loraline.base.tokenizer import train_tokenizer
    from loraline.modelling.chat import save_tokenizer

    out = tmp_path_factory.mktemp("teacher")
    tok = train_tokenizer([POLICY, FAQ] * 3, vocab_size=300)
    build = BuildParams(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=1024,
        seq_len=64,
    )
    make_model(build, tok, seed=0).save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def params(model: Path, **kw) -> SynthesizeParams:
    return SynthesizeParams(
        generator="hf", model=str(model), max_new_tokens=16, temperature=0.8, pairs_per_passage=2, **kw
    )


def test_prompt_holds_the_passage_and_the_seed_tasks_in_the_chat_template(tiny_model: Path) -> None:
    gen = HFGenerator(params(tiny_model))
    doc = make_document("returns_policy.md", POLICY, "-")
    span = passages(doc)[1]
    prompt = gen.render(build_messages(doc, span, SEEDS, 2))
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert POLICY[span[0] : span[1]].strip() in prompt
    assert json.dumps({"question": SEEDS[0].instruction, "answer": SEEDS[0].output}) in prompt
    assert "Write 2 different question/answer pairs" in prompt


def test_stage_runs_the_model_and_rejects_what_it_cannot_parse(
    tiny_model: Path, documents: Path, tmp_path: Path, one_torch_thread
) -> None:
    # one row per document keeps it to one generate() call each: the plumbing, not the volume, is under test
    p = params(tiny_model, max_rows_per_document=1)
    gen = HFGenerator(p)  # loaded once, used by both runs

    def run(name: str):
        return synthesize_tenant(
            "lampwick",
            p,
            documents,
            tmp_path / name,
            tmp_path / f"{name}.json",
            seed=5,
            seed_tasks=SEEDS,
            generator=gen,
        )

    first, second = run("a"), run("b")
    assert first.generated > 0 and first.generated == first.kept + sum(first.rejected.values())
    assert first.rejected_path.read_bytes() == second.rejected_path.read_bytes()  # seeded sampling repeats
    assert first.usage["generate_calls"] > 0
    assert first.stats["model"] == str(tiny_model) and first.stats["prompt_template_sha256"] == TEMPLATE_SHA256
    rejects = [json.loads(x) for x in first.rejected_path.read_text().splitlines()]
    assert rejects and {r["reason"] for r in rejects} <= {
        "unparseable",
        "question_length",
        "answer_length",
        "ungrounded",
        "refusal",
        "boilerplate",
        "duplicate",
    }
    prov = rejects[0]["provenance"]
    assert prov["generator"] == "hf" and prov["model"] == str(tiny_model) and prov["seed_tasks"] == [0]


def test_a_reply_in_the_format_becomes_rows(tiny_model: Path, documents: Path, tmp_path: Path, monkeypatch) -> None:
    gen = HFGenerator(params(tiny_model))
    monkeypatch.setattr(
        gen,
        "complete",
        lambda messages, seed: json.dumps(
            {
                "question": "What does the passage say?",
                "answer": messages[-1]["content"].split("<<<\n")[1].split(".")[0],
            }
        ),
    )
    result = synthesize_tenant(
        "lampwick", params(tiny_model), documents, tmp_path / "o", tmp_path / "s.json", seed=5, generator=gen
    )
    assert result.kept > 0
    row = json.loads(result.rows_path.read_text().splitlines()[0])
    assert row["provenance"]["generator"] == "hf" and row["provenance"]["span"][1] > row["provenance"]["span"][0]


def test_remote_code_is_off_unless_asked() -> None:
    assert SynthesizeParams(generator="hf", model="x").trust_remote_code is False
    with pytest.raises(ValueError, match="needs synthesize.model"):
        SynthesizeParams(generator="hf")

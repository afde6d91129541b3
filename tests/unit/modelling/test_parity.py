"""Probe generation with the KV cache (and batched) gives the tokens of a plain full-forward greedy loop.

The full-forward loop is the reference: no cache, the whole sequence through the model at every step,
argmax of the last position. Two models: the project's own tiny model, built like the stage tests build
it (some of its answers stop at eos early, so a batch pads rows after their end), and a random-init Llama
of the same shape and tokenizer with an untied head (long, varied answers: many cached steps compared).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import build_tiny_base, tiny_build  # noqa: E402

from loraline.modelling.parity import DEFAULT_PROBES, encode_probe, greedy_tokens, prompt_logits, run_probes  # noqa: E402

# In the tiny base's domain (its answers are real text, of several lengths), then chat in general.
PROBES = [
    [{"role": "user", "content": "Ticket 1003 from Dita: the mailbox is down. Please route it."}],
    [{"role": "user", "content": "Ticket 1011 from Lea: the vpn is slow. Please route it."}],
    *DEFAULT_PROBES,
]
MAX_NEW = 24

# CPU results depend on the thread count: one thread keeps them repeatable (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Tiny:
    name: str
    model: Any
    tok: Any
    inputs: list[list[int]]
    stops: list[int]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Tiny:
    from transformers import AutoModelForCausalLM

    from loraline.config import BaseParams
    from loraline.modelling.loading import load_base_tokenizer

    base = build_tiny_base(tmp_path_factory.mktemp("parity"))
    tok = load_base_tokenizer(base.out_dir, BaseParams(build=tiny_build()))
    model = AutoModelForCausalLM.from_pretrained(str(base.out_dir), dtype=torch.float32).eval()
    return Tiny("built", model, tok, [encode_probe(tok, p) for p in PROBES], [tok.eos_token_id])


@pytest.fixture(scope="module", params=["built", "random"])
def tiny(request, built: Tiny) -> Tiny:
    if request.param == "built":
        return built
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**built.model.config.to_dict(), "tie_word_embeddings": False, "initializer_range": 0.2})
    torch.manual_seed(0)
    return Tiny("random", LlamaForCausalLM(config).eval(), built.tok, built.inputs, built.stops)


@torch.no_grad()
def full_forward_greedy(model: Any, ids: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    """The reference: the whole sequence through the model at every step, no cache, argmax of the last logits."""
    seq, new = list(ids), []
    for _ in range(max_new_tokens):
        x = torch.tensor([seq])
        token = int(model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1].argmax())
        new.append(token)
        seq.append(token)
        if token in stops:
            break
    return new


@pytest.fixture(scope="module")
def reference(tiny: Tiny) -> list[list[int]]:
    out = [full_forward_greedy(tiny.model, ids, MAX_NEW, tiny.stops) for ids in tiny.inputs]
    lengths = sorted(len(g) for g in out)
    if tiny.name == "built":  # answers that stop at eos (then padded in a batch) beside full-length ones
        assert lengths[0] < MAX_NEW == lengths[-1], lengths
    else:  # long and varied: every step of the cache is compared
        assert lengths[0] == MAX_NEW and min(len(set(g)) for g in out) > 8, out
    return out


def test_cached_greedy_probes_equal_the_full_forward_loop(tiny: Tiny, reference):
    """run_probes as the merge stage runs it on the CPU: one probe at a time, transformers' generate with the cache."""
    out = run_probes(tiny.model, tiny.tok, tiny.inputs, MAX_NEW)
    assert out.greedy == reference
    assert out.texts == [tiny.tok.decode(g, skip_special_tokens=True) for g in reference]


def test_batched_cached_greedy_equals_the_full_forward_loop(tiny: Tiny, reference):
    """The CUDA path (left-padded batches, rows cut after their eos), run here on the CPU."""
    for batch_size in (2, len(tiny.inputs)):
        assert (
            greedy_tokens(tiny.model, tiny.inputs, MAX_NEW, tiny.tok.pad_token_id, tiny.stops, batch_size) == reference
        )


def test_batched_prompt_logits_are_each_prompts_own(tiny: Tiny):
    """A left-padded batch's prompt logits, at each prompt's own positions, equal the prompt run alone."""
    alone = prompt_logits(tiny.model, tiny.inputs, tiny.tok.pad_token_id)
    batched = run_probes(tiny.model, tiny.tok, tiny.inputs, 1, batch_size=len(tiny.inputs)).logits
    assert len({len(ids) for ids in tiny.inputs}) > 1, "prompts of one length: no padding tested"
    for ids, a, b in zip(tiny.inputs, alone, batched, strict=True):
        assert a.shape == b.shape == (len(ids), tiny.model.config.vocab_size)
        assert (a - b).abs().max().item() < 1e-4


def test_evaluate_generation_equals_the_full_forward_loop(tiny: Tiny, reference):
    """The evaluate stage's batched, cached generate_greedy: the loop's answers, cut at the stop tokens."""
    from loraline.evaluate.generate import generate_greedy, stop_ids

    stops = stop_ids(tiny.tok, tiny.model)
    expected = []
    for ids in tiny.inputs:
        tokens = full_forward_greedy(tiny.model, ids, MAX_NEW, stops)
        expected.append(tiny.tok.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip())
    assert generate_greedy(tiny.model, tiny.tok, tiny.inputs, MAX_NEW, batch_size=3) == expected

"""Tokenizer round trip, chat template output, and the generic exercises."""

from __future__ import annotations

import json

from loraline.base.exercises import KINDS, WORDS, make_exercises
from loraline.base.tokenizer import train_tokenizer
from loraline.modelling.chat import CHAT_TEMPLATE, DOC_SEPARATOR, IM_END, IM_START, render_chat

TEXTS = [
    "Order 40417 shipped to Zürich on 2024-03-05.",
    "def f(x):\n    return x * 2\n",
    "Ünïcödé ✓ and emoji 🙂",
] * 20


def test_round_trip_and_digits_split():
    tok = train_tokenizer(TEXTS, 300)
    for text in [*TEXTS[:3], "never seen: ქართული 12345 \t\n  spaces"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # One token per digit: copying a number is copying digit by digit, the same in every context.
    digits = tok.convert_ids_to_tokens(tok("40417", add_special_tokens=False)["input_ids"])
    assert digits == list("40417")


def test_special_tokens_are_single_ids_and_template_matches():
    tok = train_tokenizer(TEXTS, 300)
    assert tok.eos_token == IM_END and tok.pad_token == DOC_SEPARATOR and tok.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert text == render_chat(messages)
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and prompt == render_chat(
        messages[:2], add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tok.convert_tokens_to_ids(IM_END)) == 3
    # The special tokens were not learnt as pieces of ordinary text.
    assert not any("im_start" in t for t in tok.get_vocab() if t != IM_START)


def test_exercises_deterministic_varied_and_generic():
    first = make_exercises(200, seed=3)
    assert first == make_exercises(200, seed=3)
    assert first != make_exercises(200, seed=4)
    assert {k for k, _ in first} == set(KINDS)
    for kind, messages in first:
        assert [m["role"] for m in messages][-2:] == ["user", "assistant"]
        answer = messages[-1]["content"]
        assert answer
        if kind.endswith("_json"):
            assert isinstance(json.loads(answer), dict)
        if kind == "yes_no":
            assert answer in ("yes", "no")
        if kind == "copy_span":
            assert answer in messages[-2]["content"]
    # No business vocabulary that a tenant's schema or labels could share.
    assert not {"order", "intent", "urgent", "team", "priority", "refund", "billing"} & set(WORDS)

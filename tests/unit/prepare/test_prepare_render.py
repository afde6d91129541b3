"""Chat-template rendering and the completion-only mask: exactly the assistant answers are trained."""

from __future__ import annotations

import copy

import pytest
from prepare_helpers import write_jsonl

from loraline.prepare.render import IGNORE_INDEX, check_tokenizer, render
from loraline.prepare.schema import ChatTemplateError, Message

SYSTEM = Message("system", "You are Acme's support assistant.")


def label_runs(tokenizer, rendered) -> list[str]:
    """Each contiguous run of trained tokens, decoded."""
    runs, current = [], []
    for label in [*rendered.labels, IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(label)
    return runs


def test_single_turn_labels_are_the_answer_and_end_of_turn(tokenizer):
    messages = [Message("user", "What is the capital of France?"), Message("assistant", "Paris.")]
    r = render(messages, tokenizer)
    assert r.text == tokenizer.apply_chat_template([m.__dict__ for m in messages], tokenize=False)
    assert label_runs(tokenizer, r) == ["Paris.<|im_end|>"]
    assert tokenizer.decode(r.input_ids) == r.text
    assert len(r.labels) == len(r.input_ids) == r.n_tokens
    assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(r.labels, r.input_ids))
    assert r.n_answer_tokens == sum(label != IGNORE_INDEX for label in r.labels) > 0


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(tokenizer):
    messages = [
        SYSTEM,
        Message("user", "Hello"),
        Message("assistant", "Hello! How are you today?"),
        Message("user", "Order 12345?"),
        Message("assistant", "Order 12345 shipped.\nThank you!"),
    ]
    r = render(messages, tokenizer)
    assert label_runs(tokenizer, r) == [
        "Hello! How are you today?<|im_end|>",
        "Order 12345 shipped.\nThank you!<|im_end|>",
    ]
    trained = tokenizer.decode([t for t in r.labels if t != IGNORE_INDEX])
    assert SYSTEM.content not in trained and "Hello\n" not in trained and "user" not in trained


def test_an_opening_assistant_message_is_context_only(tokenizer):
    messages = [Message("assistant", "Welcome!"), Message("user", "Hi"), Message("assistant", "Hi there")]
    assert label_runs(tokenizer, render(messages, tokenizer)) == ["Hi there<|im_end|>"]
    # After a system message the template can prompt it, so it is trained like any answer.
    assert label_runs(tokenizer, render([SYSTEM, *messages], tokenizer)) == [
        "Welcome!<|im_end|>",
        "Hi there<|im_end|>",
    ]


LLAMA2_LIKE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}<|endoftext|>{% endif %}"
    "{% endfor %}"
)


def test_any_template_that_only_appends_works(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = LLAMA2_LIKE
    messages = [
        SYSTEM,
        Message("user", "q1"),
        Message("assistant", "a1"),
        Message("user", "q2"),
        Message("assistant", "a2"),
    ]
    r = render(messages, other)
    assert r.text.startswith("<<SYS>>")
    assert label_runs(other, r) == [" a1<|endoftext|>", " a2<|endoftext|>"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="prefix"):
        render([Message("user", "q"), Message("assistant", "a")], other)


def test_template_errors_name_the_row(tokenizer, raw_dir, gather):
    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    write_jsonl(raw_dir / "a.jsonl", [{"system": "s", "instruction": "q", "output": "a"}])
    with pytest.raises(ChatTemplateError, match=r"a\.jsonl row 1.*System role not supported"):
        gather(tokenizer=other)


def test_a_tokenizer_without_template_fails_before_reading(tokenizer, raw_dir, gather):
    other = copy.deepcopy(tokenizer)
    other.chat_template = None
    write_jsonl(raw_dir / "a.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(ChatTemplateError, match="base.chat_template"):
        check_tokenizer(other)
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        gather(tokenizer=other)


def test_dataset_rows_carry_rendering_and_mask(raw_dir, gather, tokenizer):
    write_jsonl(raw_dir / "a.jsonl", [{"instruction": "Say hello", "output": "Hello world"}])
    out = gather(system_prompt="Be kind.")
    (row,) = [r for s in out.splits.values() for r in s]
    assert row["messages"][0] == {"role": "system", "content": "Be kind."}
    assert row["text"] == tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "Hello world<|im_end|>"
    assert row["n_tokens"] == len(row["input_ids"]) and row["n_answer_tokens"] > 0

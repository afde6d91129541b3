"""render_batch gives, row for row, exactly what the reference render gives: the original algorithm
with three apply_chat_template calls per answer and one tokenizer call per row. Checked on several
templates (ChatML, one with a default system prompt and bos/eos tokens, one that is not
prefix-stable, one that raises), with failing rows returned in place of their results."""

from __future__ import annotations

import copy
import random

import pytest

from loraline.modelling.chat import CHAT_TEMPLATE
from loraline.prepare.render import IGNORE_INDEX, Rendered, render, render_batch, tokenizer_name
from loraline.prepare.schema import ChatTemplateError, Message


def reference_render(messages, tokenizer) -> Rendered:
    """render() as it was before render_batch: the definition of the right answer."""

    def apply(dicts, generation_prompt):
        try:
            text = tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:
            raise ChatTemplateError(
                f"the chat template of tokenizer {tokenizer_name(tokenizer)!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        return text

    dicts = [{"role": m.role, "content": m.content} for m in messages]
    full = apply(dicts, False)
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant" or i == 0:
            continue
        prefix = apply(dicts[:i], True)
        upto = apply(dicts[: i + 1], False)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise ChatTemplateError(
                f"the chat template of tokenizer {tokenizer_name(tokenizer)!r} is not prefix-stable at message {i}: "
                "rendering the conversation up to an assistant turn (with the generation prompt) is not a prefix of "
                "rendering it with the answer, so the answer cannot be located; use a template that only appends "
                "(set base.chat_template)"
            )
        start, end = len(prefix), len(upto.rstrip())
        if end > start:
            spans.append((start, end))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = []
    for token_id, (start, end) in zip(input_ids, encoding["offset_mapping"]):
        inside = end > start and any(s <= start and end <= e for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    if spans and all(label == IGNORE_INDEX for label in labels):
        raise ChatTemplateError(
            f"tokenizer {tokenizer_name(tokenizer)!r}: no token lies inside the assistant answers {spans}; "
            "its tokens straddle the template's turn boundaries"
        )
    return Rendered(full, input_ids, labels, tuple(spans))


def reference_or_error(messages, tokenizer):
    try:
        return reference_render(messages, tokenizer)
    except ChatTemplateError as exc:
        return exc


def same(got, want) -> bool:
    if isinstance(want, ChatTemplateError):
        return type(got) is type(want) and str(got) == str(want)
    return got == want


# A system prompt by default, bos at the start and eos after each answer (Llama-2 style).
SYSTEM_DEFAULT = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = 'You are a helpful assistant.' %}{% set rest = messages %}{% endif %}"
    "<<SYS>>\n{{ system }}\n<</SYS>>\n\n"
    "{% for m in rest %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
    "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)
# Marks the last message: rendering one more turn rewrites the one before, so answers cannot be located.
NOT_PREFIX_STABLE = (
    "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
RAISES_ON_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Answers glued to the prompt: a token can span the boundary, leaving no trainable token.
GLUED = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

TEMPLATES = {
    "chatml": CHAT_TEMPLATE,
    "system-default": SYSTEM_DEFAULT,
    "not-prefix-stable": NOT_PREFIX_STABLE,
    "raises": RAISES_ON_SYSTEM,
    "glued": GLUED,
}

WORDS = [
    "Hello",
    "world",
    "order",
    "12345",
    "refund",
    "Paris",
    "  ",
    "\n",
    "é",
    "日本",
    "?",
    "!",
    "the",
    "fox",
    "<b>",
    "{{x}}",
]


def conversations(seed: int, n: int) -> list[list[Message]]:
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))

    out = [
        [Message("user", "Hello"), Message("assistant", "lo")],
        [Message("user", "Or"), Message("assistant", "der")],  # GLUED: "Order" is one token, no answer token
        [Message("assistant", "Welcome!"), Message("user", "Hi"), Message("assistant", "Hi there")],
        [Message("system", "Be brief."), Message("user", "q"), Message("assistant", "   ")],
        [Message("user", "only a question")],
        [],
    ]
    for _ in range(n):
        turns = [Message("system", text())] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            turns += [Message("user", text()), Message("assistant", text())]
        out.append(turns)
    return out


@pytest.fixture(params=list(TEMPLATES))
def templated(request, tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = TEMPLATES[request.param]
    return other


def test_render_batch_equals_the_reference_row_by_row(templated):
    batch = conversations(seed=7, n=60)
    got = render_batch(batch, templated)
    want = [reference_or_error(messages, templated) for messages in batch]
    assert len(got) == len(want)
    for messages, g, w in zip(batch, got, want):
        assert same(g, w), messages


def test_every_template_kind_is_exercised(tokenizer):
    """The templates above do what they are here for: succeed, refuse, raise, straddle."""
    errors = {}
    for name, template in TEMPLATES.items():
        other = copy.deepcopy(tokenizer)
        other.chat_template = template
        results = render_batch(conversations(seed=7, n=60), other)
        assert any(isinstance(r, Rendered) for r in results), name
        errors[name] = " | ".join(str(r) for r in results if isinstance(r, ChatTemplateError))
    assert "not prefix-stable" in errors["not-prefix-stable"]
    assert "System role not supported" in errors["raises"]
    assert "straddle" in errors["glued"]
    assert "empty conversation" in errors["chatml"]


def test_system_default_template_sees_bos_and_eos(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = SYSTEM_DEFAULT
    (r,) = render_batch([[Message("user", "q"), Message("assistant", "a")]], other)
    assert (
        r.text
        == f"{other.bos_token}<<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n[INST] q [/INST] a {other.eos_token}"
    )
    assert r == reference_render([Message("user", "q"), Message("assistant", "a")], other)


def test_failures_stay_in_place_and_render_raises_the_same_error(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = RAISES_ON_SYSTEM
    good = [Message("user", "q"), Message("assistant", "a")]
    bad = [Message("system", "s"), *good]
    got = render_batch([good, bad, good], other)
    assert isinstance(got[0], Rendered) and got[0] == got[2]
    assert isinstance(got[1], ChatTemplateError) and "System role not supported" in str(got[1])
    with pytest.raises(ChatTemplateError, match="System role not supported") as raised:
        render(bad, other)
    assert str(raised.value) == str(got[1])


def test_the_not_prefix_stable_template_is_refused_with_the_same_message(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = NOT_PREFIX_STABLE
    messages = [Message("user", "q"), Message("assistant", "a")]
    with pytest.raises(ChatTemplateError, match="prefix-stable at message 1") as raised:
        render(messages, other)
    with pytest.raises(ChatTemplateError) as expected:
        reference_render(messages, other)
    assert str(raised.value) == str(expected.value)


def test_batch_size_does_not_change_results(tokenizer):
    batch = conversations(seed=11, n=40)
    whole = render_batch(batch, tokenizer)
    one_by_one = [render_batch([messages], tokenizer)[0] for messages in batch]
    assert all(same(a, b) for a, b in zip(whole, one_by_one))
    assert render_batch([], tokenizer) == []


def test_a_tokenizer_that_overrides_apply_chat_template_is_honoured(tokenizer):
    """The shortcut must not bypass a tokenizer class with its own apply_chat_template."""

    class Shouting(type(tokenizer)):
        def apply_chat_template(self, conversation, **kwargs):
            return super().apply_chat_template(conversation, **kwargs).upper()

    other = copy.copy(tokenizer)
    other.__class__ = Shouting
    (r,) = render_batch([[Message("user", "q"), Message("assistant", "a")]], other)
    assert (
        r.text
        == tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False
        ).upper()
    )


def test_the_vectorized_mask_equals_the_per_token_rule():
    """_masks (searchsorted over the whole batch) against _mask, the rule itself, on random rows:
    zero-width tokens, tokens straddling span edges, empty rows, and rows whose spans overlap or are
    out of order (those take _mask)."""
    from loraline.prepare.render import _mask, _masks

    rng = random.Random(5)
    ids_rows, offset_rows, spans_rows, lengths = [], [], [], []
    for _ in range(300):
        length = rng.randint(0, 80)
        cuts = sorted(rng.choices(range(length + 1), k=rng.randint(0, 30)))
        offsets = list(zip([0, *cuts], [*cuts, length]))
        spans = []
        for _ in range(rng.randint(0, 4)):
            a, b = sorted(rng.sample(range(length + 2), 2)) if length else (0, 1)
            spans.append((a, b))
        if rng.random() < 0.7:
            spans = sorted(spans)
        ids_rows.append([rng.randint(0, 999) for _ in offsets])
        offset_rows.append(offsets)
        spans_rows.append(spans)
        lengths.append(length)
    got = _masks(ids_rows, offset_rows, spans_rows, lengths)
    assert got == [_mask(i, o, s) for i, o, s in zip(ids_rows, offset_rows, spans_rows)]
    assert any(label != IGNORE_INDEX for row in got for label in row)

"""Chat-template rendering and the completion-only label mask, for any fast tokenizer with a template.

The answer span of assistant turn i is found by rendering the conversation twice:
prefix = template(messages[:i], add_generation_prompt=True) and upto = template(messages[:i+1]);
characters [len(prefix), len(upto)) are the answer as the template writes it (content and end-of-turn
token). That only works when each rendering is a string prefix of the next, which is checked, so a
template that rewrites earlier turns fails loudly instead of mislabelling tokens. Trailing whitespace
of the span (ChatML's newline after <|im_end|>) is left out: generation stops at the end-of-turn
token, so the model never has to produce it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from loraline.data.schema import ChatTemplateError, Message

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Rendered:
    text: str
    input_ids: list[int]
    labels: list[int]
    spans: tuple[tuple[int, int], ...]  # character spans of the trained answers

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def check_tokenizer(tokenizer) -> None:
    """Fail before reading any data when the tokenizer cannot produce completion masks."""
    name = tokenizer_name(tokenizer) or type(tokenizer).__name__
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"tokenizer {name!r} is not a fast tokenizer; offsets for the label mask need one")
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat_template; set base.chat_template in params.yaml to a Jinja chat template"
        )


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "")


def tokenizer_hash(tokenizer) -> str:
    """Identity of the tokenizer as used here: vocabulary, merges, normalization and the chat template."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    h.update(b"\0" + str(tokenizer.chat_template).encode("utf-8"))
    return h.hexdigest()


def control_tokens(tokenizer) -> tuple[str, ...]:
    """Special token strings that the tokenizer would parse out of plain text (e.g. '<|im_end|>')."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return tuple(sorted(t for t in tokens if t))


def find_control_token(texts: Sequence[str], tokens: Sequence[str]) -> tuple[int, str] | None:
    """(index of the first text holding a control token, that token), or None."""
    for i, text in enumerate(texts):
        for token in tokens:
            if token in text:
                return i, token
    return None


def render(messages: Sequence[Message], tokenizer) -> Rendered:
    """Rendered text, token ids and labels (ids inside assistant answers, -100 elsewhere)."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    full = _apply(tokenizer, dicts, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant" or i == 0:
            continue  # an opening assistant message has no prompt to render; it stays context only
        prefix = _apply(tokenizer, dicts[:i], generation_prompt=True)
        upto = _apply(tokenizer, dicts[: i + 1], generation_prompt=False)
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
    labels = _mask(input_ids, encoding["offset_mapping"], spans)
    if spans and all(label == IGNORE_INDEX for label in labels):
        raise ChatTemplateError(
            f"tokenizer {tokenizer_name(tokenizer)!r}: no token lies inside the assistant answers {spans}; "
            "its tokens straddle the template's turn boundaries"
        )
    return Rendered(full, input_ids, labels, tuple(spans))


def _apply(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raise_exception() and template bugs surface as many types
        raise ChatTemplateError(
            f"the chat template of tokenizer {tokenizer_name(tokenizer)!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, expected the rendered text")
    return text


def _mask(input_ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    # A token is trained on only when it lies wholly inside an answer; a token straddling a boundary
    # would teach part of the prompt.
    labels = []
    for token_id, (start, end) in zip(input_ids, offsets):
        inside = end > start and any(s <= start and end <= e for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return labels

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

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loraline.modelling.constants import IGNORE_INDEX
from loraline.prepare.schema import ChatTemplateError, Message


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
    (result,) = render_batch([messages], tokenizer)
    if isinstance(result, ChatTemplateError):
        raise result
    return result


def render_batch(conversations: Sequence[Sequence[Message]], tokenizer) -> list[Rendered | ChatTemplateError]:
    """render() of every conversation, with its ChatTemplateError returned in its place instead of raised,
    so one bad row does not lose the others. Same results as render() row by row, faster: the template
    is rendered without apply_chat_template's per-call overhead and the texts are tokenized in one call."""
    apply = _Template(tokenizer)
    results: list[Rendered | ChatTemplateError | None] = [None] * len(conversations)
    located: list[tuple[int, str, list[tuple[int, int]]]] = []
    for row, messages in enumerate(conversations):
        try:
            full, spans = _locate_answers(messages, apply, tokenizer)
        except ChatTemplateError as exc:
            results[row] = exc
            continue
        located.append((row, full, spans))
    if located:
        texts = [full for _, full, _ in located]
        # The attention mask and token type ids are not used; converting them to Python lists cost
        # as much as a third of the tokenizer call.
        encoding = tokenizer(
            texts,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        ids_rows, offset_rows = encoding["input_ids"], encoding["offset_mapping"]
        label_rows = _masks(ids_rows, offset_rows, [spans for _, _, spans in located], [len(t) for t in texts])
        for (row, full, spans), ids, labels in zip(located, ids_rows, label_rows):
            if spans and all(label == IGNORE_INDEX for label in labels):
                results[row] = ChatTemplateError(
                    f"tokenizer {tokenizer_name(tokenizer)!r}: no token lies inside the assistant answers {spans}; "
                    "its tokens straddle the template's turn boundaries"
                )
            else:
                results[row] = Rendered(full, list(ids), labels, tuple(spans))
    return results  # type: ignore[return-value]


def _locate_answers(messages: Sequence[Message], apply: _Template, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    full = apply(dicts, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant" or i == 0:
            continue  # an opening assistant message has no prompt to render; it stays context only
        prefix = apply(dicts[:i], generation_prompt=True)
        # The last turn rendered without a generation prompt is the full rendering: same template,
        # same arguments, so it is reused instead of rendered again.
        upto = full if i + 1 == len(dicts) else apply(dicts[: i + 1], generation_prompt=False)
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
    return full, spans


class _Template:
    """tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...), callable.

    apply_chat_template spends most of its time around the template (looking it up, copying and
    normalizing the messages, building the special-token variables) and that was most of the cost
    of rendering a row. For plain tokenizers this calls transformers' own compiled template (the same
    cached object, sandboxed environment and globals) with the same variables: the special tokens
    map (bos_token, eos_token, ...), tools=None, documents=None. Messages whose role and content are
    plain strings are what apply_chat_template's normalization would hand the template anyway.
    Anything else (a tokenizer class that overrides apply_chat_template, a transformers version
    without these internals, other message values, an empty conversation) goes through
    apply_chat_template itself. tests/unit/data/test_render_batch.py checks the texts are identical.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._compiled = None
        try:
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase
            from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data
        except ImportError:
            return
        cls = type(tokenizer)
        if (
            getattr(cls, "apply_chat_template", None) is not PreTrainedTokenizerBase.apply_chat_template
            or getattr(cls, "get_chat_template", None) is not PreTrainedTokenizerBase.get_chat_template
        ):
            return
        try:
            self._compiled = _compile_jinja_template(tokenizer.get_chat_template())
            self._variables = _plain_template_data(dict(tokenizer.special_tokens_map))
        except Exception:  # no usable template: apply_chat_template raises the error for each row
            self._compiled = None

    def __call__(self, messages: list[dict], *, generation_prompt: bool) -> str:
        try:
            if (
                self._compiled is not None
                and messages
                and all(type(m["role"]) is str and type(m["content"]) is str for m in messages)
            ):
                text = self._compiled.render(
                    messages=messages,
                    tools=None,
                    documents=None,
                    add_generation_prompt=generation_prompt,
                    **self._variables,
                )
            else:
                text = self._tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation_prompt
                )
        except Exception as exc:  # jinja raise_exception() and template bugs surface as many types
            raise ChatTemplateError(
                f"the chat template of tokenizer {tokenizer_name(self._tokenizer)!r} "
                f"failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(text, str):
            raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, expected the rendered text")
        return text


def _masks(ids_rows, offset_rows, spans_rows: list[list[tuple[int, int]]], text_lengths: list[int]) -> list[list[int]]:
    """_mask of every row, in one vectorized pass over all tokens of the batch.

    A token is trained on only when it lies wholly inside an answer; a token straddling a boundary
    would teach part of the prompt. With each row's spans sorted and disjoint, the only span that can
    hold a token is the last one starting at or before it, so one searchsorted finds it. Rows are
    laid end to end (each shifted past the previous text) so that a token can never fall inside
    another row's span. A row whose spans overlap (a template whose answers nest) takes _mask.
    """
    labels: list[list[int] | None] = [None] * len(ids_rows)
    fast = [r for r, spans in enumerate(spans_rows) if all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))]
    for r in set(range(len(ids_rows))) - set(fast):
        labels[r] = _mask(ids_rows[r], offset_rows[r], spans_rows[r])
    if fast:
        lengths = np.fromiter((len(ids_rows[r]) for r in fast), dtype=np.int64, count=len(fast))
        bases = np.zeros(len(fast), dtype=np.int64)
        np.cumsum([text_lengths[r] + 1 for r in fast[:-1]], out=bases[1:])
        ids = np.fromiter(
            itertools.chain.from_iterable(ids_rows[r] for r in fast), dtype=np.int64, count=int(lengths.sum())
        )
        offsets = np.fromiter(
            itertools.chain.from_iterable(itertools.chain.from_iterable(offset_rows[r] for r in fast)),
            dtype=np.int64,
            count=2 * len(ids),
        ).reshape(-1, 2)
        shift = np.repeat(bases, lengths)
        starts, ends = offsets[:, 0] + shift, offsets[:, 1] + shift
        span_bases = np.repeat(bases, [len(spans_rows[r]) for r in fast])
        spans = np.array([s for r in fast for s in spans_rows[r]], dtype=np.int64).reshape(-1, 2)
        span_starts, span_ends = spans[:, 0] + span_bases, spans[:, 1] + span_bases
        if len(spans):
            k = np.searchsorted(span_starts, starts, side="right") - 1
            inside = (ends > starts) & (k >= 0) & (ends <= span_ends[np.maximum(k, 0)])
            flat = np.where(inside, ids, IGNORE_INDEX)
        else:
            flat = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        for r, row_labels in zip(fast, np.split(flat, np.cumsum(lengths)[:-1])):
            labels[r] = row_labels.tolist()
    return labels  # type: ignore[return-value]


def _mask(input_ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    labels = []
    for token_id, (start, end) in zip(input_ids, offsets):
        inside = end > start and any(s <= start and end <= e for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return labels

"""What to do with text holding a tokenizer's control tokens (prepare.control_tokens, sources[].control_tokens).

A control token inside a row's text would be tokenized as real markup: "<|im_end|>" in an answer
ends the turn early, "<|im_start|>user" forges a turn. Three policies:

- strip (the default): end-of-text markers at the ends of a field are removed. Exported datasets
  often end every completion with "<|endoftext|>" or "</s>" (and may start with "<s>"); that marker
  only meant "the answer ends here", which the chat template already says with its own end-of-turn
  token, so removing it loses nothing. A control token anywhere else is still rejected: inside the
  text it is far more likely a forged turn than an export artifact.
- escape: every control token of the tokenizer is kept as literal text, broken by a zero-width space
  after its first character so that it can never be parsed as a special token (for data that talks
  about tokens, such as documentation of chat formats).
- reject: the row is rejected (reason control_token), as before sources existed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# End-of-text and start-of-text spellings of common tokenizers; the base tokenizer's own are added.
END_MARKERS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<eos>", "<|eos|>")
START_MARKERS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
ZERO_WIDTH_SPACE = "\u200b"


def text_cleaner(policy: str, controls: Iterable[str], tokenizer=None) -> Callable[[str], str] | None:
    """The function applied to every text field under `policy`, or None when text is left as written."""
    if policy == "reject":
        return None
    if policy == "escape":
        return escaper(controls)
    if policy == "strip":
        ends = set(END_MARKERS)
        starts = set(START_MARKERS)
        if tokenizer is not None:
            ends.update(t for t in (getattr(tokenizer, "eos_token", None), getattr(tokenizer, "pad_token", None)) if t)
            starts.update(t for t in (getattr(tokenizer, "bos_token", None),) if t)
        return stripper(tuple(sorted(starts, key=len, reverse=True)), tuple(sorted(ends, key=len, reverse=True)))
    raise ValueError(f"unknown control-token policy {policy!r}; expected reject, strip or escape")


def stripper(starts: tuple[str, ...], ends: tuple[str, ...]) -> Callable[[str], str]:
    def strip(text: str) -> str:
        if "<" not in text:  # every marker starts with '<': the common case costs one scan
            return text
        out = text
        changed = True
        while changed:
            changed = False
            trimmed = out.rstrip()
            for marker in ends:
                if trimmed.endswith(marker):
                    out, changed = trimmed[: -len(marker)], True
                    break
            trimmed = out.lstrip()
            for marker in starts:
                if trimmed.startswith(marker):
                    out, changed = trimmed[len(marker) :], True
                    break
        # Whitespace around a removed marker went with it; text without markers is returned as written.
        return out.strip() if out != text else text

    return strip


def escaper(controls: Iterable[str]) -> Callable[[str], str]:
    tokens = tuple(sorted((t for t in controls if len(t) > 1), key=len, reverse=True))

    def escape(text: str) -> str:
        for token in tokens:
            if token in text:
                text = text.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
        return text

    return escape

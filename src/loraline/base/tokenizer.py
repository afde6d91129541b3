"""The offline base model's tokenizer: byte-level BPE trained with `tokenizers`, ChatML chat template.

Byte-level means any UTF-8 text round-trips (no unknown token); digits are split one by one so that
order numbers and ids tokenize the same way wherever they appear, which makes copying them learnable
for a small model.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraline.modelling.chat import CHAT_TEMPLATE, DOC_SEPARATOR, IM_END, IM_START, SPECIAL_TOKENS


def strip_special(text: str) -> str:
    """Text with the special tokens replaced by newlines, for tokenizer training.

    The BPE trainer would otherwise spend merges on pieces like '<|im' that never occur outside a
    special token; the special tokens themselves are added whole.
    """
    for t in SPECIAL_TOKENS:
        text = text.replace(t, "\n")
    return text


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (deterministic for the same texts and size)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((strip_special(t) for t in texts), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=DOC_SEPARATOR,
        eos_token=IM_END,
        pad_token=DOC_SEPARATOR,
        unk_token=None,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast

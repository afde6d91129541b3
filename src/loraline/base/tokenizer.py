"""The offline base model's tokenizer: byte-level BPE trained with `tokenizers`, ChatML chat template.

Byte-level means any UTF-8 text round-trips (no unknown token); digits are split one by one so that
order numbers and ids tokenize the same way wherever they appear, which makes copying them learnable
for a small model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DOC_SEPARATOR = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [DOC_SEPARATOR, IM_START, IM_END]

# ChatML. Every turn, the assistant's included, ends with <|im_end|>, which is also the EOS token, so
# a model trained on completion tokens learns to stop where the answer ends.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
    tok.train_from_iterator(texts, trainer=trainer)
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


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with chat_template) in Hugging Face format."""
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where every loader
    # (older transformers, vLLM, llama.cpp converters) looks for it.
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)

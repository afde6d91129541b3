"""The offline base model's tokenizer: byte-level BPE trained with `tokenizers`, ChatML chat template.

Byte-level means any UTF-8 text round-trips (no unknown token); digits are split one by one so that
order numbers and ids tokenize the same way wherever they appear, which makes copying them learnable
for a small model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
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


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE rendered without a tokenizer (the corpus is rendered before the tokenizer exists).

    Same sandboxed Jinja environment settings as transformers' apply_chat_template; a test checks
    that both give identical text.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


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


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with chat_template) in Hugging Face format."""
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where every loader
    # (older transformers, vLLM, llama.cpp converters) looks for it.
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    # transformers 5 writes its own class name (TokenizersBackend), which transformers 4 based
    # tools cannot resolve; PreTrainedTokenizerFast names the same tokenizer for both.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

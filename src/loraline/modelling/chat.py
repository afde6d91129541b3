"""The chat format loraline's own base model speaks (ChatML), and saving a tokenizer so that every
loader finds its chat template and class."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraline import io

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

# transformers 5 writes its own backend class name, which transformers 4 based tools (vLLM, older
# converters) cannot resolve.
_BACKEND_CLASS = "TokenizersBackend"
_PORTABLE_CLASS = "PreTrainedTokenizerFast"
# How a tokenizer was loaded, not what it is: transformers keeps the from_pretrained arguments and facts
# in init_kwargs and save_pretrained writes them out, so HF_HUB_OFFLINE=1 (which forces
# local_files_only) or loading from the hub rather than a folder (is_local) would change the bytes of
# every saved tokenizer_config.json, and with them the merge and export hashes.
LOAD_TIME_KEYS = (
    "local_files_only",
    "is_local",
    "cache_dir",
    "token",
    "use_auth_token",
    "revision",
    "trust_remote_code",
    "force_download",
    "proxies",
    "subfolder",
    "_commit_hash",
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE rendered without a tokenizer (the corpus is rendered before the tokenizer exists).

    Same sandboxed Jinja environment settings as transformers' apply_chat_template; a test checks
    that both give identical text.
    """
    return _compiled_template().render(messages=messages, add_generation_prompt=add_generation_prompt)


@functools.cache
def _compiled_template() -> Any:
    # Compiled once per process: the base's corpus renders some 16,000 conversations, and compiling the
    # template for each one cost more than half a minute of the base stage.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE)


def save_tokenizer(tokenizer: Any, out_dir: str | Path, source_dir: str | Path | None = None) -> None:
    """Write tokenizer.json and tokenizer_config.json (chat_template inside) in Hugging Face format.

    save_jinja_files=False keeps the template inside tokenizer_config.json, where every loader
    (older transformers, vLLM, llama.cpp converters) looks for it. A tokenizer_class of transformers 5's
    backend is replaced by the source folder's class, or PreTrainedTokenizerFast, which names the same
    tokenizer for every transformers version. The load-time keys (LOAD_TIME_KEYS) are left out, so the
    same tokenizer gives the same bytes whatever the environment it was loaded in.
    """
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    portable = {k: v for k, v in config.items() if k not in LOAD_TIME_KEYS}
    if portable.get("tokenizer_class", _BACKEND_CLASS) == _BACKEND_CLASS:
        portable["tokenizer_class"] = _portable_class(source_dir)
    if portable != config:
        io.write_json(path, portable)


def _portable_class(source_dir: str | Path | None) -> str:
    original = None
    if source_dir is not None and (Path(source_dir) / "tokenizer_config.json").is_file():
        original = json.loads((Path(source_dir) / "tokenizer_config.json").read_text(encoding="utf-8")).get(
            "tokenizer_class"
        )
    return original if original and original != _BACKEND_CLASS else _PORTABLE_CLASS

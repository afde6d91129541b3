"""Loading the base model every adapter sits on, as the base stage recorded it.

The base stage writes base_record.json into models/base: either loraline's own model is in that
folder, or the record names a local folder or a Hugging Face id (with revision and trust settings).
Every later stage loads the base through these functions, so they all load the same thing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from loraline.config import BaseParams, ConfigError
from loraline.layout import BASE_RECORD, TOKENIZER_STAMP
from loraline.records import BaseRecord

RECORD = BASE_RECORD
# transformers 5's class for a tokenizer.json of its own (PreTrainedTokenizerFast is its alias there)
GENERIC_TOKENIZER = "TokenizersBackend"


def base_record(base_dir: Path) -> BaseRecord:
    """The base stage's record in `base_dir` (RecordError naming the field when it is not one)."""
    path = Path(base_dir) / RECORD
    try:
        return BaseRecord.read(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: run the base stage first (loraline base / dvc repro base)"
        ) from None


def resolve_base_model_path(base_dir: Path) -> str:
    """What to pass to from_pretrained: the built folder, the recorded local folder, or the hub id."""
    record = base_record(base_dir)
    return str(Path(base_dir)) if record.source == "built" else record.model_ref


def base_load_kwargs(base_dir: Path) -> dict[str, Any]:
    """The from_pretrained keyword arguments that go with resolve_base_model_path (revision, trust)."""
    record = base_record(base_dir)
    kwargs: dict[str, Any] = {}
    if record.source == "hub":
        kwargs["revision"] = record.revision
    if record.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return kwargs


def chat_template(tok: Any, params: BaseParams) -> tuple[str, str]:
    """(template, where it came from): the model's own, else base.chat_template from params."""
    if isinstance(tok.chat_template, str) and tok.chat_template:
        return tok.chat_template, "model"
    if params.chat_template:
        return params.chat_template, "params"
    raise ConfigError(
        f"base.model: the tokenizer of {params.model} has no chat template; set base.chat_template in "
        "params.yaml to a Jinja chat template for this model (e.g. its ChatML or instruct format)"
    )


def load_base_tokenizer(base_dir: Path, params: BaseParams):
    """The base's tokenizer, always with a chat template and a pad token."""
    tok = _tokenizer(base_dir)
    template, _ = chat_template(tok, params)
    tok.chat_template = template
    if tok.pad_token is None:
        # Batching needs a pad id; padded positions are masked, so which token it is does not matter.
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer(base_dir: Path) -> Any:
    """AutoTokenizer's tokenizer of the base. Which class AutoTokenizer picks follows rules of transformers' own that
    change between versions, and asking it imports transformers' auto classes and torch with them: 6-9 s of every
    stage's start on a GPU machine, and all of the time prepare spends loading a tokenizer. So where the base stage
    recorded that AutoTokenizer picked the generic tokenizers-backed class for this very folder (a local base, no
    remote code) under this very transformers version, that class is loaded directly: what AutoTokenizer would
    return, without the imports. Anything else goes through AutoTokenizer."""
    record = base_record(base_dir)
    path, kwargs = resolve_base_model_path(base_dir), base_load_kwargs(base_dir)
    if record.source == "local" and not kwargs and record.tokenizer_class == GENERIC_TOKENIZER:
        from importlib.metadata import version

        if (record.library_versions or {}).get("transformers") == version("transformers"):
            from transformers import PreTrainedTokenizerFast

            if PreTrainedTokenizerFast.__name__ == GENERIC_TOKENIZER:
                return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def tokenizer_hash(tokenizer: Any) -> str:
    """Identity of the tokenizer as used here: vocabulary, merges, normalization and the chat template."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    h.update(b"\0" + str(tokenizer.chat_template).encode("utf-8"))
    return h.hexdigest()


def write_tokenizer_stamp(dataset_dir: Path, hash_: str, name: str) -> None:
    """Record in a prepared dataset which tokenizer (tokenizer_hash, name_or_path) made its token ids."""
    stamp = {"tokenizer_hash": hash_, "tokenizer": name}
    (Path(dataset_dir) / TOKENIZER_STAMP).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")


def tokenizer_mismatch(dataset_dir: Path, tokenizer: Any) -> str | None:
    """Why the ids in `dataset_dir` do not belong to `tokenizer`, or None when they do.

    Token ids from another vocabulary train and score fine by the numbers (a low loss on the wrong
    ids) and generate garbage: a base rebuilt or swapped after prepare must be caught here, loudly.
    A dataset without a stamp (written before stamps existed) is not judged.
    """
    path = Path(dataset_dir) / TOKENIZER_STAMP
    if not path.is_file():
        return None
    stamp = json.loads(path.read_text(encoding="utf-8"))
    if stamp.get("tokenizer_hash") == tokenizer_hash(tokenizer):
        return None
    return (
        f"dataset {dataset_dir} was tokenized with another tokenizer ({stamp.get('tokenizer') or 'in memory'}, "
        f"{str(stamp.get('tokenizer_hash'))[:12]}) than the base's ({tokenizer_hash(tokenizer)[:12]}): its token ids "
        "mean other words to this model; run the prepare stage again with this base"
    )


def base_model_hash(record: BaseRecord) -> str:
    """One hash for the base model: over the recorded file hashes (built or local folder), else the
    hub id and revision (a hub model the base stage could not hash; pinned only by a commit revision)."""
    files = {k: v for k, v in (record.files or {}).items() if k != RECORD}
    if files:
        payload = json.dumps(files, sort_keys=True)
    else:
        payload = f"{record.model_ref}@{record.revision}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def quantization_config(quantization: str, double_quant: bool, compute_dtype: Any):
    """bitsandbytes' 4-bit config for `quantization` ("nf4" or "fp4"); None for "none"."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base_config(base_dir: Path):
    """The base model's transformers config, as the base record says to load it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_base_model_path(base_dir), **base_load_kwargs(base_dir))


def load_base_causal_lm(
    base_dir: Path,
    device: Any,
    dtype: Any,
    quantization: str = "none",
    double_quant: bool = False,
    config_overrides: dict[str, Any] | None = None,
):
    """The base causal LM on `device` in `dtype`, 4-bit quantized when `quantization` asks for it;
    `config_overrides` (e.g. an adapter's long-context rope scaling) are set on its config first."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(base_load_kwargs(base_dir))  # revision and trust_remote_code from the base record
    if config_overrides:
        config = load_base_config(base_dir)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        kwargs["config"] = config
    quant = quantization_config(quantization, double_quant, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return AutoModelForCausalLM.from_pretrained(
        resolve_base_model_path(base_dir), dtype=dtype, device_map={"": str(device)}, **kwargs
    )

"""LongLoRA's model-side settings: the rope scaling that extends a base's context, and the
embeddings and norms that train beside LoRA (Chen et al., 2023).

The train stage writes what it changed into the adapter's train_record.json (`long_context`); every
later stage that puts the adapter on the base (merge, the quantized reference) applies the same
config overrides (records.TrainRecord.config_overrides, through modelling/variants.py's
LongContextVariant), so the merged model's config carries the rope scaling and the extended
max_position_embeddings, and inference needs nothing else.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from loraline.config import ConfigError, LongContextParams

# The full-attention reference of a LongLoRA adapter (train.long_context.reference), inside its adapter folder.
FULL_ATTENTION_REFERENCE = "full_attention_reference"


def original_context(config: Any) -> int:
    """The context the base was trained on (its rope's original length when it was extended before)."""
    rope = _rope_parameters(config) or {}
    return int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)


def extended_context(config: Any) -> tuple[int, int] | None:
    """(original context, extended context) when a model config (object or config.json dict) carries
    rope scaling that extends its base's context, as train.long_context writes it; else None."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    rope, extended = get("rope_parameters"), get("max_position_embeddings")
    original = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    if isinstance(original, int) and isinstance(extended, int) and extended > original:
        return original, extended
    return None


def _rope_parameters(config: Any) -> dict[str, Any] | None:
    """The config's single rope setting; None for no rope, or one per layer type (e.g. Gemma 3), not handled here."""
    rope = getattr(config, "rope_parameters", None)
    return rope if isinstance(rope, dict) and "rope_type" in rope else None


def rope_overrides(config: Any, lc: LongContextParams) -> dict[str, Any]:
    """The config changes that extend `config`'s model to lc.target_len with lc.rope_scaling.
    Raises ConfigError naming why when this base cannot be extended so."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _rope_parameters(config)
    if rope is None or getattr(config, "max_position_embeddings", None) is None:
        raise ConfigError(
            f"train.long_context: the base ({config.__class__.__name__}) has no rotary position embeddings to scale "
            "(no rope_parameters / max_position_embeddings in its config); LongLoRA needs a RoPE model"
        )
    if lc.rope_scaling not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(
            f"train.long_context.rope_scaling {lc.rope_scaling!r} is not supported by this transformers; "
            f"it offers: {', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
        )
    if rope.get("rope_type", "default") not in ("default", lc.rope_scaling):
        raise ConfigError(
            f"train.long_context.rope_scaling {lc.rope_scaling!r}: the base already uses rope type "
            f"{rope.get('rope_type')!r}; extend it with that type"
        )
    original = original_context(config)
    if lc.target_len <= original:
        raise ConfigError(
            f"train.long_context.target_len ({lc.target_len}) must be above the base's context ({original} tokens)"
        )
    new_rope = {k: v for k, v in rope.items() if k not in ("factor", "rope_type", "original_max_position_embeddings")}
    new_rope.update(
        rope_type=lc.rope_scaling, factor=lc.target_len / original, original_max_position_embeddings=original
    )
    return {"max_position_embeddings": lc.target_len, "rope_parameters": new_rope}


def trainable_module_names(model: nn.Module, trainable: list[str]) -> list[str]:
    """modules_to_save entries (peft's dotted-suffix rule) for LongLoRA's `trainable`: the input
    embeddings ("embed") and every normalization layer ("norm"), named as in this model."""
    names: list[str] = []
    if "embed" in trainable:
        embed = model.get_input_embeddings()
        names += [n for n, m in model.named_modules() if m is embed][:1]
    if "norm" in trainable:
        # full names: a leaf name like "norm" could also be a non-norm module's, which peft would then train
        norms = [n for n, m in model.named_modules() if n and _is_norm(m)]
        if not norms:
            raise ConfigError("train.long_context.trainable has 'norm' but the base has no normalization layers")
        names += norms
    return names


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm"))

"""A causal LM with its KV cache as flat tensors, so that an exported graph can carry the cache.

Inputs (batch B, current length S, past length P; all dynamic):
    input_ids        int64  [B, S]
    attention_mask   int64  [B, P + S]   1 = real token, 0 = padding (left padding is supported)
    past_key.i       float  [B, kv_heads, P, head_dim]   for every layer i
    past_value.i     float  [B, kv_heads, P, head_dim]
Outputs:
    logits           float  [B, S, vocab]
    present.i.key    float  [B, kv_heads, P + S, head_dim]
    present.i.value  float  [B, kv_heads, P + S, head_dim]

Position ids are derived from the attention mask (cumulative sum - 1), as transformers' generate
does, so callers never have to track them. The first (prompt) step feeds P = 0 past tensors.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> CacheLayout:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, kv, head_dim)

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        for i in range(self.num_layers):
            names += [f"past_key.{i}", f"past_value.{i}"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.num_layers)]


class KVCacheWrapper(torch.nn.Module):
    """forward(input_ids, attention_mask, *flat_past) -> (logits, *flat_present)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.layout = CacheLayout.from_config(model.config)
        # transformers 5.x renamed `past_key_values` to `cache`; accept either spelling.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        n = self.layout.num_layers
        if len(past) != 2 * n:
            raise ValueError(f"expected {2 * n} past tensors (key and value per layer), got {len(past)}")
        cache = DynamicCache(config=self.model.config)
        for i in range(n):
            cache.update(past[2 * i], past[2 * i + 1], i)
        seq = input_ids.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{self._cache_arg: cache},
        )
        present = getattr(out, "cache", None) or out.past_key_values
        flat: list[torch.Tensor] = []
        for i in range(n):
            layer = present.layers[i]
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)

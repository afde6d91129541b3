"""How many test rows the evaluate stage scores and generates at once (evaluate.batch_size).

On the CPU, auto is 32: measured on 2 cores, larger batches gain nothing and the answers are the same.
On CUDA the cost of a batch is per step, not per row: an 8B base generates 32 rows or 244 in about the
same time per token (the step reads all weights once), so one batch of every test row is 5-8 times
faster than batches of 32. auto takes as many rows as the card holds beside the loaded model:

    rows = (CARD_SHARE x total memory - memory the model holds) / bytes per row,   1 <= rows <= MAX_ROWS

where a row costs its longest sequence (prompt + new tokens) times, per token, the KV cache, one
decoder layer's activations and the bf16 logits the answer loss takes over the whole vocabulary. The
card's total memory, not its free memory, decides: a card of one kind running one model on one test
split always picks the same number, so its metrics repeat. Should the estimate still be too high (another
process on the card), the batch is halved and the model rescored from scratch (`scored_in_batches`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

CPU_ROWS = 32
MAX_ROWS = 256
CARD_SHARE = 0.8  # of the card's total memory: the rest is for the CUDA context, allocator slack and fragmentation

T = TypeVar("T")


def rows_for(requested: int | str, model: Any, longest_tokens: int, rows: int) -> int:
    """The rows per batch for `model` (loaded, on its device): `requested` when it is a number; for auto,
    CPU_ROWS on the CPU and the memory estimate on CUDA; never more than the `rows` there are."""
    if requested != "auto":
        return max(1, min(int(requested), rows))
    device = model.device
    if device.type != "cuda":
        return max(1, min(CPU_ROWS, rows))
    budget = CARD_SHARE * torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    fit = int(budget // (longest_tokens * bytes_per_token(model.config)))
    return max(1, min(fit, MAX_ROWS, rows))


def bytes_per_token(config: Any) -> int:
    """Memory one token of a batch costs while scoring: KV cache (bf16) + one decoder layer's activations
    (attention and MLP inputs/outputs, a few copies) + the bf16 logits row and its float32 copy."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    kv = 2 * int(text.num_hidden_layers) * kv_heads * head_dim * 2
    activations = (4 * hidden + 3 * intermediate) * 2
    logits = int(text.vocab_size) * (2 + 4)
    return kv + activations + logits


def scored_in_batches(requested: int | str, rows: int, score: Callable[[int], T], what: str) -> tuple[T, int]:
    """(score(rows), rows) with `rows` halved after each CUDA out-of-memory error while evaluate.batch_size
    is auto (a number the user chose is kept: the error names the setting instead)."""
    while True:
        try:
            return score(rows), rows
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            if requested != "auto":
                raise torch.cuda.OutOfMemoryError(
                    f"{what}: out of GPU memory at evaluate.batch_size {requested}: lower it, or set it to auto"
                ) from e
            if rows == 1:
                raise
            rows //= 2
            print(f"{what}: out of GPU memory, retrying {rows} rows at a time", file=sys.stderr)

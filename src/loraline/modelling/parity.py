"""Probes and parity: does one model behave like another on a fixed set of chat conversations?

The merge stage compares the merged model with the adapter on its base (and with the 4-bit model it
was trained against); the export stage compares the ONNX graph with the merged model. Both encode the
same probes, generate greedily with the same settings and count agreement the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraline.modelling.parity_numbers import summarize

DEFAULT_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "Summarise in one sentence: the printer on floor 2 is down again."},
    ],
    [{"role": "user", "content": "Turn this into JSON: name=Ana, team=network, priority=P2"}],
    [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 4?"},
    ],
]


def encode_probe(tok: Any, conversation: list[dict[str, str]], error: type[Exception] = ValueError) -> list[int]:
    """Token ids of `conversation` rendered with the chat template, ready for the assistant's turn."""
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise error(f"probe {conversation!r} renders to no tokens")
    return list(ids)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Probes run at once on CUDA (left-padded): the 4 built-in ones and merge.probes' 16 drawn from the tenant
# (up to merge.probe_max_tokens each) make one batch.
CUDA_PROBE_BATCH = 32


def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int | None,
    eos_token_id: int | list[int] | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' generate, greedy with every sampling knob off, with the KV cache; the new tokens only,
    [rows, new] (rows of a batch that stopped early are padded with pad_token_id)."""
    gen = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    return gen[:, input_ids.shape[1] :]


@dataclass
class ProbeOutputs:
    logits: list[torch.Tensor]  # per probe: [prompt_len, vocab] float32, on the CPU
    greedy: list[list[int]]  # per probe: generated token ids (prompt excluded)
    texts: list[str]


@torch.no_grad()
def run_probes(
    model: Any,
    tok: Any,
    inputs: list[list[int]],
    max_new_tokens: int,
    batch_size: int | None = None,
    logits: bool = True,
) -> ProbeOutputs:
    """Prompt logits and greedy generations of a PyTorch model on every probe. `batch_size` None: one
    probe at a time on the CPU (the numbers CPU runs always had, and the same bytes in the reports),
    CUDA_PROBE_BATCH at once, left-padded, on CUDA. `logits` False: the generations alone (no logits to
    compare with: a prompt's [tokens x vocab] float32 logits are about 100 MB at a 128k vocabulary)."""
    size = probe_batch_size(model.device) if batch_size is None else batch_size
    logits = prompt_logits(model, inputs, tok.pad_token_id, size) if logits else []
    greedy = greedy_tokens(model, inputs, max_new_tokens, tok.pad_token_id, tok.eos_token_id, size)
    return ProbeOutputs(logits, greedy, [tok.decode(g, skip_special_tokens=True) for g in greedy])


def probe_batch_size(device: torch.device) -> int:
    """How many probes run at once on `device`: one on the CPU (today's numbers, bit for bit), a batch on CUDA."""
    return CUDA_PROBE_BATCH if device.type == "cuda" else 1


@torch.no_grad()
def prompt_logits(
    model: Any, inputs: list[list[int]], pad_token_id: int | None, batch_size: int = 1
) -> list[torch.Tensor]:
    """Per prompt, the logits at each of its positions ([len, vocab] float32 on the CPU), from one
    forward pass without the cache; a batch is left-padded and each prompt's rows are its own positions."""
    out: list[torch.Tensor] = []
    for batch in _batches(inputs, batch_size):
        ids, attn = left_pad(batch, pad_token_id or 0, model.device)
        # Positions count real tokens only (as generate does), so padding shifts no prompt's rope phase.
        positions = None if len(batch) == 1 else padded_positions(attn)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=False).logits
        out += [logits[row, ids.shape[1] - len(p) :].float().cpu() for row, p in enumerate(batch)]
    return out


@torch.no_grad()
def greedy_tokens(
    model: Any,
    inputs: list[list[int]],
    max_new_tokens: int,
    pad_token_id: int | None,
    eos_token_id: int | list[int] | None,
    batch_size: int = 1,
) -> list[list[int]]:
    """Per prompt, its greedy continuation with the KV cache (up to and including the first eos); a batch
    is left-padded, and what a row generates after its eos (padding) is cut."""
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    pad = pad_token_id if pad_token_id is not None else (min(stops) if stops else 0)
    out: list[list[int]] = []
    for batch in _batches(inputs, batch_size):
        ids, attn = left_pad(batch, pad, model.device)
        for row in greedy_generate(model, ids, max_new_tokens, pad, eos_token_id, attn).tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:end])
    return out


def left_pad(batch: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left to the longest (no padding for one)."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[row, width - len(p) :] = 1
    return ids.to(device), attn.to(device)


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (generate's own rule)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _batches(inputs: list[list[int]], size: int) -> list[list[list[int]]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [inputs[i : i + size] for i in range(0, len(inputs), size)]


def compare(a: ProbeOutputs, b: ProbeOutputs) -> dict[str, Any]:
    """Logit differences and greedy agreement of `a` against `b`, overall and per probe."""
    per_probe = []
    for la, lb, ga, gb in zip(a.logits, b.logits, a.greedy, b.greedy, strict=True):
        diff = (la - lb).abs()
        per_probe.append(
            {
                "max_abs_logit_diff": float(diff.max()),
                "mean_abs_logit_diff": float(diff.mean()),
                "next_token_equal": bool(la[-1].argmax() == lb[-1].argmax()),
                "greedy_equal": ga == gb,
                "greedy_common_prefix": common_prefix(ga, gb),
            }
        )
    return {**summarize(per_probe), "per_probe": per_probe, "merged_greedy_texts": a.texts}

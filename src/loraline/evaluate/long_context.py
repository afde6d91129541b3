"""Long-context evaluation of a LongLoRA candidate: held-out perplexity by length and passkey retrieval.

Written to reports/<tenant>/evaluation/long_context.json when the candidate's config extends the
base's context (rope_parameters.original_max_position_embeddings below max_position_embeddings):

- perplexity at lengths from the base's own context up to the extended one (doubling), over
  windows of the tenant's held-out test rows laid end to end (text the adapter never trained on),
  for the base as it is, the base with the candidate's rope scaling alone, and the candidate;
- passkey retrieval (Mohtashami and Jaggi, 2023, as LongLoRA reports it): a random 5-digit number
  hidden at several depths of filler text of each length, asked for at the end; greedy decoding.

Everything is seeded, so the same models give the same report.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DEPTHS = (0.1, 0.5, 0.9)
MAX_WINDOWS = 4
PASSKEY_TRIALS = 2
SEED = 0
GATE_METRIC = "long_context_perplexity"  # held-out perplexity at the extended context, in metrics.json


def lengths_between(original: int, extended: int) -> list[int]:
    """original, 2x original, ... up to and including the extended context."""
    out, n = [], original
    while n < extended:
        out.append(n)
        n *= 2
    return out + [extended]


def held_out_stream(rows: Sequence[Sequence[int]], separator: int | None) -> list[int]:
    """The test rows' tokens end to end (a separator between rows), for windows longer than any one row."""
    stream: list[int] = []
    for ids in rows:
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
    return stream


@torch.no_grad()
def perplexity_by_length(
    model: Any, stream: list[int], lengths: list[int], max_windows: int = MAX_WINDOWS
) -> dict[str, Any]:
    """Perplexity over non-overlapping windows of each length (every next-token prediction in the
    window counts); a length the held-out text cannot fill once is reported as such, not guessed."""
    out: dict[str, Any] = {}
    for length in lengths:
        windows = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)][:max_windows]
        if not windows:
            out[str(length)] = {"perplexity": None, "windows": 0, "why": f"held-out text has {len(stream)} tokens"}
            continue
        nll, count = 0.0, 0
        for window in windows:
            ids = torch.tensor([window], device=model.device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(window) - 1
        loss = nll / count
        out[str(length)] = {
            "perplexity": round(math.exp(loss), 4) if loss < 700 else math.inf,
            "windows": len(windows),
        }
    return out


def passkey_prompt(tok: Any, length: int, depth: float, key: int) -> list[int]:
    """Filler of about `length` tokens with the key's sentence at `depth`, ending in the question."""
    needle = tok(f"The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)["input_ids"]
    question = tok("What is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    filler = tok(FILLER, add_special_tokens=False)["input_ids"]
    room = max(length - len(needle) - len(question), 0)
    body = (filler * (room // max(len(filler), 1) + 1))[:room]
    at = int(len(body) * depth)
    return body[:at] + needle + body[at:] + question


@torch.no_grad()
def passkey_retrieval(
    model: Any, tok: Any, lengths: list[int], depths: Sequence[float] = DEPTHS, trials: int = PASSKEY_TRIALS
) -> dict[str, Any]:
    """Share of prompts whose greedy continuation starts with the hidden key, by length and by depth."""
    rng = random.Random(SEED)
    cells, by_length, by_depth = [], {}, {}
    for length in lengths:
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                ids = torch.tensor([passkey_prompt(tok, length, depth, key)], device=model.device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=8,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
                text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                hits += text.strip().startswith(str(key))
            cells.append({"length": length, "depth": depth, "accuracy": hits / trials})
    for length in lengths:
        by_length[str(length)] = _mean(c["accuracy"] for c in cells if c["length"] == length)
    for depth in depths:
        by_depth[str(depth)] = _mean(c["accuracy"] for c in cells if c["depth"] == depth)
    return {"trials_per_cell": trials, "by_length": by_length, "by_depth": by_depth, "cells": cells}


def _mean(values: Any) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else math.nan

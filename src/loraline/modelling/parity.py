"""Probes and parity: does one model behave like another on a fixed set of chat conversations?

The merge stage compares the merged model with the adapter on its base (and with the 4-bit model it
was trained against); the export stage compares the ONNX graph with the merged model. Both encode the
same probes, generate greedily with the same settings and count agreement the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "Summarise in one sentence: the printer on floor 2 is down again."},
    ],
    [{"role": "user", "content": 'Turn this into JSON: name=Ana, team=network, priority=P2'}],
    [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 4?"},
    ],
]


class ParityError(ValueError):
    """A model does not behave like its reference within tolerance (or the probes are unusable);
    `report` holds the numbers measured so far, for the caller to show or keep."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report


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


def greedy_generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, pad_token_id: int | None,
                    eos_token_id: int | list[int] | None) -> list[int]:
    """transformers' generate, greedy with every sampling knob off; the new tokens only."""
    gen = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, use_cache=True,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id,
    )
    return gen[0, input_ids.shape[1]:].tolist()


@dataclass
class ProbeOutputs:
    logits: list[torch.Tensor]  # per probe: [prompt_len, vocab] float32
    greedy: list[list[int]]  # per probe: generated token ids (prompt excluded)
    texts: list[str]


@torch.no_grad()
def run_probes(model: Any, tok: Any, inputs: list[list[int]], max_new_tokens: int) -> ProbeOutputs:
    """Prompt logits and greedy generations of a PyTorch model on every probe."""
    out = ProbeOutputs([], [], [])
    for ids in inputs:
        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        out.logits.append(model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float().cpu())
        new = greedy_generate(model, x, max_new_tokens, tok.pad_token_id, tok.eos_token_id)
        out.greedy.append(new)
        out.texts.append(tok.decode(new, skip_special_tokens=True))
    return out


def compare(a: ProbeOutputs, b: ProbeOutputs) -> dict[str, Any]:
    """Logit differences and greedy agreement of `a` against `b`, overall and per probe."""
    per_probe = []
    for la, lb, ga, gb in zip(a.logits, b.logits, a.greedy, b.greedy, strict=True):
        diff = (la - lb).abs()
        per_probe.append({
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "next_token_equal": bool(la[-1].argmax() == lb[-1].argmax()),
            "greedy_equal": ga == gb,
            "greedy_common_prefix": common_prefix(ga, gb),
        })
    return {**summarize(per_probe), "per_probe": per_probe, "merged_greedy_texts": a.texts}


def summarize(per_probe: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst and mean logit difference and the agreement fractions over the probes."""
    n = len(per_probe)
    return {
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in per_probe),
        "mean_abs_logit_diff": sum(p["mean_abs_logit_diff"] for p in per_probe) / n,
        "greedy_agreement": sum(p["greedy_equal"] for p in per_probe) / n,
        "next_token_agreement": sum(p["next_token_equal"] for p in per_probe) / n,
    }


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The parity numbers worth comparing across runs (a stage's metrics file): the worst logit
    difference and the greedy agreement of a `compare`/`summarize` result."""
    return {k: summary[k] for k in ("max_abs_logit_diff", "greedy_agreement")}

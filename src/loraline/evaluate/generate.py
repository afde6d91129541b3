"""Model-side evaluation: load a causal LM, score answer tokens, generate answers greedily.

Every model is evaluated with the *base* tokenizer: the stored input_ids/labels were made with it
and every adapter (hence every merged candidate or production model) sits on the same base.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraline.modelling.constants import IGNORE_INDEX
from loraline.modelling.device import compute_dtype


@contextmanager
def loaded_model(path: str | Path, device: torch.device, adapter: Path | None = None, **kwargs: Any) -> Iterator[Any]:
    """A causal LM in eval mode on `device` (with a peft `adapter` folder on it, unmerged, if given),
    released (and the CUDA cache emptied) afterwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=compute_dtype(device), device_map={"": str(device)}, **kwargs
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    try:
        yield model
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class AnswerLoss:
    loss: float  # mean cross-entropy per answer token (NaN when there is none)
    tokens: int  # answer tokens scored

    @property
    def perplexity(self) -> float:
        if not math.isfinite(self.loss):
            return math.nan
        return math.exp(self.loss) if self.loss < 700 else math.inf


@torch.no_grad()
def answer_loss(
    model: Any, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8
) -> AnswerLoss:
    """Mean cross-entropy over the tokens whose label is not -100 (HF convention: labels align with
    input_ids, the model predicts labels[t + 1] from the prefix up to t). Micro-averaged over tokens."""
    total, count = 0.0, 0
    for logits, targets, keep in _answer_batches(model, input_ids, labels, pad_id, batch_size):
        if keep.any():
            total += F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return AnswerLoss(total / count if count else math.nan, count)


@torch.no_grad()
def answer_logps(
    model: Any, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8
) -> list[float]:
    """Each row's summed log-probability of its answer tokens (labels != -100), fp32 log-softmax: what DPO
    compares between a chosen and a rejected answer. Batched and right-padded as `answer_loss`."""
    out: list[float] = []
    for logits, targets, keep in _answer_batches(model, input_ids, labels, pad_id, batch_size):
        # Only answer positions go through the fp32 log-softmax: at a 128k vocabulary a whole batch would not fit.
        picked = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1).gather(-1, targets[keep].unsqueeze(-1))
        sums = torch.zeros(len(targets), dtype=torch.float64, device=targets.device)
        sums.index_add_(0, keep.nonzero()[:, 0], picked.squeeze(-1).double())
        out.extend(sums.tolist())
    return out


@torch.no_grad()
def _answer_batches(
    model: Any, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of `batch_size` right-padded rows: the logits, the shifted targets and where they are answers."""
    device = model.device
    for start in range(0, len(input_ids), batch_size):
        ids, lab, attn = _right_padded(
            input_ids[start : start + batch_size], labels[start : start + batch_size], pad_id
        )
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
        targets = lab[:, 1:].to(device)
        yield logits, targets, targets != IGNORE_INDEX


def _right_padded(
    ids_b: Sequence[Sequence[int]], lab_b: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids_b)
    ids = torch.full((len(ids_b), width), pad_id, dtype=torch.long)
    lab = torch.full((len(ids_b), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(ids_b), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(ids_b, lab_b, strict=True)):
        ids[row, : len(x)] = torch.tensor(x)
        lab[row, : len(y)] = torch.tensor(y)
        attn[row, : len(x)] = 1
    return ids, lab, attn


def encode_prompt(tok: Any, context: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def stop_ids(tok: Any, model: Any) -> list[int]:
    """tokenizer.eos_token_id plus whatever the model's generation_config stops at (<|im_end|> for ours)."""
    ids: list[int] = []
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tok.eos_token_id, cfg):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def generate_greedy(
    model: Any,
    tok: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers (decoded, special tokens dropped, stripped) for tokenized prompts, batched with left padding."""
    eos = stop_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            attn[row, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=attn.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            out.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
        if on_batch:
            on_batch(len(batch))
    return out

"""The model's forward pass to token losses, as every objective computes them.

Invariants: log-softmax in fp32 (the plain path casts the logits; the fused path,
speed.chunked_linear_*, soft-maxes each chunk in fp32); only positions with a target are scored; a
packed batch's example boundaries reach the attention function where it takes them (varlen, S2-Attn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraline.modelling.constants import IGNORE_INDEX
from loraline.modelling.device import autocast, compute_dtype
from loraline.modelling.s2attn import S2_ATTN
from loraline.train.packing import Batch
from loraline.train.speed import VARLEN, FusedHead, chunked_linear_cross_entropy, chunked_linear_token_nll


def loss_sum(
    model: torch.nn.Module, batch: Batch, device: torch.device, *, fused: FusedHead | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (fp32 softmax for stability).

    With `fused` (decoder, lm_head), the loss comes from the decoder's hidden states chunk by chunk
    (speed.chunked_linear_cross_entropy): the same value and gradients, without full-vocabulary logits.
    """
    return _target_losses(model, batch, device, fused, chunk, "sum")


def token_nll(
    model: torch.nn.Module, batch: Batch, device: torch.device, *, fused: FusedHead | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Cross-entropy of every target token (fp32), in the order of the flattened targets: loss_sum before the
    sum, for objectives that add the tokens up per sequence (fused: speed.chunked_linear_token_nll)."""
    return _target_losses(model, batch, device, fused, chunk, "none")


def _target_losses(
    model: torch.nn.Module, batch: Batch, device: torch.device, fused: FusedHead | None, chunk: int, reduction: str
) -> torch.Tensor:
    """One forward pass, then the targets' cross-entropy summed ("sum") or per token ("none")."""
    inputs = batch.model_inputs(varlen=attends_by_segments(model))
    with autocast(device):
        if fused is not None:
            decoder, head = fused
            hidden = decoder(**inputs, use_cache=False)[0]
            linear_loss = chunked_linear_cross_entropy if reduction == "sum" else chunked_linear_token_nll
            return linear_loss(hidden, head.weight, batch.targets, chunk=chunk, dtype=compute_dtype(device))
        logits = model(**inputs, use_cache=False).logits
    keep = batch.targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), batch.targets[keep], reduction=reduction)


def uses_varlen(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == VARLEN


def attends_by_segments(model: torch.nn.Module) -> bool:
    """Whether the attention function takes the packed batch's example boundaries (cu_seq_lens_q)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in (VARLEN, S2_ATTN)

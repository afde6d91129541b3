"""Training-speed options of the train stage (each one a `train.` param; see docs/benchmarks.md).

- fused_cross_entropy: the loss is computed from the decoder's last hidden states chunk by chunk
  (`chunked_linear_cross_entropy`), only at the positions that have a target, so the
  [tokens x vocabulary] logits tensor is never materialized (4.2 GB in fp32 for 8k tokens of a
  128k vocabulary). Exact: the same loss and gradients as logits + F.cross_entropy.
- varlen_attention: packed rows attend through flash attention over variable-length sequences
  (torch.nn.attention.varlen), one sequence per example, instead of SDPA with a materialized
  block-diagonal mask (which runs the slower masked kernel over whole rows). CUDA only; elsewhere
  the model keeps its own attention (the block-diagonal mask derived from position_ids).
- checkpoint_fraction: activation checkpointing on only the first part of the decoder layers,
  trading memory for the recompute of the rest.

Every option falls back to the plain path where it does not apply, so CPU runs (CI) keep working.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from loraline.modelling.constants import IGNORE_INDEX
from loraline.modelling.varlen import causal_varlen

log = logging.getLogger(__name__)

VARLEN = "loraline_varlen"  # the attention implementation name registered with transformers


# --------------------------------------------------------------------------- linear + cross-entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]), computed `chunk` rows at a time.

    The loss is the graph's end, so its gradients are computed in the forward pass, chunk by chunk,
    while each chunk's logits exist anyway (no recompute); backward only scales them by the
    incoming gradient. Logits are computed in `dtype` (bf16 on CUDA, as autocast would) and
    soft-maxed in fp32, exactly as the plain path's `logits.float()` cross-entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype, need_h: bool, need_w: bool):  # noqa: ANN001
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)
                t = targets[start : start + chunk]
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    g = probs.to(dtype)
                    del logits, probs
                    if need_h:
                        grad_h[start : start + chunk] = (g @ w).to(hidden.dtype)
                    if need_w:
                        grad_w += (g.t() @ h).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_h = grad_w = None
        if need_h:
            g = saved.pop(0)
            grad_h = (g.float() * grad_out).to(g.dtype)
        if need_w:
            grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = 1024,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX positions skipped),
    without ever holding more than `chunk` rows of logits. hidden: [..., H]; targets: [...]."""
    hidden, targets = _with_targets(hidden, targets)
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        hidden,
        weight,
        targets,
        chunk,
        dtype or hidden.dtype,
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
    )


class _LinearTokenNll(torch.autograd.Function):
    """CE(hidden[i] @ weight.T, targets[i]) for every row i (a vector), computed `chunk` rows at a time.

    The per-row cross-entropies are not the graph's end (the preference losses sum them per sequence and
    combine the sums non-linearly), so the forward keeps each row's gradient with respect to its hidden
    state, (softmax - onehot) @ weight, and backward scales it by that row's incoming gradient. The
    weight's gradient (lm_head trained through modules_to_save) needs the per-row scales, so it is
    recomputed chunk by chunk in backward. Same dtypes as _LinearCrossEntropy: logits in `dtype`,
    log-softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype, need_h: bool, need_w: bool):  # noqa: ANN001
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            for start in range(0, hidden.shape[0], chunk):
                logits = (hidden[start : start + chunk].to(dtype) @ w.t()).float()
                t = targets[start : start + chunk]
                lse = torch.logsumexp(logits, dim=-1)
                nll[start : start + chunk] = lse - logits.gather(1, t[:, None]).squeeze(1)
                if need_h:
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    grad_h[start : start + chunk] = (probs.to(dtype) @ w).to(hidden.dtype)
        saved = [x for x in (grad_h,) if x is not None]
        ctx.save_for_backward(*saved, *((hidden, weight, targets) if need_w else ()))
        ctx.has, ctx.chunk, ctx.dtype = (need_h, need_w), chunk, dtype
        return nll

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_h = grad_w = None
        scale = grad_out.float()[:, None]
        if need_h:
            g = saved.pop(0)
            grad_h = (g.float() * scale).to(g.dtype)
        if need_w:
            hidden, weight, targets = saved
            grad_w = _token_nll_weight_grad(hidden, weight, targets, scale, ctx.chunk, ctx.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _token_nll_weight_grad(hidden, weight, targets, scale, chunk: int, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
    """sum_i scale[i] * (softmax_i - onehot_i)^T hidden[i]: the head's gradient, its logits recomputed by chunk."""
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            probs = torch.softmax((h @ w.t()).float(), dim=-1)
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_w += ((probs * scale[start : start + chunk]).to(dtype).t() @ h).float()
    return grad_w.to(weight.dtype)


def chunked_linear_token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = 1024,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` at each position that has a target (IGNORE_INDEX
    positions skipped), in the order of the flattened targets, without ever holding more than `chunk` rows of
    logits: the per-token losses the preference objectives sum per sequence. hidden: [..., H]; targets: [...]."""
    hidden, targets = _with_targets(hidden, targets)
    grad = torch.is_grad_enabled()
    return _LinearTokenNll.apply(
        hidden,
        weight,
        targets,
        chunk,
        dtype or hidden.dtype,
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
    )


FusedHead = tuple[nn.Module, nn.Linear]


def fused_head(model: nn.Module) -> FusedHead | None:
    """(decoder, lm_head) when the causal LM's logits are exactly `lm_head(decoder(...).last_hidden_state)`,
    else None (a head with bias or an adapter on it, logit soft-capping or scaling): those keep the plain path."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(lm, "get_decoder", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if get_decoder is None or not _plain_linear(head):
        return None
    cfg = getattr(lm, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            return None
    if type(lm).__name__ not in FUSED_ARCHITECTURES:
        return None
    try:
        decoder = get_decoder()
    except Exception:  # noqa: BLE001
        return None
    return (decoder, head) if decoder is not None else None


def _plain_linear(head: nn.Module | None) -> bool:
    """A bias-free nn.Linear, or peft's modules_to_save wrapper around them (train.modules_to_save:
    [lm_head], or tied embeddings): the wrapper's `.weight` is the trained copy while the adapter is
    active and the base's when it is disabled, which is what the loss must read."""
    inner = getattr(head, "original_module", None)
    copies = getattr(head, "modules_to_save", None)
    if inner is not None and isinstance(copies, nn.ModuleDict):
        return all(_plain_linear(m) for m in [inner, *copies.values()])
    return type(head) is nn.Linear and head.bias is None


# Causal LMs whose forward is `logits = lm_head(model(...)[0])` with nothing in between (checked by
# reading their modeling code); others keep the plain path.
FUSED_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "GPTNeoXForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
        "StableLmForCausalLM",
    }
)


# ----------------------------------------------------------------------------- varlen attention


def segments_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, over the flattened rows) and the longest segment, from positions that
    restart at 0 for every example (and for a row's trailing pad segment)."""
    b, s = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[torch.arange(0, b * s, s, device=flat.device)] = True  # every row starts a segment
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, idx.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def segments_from_rows(rows_lengths: list[list[int]], width: int) -> tuple[torch.Tensor, int]:
    """The same from the collated rows' example lengths (no device sync): each row's examples, then its pad segment."""
    cu, at, longest = [0], 0, 0
    for lengths in rows_lengths:
        row_start = at
        for n in lengths:
            at += n
            cu.append(at)
            longest = max(longest, n)
        if at - row_start < width:
            longest = max(longest, width - (at - row_start))
            at = row_start + width
            cu.append(at)
    return torch.tensor(cu, dtype=torch.int32), longest


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):  # noqa: ANN001
    """transformers attention interface: query [b, hq, s, d], key/value [b, hkv, s, d] -> [b, s, hq, d]."""
    if attention_mask is not None:
        raise RuntimeError("varlen attention needs packed rows without an attention_mask (train.packing: true)")
    if dropout:
        raise RuntimeError("varlen attention has no attention dropout")
    b, hq, s, d = query.shape
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(s, device=query.device).expand(b, s)
        cu, longest = segments_from_positions(position_ids.expand(b, s))
    q, k, v = (x.transpose(1, 2).reshape(b * s, x.shape[1], d) for x in (query, key, value))
    out = causal_varlen(q, k, v, cu.to(device=query.device, dtype=torch.int32), scaling, longest)
    return out.view(b, s, hq, d), None


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch the model to varlen attention (registered with transformers' AttentionInterface)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    cfg = model.config
    try:
        model.set_attn_implementation(VARLEN)
    except Exception as exc:  # noqa: BLE001 -- an old or remote-code model: keep its attention
        log.warning(
            "train.varlen_attention: this model cannot switch attention implementation (%s); keeping %s",
            exc,
            cfg._attn_implementation,
        )
        return False
    return cfg._attn_implementation == VARLEN


# -------------------------------------------------------------------------- selective checkpointing


def apply_checkpoint_fraction(model: nn.Module, fraction: float) -> int:
    """Keep activation checkpointing on the first round(fraction * layers) decoder layers only;
    returns how many are checkpointed. The layers left out keep their activations (memory) and
    skip the recompute (time)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    keep = round(fraction * len(layers))
    for i, layer in enumerate(layers):
        if i >= keep:
            layer.gradient_checkpointing = False
    return keep


def _with_targets(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that have a target (not IGNORE_INDEX), flattened: hidden [N, H], targets [N]."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]

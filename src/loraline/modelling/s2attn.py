"""LongLoRA's shifted sparse attention (S2-Attn), the reference implementation (any device, O(T^2) masks).

For training at a long context, S2-Attn (Chen et al., 2023) splits each sequence into groups of
`group` tokens and attends within each group only; half of the heads use groups shifted by half a
group, so information crosses group borders from layer to layer. At inference the model uses full
attention again.

Two choices differ from the paper's reference code, both for correctness:
- The shifted heads' groups are offset, not rolled: the paper's `roll` wraps the last half group
  onto the first, and under a causal mask the first tokens then see the last ones (a look into the
  future). Here the shifted groups are [0, G/2), [G/2, 3G/2), ...: no token sees a later one.
- Packed rows (several examples laid end to end, positions restarting at 0 for each): groups are
  counted from each example's own start and never cross an example's border; an example no longer
  than one group is a group of its own in every head, that is, plain causal attention.

`s2_attention` (masks) is the reference; `s2_attention_segments` is what training runs: each
group is a run of consecutive tokens, so S2-Attn is causal attention within runs, with one set of
runs for the plain heads and one for the shifted heads (flash varlen attention on CUDA, SDPA per
run elsewhere), and is tested against the reference.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from loraline.modelling.varlen import causal_varlen, flash_varlen_available

S2_ATTN = "loraline_s2"


def segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Example index of every token of packed rows (a new example starts where the position is 0)."""
    return torch.cumsum((position_ids == 0).to(torch.int64), dim=-1)


def s2_mask(position_ids: torch.Tensor, group: int, heads: int) -> torch.Tensor:
    """(batch, heads, T, T) boolean: may query i attend to key j. The first half of the heads uses
    groups [0, G), [G, 2G), ...; the second half groups offset by G/2; always causal, always within
    one example, and an example of at most `group` tokens is one group in every head."""
    pos = position_ids.to(torch.int64)
    seg = segments(pos)
    t = pos.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=pos.device).tril()
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # (B, T, T)
    # each token's example length: short examples attend fully
    lengths = torch.zeros_like(pos)
    for b in range(pos.shape[0]):
        _, inverse, counts = torch.unique_consecutive(seg[b], return_inverse=True, return_counts=True)
        lengths[b] = counts[inverse]
    short = (lengths <= group).unsqueeze(-1)  # (B, T, 1): the query's example is one group

    def grouped(offset: int) -> torch.Tensor:
        g = torch.div(pos + offset, group, rounding_mode="floor")
        return (g.unsqueeze(-1) == g.unsqueeze(-2)) | short

    plain, shifted = grouped(0), grouped(group // 2)
    half = heads // 2
    per_head = torch.stack([plain] * (heads - half) + [shifted] * half, dim=1)  # (B, H, T, T)
    return per_head & (same & causal).unsqueeze(1)


def s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor,
    group: int,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """query (B, H, T, D), key and value (B, H_kv, T, D): S2-Attn output (B, H, T, D)."""
    b, h, t, d = query.shape
    if key.shape[1] != h:  # grouped-query attention: each key/value head serves h / h_kv query heads
        key = key.repeat_interleave(h // key.shape[1], dim=1)
        value = value.repeat_interleave(h // value.shape[1], dim=1)
    mask = s2_mask(position_ids.expand(b, t), group, h)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)


Run = tuple[int, int, int]  # (row, start, end): tokens [start, end) of one row attend causally among themselves


def _group_cuts(a: int, e: int, group: int) -> tuple[list[int], list[int]]:
    """Cut points of one example's tokens [a, e), for the plain heads and for the shifted heads."""
    plain = list(range(a, e, group)) + [e]
    shifted = [a] + ([] if e - a <= group else list(range(a + group // 2, e, group))) + [e]
    return plain, shifted


def s2_runs(position_ids: torch.Tensor, group: int) -> tuple[list[Run], list[Run]]:
    """The groups of s2_mask as runs of consecutive tokens, for the plain heads and for the shifted
    heads: within each example (positions restart at 0), groups of `group` tokens, the shifted ones
    offset by half a group; an example of at most `group` tokens is one run in both."""
    b, t = position_ids.shape
    is_start = position_ids == 0
    is_start[:, 0] = True
    starts: list[list[int]] = [[] for _ in range(b)]
    for row, i in torch.nonzero(is_start).tolist():  # one small transfer, not one per token
        starts[row].append(i)
    plain: list[Run] = []
    shifted: list[Run] = []
    for row, row_starts in enumerate(starts):
        for a, e in zip(row_starts, row_starts[1:] + [t]):
            p, s = _group_cuts(a, e, group)
            plain += [(row, x, y) for x, y in zip(p[:-1], p[1:])]
            shifted += [(row, x, y) for x, y in zip(s[:-1], s[1:])]
    return plain, shifted


def s2_boundaries(position_ids: torch.Tensor, group: int) -> tuple[list[int], list[int]]:
    """s2_runs as cu_seqlens over the flattened (B*T) tokens (for flash varlen attention):
    (cu_plain, cu_shifted), each starting at 0 and ending at B*T."""
    t = position_ids.shape[-1]
    return tuple([0] + [row * t + e for row, _, e in runs] for runs in s2_runs(position_ids, group))  # type: ignore[return-value]


def s2_boundaries_from_segments(cu_seqlens: list[int], group: int) -> tuple[list[int], list[int]]:
    """The same from the packed batch's own example boundaries over the flattened tokens (every
    example, and every row's pad segment, as the collator lays them out): no look at the positions."""
    plain, shifted = [0], [0]
    for a, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if e > a:
            p, s = _group_cuts(a, e, group)
            plain += p[1:]
            shifted += s[1:]
    return plain, shifted


# Every layer of a forward pass (and its recomputation under gradient checkpointing) gets the same
# boundaries tensor: the runs are computed once per tensor, not once per layer.
_last_boundaries: list = []


def _boundaries_once(source: torch.Tensor, group: int, compute) -> tuple[list[int], list[int]]:
    key = (group, source._version, tuple(source.shape))
    if _last_boundaries and _last_boundaries[0]() is source and _last_boundaries[1] == key:
        return _last_boundaries[2]
    value = compute()
    _last_boundaries[:] = [weakref.ref(source), key, value]
    return value


def _shared_kv(heads: slice, key: torch.Tensor, value: torch.Tensor, h: int):
    """(key, value, kv_heads) for query heads `heads` of h, in the (B, H, T, D) layout: under GQA the
    key/value heads those query heads share, unless the slice splits a key/value head's group; then
    key/value repeated to every query head, and `heads` itself."""
    per_kv = h // key.shape[1]
    if heads.start % per_kv == 0 and heads.stop % per_kv == 0:
        return key, value, slice(heads.start // per_kv, heads.stop // per_kv)
    return key.repeat_interleave(per_kv, dim=1), value.repeat_interleave(per_kv, dim=1), heads


def _attend_runs(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: slice,
    runs: list[Run],
    scaling: float | None,
) -> None:
    """Causal attention within each run, for query heads `heads`, written into out (B, H, T, D).
    Runs of one length go through SDPA together (one batched call), on contiguous copies."""
    key, value, kv_heads = _shared_kv(heads, key, value, query.shape[1])
    gqa = key[:, kv_heads].shape[1] != query[:, heads].shape[1]
    t = query.shape[2]
    by_length: dict[int, list[Run]] = {}
    for run in runs:
        by_length.setdefault(run[2] - run[1], []).append(run)
    for length, same in by_length.items():
        if length == t:  # whole rows: no copies
            rows = [r for r, _, _ in same]
            q, k, v = query[rows, heads], key[rows, kv_heads], value[rows, kv_heads]
        else:
            q, k, v = (
                torch.stack([x[r, hs, a:e] for r, a, e in same])
                for x, hs in ((query, heads), (key, kv_heads), (value, kv_heads))
            )
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        for i, (r, a, e) in enumerate(same):
            out[r, heads, a:e] = o[i]


class _HalvesAttention(torch.autograd.Function):
    """Causal varlen attention for the plain heads over one set of runs and for the shifted heads over
    another, assembled into one (N, H, D) output. The kernels' own outputs are not kept for backward:
    the assembled output lives on anyway (as o_proj's input), and keeping both would cost S2-Attn one
    attention output per layer more memory than full attention. Backward recomputes each half's
    attention instead, one half at a time (a forward over groups, a fraction of full attention's)."""

    @staticmethod
    def forward(ctx, q1, k1, v1, q2, k2, v2, runs, scaling):  # noqa: ANN001 (autograd's signature)
        ctx.save_for_backward(q1, k1, v1, q2, k2, v2)
        ctx.runs, ctx.scaling = runs, scaling
        return torch.cat(
            [causal_varlen(q1, k1, v1, runs[0], scaling), causal_varlen(q2, k2, v2, runs[1], scaling)], dim=1
        )

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        saved = ctx.saved_tensors
        split = saved[0].shape[1]
        grads: list[torch.Tensor] = []
        for inputs, runs, g in ((saved[:3], ctx.runs[0], grad[:, :split]), (saved[3:], ctx.runs[1], grad[:, split:])):
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in inputs]
                out = causal_varlen(*leaves, runs, ctx.scaling)
                grads += torch.autograd.grad(out, leaves, g)
        return (*grads, None, None)


def _s2_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plain: list[int],
    shifted: list[int],
    scaling: float | None,
) -> torch.Tensor:
    """S2-Attn through causal_varlen: (B, H, T, D) in, (B, T, H, D) out; `plain` and `shifted` are the
    two halves' runs as cu_seqlens over the flattened tokens."""
    b, h, t, d = query.shape
    half = h // 2
    inputs: list[torch.Tensor] = []
    for heads in (slice(0, h - half), slice(h - half, h)):
        # Each half is made contiguous in the kernel's (tokens, heads, dim) layout straight from the
        # model's, with only its own key/value heads (GQA): no full-width copy is sliced again.
        k_src, v_src, kv_heads = _shared_kv(heads, key, value, h)
        inputs += [
            x[:, hs].transpose(1, 2).reshape(b * t, -1, d)
            for x, hs in ((query, heads), (k_src, kv_heads), (v_src, kv_heads))
        ]
    return _HalvesAttention.apply(*inputs, (plain, shifted), scaling).view(b, t, h, d)


def s2_attention_segments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor,
    group: int,
    scaling: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same output as s2_attention, computed group by group (O(T * group), not O(T^2)):
    query (B, H, T, D), key and value (B, H_kv, T, D) -> (B, T, H, D). Flash varlen attention over
    the flattened tokens on CUDA; elsewhere SDPA on the runs, those of one length batched.
    `cu_seqlens`: the packed batch's example boundaries over the flattened tokens, if the caller has
    them (then the positions are not read)."""
    b, h, t, d = query.shape
    half = h // 2
    plain_heads, shifted_heads = slice(0, h - half), slice(h - half, h)
    if flash_varlen_available(query.device):
        if cu_seqlens is not None:
            plain, shifted = _boundaries_once(
                cu_seqlens, group, lambda: s2_boundaries_from_segments(cu_seqlens.tolist(), group)
            )
        else:
            plain, shifted = _boundaries_once(
                position_ids, group, lambda: s2_boundaries(position_ids.expand(b, t), group)
            )
        return _s2_varlen(query, key, value, plain, shifted, scaling)
    plain_runs, shifted_runs = s2_runs(position_ids.expand(b, t), group)
    out = query.new_empty(b, h, t, d)
    _attend_runs(out, query, key, value, plain_heads, plain_runs, scaling)
    _attend_runs(out, query, key, value, shifted_heads, shifted_runs, scaling)
    return out.transpose(1, 2)


def s2_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature (AttentionInterface). In training, S2-Attn with
    groups of `config.s2_attn_group` tokens; in eval mode, full causal attention within each packed
    example, as LongLoRA serves the model. Returns (output (B, T, H, D), None)."""
    if dropout and module.training:
        raise RuntimeError("S2-Attn has no attention dropout")
    b, _, t, _ = query.shape
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(t, device=query.device).unsqueeze(0)
    group = module.config.s2_attn_group if module.training else t
    out = s2_attention_segments(
        query, key, value, position_ids, group, scaling=scaling, cu_seqlens=kwargs.get("cu_seq_lens_q")
    )
    return out, None


def use_s2_attention(model, group: int) -> None:
    """Switch `model` to S2-Attn (registered with transformers' AttentionInterface; no model class is patched)."""
    from transformers import AttentionInterface

    AttentionInterface.register(S2_ATTN, s2_attention_forward)
    model.config.s2_attn_group = group
    model.set_attn_implementation(S2_ATTN)

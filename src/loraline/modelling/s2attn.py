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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor, group: int,
    scaling: float | None = None, dropout: float = 0.0,
) -> torch.Tensor:
    """query (B, H, T, D), key and value (B, H_kv, T, D): S2-Attn output (B, H, T, D)."""
    b, h, t, d = query.shape
    if key.shape[1] != h:  # grouped-query attention: each key/value head serves h / h_kv query heads
        key = key.repeat_interleave(h // key.shape[1], dim=1)
        value = value.repeat_interleave(h // value.shape[1], dim=1)
    mask = s2_mask(position_ids.expand(b, t), group, h)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)


Run = tuple[int, int, int]  # (row, start, end): tokens [start, end) of one row attend causally among themselves


def s2_runs(position_ids: torch.Tensor, group: int) -> tuple[list[Run], list[Run]]:
    """The groups of s2_mask as runs of consecutive tokens, for the plain heads and for the shifted
    heads: within each example (positions restart at 0), groups of `group` tokens, the shifted ones
    offset by half a group; an example of at most `group` tokens is one run in both."""
    b, t = position_ids.shape
    plain: list[Run] = []
    shifted: list[Run] = []
    for row, pos in enumerate(position_ids.tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0 or i == 0] + [t]
        for a, e in zip(starts[:-1], starts[1:]):
            cuts = list(range(a, e, group)) + [e]
            plain += [(row, x, y) for x, y in zip(cuts[:-1], cuts[1:])]
            cuts = [a] + ([] if e - a <= group else list(range(a + group // 2, e, group))) + [e]
            shifted += [(row, x, y) for x, y in zip(cuts[:-1], cuts[1:])]
    return plain, shifted


def s2_boundaries(position_ids: torch.Tensor, group: int) -> tuple[list[int], list[int]]:
    """s2_runs as cu_seqlens over the flattened (B*T) tokens (for flash varlen attention):
    (cu_plain, cu_shifted), each starting at 0 and ending at B*T."""
    t = position_ids.shape[-1]
    return tuple([0] + [row * t + e for row, _, e in runs] for runs in s2_runs(position_ids, group))  # type: ignore[return-value]


def _attend_runs(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: slice,
                 runs: list[Run], scaling: float | None) -> None:
    """Causal attention within each run, for query heads `heads`, written into out (B, H, T, D).
    Runs of one length go through SDPA together (one batched call), on contiguous copies."""
    h, hkv = query.shape[1], key.shape[1]
    per_kv = h // hkv
    if heads.start % per_kv == 0 and heads.stop % per_kv == 0:  # the heads' own key/value heads, shared (GQA)
        kv_heads = slice(heads.start // per_kv, heads.stop // per_kv)
    else:
        key, value = (x.repeat_interleave(per_kv, dim=1) for x in (key, value))
        kv_heads = heads
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
            q, k, v = (torch.stack([x[r, hs, a:e] for r, a, e in same]) for x, hs in
                       ((query, heads), (key, kv_heads), (value, kv_heads)))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        for i, (r, a, e) in enumerate(same):
            out[r, heads, a:e] = o[i]


def s2_attention_segments(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor, group: int,
    scaling: float | None = None,
) -> torch.Tensor:
    """The same output as s2_attention, computed group by group (O(T * group), not O(T^2)):
    query (B, H, T, D), key and value (B, H_kv, T, D) -> (B, T, H, D). Flash varlen attention over
    the flattened tokens on CUDA; elsewhere SDPA on the runs, those of one length batched."""
    b, h, t, d = query.shape
    half = h // 2
    plain_heads, shifted_heads = slice(0, h - half), slice(h - half, h)
    if flash_varlen_available(query.device):
        plain, shifted = s2_boundaries(position_ids.expand(b, t), group)
        q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
        if key.shape[1] != h:
            k, v = (x.repeat_interleave(h // key.shape[1], dim=1) for x in (k, v))
        out = torch.cat([
            causal_varlen(q[:, plain_heads], k[:, plain_heads], v[:, plain_heads], plain, scaling),
            causal_varlen(q[:, shifted_heads], k[:, shifted_heads], v[:, shifted_heads], shifted, scaling),
        ], dim=1)
        return out.view(b, t, h, d)
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
    return s2_attention_segments(query, key, value, position_ids, group, scaling=scaling), None


def use_s2_attention(model, group: int) -> None:
    """Switch `model` to S2-Attn (registered with transformers' AttentionInterface; no model class is patched)."""
    from transformers import AttentionInterface

    AttentionInterface.register(S2_ATTN, s2_attention_forward)
    model.config.s2_attn_group = group
    model.set_attn_implementation(S2_ATTN)

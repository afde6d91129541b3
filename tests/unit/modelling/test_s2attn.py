"""S2-Attn's reference: groups, the shifted half of the heads, causality and packed examples."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from loraline.modelling.s2attn import s2_attention, s2_mask


def _qkv(b=1, h=4, t=16, d=8, h_kv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, t, d, generator=g),
        torch.randn(b, h_kv or h, t, d, generator=g),
        torch.randn(b, h_kv or h, t, d, generator=g),
    )


def test_with_one_group_spanning_the_sequence_it_is_causal_attention():
    q, k, v = _qkv()
    pos = torch.arange(16).unsqueeze(0)
    got = s2_attention(q, k, v, pos, group=16)
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)


def test_plain_heads_see_their_group_and_shifted_heads_the_group_offset_by_half():
    mask = s2_mask(torch.arange(16).unsqueeze(0), group=8, heads=4)[0]
    # query 9: plain heads (0, 1) see 8..9; shifted heads (2, 3) see 4..9 (groups [4, 12))
    assert mask[0, 9].nonzero().flatten().tolist() == [8, 9]
    assert mask[3, 9].nonzero().flatten().tolist() == [4, 5, 6, 7, 8, 9]
    # shifted heads' first group is the first half group: query 2 sees 0..2, query 5 sees only 4..5
    assert mask[2, 2].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[2, 5].nonzero().flatten().tolist() == [4, 5]
    assert not mask.triu(1).any()  # never a later token, in any head (no wrap-around as with roll)


def test_outputs_depend_only_on_what_the_mask_allows():
    q, k, v = _qkv(t=16)
    pos = torch.arange(16).unsqueeze(0)
    base = s2_attention(q, k, v, pos, group=8)
    v2 = v.clone()
    v2[:, :, 3] += 10.0  # change one early value
    moved = (s2_attention(q, k, v2, pos, group=8) - base).abs().amax(-1)[0]  # (heads, T)
    assert moved[0, 3:8].gt(0).all() and moved[0, 8:].eq(0).all()  # plain heads: only its group [0, 8)
    assert moved[2, :3].eq(0).all()  # shifted heads: token 3 is in group [0, 4); nothing before it moves
    assert moved[2, 3].gt(0) and moved[2, 4:].eq(0).all()


def test_packed_examples_never_see_each_other_and_short_ones_attend_fully():
    q, k, v = _qkv(t=20, h=4, h_kv=2)  # grouped-query attention too
    pos = torch.cat([torch.arange(6), torch.arange(14)]).unsqueeze(0)  # a 6-token and a 14-token example
    got = s2_attention(q, k, v, pos, group=8)
    # the 6-token example (shorter than a group) gets plain causal attention, alone
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    alone = F.scaled_dot_product_attention(q[:, :, :6], kr[:, :, :6], vr[:, :, :6], is_causal=True)
    assert torch.allclose(got[:, :, :6], alone, atol=1e-6)
    # changing the first example leaves the second as it was
    v2 = v.clone()
    v2[:, :, :6] += 5.0
    assert torch.equal(s2_attention(q, k, v2, pos, group=8)[:, :, 6:], got[:, :, 6:])
    # and the second example is grouped from its own start: its token 8 (position 2) sees positions 0..2
    mask = s2_mask(pos, group=8, heads=4)[0]
    assert mask[0, 8].nonzero().flatten().tolist() == [6, 7, 8]


def test_a_model_switched_to_s2_attention_trains_grouped_and_evaluates_with_full_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraline.modelling.s2attn import use_s2_attention

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    reference = LlamaForCausalLM(config)
    model = LlamaForCausalLM(copy.deepcopy(config))  # the switch is per config: the reference keeps sdpa
    model.load_state_dict(reference.state_dict())
    use_s2_attention(model, group=8)
    assert model.config._attn_implementation == "loraline_s2"
    ids = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        reference.eval(), model.eval()
        assert torch.allclose(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5
        )  # eval: full attention
        model.train(), reference.train()
        grouped, full = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(grouped[:, :4], full[:, :4], atol=1e-5)  # the first half group sees the same in every head
    assert (grouped - full).abs().max() > 1e-3  # later tokens see less: it is sparse


def test_boundaries_are_the_groups_as_runs_of_tokens():
    from loraline.modelling.s2attn import s2_boundaries

    # one 20-token example, then a 6-token one (shorter than a group), then a 2-token pad segment
    pos = torch.cat([torch.arange(20), torch.arange(6), torch.arange(2)]).unsqueeze(0)
    plain, shifted = s2_boundaries(pos, group=8)
    assert plain == [0, 8, 16, 20, 26, 28]
    assert shifted == [0, 4, 12, 20, 26, 28]  # offset by half a group inside the long example only
    two_rows = s2_boundaries(torch.arange(16).repeat(2, 1), group=8)
    assert two_rows == ([0, 8, 16, 24, 32], [0, 4, 12, 16, 20, 28, 32])


@pytest.mark.parametrize(
    ("lengths", "group", "h", "h_kv"),
    [([64], 16, 4, 4), ([40, 9, 15], 8, 4, 2), ([33, 31], 16, 8, 2), ([12, 52], 32, 2, 1)],
)
def test_the_run_by_run_path_equals_the_mask_reference(lengths, group, h, h_kv):
    from loraline.modelling.s2attn import s2_attention_segments

    t = sum(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).expand(2, t)
    q, k, v = _qkv(b=2, h=h, t=t, d=8, h_kv=h_kv, seed=len(lengths))
    want = s2_attention(q, k, v, pos, group, scaling=0.3)
    got = s2_attention_segments(q, k, v, pos, group, scaling=0.3)  # (B, T, H, D)
    assert torch.allclose(got.transpose(1, 2), want, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("h_kv", [2, 1, 8], ids=["gqa-shared-per-half", "mqa-split-group", "mha"])
def test_the_flash_varlen_kernel_gives_the_reference_s2_attention(h_kv):
    from loraline.modelling.s2attn import s2_attention_segments

    lengths, group = [300, 77, 135], 64
    t = sum(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    q, k, v = (x.cuda().to(torch.bfloat16).requires_grad_() for x in _qkv(b=1, h=8, t=t, d=64, h_kv=h_kv, seed=3))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    upstream = torch.randn(1, 8, t, 64, generator=torch.Generator().manual_seed(1)).cuda()
    want = s2_attention(q32, k32, v32, pos.cuda(), group)
    got = s2_attention_segments(q, k, v, pos.cuda(), group).transpose(1, 2)
    assert (got.float() - want).abs().max().item() < 2e-2  # bf16 flash against the fp32 reference
    (want * upstream).sum().backward()
    (got.float() * upstream).sum().backward()  # through the recomputing backward
    for g, w in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert (g.float() - w).abs().max().item() < 3e-2 * w.abs().max().item()


@pytest.mark.parametrize("group", [4, 6, 20])
def test_boundaries_from_the_collators_segments_equal_those_from_the_positions(group):
    """The CUDA path takes the packed batch's cu_seqlens when it has them: the same runs as the positions give."""
    from loraline.modelling.s2attn import s2_boundaries, s2_boundaries_from_segments
    from loraline.train.speed import segments_from_rows

    width, rows = 20, [[7, 9], [20], [3]]  # the first and last rows end with a pad segment
    cu, _ = segments_from_rows(rows, width)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for r, lengths in enumerate(rows):
        at = 0
        for n in lengths + [width - sum(lengths)]:
            pos[r, at : at + n] = torch.arange(n)
            at += n
    assert s2_boundaries_from_segments(cu.tolist(), group) == s2_boundaries(pos, group)


def test_runs_are_computed_once_per_boundaries_tensor():
    from loraline.modelling import s2attn

    pos = torch.arange(12).unsqueeze(0)
    calls = []

    def compute():
        calls.append(1)
        return s2attn.s2_boundaries(pos, 4)

    first = s2attn._boundaries_once(pos, 4, compute)
    assert s2attn._boundaries_once(pos, 4, compute) is first and len(calls) == 1
    s2attn._boundaries_once(pos, 8, compute)  # another group size: computed again
    other = torch.arange(12).unsqueeze(0)  # equal values, another tensor: computed again
    s2attn._boundaries_once(other, 8, compute)
    pos.add_(0)  # changed in place: computed again
    s2attn._boundaries_once(pos, 4, compute)
    assert len(calls) == 4


@pytest.mark.parametrize(("h", "h_kv"), [(8, 2), (8, 1), (4, 4)])
def test_the_varlen_path_matches_the_reference_in_values_and_gradients(h, h_kv):
    """The path training takes on CUDA (two halves of the heads, each over its own runs, backward by
    recomputation) run here through causal_varlen's SDPA fallback: outputs and all three gradients
    equal the mask reference's."""
    from loraline.modelling.s2attn import _s2_varlen, s2_attention, s2_boundaries

    lengths, group = [40, 9, 15], 8
    t = sum(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    inputs = _qkv(b=1, h=h, t=t, d=8, h_kv=h_kv, seed=7)
    upstream = torch.randn(1, h, t, 8, generator=torch.Generator().manual_seed(1))

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = fn(*leaves)
        (out * upstream).sum().backward()
        return out.detach(), [x.grad for x in leaves]

    want, want_grads = run(lambda q, k, v: s2_attention(q, k, v, pos, group, scaling=0.3))
    plain, shifted = s2_boundaries(pos, group)
    got, got_grads = run(lambda q, k, v: _s2_varlen(q, k, v, plain, shifted, 0.3).transpose(1, 2))
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)

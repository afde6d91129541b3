"""Which examples go into which row, micro-batch and optimizer step; and how a batch is laid out.

Packed (the default): whole examples, in a seeded per-epoch order, are packed greedily (next fit)
into rows of at most max_seq_len tokens. Each example's position_ids restart at 0 and the batch
carries no attention_mask: transformers' masking_utils then derives a block-diagonal causal mask
from the position_ids (find_packed_sequence_indices), so no token attends across examples. Rows of
one micro-batch are padded to the longest row with a trailing pad segment that has its own
positions (so it is a separate "example" that nothing attends to) and no targets.
Not packed: one example per row, right-padded, with an attention_mask.

The whole plan is a pure function of (lengths, seed, params), so a resumed run only needs the step
number to know exactly which data comes next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loraline.config import TrainParams
from loraline.modelling.constants import IGNORE_INDEX
from loraline.modelling.device import autocast
from loraline.train.data import Example
from loraline.train.speed import segments_from_rows

Row = list[int]  # example indices
MicroBatch = list[Row]
Step = list[MicroBatch]


@dataclass(frozen=True)
class PlannedStep:
    epoch: int
    index_in_epoch: int  # optimizer step within its epoch (the data position)
    micro_batches: list[MicroBatch]


def pack_rows(lengths: list[int], order: list[int], max_len: int) -> list[Row]:
    rows: list[Row] = []
    current: Row = []
    used = 0
    for i in order:
        if current and used + lengths[i] > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # numpy's PCG64 seeded with (seed, epoch): the same order on every platform and every resume.
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def epoch_steps(lengths: list[int], params: TrainParams, seed: int, epoch: int) -> list[Step]:
    order = epoch_order(len(lengths), seed, epoch)
    rows = pack_rows(lengths, order, params.max_seq_len) if params.packing else [[i] for i in order]
    micro = [rows[i : i + params.batch_size] for i in range(0, len(rows), params.batch_size)]
    # A short last step (fewer micro-batches) is fine: the loss is normalized by its token count.
    return [micro[i : i + params.grad_accum] for i in range(0, len(micro), params.grad_accum)]


def plan_steps(lengths: list[int], params: TrainParams, seed: int) -> list[PlannedStep]:
    """Every optimizer step of the run: `max_steps` when set (cycling epochs), else `epochs` (fractional ok)."""
    plan: list[PlannedStep] = []
    epoch = 0
    while True:
        steps = epoch_steps(lengths, params, seed, epoch)
        if params.max_steps is not None:
            take = min(len(steps), params.max_steps - len(plan))
        else:
            remaining = params.epochs - epoch
            take = len(steps) if remaining >= 1 else max(1, math.ceil(remaining * len(steps)))
        plan.extend(PlannedStep(epoch, i, steps[i]) for i in range(take))
        epoch += 1
        done = len(plan) >= params.max_steps if params.max_steps is not None else epoch >= params.epochs
        if done:
            return plan


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    targets: torch.Tensor
    n_tokens: int  # real (non-pad) tokens
    n_targets: int  # tokens with a loss
    # Packed rows: segment boundaries over the flattened rows (each example, then each row's pad
    # segment) and the longest segment, for varlen attention.
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    def to(self, device: torch.device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True)
        return Batch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            mask,
            self.targets.to(device),
            self.n_tokens,
            self.n_targets,
            cu,
            self.max_seqlen,
        )

    def model_inputs(self, varlen: bool = False) -> dict[str, torch.Tensor | int | None]:
        inputs: dict[str, torch.Tensor | int | None] = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
        }
        if varlen and self.cu_seqlens is not None:  # transformers passes these through to the attention function
            inputs.update(
                cu_seq_lens_q=self.cu_seqlens,
                cu_seq_lens_k=self.cu_seqlens,
                max_length_q=self.max_seqlen,
                max_length_k=self.max_seqlen,
            )
        return inputs


def collate(rows: list[list[Example]], pad_id: int, packed: bool, flat: bool = False) -> Batch:
    """Rows of examples to tensors; `packed` puts several examples in a row (no attention_mask).

    `flat` (packed only, for varlen attention, which keeps each example to itself whatever the
    layout): the micro-batch's rows are laid end to end in one row, so no pad token is computed.
    """
    if not packed and any(len(r) != 1 for r in rows):
        raise ValueError("an unpacked batch holds exactly one example per row")
    if flat and packed:
        rows = [[e for row in rows for e in row]]
    width = max(sum(e.n_tokens for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = e.n_tokens
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            tgt[r, at : at + n] = torch.tensor(e.targets)
            pos[r, at : at + n] = torch.arange(n)
            mask[r, at : at + n] = 1
            at += n
        pos[r, at:] = torch.arange(width - at)  # the pad segment: positions of its own
    n_tokens = int(mask.sum())
    n_targets = int((tgt != IGNORE_INDEX).sum())
    if not packed:
        return Batch(ids, pos, mask, tgt, n_tokens, n_targets)
    cu, longest = segments_from_rows([[e.n_tokens for e in row] for row in rows], width)
    return Batch(ids, pos, None, tgt, n_tokens, n_targets, cu, longest)


def check_packing_isolation(model: torch.nn.Module, device: torch.device, vocab_size: int) -> float:
    """Fail if this model lets packed examples attend to each other (e.g. remote code ignoring position_ids).

    The same 6-token example follows two different 6-token prefixes in a packed row; with a
    block-diagonal mask the prefix's scores are exactly masked out, so the example's logits are
    (bit-)identical. Returns the largest difference seen.
    """
    g = torch.Generator().manual_seed(0)
    prefix_a, prefix_b, tail = (torch.randint(3, vocab_size, (6,), generator=g) for _ in range(3))
    rows = torch.stack([torch.cat([prefix_a, tail]), torch.cat([prefix_b, tail])]).to(device)
    pos = torch.arange(6).repeat(2).expand(2, -1).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device):
            logits = model(input_ids=rows, position_ids=pos, attention_mask=None, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    diff = (logits[0, 6:] - logits[1, 6:]).abs().max().item()
    scale = logits[:, 6:].abs().max().item()
    # Masked scores are exactly zero after softmax, so fp32 gives identical logits; bf16 gets slack
    # for kernels whose rounding depends on the row.
    tolerance = (1e-6 if logits.dtype == torch.float32 and device.type == "cpu" else 1e-2) * max(scale, 1.0)
    if diff > tolerance:
        raise RuntimeError(
            f"packed examples attend to each other with this model (logit gap {diff:.3g}): its attention does not "
            "derive a per-example mask from position_ids; set train.packing: false"
        )
    return diff

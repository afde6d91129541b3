"""Packing: the plan's shape, and packed rows computing exactly what one-at-a-time examples compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_train

from loraline.modelling.constants import IGNORE_INDEX
from loraline.train.data import Example, load_splits, to_example
from loraline.train.loop import Run, loss_sum, train_step
from loraline.train.model import attach_lora, load_base_model, trainable_parameters
from loraline.train.packing import PlannedStep, check_packing_isolation, collate, pack_rows, plan_steps

CPU = torch.device("cpu")


def test_pack_rows_is_greedy_in_order_and_never_overflows():
    lengths = [5, 4, 3, 8, 1, 2]
    assert pack_rows(lengths, [0, 1, 2, 3, 4, 5], 10) == [[0, 1], [2], [3, 4], [5]]
    assert pack_rows(lengths, [3, 5, 0, 4], 10) == [[3, 5], [0, 4]]


@pytest.mark.parametrize("packing", [True, False])
def test_plan_uses_every_example_once_per_epoch_in_a_seeded_order(packing):
    lengths = [7, 30, 12, 50, 3, 22, 9, 41, 16, 5, 28, 11]
    params = tiny_train(packing=packing, max_seq_len=64, batch_size=2, grad_accum=2, max_steps=None, epochs=2)
    plan = plan_steps(lengths, params, seed=3)
    assert plan == plan_steps(lengths, params, seed=3) and plan != plan_steps(lengths, params, seed=4)
    for epoch in (0, 1):
        rows = [row for s in plan if s.epoch == epoch for mb in s.micro_batches for row in mb]
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
        assert all(len(mb) <= 2 for s in plan for mb in s.micro_batches)
        assert [s.index_in_epoch for s in plan if s.epoch == epoch] == list(range(sum(s.epoch == epoch for s in plan)))
    first = [i for s in plan if s.epoch == 0 for mb in s.micro_batches for row in mb for i in row]
    second = [i for s in plan if s.epoch == 1 for mb in s.micro_batches for row in mb for i in row]
    assert first != second  # a new order each epoch


def test_plan_length_follows_max_steps_and_fractional_epochs():
    lengths = [10] * 40  # 6 per row at max_seq_len 64 -> 7 rows = 7 steps of one row
    p = tiny_train(max_seq_len=64, batch_size=1, grad_accum=1, max_steps=None, epochs=2.5)
    assert len(plan_steps(lengths, p, 0)) == 7 + 7 + 4  # ceil(0.5 * 7)
    assert len(plan_steps(lengths, tiny_train(max_seq_len=64, batch_size=1, grad_accum=1, max_steps=17), 0)) == 17


def test_targets_are_shifted_inside_each_example_so_no_loss_crosses_a_boundary():
    ex = to_example([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4])
    assert ex.targets == (IGNORE_INDEX, 3, 4, IGNORE_INDEX) and ex.n_targets == 2
    b = collate([[ex, to_example([5, 6], [5, 6])]], pad_id=0, packed=True)
    assert b.targets.tolist() == [[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 6, IGNORE_INDEX]]  # 4 never predicts 5
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]] and b.attention_mask is None


def test_short_rows_get_a_separate_pad_segment():
    a, b = to_example([1, 2, 3], [1, 2, 3]), to_example([4], [4])
    batch = collate([[a], [b]], pad_id=9, packed=True)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]]  # the pads restart: their own segment
    assert batch.targets[1].tolist() == [IGNORE_INDEX] * 3 and batch.n_tokens == 4
    padded = collate([[a], [b]], pad_id=9, packed=False)
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.fixture(scope="module")
def examples(setup) -> list[Example]:
    return load_splits(setup.dataset_dir).train[:6]


def _model(setup, quantization: str):
    params = tiny_train(quantization=quantization, lora_dropout=0.0)
    torch.manual_seed(0)
    model = attach_lora(params, load_base_model(params, setup.base_dir, CPU))
    with torch.no_grad():  # a non-trivial adapter, so LoRA paths count too
        for name, p in trainable_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def _per_example_losses(model, rows: list[list[Example]], packed: bool) -> list[float]:
    batch = collate(rows, pad_id=0, packed=packed)
    with torch.no_grad():
        logits = model(**batch.model_inputs(), use_cache=False).logits
    token = F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none", ignore_index=IGNORE_INDEX)
    out = []
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            out.append(token[r, at : at + e.n_tokens].sum().item() / e.n_targets)
            at += e.n_tokens
    return out


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_packed_batch_gives_the_same_per_example_losses_as_one_at_a_time(setup, examples, quantization):
    model = _model(setup, quantization)
    alone = [_per_example_losses(model, [[e]], packed=True)[0] for e in examples]
    packed = _per_example_losses(model, [examples[:4], examples[4:]], packed=True)  # 2 rows, 2nd one padded
    padded = _per_example_losses(model, [[e] for e in examples], packed=False)
    gap = max(abs(a - b) for a, b in zip(alone, packed))
    assert gap < 1e-5, (quantization, gap)  # 0.0 seen in fp32 and nf4
    assert max(abs(a - b) for a, b in zip(alone, padded)) < 1e-5
    # Control: the same row with positions that do not restart lets examples attend to each other.
    leaky = collate([examples[:4]], pad_id=0, packed=True)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1])[None]
    with torch.no_grad():
        logits = model(**leaky.model_inputs(), use_cache=False).logits
    second = slice(examples[0].n_tokens, examples[0].n_tokens + examples[1].n_tokens)
    leaked = F.cross_entropy(logits[0, second], leaky.targets[0, second], ignore_index=IGNORE_INDEX).item()
    assert abs(leaked - alone[1]) > 1e-3


def test_isolation_check_passes_here_and_catches_a_model_that_ignores_position_ids(setup):
    model = _model(setup, "none")
    assert check_packing_isolation(model, CPU, 512) == 0.0

    class IgnoresPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, **kw)  # plain causal attention over the whole row

    with pytest.raises(RuntimeError, match="set train.packing: false"):
        check_packing_isolation(IgnoresPositions(model), CPU, 512)


def test_loss_normalization_makes_accumulation_and_packing_irrelevant(setup, examples):
    """One optimizer step over the same examples: one packed micro-batch == three padded micro-batches."""
    results = []
    for packing, micro_batches in ((True, [[[0, 1, 2], [3, 4, 5]]]), (False, [[[0], [1]], [[2], [3]], [[4], [5]]])):
        model = _model(setup, "none").train()
        trainable = trainable_parameters(model)
        opt = torch.optim.SGD(list(trainable.values()), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        run = Run(
            model, trainable, opt, sched, tiny_train(packing=packing, max_grad_norm=1e9), CPU, 0, examples, [], []
        )
        loss, _, n_targets = train_step(run, PlannedStep(0, 0, micro_batches))
        results.append((loss, {n: p.detach().clone() for n, p in trainable.items()}))
    (loss_a, weights_a), (loss_b, weights_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    assert max((weights_a[n] - weights_b[n]).abs().max().item() for n in weights_a) < 1e-6


def test_4bit_gradients_survive_an_evaluation_pass(setup, examples):
    """Regression: bnb repacks 4-bit weights for CPU inference on the first eval-mode forward, after
    which backward silently loses the gradient through them; load_base_model switches that off."""
    model = _model(setup, "nf4").train()
    trainable = trainable_parameters(model)
    batch = collate([examples[:3]], pad_id=0, packed=True)

    def grads():
        loss_sum(model, batch, CPU).backward()
        out = {n: p.grad.clone() for n, p in trainable.items()}
        model.zero_grad()
        return out

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch.input_ids[:, :5])
    model.train()
    after = grads()
    assert max((before[n] - after[n]).abs().max().item() for n in before) == 0.0

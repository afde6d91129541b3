"""The pretraining loss: the head runs on labelled positions only, and the result is transformers' own loss."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraline.base.pretrain import next_token_loss
from loraline.modelling.constants import IGNORE_INDEX


@pytest.mark.parametrize("labelled", [1.0, 0.3, 0.02])
def test_loss_and_gradients_equal_transformers_loss(labelled):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 300, (3, 40))
    labels = ids.clone()
    labels[torch.rand(ids.shape) >= labelled] = IGNORE_INDEX
    labels[0, 5] = ids[0, 5]  # at least one labelled position

    expected = model(input_ids=ids, labels=labels).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = next_token_loss(model, ids, labels)
    got.backward()

    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)

"""Learning rates by parameter group: LoRA+ for the B matrices, its own rate for modules_to_save."""

from __future__ import annotations

import shutil

import pytest
import torch
from train_helpers import tiny_train

from loraline.config import ConfigError, TrainParams, load_params
from loraline.train import train_adapter
from loraline.train.model import attach_lora, load_base_model, trainable_parameters
from loraline.train.optim import make_optimizer, parameter_groups

CPU = torch.device("cpu")


def _peft_model(setup, params: TrainParams):
    return attach_lora(params, load_base_model(params, setup.base_dir, CPU))


def test_one_group_at_the_learning_rate_by_default(setup):
    params = tiny_train(modules_to_save=["embed_tokens"])
    trainable = trainable_parameters(_peft_model(setup, params))
    groups = parameter_groups(params, trainable)
    assert [(g["name"], g["lr"]) for g in groups] == [("lora", params.learning_rate)]
    assert len(groups[0]["params"]) == len(trainable)


def test_groups_split_b_matrices_and_saved_modules_each_parameter_once(setup):
    params = tiny_train(modules_to_save=["embed_tokens"], loraplus_lr_ratio=16, modules_to_save_learning_rate=0.02)
    trainable = trainable_parameters(_peft_model(setup, params))
    groups = {g["name"]: g for g in parameter_groups(params, trainable)}
    assert {name: g["lr"] for name, g in groups.items()} == {
        "lora": params.learning_rate,
        "lora_B": params.learning_rate * 16,
        "modules_to_save": 0.02,
    }
    by_id = {id(p): name for name, p in trainable.items()}
    members = {name: sorted(by_id[id(p)] for p in g["params"]) for name, g in groups.items()}
    assert all(".lora_B." in n for n in members["lora_B"])
    assert all(".lora_A." in n for n in members["lora"])
    assert members["modules_to_save"] == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    assert sum(len(v) for v in members.values()) == len(trainable)  # every trainable parameter, once


def test_first_adam_step_moves_each_group_by_its_own_rate(setup):
    """AdamW's first step moves every weight by about lr (m/sqrt(v) is the gradient's sign): the saved
    embeddings move by their own rate, the LoRA B matrices by the base rate (A gets no gradient on the
    first step: B starts at zero)."""
    params = tiny_train(modules_to_save=["embed_tokens"], modules_to_save_learning_rate=0.02, optimizer="adamw_torch")
    torch.manual_seed(0)
    model = _peft_model(setup, params)
    trainable = trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = make_optimizer(params, trainable, CPU)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in trainable.items()}
    embed = next(n for n in moved if ".modules_to_save." in n)
    lora_b = [v for n, v in moved.items() if ".lora_B." in n]
    assert moved[embed] == pytest.approx(0.02, rel=0.01)
    assert max(lora_b) == pytest.approx(params.learning_rate, rel=0.01)


def test_resume_keeps_the_groups_and_reproduces_the_adapter(setup, tmp_path):
    params = tiny_train(
        modules_to_save=["embed_tokens"],
        modules_to_save_learning_rate=0.01,
        loraplus_lr_ratio=4,
        max_steps=6,
        save_every=2,
        lora_dropout=0.0,
    )
    full = train_adapter(params, out_dir=tmp_path / "full", checkpoint_dir=tmp_path / "ck", **setup.kwargs())
    shutil.copytree(tmp_path / "ck", tmp_path / "ck2")
    resumed = train_adapter(params, out_dir=tmp_path / "resumed", checkpoint_dir=tmp_path / "ck2", **setup.kwargs())
    assert resumed.timing["resumed_from_step"] == 4
    assert (resumed.out_dir / "adapter_model.safetensors").read_bytes() == (
        full.out_dir / "adapter_model.safetensors"
    ).read_bytes()


def test_bad_rates_are_refused_by_name(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "tenants:\n  t:\n    raw_dir: raw\n    train: {modules_to_save_learning_rate: 0}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError, match="modules_to_save_learning_rate"):
        load_params(path)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        TrainParams(loraplus_lr_ratio=-1)

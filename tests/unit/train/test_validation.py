"""Bad inputs fail with a message naming the key or path, before any training step."""

from __future__ import annotations

import json
import shutil
from unittest import mock

import datasets
import pytest
from pydantic import ValidationError
from train_helpers import tiny_train

import loraline.train.stage as stage
from loraline.config import TrainParams
from loraline.train import TrainError, train_adapter


@pytest.fixture
def no_training():
    """Any call into the loop means a check came too late."""
    with mock.patch.object(stage, "train_loop", side_effect=AssertionError("training started")) as loop:
        yield loop


def _train(setup, tmp_path, params=None, **paths):
    kwargs = {**setup.kwargs(), **paths}
    return train_adapter(params or tiny_train(), out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ck", **kwargs)


def test_rank_zero_is_rejected_by_the_params_schema():
    with pytest.raises(ValidationError, match="lora_r"):
        TrainParams(lora_r=0)


def test_unknown_target_module_lists_the_available_ones(setup, tmp_path, no_training):
    with pytest.raises(TrainError) as err:
        _train(setup, tmp_path, tiny_train(target_modules=["q_proj", "qkv_proj"]))
    msg = str(err.value)
    assert msg.startswith("train.target_modules: 'qkv_proj' match no linear layer")
    assert "q_proj" in msg.split("available:")[1] and "down_proj" in msg and "lm_head" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_unknown_target_module_is_caught_on_a_4bit_base_too(setup, tmp_path, no_training):
    with pytest.raises(TrainError, match="train.target_modules: 'attn'"):
        _train(setup, tmp_path, tiny_train(quantization="nf4", target_modules=["attn"]))


def test_unknown_modules_to_save(setup, tmp_path, no_training):
    with pytest.raises(TrainError, match=r"train.modules_to_save: 'embeddings' match no module.*embed_tokens"):
        _train(setup, tmp_path, tiny_train(modules_to_save=["embeddings"]))


def test_missing_base_dir(setup, tmp_path, no_training):
    with pytest.raises(TrainError, match=r"base model folder .*nowhere does not exist: run the base stage"):
        _train(setup, tmp_path, base_dir=tmp_path / "nowhere")


def test_base_dir_without_record(setup, tmp_path, no_training):
    copy = tmp_path / "base-copy"
    shutil.copytree(setup.base_dir, copy)
    (copy / "base_record.json").unlink()
    with pytest.raises(TrainError, match="has no base_record.json"):
        _train(setup, tmp_path, base_dir=copy)


def test_missing_dataset(setup, tmp_path, no_training):
    with pytest.raises(TrainError, match="run the prepare stage"):
        _train(setup, tmp_path, dataset_dir=tmp_path / "nothing")


def _dataset_with(setup, tmp_path, **splits):
    dd = datasets.load_from_disk(str(setup.dataset_dir))
    for name, ds in splits.items():
        dd[name] = ds(dd[name])
    out = tmp_path / "ds"
    dd.save_to_disk(str(out), num_shards=dict.fromkeys(dd, 1))
    return out


def test_empty_train_split(setup, tmp_path, no_training):
    ds = _dataset_with(setup, tmp_path, train=lambda d: d.select([]))
    with pytest.raises(TrainError, match="the train split is empty"):
        _train(setup, tmp_path, dataset_dir=ds)


def test_max_seq_len_shorter_than_an_example_is_rejected_not_truncated(setup, tmp_path, no_training):
    longest = max(datasets.load_from_disk(str(setup.dataset_dir))["train"]["n_tokens"])
    with pytest.raises(TrainError) as err:
        _train(setup, tmp_path, tiny_train(max_seq_len=longest - 1))
    msg = str(err.value)
    assert msg.startswith(f"train.max_seq_len ({longest - 1}) is shorter than") and f"longest: {longest} tokens" in msg
    assert "prepare.max_tokens" in msg


def test_early_stopping_needs_a_validation_split(setup, tmp_path, no_training):
    ds = _dataset_with(setup, tmp_path, validation=lambda d: d.select([]))
    with pytest.raises(TrainError, match="train.early_stopping_patience is set but the validation split is empty"):
        _train(setup, tmp_path, tiny_train(early_stopping_patience=2), dataset_dir=ds)


def test_seed_must_be_set(setup, tmp_path, no_training):
    with pytest.raises(TrainError, match="train.seed is unset"):
        _train(setup, tmp_path, tiny_train(seed=None))


def test_base_model_that_does_not_exist(setup, tmp_path, no_training):
    """A recorded hub id that is in no cache fails offline, naming the model and the key (no download)."""
    base = tmp_path / "hub-base"
    base.mkdir()
    (base / "base_record.json").write_text(
        json.dumps({"source": "hub", "model_ref": "nobody/no-such-model", "revision": "main"})
    )
    with pytest.raises(TrainError, match=r"cannot load the base model 'nobody/no-such-model' .*\(base.model\)"):
        _train(setup, tmp_path, base_dir=base)


def test_a_dataset_tokenized_for_another_base_is_refused(setup, tmp_path, no_training):
    # A base rebuilt after prepare (e.g. on another Python, whose stdlib docstrings are in its corpus)
    # has another vocabulary: the old ids would train to a low loss and generate garbage.
    from loraline.layout import TOKENIZER_STAMP

    stamp = json.loads((setup.dataset_dir / TOKENIZER_STAMP).read_text())
    assert len(stamp["tokenizer_hash"]) == 64
    copy = tmp_path / "dataset"
    shutil.copytree(setup.dataset_dir, copy)
    (copy / TOKENIZER_STAMP).write_text(json.dumps({**stamp, "tokenizer_hash": "f" * 64}))
    with pytest.raises(
        TrainError, match=r"tokenized with another tokenizer .*ffffffffffff.* run the prepare stage again"
    ):
        _train(setup, tmp_path, dataset_dir=copy)

"""The train stage end to end on CPU: outputs, stock peft loading, determinism, learning, options."""

from __future__ import annotations

import csv
import json
import logging
from unittest import mock

import pytest
import torch
from train_helpers import adapter_tensors, tiny_train

from loraline.layout import TRAIN_RECORD
from loraline.provenance import hash_tree, sha256_file
from loraline.records import TrainRecord
from loraline.train import train_adapter


def test_out_dir_holds_exactly_the_adapter_record_and_curve(reference):
    out = reference.result.out_dir
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        TRAIN_RECORD,
        "train_loss.csv",
        "val_loss.csv",
    }
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # the atomic write left no temporary behind
    # all-linear resolves to a set: written sorted, not in the process's hash order, so equal adapters are equal bytes
    modules = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert len(modules) > 1 and modules == sorted(modules)


def test_record_has_provenance_and_measurements(reference, setup):
    rec = TrainRecord.read(reference.result.record_path)
    assert rec == reference.result.record
    assert rec.seed == 11 and rec.params["lora_r"] == 8
    assert rec.data.sha256 == hash_tree(setup.dataset_dir)
    assert rec.base.sha256 and len(rec.base.sha256) == 64
    assert rec.device == "cpu" and rec.compute_dtype == "float32"
    assert (rec.steps.planned, rec.steps.done, rec.steps.warmup) == (12, 12, 2)
    assert rec.tokens_seen.useful > rec.tokens_seen.answer > 0
    assert rec.loss.final_val is not None and rec.loss.base_val is not None
    assert rec.files["adapter_model.safetensors"] == sha256_file(reference.result.adapter_weights)
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(rec.library_versions)
    assert len(rec.code.sha256) == 64 and rec.code.modules > 10
    # what differs between identical runs is in the timing, not in the output
    assert not {"code_revision", "wall_s", "tokens_per_s", "peak_memory", "resumed_from_step"} & set(rec.to_json())
    timing = reference.result.timing
    assert timing["peak_memory"]["kind"] == "process_max_rss" and timing["peak_memory"]["bytes"] > 10 << 20
    assert timing["wall_s"] > 0 and timing["tokens_per_s"] > 0 and timing["resumed_from_step"] is None


def test_loss_curves_are_full_csvs_that_dvc_plots_can_read(reference):
    train = list(csv.DictReader(reference.result.train_curve.open()))
    assert list(train[0]) == ["step", "train_loss", "lr"]
    assert [int(r["step"]) for r in train] == list(range(1, 13))
    assert all(float(r["train_loss"]) > 0 for r in train)  # every cell is a number (no gaps)
    assert float(train[0]["lr"]) == 0.0 and float(train[1]["lr"]) > 0  # linear warmup from 0 over 2 steps
    val = list(csv.DictReader(reference.result.val_curve.open()))
    assert list(val[0]) == ["step", "val_loss"]
    assert [int(r["step"]) for r in val] == [0, 4, 8, 12]  # the base model, then every eval_every=4
    assert float(val[0]["val_loss"]) == pytest.approx(reference.result.record.loss.base_val, rel=1e-5)


def test_dvc_reads_the_curves_as_numbers(reference):
    """DVC's CSV loader hands cells over as strings and its renderers convert them with float()."""
    _load_sv = pytest.importorskip("dvc.repo.plots")._load_sv
    VegaRenderer = pytest.importorskip("dvc_render.vega").VegaRenderer

    for path, y in ((reference.result.train_curve, "train_loss"), (reference.result.val_curve, "val_loss")):
        points = _load_sv(path.read_text())
        assert points and all(isinstance(float(p["step"]) + float(p[y]), float) for p in points)
        spec = VegaRenderer(points, path.name, x="step", y=y).get_filled_template()
        assert len(spec["data"]["values"]) == len(points)


def test_stock_peft_loads_the_adapter_and_matches_our_model(reference, setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(setup.base_dir, dtype=torch.float32)
    stock = PeftModel.from_pretrained(base, reference.result.out_dir).eval()
    ours = reference.model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 311, 7, 64, 128, 256, 3]])
    with torch.no_grad():
        a, b = stock(input_ids=ids).logits, ours(input_ids=ids).logits
        with stock.disable_adapter():
            no_adapter = stock(input_ids=ids).logits
    assert torch.equal(a, b) or (a - b).abs().max().item() < 1e-5
    assert (a - no_adapter).abs().max().item() > 1e-3  # the adapter is not a no-op


def test_same_seed_data_and_params_give_identical_adapter_files(reference, setup, tmp_path):
    again = train_adapter(tiny_train(), out_dir=tmp_path / "again", **setup.kwargs())
    assert sha256_file(again.adapter_weights) == sha256_file(reference.result.adapter_weights)
    assert again.record.loss == reference.result.record.loss
    other = train_adapter(
        tiny_train(seed=12, max_steps=2, eval_every=100), out_dir=tmp_path / "other", **setup.kwargs()
    )
    assert sha256_file(other.adapter_weights) != sha256_file(reference.result.adapter_weights)


def test_training_lowers_held_out_loss_against_the_base(setup, tmp_path):
    """Toy triage data: 30 steps cut the validation answer loss by about a quarter (4.4 -> 3.3 seen)."""
    res = train_adapter(
        tiny_train(max_steps=30, learning_rate=2e-2, eval_every=10, lora_dropout=0.0),
        out_dir=tmp_path / "o",
        **setup.kwargs(),
    )
    loss = res.record.loss
    assert loss.final_val < 0.85 * loss.base_val, loss
    rows = list(csv.DictReader(res.train_curve.open()))
    first, last = [float(r["train_loss"]) for r in rows[:3]], [float(r["train_loss"]) for r in rows[-3:]]
    assert sum(last) < 0.9 * sum(first)


def test_nf4_with_paged_8bit_adamw_on_cpu_trains_and_says_paging_is_cuda_only(setup, tmp_path, caplog):
    import bitsandbytes as bnb

    with caplog.at_level(logging.WARNING, logger="loraline.train"):
        res = train_adapter(
            tiny_train(
                quantization="nf4", optimizer="paged_adamw_8bit", max_steps=3, eval_every=3, learning_rate=2e-2
            ),
            out_dir=tmp_path / "nf4",
            **setup.kwargs(),
        )
    notes = [r.getMessage() for r in caplog.records if "CUDA-only" in r.getMessage()]
    assert len(notes) == 1 and "paged_adamw_8bit" in notes[0]
    assert res.record.optimizer == "AdamW8bit" and bnb.optim.AdamW8bit.__name__ == "AdamW8bit"
    assert res.record.loss.final_val < res.record.loss.base_val
    cfg = json.loads(res.adapter_config.read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(quantization="fp4", double_quant=False, use_rslora=True, packing=False, optimizer="paged_adamw_32bit"),
        dict(use_dora=True, target_modules=["q_proj", "v_proj"], gradient_checkpointing=True, lr_scheduler="linear"),
        dict(modules_to_save=["norm"], lr_scheduler="constant", weight_decay=0.01, epochs=0.5, max_steps=None),
    ],
    ids=["fp4-rslora-padded", "dora-listed-checkpointing", "modules_to_save-epochs"],
)
def test_options_run_and_save_a_loadable_adapter(setup, tmp_path, overrides):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fields = dict(max_steps=2, eval_every=2)
    fields.update(overrides)
    res = train_adapter(tiny_train(**fields), out_dir=tmp_path / "o", **setup.kwargs())
    cfg = json.loads(res.adapter_config.read_text())
    assert cfg["use_rslora"] == fields.get("use_rslora", False) and cfg["use_dora"] == fields.get("use_dora", False)
    if "target_modules" in fields:
        assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    names = set(adapter_tensors(res.out_dir))
    if fields.get("use_dora"):
        assert any("lora_magnitude_vector" in n for n in names)
    if "modules_to_save" in fields:
        assert any(n.endswith("norm.weight") and "lora" not in n for n in names)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.base_dir, dtype=torch.float32), res.out_dir)


def test_early_stopping_stops_and_ships_the_best_adapter(setup, tmp_path):
    import loraline.train.loop as loop

    # Scripted validation losses (base first): best at step 2, then two evals without improvement.
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.6, 1.0, 1.0])
    snapshots = []
    real_snapshot = loop.snapshot

    def record_snapshot(trainable):
        snapshots.append(real_snapshot(trainable))
        return snapshots[-1]

    with (
        mock.patch.object(loop, "evaluate_metrics", lambda run: {"loss": next(scripted)}),
        mock.patch.object(loop, "snapshot", record_snapshot),
    ):
        res = train_adapter(
            tiny_train(eval_every=1, early_stopping_patience=2), out_dir=tmp_path / "o", **setup.kwargs()
        )
    rec = res.record
    assert rec.stopped_early and rec.steps.done == 4 and rec.steps.planned == 12
    assert rec.loss.best_step == 2 and rec.loss.final_val == 3.0
    saved = adapter_tensors(res.out_dir)
    best = {k.replace(".default", ""): v for k, v in snapshots[-1].items()}
    assert len(saved) == len(best)
    for name, tensor in saved.items():
        match = [v for k, v in best.items() if k.endswith(name.removeprefix("base_model.model."))]
        assert len(match) == 1 and torch.equal(match[0], tensor), name

"""On the committed sample data (not a toy set), a short QLoRA run lowers held-out answer loss."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import tiny_train

from loraline.config import PrepareParams, TenantParams
from loraline.modelling.loading import load_base_tokenizer
from loraline.prepare.stage import prepare_tenant
from loraline.train import train_adapter

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_nf4_adapter_on_sample_tenant_cuts_held_out_answer_loss(setup, tmp_path):
    tok = load_base_tokenizer(setup.base_dir, setup.base_params)
    prepared = prepare_tenant(
        TenantParams(name="globex-it", raw_dir=REPO / "data" / "raw" / "globex-it"),
        PrepareParams(),
        tok,
        out_dir=tmp_path / "prepared",
        rejected_path=tmp_path / "rejected.jsonl",
        stats_path=tmp_path / "stats.json",
    )
    res = train_adapter(
        tiny_train(
            quantization="nf4",
            optimizer="paged_adamw_32bit",
            max_steps=40,
            learning_rate=1e-2,
            eval_every=20,
            save_every=1000,
            lora_dropout=0.0,
            max_seq_len=1024,
            grad_accum=1,
        ),
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        dataset_dir=prepared.dataset_dir,
        out_dir=tmp_path / "adapter",
    )
    loss = res.record.loss
    # The held-out split here is the prepared validation split (rows never trained on). Seen: 40
    # steps on the tiny test base (0.1M parameters) take it from 3.78 to 2.44, 35% lower; the
    # default 3.7M base with 600 steps (`make run`) cuts it by about 90%.
    assert loss.final_val < 0.75 * loss.base_val, loss

"""evaluate.batch_size: auto sizes batches to the card (evaluate/batching.py); a number is kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from loraline.config import ConfigError, load_params
from loraline.evaluate.batching import CPU_ROWS, MAX_ROWS, bytes_per_token, rows_for, scored_in_batches

GIB = 1024**3
LLAMA_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)


def _model(device: str, config=LLAMA_8B):
    return SimpleNamespace(device=torch.device(device), config=config)


def _card(monkeypatch, total_gib: float, allocated_gib: float) -> None:
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=int(total_gib * GIB))
    )
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: int(allocated_gib * GIB))


def test_a_number_is_kept_and_never_exceeds_the_rows():
    assert rows_for(8, _model("cpu"), 300, 244) == 8
    assert rows_for(64, _model("cpu"), 300, 20) == 20


def test_auto_on_the_cpu_is_32_rows():
    assert rows_for("auto", _model("cpu"), 300, 244) == CPU_ROWS == 32
    assert rows_for("auto", _model("cpu"), 300, 5) == 5


def test_bytes_per_token_of_an_8b_llama():
    # KV 128 KiB (32 layers x 8 heads x 128 x k,v x bf16) + activations + bf16 and fp32 logits
    kv = 2 * 32 * 8 * 128 * 2
    assert bytes_per_token(LLAMA_8B) == kv + (4 * 4096 + 3 * 14336) * 2 + 128256 * 6
    assert kv == 128 * 1024


def test_auto_on_cuda_fits_the_card_beside_the_model(monkeypatch):
    per_row = 300 * bytes_per_token(LLAMA_8B)
    _card(monkeypatch, total_gib=80, allocated_gib=15)  # an H100 holding an 8B base in bf16
    on_h100 = int((0.8 * 80 * GIB - 15 * GIB) // per_row)
    assert 128 < on_h100 < 244  # the sample tenant's 244 test rows in two batches instead of eight
    assert rows_for("auto", _model("cuda"), 300, 244) == on_h100
    assert rows_for("auto", _model("cuda"), 300, 100) == 100  # never more than there are
    _card(monkeypatch, total_gib=141, allocated_gib=15)  # an H200: capped
    assert rows_for("auto", _model("cuda"), 300, 1000) == MAX_ROWS
    _card(monkeypatch, total_gib=24, allocated_gib=15)  # the same base on a 24 GiB card
    expected = int((0.8 * 24 * GIB - 15 * GIB) // per_row)
    assert 1 <= expected < 32
    assert rows_for("auto", _model("cuda"), 300, 244) == expected
    _card(monkeypatch, total_gib=16, allocated_gib=15)  # no room beside the model: one row at a time
    assert rows_for("auto", _model("cuda"), 300, 244) == 1


def test_auto_halves_after_an_out_of_memory_error(capsys):
    tried: list[int] = []

    def score(rows: int) -> str:
        tried.append(rows)
        if rows > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return f"scored {rows}"

    assert scored_in_batches("auto", 32, score, "evaluate") == ("scored 4", 4)
    assert tried == [32, 16, 8, 4]
    assert "evaluate: out of GPU memory, retrying 16 rows at a time" in capsys.readouterr().err


def test_a_chosen_number_is_not_changed_behind_the_users_back():
    def score(rows: int) -> str:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of GPU memory at evaluate.batch_size 32: lower it"):
        scored_in_batches(32, 32, score, "evaluate")


@pytest.mark.parametrize("bad", [0, -1, "big", True, 2.5])
def test_bad_batch_sizes_name_the_key(bad):
    with pytest.raises(ConfigError, match=r"evaluate\.batch_size.*whole number of test rows >= 1, or auto"):
        load_params(overrides={"evaluate": {"batch_size": bad}})


def test_auto_is_the_default():
    assert load_params().evaluate.batch_size == "auto"

"""The vLLM command line loraline builds, and the LoRA rank it asks for."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraline.config import ServeParams
from loraline.serve.engine import EngineError, engine_command, engine_dtype, lora_rank_for


def test_rank_is_the_smallest_vllm_size_that_holds_every_adapter():
    assert lora_rank_for([4, 16]) == 16 and lora_rank_for([17]) == 32 and lora_rank_for([256, 8]) == 256
    with pytest.raises(EngineError, match="above the largest vLLM serves"):
        lora_rank_for([600])


def test_the_engine_listens_on_loopback_with_runtime_lora_and_the_users_extra_arguments():
    params = ServeParams(engine_port=9001, dtype="bfloat16", engine_args=["--max-num-seqs", "64"])
    cmd = engine_command(
        Path("/env/bin/python"),
        Path("models/base"),
        params,
        dtype="bfloat16",
        lora_rank=256,
        max_loras=4,
        max_model_len=1024,
        on_cpu=True,
    )
    assert cmd[:3] == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::1], cmd[4::1]))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "9001" and flags["--max-lora-rank"] == "256"
    assert flags["--max-loras"] == "4" and flags["--dtype"] == "bfloat16" and flags["--max-model-len"] == "1024"
    assert "--enable-lora" in cmd and "--enforce-eager" in cmd and cmd[-2:] == ["--max-num-seqs", "64"]
    gpu = engine_command(
        Path("p"), Path("m"), params, dtype="bfloat16", lora_rank=16, max_loras=2, max_model_len=None, on_cpu=False
    )
    assert "--enforce-eager" not in gpu and "--max-model-len" not in gpu


def test_the_engine_serves_at_the_merged_models_precision_unless_told_otherwise():
    """The deployment check compares served greedy answers with the merged model's: by default vLLM
    computes at merge.dtype, not its `auto` (16 bits for a float32 model)."""
    assert ServeParams().dtype == "merge"
    assert (
        engine_dtype(ServeParams(), "float32") == "float32" and engine_dtype(ServeParams(), "bfloat16") == "bfloat16"
    )
    assert engine_dtype(ServeParams(dtype="auto"), "float32") == "auto"
    assert engine_dtype(ServeParams(dtype="float16"), "float32") == "float16"

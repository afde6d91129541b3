"""Checkpoints: format (safetensors + JSON only), pruning, and resuming after a real SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from train_helpers import THREADS, adapter_tensors, tiny_train

from loraline.train import checkpoint, train_adapter

HERE = Path(__file__).parent


def test_checkpoints_are_safetensors_and_json_and_only_the_last_two_are_kept(reference):
    dirs = sorted(p.name for p in reference.checkpoint_dir.iterdir())
    assert dirs == ["step-00000006", "step-00000009"]  # save_every=3 over 12 steps (none at the end), keep 2
    ck = reference.checkpoint_dir / "step-00000009"
    assert sorted(p.name for p in ck.iterdir()) == ["adapter.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 9 and state["format"] == checkpoint.FORMAT
    assert state["fingerprint"] == reference.result.record.fingerprint
    assert set(state["data_position"]) == {"epoch", "step_in_epoch"}
    assert len(state["progress"]["history"]) == 10  # base eval + 9 steps
    assert {"python", "numpy"} <= set(state["rng"][0])
    from safetensors.torch import load_file

    tensors = load_file(ck / "optimizer.safetensors")
    assert "rank0.rng.torch" in tensors and any(k.endswith(".exp_avg") for k in tensors)


def test_checkpoints_of_another_run_are_discarded_not_resumed(reference, setup, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(reference.checkpoint_dir, ck)
    (ck / ".step-00000012.tmp-abc").mkdir()  # what a kill during a checkpoint write leaves
    res = train_adapter(
        tiny_train(lora_r=4, max_steps=2, save_every=100), out_dir=tmp_path / "o", checkpoint_dir=ck, **setup.kwargs()
    )
    assert res.timing["resumed_from_step"] is None
    assert list(ck.iterdir()) == []


def test_resuming_a_finished_checkpoint_dir_reproduces_the_adapter(reference, setup, tmp_path):
    """Starting again with the reference's checkpoints resumes at step 9 and ends identically."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(reference.checkpoint_dir, ck)
    res = train_adapter(tiny_train(), out_dir=tmp_path / "o", checkpoint_dir=ck, **setup.kwargs())
    assert res.timing["resumed_from_step"] == 9
    assert res.record.files == reference.result.record.files
    assert res.record.tokens_seen == reference.result.record.tokens_seen
    assert res.record_path.read_bytes() == reference.result.record_path.read_bytes()  # resumed or not: the same output
    assert res.train_curve.read_text() == reference.result.train_curve.read_text()
    assert res.val_curve.read_text() == reference.result.val_curve.read_text()


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads({threads})
    sys.path.insert(0, {helpers!r})
    from train_helpers import tiny_build, tiny_train
    import loraline.train.loop as loop
    from loraline.config import BaseParams
    from loraline.train import train_adapter

    real_step = loop.train_step
    def slow_step(run, planned):  # slow enough for the parent to kill it between two checkpoints
        time.sleep(0.25)
        return real_step(run, planned)
    loop.train_step = slow_step
    train_adapter(
        tiny_train(), base_dir=Path({base!r}), base_params=BaseParams(build=tiny_build()),
        dataset_dir=Path({data!r}), out_dir=Path({out!r}), checkpoint_dir=Path({ck!r}),
    )
    """
)


def test_run_killed_with_sigkill_resumes_to_the_same_adapter(reference, setup, tmp_path):
    ck, out = tmp_path / "ck", tmp_path / "out"
    script = tmp_path / "train_script.py"
    script.write_text(
        SCRIPT.format(
            threads=THREADS,
            helpers=str(HERE),
            base=str(setup.base_dir),
            data=str(setup.dataset_dir),
            out=str(out),
            ck=str(ck),
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(ck.glob("step-*")):
            if proc.poll() is not None:
                pytest.fail(
                    f"training script ended before its first checkpoint:\n{proc.stderr.read().decode()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 120 s")
            time.sleep(0.01)
        time.sleep(0.3)  # into the next steps: the kill lands mid-way, not right at the checkpoint
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not out.exists()  # it really died before finishing
    killed_at = sorted(int(p.name.split("-")[1]) for p in ck.glob("step-*"))
    assert killed_at and killed_at[-1] < 12

    res = train_adapter(tiny_train(), out_dir=out, checkpoint_dir=ck, **setup.kwargs())
    assert res.timing["resumed_from_step"] == killed_at[-1]
    ours, ref = adapter_tensors(out), adapter_tensors(reference.result.out_dir)
    assert ours.keys() == ref.keys()
    diff = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    assert diff == 0.0, diff  # identical on CPU (the issue allows 1e-6)
    assert res.record.files["adapter_model.safetensors"] == reference.result.record.files["adapter_model.safetensors"]
    assert res.train_curve.read_text() == reference.result.train_curve.read_text()
    assert res.val_curve.read_text() == reference.result.val_curve.read_text()
    assert torch.get_num_threads() == THREADS


def test_the_stage_removes_its_checkpoints_once_the_adapter_is_written(setup, tmp_path, monkeypatch):
    """A finished run's checkpoints repeat its adapter (and the optimizer's state): the stage keeps the adapter."""
    import loraline.train.stage as stage_module
    from loraline.config import Params
    from loraline.layout import Layout

    layout = Layout(tmp_path)
    shutil.copytree(setup.dataset_dir, layout.prepared_dataset_dir("t"))
    params = Params.model_validate(
        {
            "base": setup.base_params.model_dump(),
            "tenants": {
                "t": {
                    "raw_dir": "data/raw/t",
                    "train": tiny_train(max_steps=4, save_every=2).model_dump(exclude_defaults=True),
                }
            },
        }
    )
    written = []
    real = stage_module.train_adapter

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        written.append(sorted(p.name for p in kwargs["checkpoint_dir"].iterdir()))
        return result

    monkeypatch.setattr(stage_module, "train_adapter", spy)
    res = stage_module.run(params, layout, "t", base_dir=setup.base_dir)
    assert written == [["step-00000002"]]  # written during the run (the last step is the adapter itself)
    assert not layout.checkpoint_dir("t").exists() and (res.out_dir / "adapter_model.safetensors").is_file()

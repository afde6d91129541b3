"""Shared fixtures: one tiny base model, one tiny prepared dataset and one reference training run
per session (a few seconds on 2 CPU cores)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from train_helpers import THREADS, make_raw, tiny_build, tiny_train  # noqa: E402

from loraline.config import BaseParams, PrepareParams, TenantParams  # noqa: E402


@dataclass(frozen=True)
class Setup:
    base_params: BaseParams
    base_dir: Path
    dataset_dir: Path
    root: Path

    def kwargs(self) -> dict[str, Any]:
        return {"base_dir": self.base_dir, "base_params": self.base_params, "dataset_dir": self.dataset_dir}


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request):
    """CPU tests stay CPU tests on a GPU machine (exactness, rss, fp32); @pytest.mark.cuda ones use the GPU."""
    if request.node.get_closest_marker("cuda"):
        yield
        return
    with mock.patch("loraline.train.stage.pick_device", return_value=torch.device("cpu")):
        yield


@pytest.fixture(autouse=True)
def _pinned_threads():
    # Same thread count in every run (and in the subprocess of the resume test): CPU float sums
    # depend on it, and one thread is also fastest on 2 cores shared with other work.
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    from loraline.base.stage import build_base
    from loraline.modelling.loading import load_base_tokenizer
    from loraline.prepare.stage import prepare_tenant

    root = tmp_path_factory.mktemp("train-setup")
    raw = make_raw(root / "raw" / "toy")
    base_params = BaseParams(build=tiny_build())
    base = build_base(base_params, seed=5, raw_dirs=[raw], out_dir=root / "base")
    tok = load_base_tokenizer(base.out_dir, base_params)
    prepared = prepare_tenant(
        TenantParams(name="toy", raw_dir=raw),
        PrepareParams(),
        tok,
        out_dir=root / "prepared",
        rejected_path=root / "rejected.jsonl",
        stats_path=root / "stats.json",
    )
    return Setup(base_params, base.out_dir, prepared.dataset_dir, root)


@dataclass(frozen=True)
class Reference:
    result: Any  # TrainResult
    model: torch.nn.Module  # the trained peft model as the loop left it
    checkpoint_dir: Path


@pytest.fixture(scope="session")
def reference(setup: Setup, tmp_path_factory) -> Reference:
    """One uninterrupted run of tiny_train() with checkpoints (12 steps, dropout on, grad_accum 2)."""
    import loraline.train.stage as stage

    root = tmp_path_factory.mktemp("reference")
    seen: dict[str, Any] = {}
    real_loop = stage.train_loop

    def capture(run, *args, **kwargs):
        seen["model"] = run.model
        return real_loop(run, *args, **kwargs)

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with (
            mock.patch.object(stage, "train_loop", capture),
            mock.patch.object(stage, "pick_device", return_value=torch.device("cpu")),
        ):
            result = stage.train_adapter(
                tiny_train(), out_dir=root / "out", checkpoint_dir=root / "ckpt", **setup.kwargs()
            )
    finally:
        torch.set_num_threads(previous)
    return Reference(result, seen["model"], root / "ckpt")


@pytest.fixture
def cpu_ranks(monkeypatch):
    """Launched ranks run on CPU (gloo) on a GPU machine too, one thread each."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

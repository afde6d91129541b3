"""Shared test setup: never reach a model hub, never send analytics, skip CUDA tests without a GPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not os.environ.get("LORALINE_SERVE_PYTHON"):
        skip_serve = pytest.mark.skip(reason="starts the real vLLM server: run `make test-serve` (builds the serving environment)")
        for item in items:
            if item.get_closest_marker("serve"):
                item.add_marker(skip_serve)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA); run on a CUDA machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch CPU thread (results then repeat bit for bit), restoring the count after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

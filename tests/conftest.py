"""Shared test setup: never reach a model hub, never send analytics, skip CUDA tests without a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    """Deprecations are errors, except loraline/quiet.py's narrow filters, made pytest's own: pytest puts its
    filters in front of those `import loraline` installed, in each test (its fixtures included)."""
    from loraline import quiet

    # A deprecation (transformers', peft's, any library's) fails the test that meets it: it announces the
    # next upgrade's breakage. Added first, so that quiet.py's narrow filters below take precedence.
    for category in ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}")
    for noise in quiet.NOISE:
        if noise.kind == "warning":
            config.addinivalue_line(
                "filterwarnings", f"ignore:{noise.message}:{noise.category.__name__}:{noise.source}"
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not os.environ.get("LORALINE_SERVE_PYTHON"):
        skip_serve = pytest.mark.skip(
            reason="starts the real vLLM server: run `make test-serve` (builds the serving environment)"
        )
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


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory) -> Path:
    """A random-init Llama (GQA, untied head): its greedy outputs are long and varied, never an early eos."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraline.base.tokenizer import train_tokenizer
    from loraline.modelling.chat import save_tokenizer

    root = tmp_path_factory.mktemp("random_llama")
    corpus = [
        f"Ticket {i} from {who}: the {thing} is {state}. Please route it."
        for i, (who, thing, state) in enumerate(
            [("Ana", "printer", "down"), ("Bo", "vpn", "slow"), ("Chen", "mailbox", "down")] * 20
        )
    ]
    tok = train_tokenizer(corpus, 400)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(root / "model")
    save_tokenizer(tok, root / "model")
    return root / "model"

"""Shared fixtures for the prepare stage: a tiny tokenizer and helpers to lay out raw files."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraline.base.tokenizer import train_tokenizer
from loraline.config import PrepareParams, TenantParams
from loraline.prepare.stage import collect, prepare_tenant

CORPUS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "Order 12345 shipped; refund the customer and answer politely. Thank you!",
    "system user assistant instruction input output prompt completion document text",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS * 4, vocab_size=400)


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    d = tmp_path / "raw"
    d.mkdir()
    return d


@pytest.fixture
def tenant(raw_dir: Path) -> TenantParams:
    return TenantParams(name="acme", raw_dir=raw_dir)


@pytest.fixture
def params() -> PrepareParams:
    return PrepareParams()


@pytest.fixture
def run(tmp_path: Path, tenant: TenantParams, params: PrepareParams, tokenizer):
    """prepare_tenant into tmp_path/out with the default fixtures (keyword overrides allowed)."""

    def _run(name: str = "out", **kwargs):
        kwargs.setdefault("params", params)
        return prepare_tenant(
            kwargs.pop("tenant", tenant),
            kwargs.pop("params"),
            kwargs.pop("tokenizer", tokenizer),
            out_dir=tmp_path / name / "prepared",
            rejected_path=tmp_path / name / "rejected" / "acme.jsonl",
            stats_path=tmp_path / name / "stats.json",
            **kwargs,
        )

    return _run


@pytest.fixture
def gather(tenant: TenantParams, params: PrepareParams, tokenizer):
    """collect() (in memory, nothing written) with the default fixtures."""

    def _gather(**kwargs):
        return collect(
            kwargs.pop("tenant", tenant), kwargs.pop("params", params), kwargs.pop("tokenizer", tokenizer), **kwargs
        )

    return _gather

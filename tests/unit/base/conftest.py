"""Shared fixtures: one tiny offline base build (a few seconds on 2 CPU cores) reused by the tests."""

from __future__ import annotations

import os

# Never reach a model hub from tests, whatever the environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from base_helpers import make_raw, tiny_build  # noqa: E402

from loraline.config import BaseParams  # noqa: E402


@pytest.fixture(scope="session")
def raw_dirs(tmp_path_factory) -> list[Path]:
    return make_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def built(tmp_path_factory, raw_dirs):
    """(BaseParams, BaseResult) of one tiny build with seed 7."""
    from loraline.base.stage import build_base

    params = BaseParams(build=tiny_build())
    out = tmp_path_factory.mktemp("base") / "base"
    return params, build_base(params, seed=7, raw_dirs=raw_dirs, out_dir=out)

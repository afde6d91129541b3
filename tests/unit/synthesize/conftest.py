"""Fixtures of the synthesize tests: a tenant's documents folder as the documents stage writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from synth_helpers import make_documents


@pytest.fixture
def documents(tmp_path: Path) -> Path:
    return make_documents(tmp_path)

"""The prepare stage: raw tenant files to a clean, deduplicated, split, chat-templated dataset.

The names below are resolved on first use rather than imported here, so that `loraline inspect` and
the tests can use one small module (readers, render, schema) without loading the whole stage.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CHAT_FEATURES": "loraline.prepare.features",
    "DOCUMENT_FEATURES": "loraline.prepare.features",
    "PrepareResult": "loraline.prepare.stage",
    "collect": "loraline.prepare.stage",
    "prepare_tenant": "loraline.prepare.stage",
    "run": "loraline.prepare.stage",
    "ChatTemplateError": "loraline.prepare.schema",
    "PrepareError": "loraline.prepare.schema",
    "PrepareStats": "loraline.prepare.schema",
    "Record": "loraline.prepare.schema",
    "Reject": "loraline.prepare.schema",
    "RejectReason": "loraline.prepare.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loraline.prepare' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

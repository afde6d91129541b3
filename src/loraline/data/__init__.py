"""The prepare stage: raw tenant files to a clean, deduplicated, split, chat-templated dataset.

The names below are resolved on first use rather than imported here: the train, merge and evaluate
stages import small modules of this package (render, schema), and an eager import of the prepare
stage would make them run, and depend on, every module prepare uses.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CHAT_FEATURES": "loraline.data.features",
    "DOCUMENT_FEATURES": "loraline.data.features",
    "PrepareResult": "loraline.data.prepare",
    "collect": "loraline.data.prepare",
    "prepare_tenant": "loraline.data.prepare",
    "ChatTemplateError": "loraline.data.schema",
    "PrepareError": "loraline.data.schema",
    "PrepareStats": "loraline.data.schema",
    "Record": "loraline.data.schema",
    "Reject": "loraline.data.schema",
    "RejectReason": "loraline.data.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loraline.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

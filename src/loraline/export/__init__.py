"""Export stage: a merged Hugging Face causal LM -> ONNX (KV cache in the graph), optional int8, runtime.

The names below are resolved on first use rather than imported here: `loraline export` for a tenant
without onnx in deploy.targets writes its report without importing torch or onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheLayout": "loraline.export.wrapper",
    "ExportError": "loraline.export.stage",
    "ExportResult": "loraline.export.stage",
    "KVCacheWrapper": "loraline.export.wrapper",
    "OnnxGenerator": "loraline.export.runtime",
    "export_onnx": "loraline.export.build",
    "run": "loraline.export.stage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loraline.export' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""Export stage: a merged Hugging Face causal LM -> ONNX (KV cache in the graph), optional int8, runtime."""

from loraline.export.runtime import OnnxGenerator
from loraline.export.stage import ExportError, ExportResult, export_onnx, run
from loraline.export.wrapper import CacheLayout, KVCacheWrapper

__all__ = [
    "CacheLayout",
    "ExportError",
    "ExportResult",
    "KVCacheWrapper",
    "OnnxGenerator",
    "export_onnx",
    "run",
]

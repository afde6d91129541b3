"""The train stage: LoRA / QLoRA adapters on the base model from a tenant's prepared dataset."""

from loraline.train.errors import TrainError
from loraline.train.stage import TrainResult, run, train_adapter, train_metrics

__all__ = ["TrainError", "TrainResult", "run", "train_adapter", "train_metrics"]

"""The train stage: LoRA / QLoRA adapters on the base model from a tenant's prepared dataset."""

from loraline.train.errors import TrainError
from loraline.train.stage import TrainResult, train_adapter

__all__ = ["TrainError", "TrainResult", "train_adapter"]

"""The `base` stage: the base model every adapter sits on, built offline or recorded from base.model."""

from loraline.base.stage import BaseResult, build_base, run

__all__ = ["BaseResult", "build_base", "run"]

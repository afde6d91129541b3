"""The `merge` stage: a tenant's adapter merged into a full-precision copy of the base, proven to
behave like the adapter on its base."""

from loraline.merge.stage import MergeError, MergeResult, merge_adapter, run
from loraline.modelling.parity import DEFAULT_PROBES

__all__ = ["DEFAULT_PROBES", "MergeError", "MergeResult", "merge_adapter", "run"]

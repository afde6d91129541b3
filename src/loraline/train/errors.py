"""The one error type the train stage raises for bad inputs, always before any training step."""

from __future__ import annotations


class TrainError(ValueError):
    """A train input is unusable; the message names the params key or path and how to fix it."""

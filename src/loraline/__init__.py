"""loraline: a repeatable, versioned, gated pipeline from raw data to deployed LoRA/QLoRA adapters."""

__version__ = "0.1.0"

"""Other libraries' messages that tell a loraline user nothing they can act on, silenced at their source.

Each entry names the library's logger or warning module, the message and the category, and says why the
message is harmless here; nothing broader is filtered, so a new warning still shows (it may be news:
tests/e2e/test_dvc_pipeline.py fails on any warning a stage prints that is not ours). `install` runs on
`import loraline`, so every stage process and the CLI start with these filters; pytest, which shows every
DeprecationWarning with filters of its own, gets them as its own (tests/conftest.py).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    source: str  # a logger's name (kind "log"), or a regular expression of the module that warns (kind "warning")
    message: str  # a regular expression the message starts with
    kind: str  # "log" | "warning"
    why: str  # why it is harmless for a loraline run
    category: type[Warning] = Warning


NOISE: tuple[Noise, ...] = (
    Noise(
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "log",
        "On CPUs with AVX512-BF16, bitsandbytes asks the Hugging Face hub for an optional faster 4-bit kernel, "
        "refused as remote code (and loraline runs offline); it then uses its own CPU kernel, the one loraline "
        "is tested with.",
    ),
    Noise(
        "kernels._internals.hf_hub",
        r"Skipping publisher trust check for 'kernels-community/",
        "log",
        "The same optional bitsandbytes CPU kernel: with the hub offline (as loraline runs), the kernels package "
        "says it did not check the kernel's publisher; the kernel is then refused as remote code (above).",
    ),
    Noise(
        "torchao",
        r"Failed to load \S*torchao/_C_\w+",
        "log",
        "torchao's compiled extensions for fp8 and Hopper CUTLASS kernels, which a CPU build of torch (or another "
        "torch version) cannot load; loraline uses torchao only for QA-LoRA's checkpoint format, in plain PyTorch.",
    ),
    Noise(
        "torch.utils._pytree",
        r"<enum '\w+'> is an Enum subclass and is now natively supported by torch.compile",
        "log",
        "torchao registers its Enums with torch.compile's pytree on import, which torch now does itself: "
        "a notice for torchao's maintainers.",
    ),
    Noise(
        r"transformers\.modeling_utils",
        r"`is_gradient_checkpointing` is deprecated",
        "warning",
        "peft reads transformers' old property name when wrapping a model; the value is the same, and the rename "
        "is peft's to follow.",
        FutureWarning,
    ),
    Noise(
        r"transformers\.modeling_utils",
        r"`gradient_checkpointing_enable` is deprecated",
        "warning",
        "peft's prepare_model_for_kbit_training (train.upcast_non_quantized) calls transformers' old name for "
        "activation checkpointing, an alias of the new one; loraline's own code calls the new one.",
        FutureWarning,
    ),
    Noise(
        "root",
        r"Please consider to run pre-processing before quantization",
        "log",
        "onnxruntime's int8 quantizer suggests its shape-inference pre-pass on every call (its example is an image "
        "model); the int8 graph's parity with the model is measured and reported either way (export_report.json).",
    ),
    Noise(
        r"torch\.jit\._script",
        r"`torch.jit.script_method` is deprecated",
        "warning",
        "torch's own mkldnn utilities, imported by torch itself, still use the deprecated decorator; loraline "
        "scripts nothing.",
        DeprecationWarning,
    ),
    Noise(
        r"dvc\.repo\.\w+",
        r"_NoneStep\.value will soon raise AttributeError",
        "warning",
        "DVC's own index code reads a value the way its trie library (dvc-data) is deprecating; DVC's to change.",
        DeprecationWarning,
    ),
    # the compiler names the module by its file: shown once, when Python first compiles torchao's source
    Noise(
        r".*torchao/quantization/quant_api",
        r"invalid escape sequence",
        "warning",
        "A docstring of torchao's with a regular expression in it, read by Python's compiler; nothing runs it.",
        DeprecationWarning,
    ),
    Noise(
        r".*torchao/quantization/quant_api",
        r"invalid escape sequence",
        "warning",
        "The same docstring on Python 3.12 and later, whose compiler says it as a SyntaxWarning.",
        SyntaxWarning,
    ),
)


def install() -> None:
    """Add a filter for each entry of NOISE (idempotent: warnings dedupes its filters, loggers get one each)."""
    for noise in NOISE:
        if noise.kind == "log":
            logger = logging.getLogger(noise.source)
            if not any(isinstance(f, _DropMessages) and f.noise is noise for f in logger.filters):
                logger.addFilter(_DropMessages(noise))
        else:
            warnings.filterwarnings("ignore", message=noise.message, category=noise.category, module=noise.source)


class _DropMessages(logging.Filter):
    def __init__(self, noise: Noise):
        super().__init__()
        self.noise = noise
        self.pattern = re.compile(noise.message)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())

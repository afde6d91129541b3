"""loraline: a repeatable, versioned, gated pipeline from raw data to deployed LoRA/QLoRA adapters."""

import logging as _logging

__version__ = "0.1.0"

# transformers and peft import torchao whenever it is installed (loraline needs it for QA-LoRA's
# checkpoint). On import it warns about the CUDA extensions a CPU build cannot load and torch warns
# about its Enum registrations: neither concerns anything loraline runs, and they would be in every
# stage's log.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

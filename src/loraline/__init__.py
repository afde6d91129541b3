"""loraline: a repeatable, versioned, gated pipeline from raw data to deployed LoRA/QLoRA adapters."""

from loraline import progress as _progress
from loraline import quiet as _quiet

__version__ = "0.1.0"

# Before any stage imports torch, transformers, peft or bitsandbytes: their import-time messages that say
# nothing a user can act on are filtered at their source, one by one (loraline/quiet.py says why each).
_quiet.install()
_progress.hub_bars_off_in_logs()

"""Synthetic instruction/answer rows from each tenant's documents (the `synthesize` stage).

Generators (one interface, `Generator`; `make_generator` picks one from params): `offline`
(templates around facts the documents state, no model), `hf` (a transformers teacher model),
`openai` (an OpenAI-compatible endpoint). Every row carries its provenance; filters.py decides what
is kept; stage.py writes data/synthetic/<tenant>/.
"""

from loraline.synthesize.base import Generated, Generator, SynthesizeError, make_generator
from loraline.synthesize.stage import SynthesizeResult, run, synthesize_tenant

__all__ = [
    "Generated",
    "Generator",
    "SynthesizeError",
    "SynthesizeResult",
    "make_generator",
    "run",
    "synthesize_tenant",
]

"""What every generator is: one interface, so the stage, the filters and the provenance do not care
whether a row came from templates, a local teacher model or an HTTP endpoint."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from loraline.config import SeedTask, SynthesizeParams
from loraline.synthesize.passages import Document, Span


class SynthesizeError(ValueError):
    """The synthesize stage cannot go on (unreachable endpoint, counts that do not reconcile...)."""


@dataclass(frozen=True)
class Generated:
    """One generated question/answer pair, or a generator-level reject (`reject` set, e.g. output
    that could not be parsed), with what provenance needs: the source document and span of the
    grounding passage, the seed tasks that shaped it, and how it was made (`method`)."""

    question: str
    answer: str
    source: str
    span: Span
    seed_tasks: list[int] = field(default_factory=list)
    method: str = ""
    reject: str | None = None
    detail: str | None = None


@runtime_checkable
class Generator(Protocol):
    name: str  # "offline" | "hf" | "openai"
    model: str | None  # None for offline
    template_sha256: str  # sha256 of the prompt template (or of the offline templates)

    def generate(self, doc: Document, seed: int, seed_tasks: Sequence[SeedTask] = ()) -> Iterator[Generated]:
        """Pairs grounded in `doc`, deterministic for a given seed where the backend allows it."""
        ...

    def usage(self) -> dict:
        """Counters worth reporting (requests sent, cache hits...); {} when there are none."""
        ...


def make_generator(params: SynthesizeParams, cache_dir: Path | None = None) -> Generator:
    """The generator `params.generator` names. Model libraries are imported only when chosen."""
    if params.generator == "offline":
        from loraline.synthesize.offline import OfflineGenerator

        return OfflineGenerator(questions_per_fact=params.questions_per_fact)
    if params.generator == "hf":
        from loraline.synthesize.hf import HFGenerator

        return HFGenerator(params)
    from loraline.synthesize.endpoint import EndpointGenerator

    return EndpointGenerator(params, cache_dir=cache_dir)

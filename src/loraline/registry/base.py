"""What the rest of loraline may ask of a model registry, independent of where it keeps its records.

GTO (git tags) is the backend today; an MLflow or other backend can stand beside it by providing
the same methods, so flows, the CLI and `release` never import a backend directly.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

PROD = "prod"


class _AnyType:
    """`expected_current=ANY`: promote whatever production is now (manual promotions, rollbacks)."""

    _instance: _AnyType | None = None

    def __new__(cls) -> _AnyType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY"


ANY = _AnyType()


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    commit: str
    created_at: datetime
    lineage: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Assignment:
    name: str
    version: str
    stage: str
    number: int
    commit: str
    created_at: datetime
    message: str = field(default="", compare=False)


class RegistryError(RuntimeError):
    """The registry refused an operation; the message says why and what to do."""


class ReleaseRefused(RegistryError):
    """The project's state forbids the release (stages out of date, dvc.lock disagreeing with itself):
    not I/O that may recover, so the flow does not retry it; the message says what to run first."""


class StaleRelease(ReleaseRefused):
    """DVC reports stages of the tenant out of date (`stages`): its reports would describe another adapter."""

    def __init__(self, message: str, tenant: str = "", stages: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.tenant, self.stages = tenant, tuple(stages)

    def __reduce__(self):  # pickled with its fields (Prefect may persist a task's exception)
        return type(self), (str(self), self.tenant, self.stages)


class PromotionConflict(RegistryError):
    """Production changed between the caller's decision and its promotion: decide again."""

    def __init__(self, name: str, expected: str | None, actual: str | None) -> None:
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(
            f"{name}: production is {actual or 'nothing'}, not {expected or 'nothing'} as expected when the promotion "
            "was decided (another promotion won the race); re-run the release to decide against the new production"
        )


@runtime_checkable
class Registry(Protocol):
    def versions(self, name: str) -> list[Version]:
        """Registered versions, oldest first."""
        ...

    def latest(self, name: str) -> Version | None: ...

    def production(self, name: str) -> Version | None: ...

    def history(self, name: str, stage: str = PROD) -> list[Assignment]:
        """Assignments to `stage`, oldest to newest."""
        ...

    def register(self, name: str, ref: str, lineage: dict[str, Any], version: str | None = None) -> Version:
        """Record `ref` (a commit) as a new version; None bumps the latest patch number."""
        ...

    def promote(
        self, name: str, version: str, expected_current: str | None | _AnyType = ANY, message: str | None = None
    ) -> Assignment:
        """Make `version` production, refusing (PromotionConflict) if production is no longer `expected_current`."""
        ...

    def rollback_target(self, name: str) -> tuple[str, str]:
        """(production now, the version `rollback` would make production); RegistryError when there is none."""
        ...

    def rollback(self, name: str, message: str | None = None) -> Assignment:
        """Make production again the version that was production before the current one."""
        ...

    def artifacts(self) -> list[str]: ...

    def transaction(self) -> AbstractContextManager[None]:
        """Hold off every other writer, so that several promotions decided together land together."""
        ...

    def reading(self) -> AbstractContextManager[None]:
        """Reads inside may share one read of the whole registry; a write inside, or a transaction starting, drops
        it. For a backend whose every read costs the same as reading everything (GTO's tags)."""
        ...

"""Rolling production back: each artifact of a tenant to the version that was production before the
current one, all or none. `loraline registry rollback` and serving's canary (registry.canary) both
roll back through `rollback_artifacts`, so a rollback reads the same in the registry whoever made it."""

from __future__ import annotations

from dataclasses import dataclass

from loraline.registry.base import PROD, Assignment, Registry
from loraline.registry.consistency import allowed


@dataclass(frozen=True)
class RolledBack:
    name: str
    was: str  # the version that was production
    assignment: Assignment  # the new `#prod#N` tag, at the version production went back to


def rollback_artifacts(
    registry: Registry, names: list[str], by: str, *, force: bool, reason: str = ""
) -> list[RolledBack]:
    """Every artifact of `names` back to its previous production, under the registry's lock; the rule that a
    target's gate passed and its lineage agrees is checked for all before any moves (--force overrides it,
    and the tag message then says which rule). `by` (who rolls back) and `reason` go into the tag message."""
    with registry.transaction():
        moves = {}
        for name in names:
            current, target = registry.rollback_target(name)
            moves[name] = current, target, allowed(registry.version(name, target), force, "roll back to")
        return [
            RolledBack(
                name,
                current,
                registry.rollback(
                    name,
                    message=f"Roll back {name} {PROD} from {current} to {target} by {by}{note}"
                    + (f": {reason}" if reason else ""),
                ),
            )
            for name, (current, target, note) in moves.items()
        ]

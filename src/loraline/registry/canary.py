"""Canary rollout in the registry: which promotions are on probation, and the decision that ends one.

A promotion made while serve.canary is set (the release, `loraline registry promote`) carries CANARY_NOTE
in its `#prod#N` tag message: serving replicas then give the new version a share of the tenant's
requests beside the previous production until one of them decides (loraline.serve.canary). A promotion
without the note (serve.canary null, `promote --no-canary`, a first production, a rollback, a `gto assign`
by hand) is served wholly at once.

The decision is an annotated git tag `canary/<artifact>/prod-<N>` beside the assignment it decides,
its message a summary line and the facts as JSON. GTO ignores such tags (they parse as no action), so
`gto`, `dvc artifacts get` and the registry's readers are unaffected. One tag name per promotion makes
the first decision win: under the registry's lock on one machine, and through the git remote's refusal
to create an existing tag between machines (registry.sync pushes a decision and its rollback together,
all or none). A rollback is the same `rollback_artifacts` as `loraline registry rollback`, made before
the decision tag, so no reader finds a rollback decided but production not yet moved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraline.registry.base import PROD
from loraline.registry.gto_registry import GtoRegistry
from loraline.registry.lineage import artifact_paths
from loraline.registry.rollback import rollback_artifacts
from loraline.registry.snapshot import git
from loraline.registry.sync import shared_registry

CANARY_NOTE = "Canary: on probation until a serving replica keeps it or rolls it back (serve.canary)"
ADAPTER_SUFFIX = "-adapter"  # the artifact serving loads (<tenant>-adapter); its canary decides for the tenant


@dataclass(frozen=True)
class CanaryDecision:
    artifact: str
    number: int  # the `#prod#N` assignment decided
    version: str
    kept: bool
    reason: str
    by: str  # which serving replica decided
    facts: dict[str, Any]  # the evidence: answers, errors, latencies of both versions


def record_decision(
    root: str | Path,
    remote: str | None,
    tenant: str,
    number: int,
    version: str,
    *,
    kept: bool,
    reason: str,
    facts: dict[str, Any],
    by: str,
) -> CanaryDecision | None:
    """Decide the canary of `tenant`'s promotion `#prod#<number>` to `version`: kept, or its artifacts rolled
    back (the reason in the rollback's tag message). Returns the decision that stands: this one, or one
    another replica made first; None when production has moved on from that promotion (nothing to decide).
    With a registry remote, against the remote's registry (a RegistryError when another machine changed it
    meanwhile: read the registry again)."""
    root = Path(root)
    artifact = tenant + ADAPTER_SUFFIX
    registry = GtoRegistry(root)
    with shared_registry(root, remote), registry.transaction():
        standing = read_decision(root, artifact, number)
        if standing is not None:
            return standing
        history = registry.history(artifact)
        if not history or (history[-1].number, history[-1].version) != (number, version):
            return None
        decision = CanaryDecision(artifact, number, version, kept, reason, by, facts)
        if not kept:  # onto what was serving moments ago: its gate's verdict is noted in the tag, not a refusal
            names = [n for n in artifact_paths(tenant) if registry.history(n)]
            rollback_artifacts(
                registry, names, f"{by} after the canary of {artifact}#{PROD}#{number}", force=True, reason=reason
            )
        git(root, "tag", "-a", decision_tag(artifact, number), history[-1].commit, "-m", _message(decision))
    return decision


def provisional(message: str) -> str:
    """A promotion's tag message, marked as the start of a canary."""
    return f"{message}\n\n{CANARY_NOTE}\n"


def is_provisional(message: str) -> bool:
    return CANARY_NOTE in message


def decision_tag(artifact: str, number: int) -> str:
    return f"canary/{artifact}/{PROD}-{number}"


def read_decision(root: str | Path, artifact: str, number: int) -> CanaryDecision | None:
    message = git(root, "tag", "--list", decision_tag(artifact, number), "--format=%(contents)")
    if not message:
        return None
    _, _, body = message.partition("\n")
    return CanaryDecision(**json.loads(body))


def _message(decision: CanaryDecision) -> str:
    verb = "Keep" if decision.kept else "Roll back"
    summary = (
        f"{verb} {decision.artifact} {decision.version} after its canary ({PROD}#{decision.number}): {decision.reason}"
    )
    return f"{summary}\n{json.dumps(asdict(decision), indent=2, sort_keys=True)}\n"

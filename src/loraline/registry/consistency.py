"""Whether a tenant's outputs and the evidence about them belong together, before they are versioned or promoted.

A release registers the adapter that dvc.lock records for train@<tenant> and reads the gate's verdict
from reports/<tenant>/gate.json. Both only describe one candidate when every stage between them ran on
the other's outputs: after `dvc commit -f train@<t>` (what a partial `dvc repro train@<t>` leaves) the
adapter is new while merge, export, evaluate and gate still describe the previous one. Two checks:

- `check_up_to_date`: DVC's own status (the Python API of `dvc status`) of every stage of the tenant and
  of the shared stages: the workspace is what dvc.lock says, and no stage needs re-running.
- `evidence_problems`: inside dvc.lock (or a version's recorded lineage, which quotes it), every stage
  that depends on another stage's output used the hash that stage produced: merge and evaluate used
  train's adapter, export used merge's model, gate used evaluate's metrics and the parity metrics.

`version_problems` applies the second check (and the recorded gate verdict) to a registered version,
which is what a manual promotion or a rollback must respect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraline.dvcfiles import read_lock
from loraline.layout import SHARED_STAGES, TENANT_STAGES, dvc_target, split_stage_id, stage_id, tenant_dvc_file
from loraline.registry.base import RegistryError, ReleaseRefused, StaleRelease, Version


def check_releasable(root: str | Path, tenant: str) -> None:
    """StaleRelease (a ReleaseRefused, which a retry cannot change), naming the stages and the command that
    fixes them, unless DVC finds every stage of the tenant (and the shared ones) up to date; ReleaseRefused
    unless dvc.lock's chain from train to gate agrees with itself. RegistryError when DVC cannot answer."""
    stale, checked = dvc_status(root, tenant_stages(tenant))
    if not checked:
        raise ReleaseRefused(
            f"{tenant}: {Path(root) / tenant_dvc_file(tenant)} defines none of {', '.join(tenant_stages(tenant))}, "
            "so DVC cannot say whether its outputs are up to date: is this the project's root (and has "
            "`loraline pipelines` written the tenant's dvc.yaml)?"
        )
    last = next((s for s in reversed(tenant_stages(tenant)) if s in checked), stage_id("gate", tenant))
    fix = f"dvc repro {dvc_target(last)}"
    if stale:
        details = "; ".join(f"{name} ({_describe(changes)})" for name, changes in stale.items())
        raise StaleRelease(
            f"{tenant}: not released, DVC reports stages out of date: {details}. Their outputs and reports "
            f"(the gate's verdict included) would describe another adapter than the one registered. "
            f"Run `{fix}` (it re-runs exactly what is out of date) and release again",
            tenant,
            tuple(stale),
        )
    problems = evidence_problems(lock_stages(read_lock(root, [tenant]), tenant_stages(tenant)))
    if problems:  # DVC's status was clean, so a stage dvc.yaml no longer defines left its record behind
        raise ReleaseRefused(
            f"{tenant}: not released, dvc.lock's records disagree: {'; '.join(problems)}. Re-run the stages "
            "that used the old hashes (`dvc repro --force --single-item "
            f"<stage>`), or `{fix} --force`, and release again"
        )


def tenant_stages(tenant: str) -> list[str]:
    """The shared stages the tenant's outputs depend on, then the tenant's own stages in pipeline order."""
    return [*SHARED_STAGES, *(stage_id(s, tenant) for s in TENANT_STAGES)]


def dvc_status(root: str | Path, wanted: list[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """({stale stage: DVC's changes}, the stages of `wanted` that the dvc.yaml files define), through DVC's
    status API.

    What `repo.status(targets=...)` answers, stage by stage in `wanted`'s order, reading only the dvc.yaml (and
    dvc.lock) files that hold `wanted`, each once: given targets, DVC collects each one by parsing its files
    again, and the repository's whole index parses every tenant's (bench/scale_tenants.py)."""
    from dvc.dvcfile import load_file
    from dvc.exceptions import DvcException
    from dvc.repo import Repo, lock_repo

    root = Path(root).resolve()
    files = dict.fromkeys(dvc_file_of(name) for name in wanted)
    try:
        with Repo(str(root), _wait_for_lock=True) as repo:  # a stage of another flow run may hold the lock
            with lock_repo(repo):  # as repo.status holds it: the files are read under the lock
                known = {}
                for path in files:
                    if (root / path).is_file():
                        known.update(
                            {stage.name: stage for stage in load_file(repo, str(root / path)).stages.values()}
                        )
                checked = [name for name in wanted if name in known]
                found: dict[str, list[Any]] = {}
                for name in checked:
                    found.update(known[name].status(check_updates=True))
    except DvcException as exc:
        raise RegistryError(f"cannot read DVC's status of {', '.join(wanted)} in {root}: {exc}") from exc
    return {key.rpartition(":")[2]: changes for key, changes in found.items()}, checked


def dvc_file_of(name: str) -> str:
    """The dvc.yaml (relative to the project root) that defines stage `name`."""
    tenant = split_stage_id(name)[1]
    return "dvc.yaml" if tenant is None else tenant_dvc_file(tenant)


def _describe(changes: list[Any], shown: int = 3) -> str:
    """DVC's status entries of one stage in words (`changed deps: models/adapters/t1 modified`), `shown` paths a
    kind."""
    parts = []
    for change in changes:
        if not isinstance(change, dict):
            parts.append(str(change))
            continue
        for kind, files in change.items():
            listed = [f"{path} {state}" for path, state in files.items()]
            more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
            parts.append(f"{kind}: {', '.join(listed[:shown])}{more}")
    return "; ".join(parts)


def evidence_problems(stages: dict[str, dict[str, dict[str, str | None]]]) -> list[str]:
    """Where a stage used another hash of a path than the stage producing it recorded.

    `stages` maps a stage to its `deps` and `outs` as {path: hash} (lineage's `dvc` section; `lock_stages`)."""
    producers = {path: (name, digest) for name, s in stages.items() for path, digest in (s.get("outs") or {}).items()}
    problems = []
    for name, s in stages.items():
        for path, used in (s.get("deps") or {}).items():
            producer, made = producers.get(path, (None, None))
            if producer is not None and producer != name and used != made:
                problems.append(f"{name} used {path} {_short(used)} but {producer} produced {_short(made)}")
    return problems


def lock_stages(lock: dict[str, Any], names: list[str]) -> dict[str, dict[str, dict[str, str | None]]]:
    """dvc.lock's `stages` entries of `names` as lineage records them: {stage: {deps: {path: hash}, outs: {...}}}."""
    return {
        name: {"deps": entry_hashes(lock[name].get("deps")), "outs": entry_hashes(lock[name].get("outs"))}
        for name in names
        if name in lock
    }


def entry_hashes(entries: list[dict[str, Any]] | None) -> dict[str, str | None]:
    return {e["path"]: e.get("md5") or e.get("etag") or e.get("checksum") for e in entries or []}


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "nothing"


def version_problems(version: Version) -> list[str]:
    """Why `version` should not become production: its recorded gate failed, or its lineage disagrees with itself."""
    lineage = version.lineage
    problems = []
    gate = (lineage.get("metrics") or {}).get("gate") or {}
    if gate.get("passed") is False:
        problems.append(f"failed its gate ({', '.join(gate.get('failed') or []) or 'no rule named'})")
    recorded = (lineage.get("consistency") or {}).get("problems") or []
    inconsistent = list(dict.fromkeys([*recorded, *evidence_problems(lineage.get("dvc") or {})]))
    if inconsistent:
        problems.append(f"has an inconsistent lineage ({'; '.join(inconsistent)})")
    return problems


def forced_note(problems: list[str]) -> str:
    """What a tag message says about a forced promotion or rollback: which rule --force overrode."""
    words = [
        w
        for w, hit in (
            ("gate FAILED", any(p.startswith("failed its gate") for p in problems)),
            ("lineage INCONSISTENT", any(p.startswith("has an inconsistent") for p in problems)),
        )
        if hit
    ]
    return f" ({', '.join(words)}, --force)" if words else ""


def allowed(version: Version, force: bool, action: str) -> str:
    """What the tag message says --force overrode ("" when nothing); RegistryError when `version` may not become
    production without --force: its recorded gate failed or its lineage disagrees with itself."""
    problems = version_problems(version)
    if problems and not force:
        raise RegistryError(
            f"{version.name} {version.version} {' and '.join(problems)}; pass --force to {action} it anyway"
        )
    return forced_note(problems)

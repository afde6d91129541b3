"""The step after a tenant's DVC stages: register what they produced, and promote it if it deserves to be.

The gate stage judged the candidate against the base and parity; production, though, is whatever
the registry says *now*, which may have changed since the evaluate stage ran (another tenant run,
a manual promotion, a rollback). So when a different version is in production, its merged model is
fetched from DVC at that version's commit and measured on this candidate's test split and general-text
sample (so its general_loss compares with the candidate's), and the gate's rules are decided again
against those numbers; the promotion then only lands if production is still the version it was
decided against (the registry's lock and `expected_current`).

The LLM judge (evaluate.judge) is part of that re-measure: the evaluate stage judged the candidate against
the base (it does not read the registry), so with gate.min_judge_win_rate set the candidate's answers
(the evaluation's generations.jsonl) are judged again against the production version's, and the gate's
judge rule decides on that win rate, recorded with the version and commit it was measured against.
A win rate is never carried over to a production it was not measured against.

Nothing is registered while DVC finds a stage of the tenant (or a shared one) out of date, or dvc.lock's
records disagree about which adapter merge, export, evaluate and gate used (registry.consistency): the
gate's verdict, the ONNX export and the lineage in the tag must all describe the adapter registered.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraline import io
from loraline.config import JudgeParams, Params
from loraline.gate.stage import read_parity
from loraline.layout import Layout, dvc_target, stage_id
from loraline.registry.base import PromotionConflict, Registry, ReleaseRefused, Version
from loraline.registry.canary import provisional
from loraline.registry.consistency import check_releasable, evidence_problems
from loraline.registry.lineage import (
    artifact_paths,
    check_artifacts_declared,
    fetch_output,
    gate_summary,
    locked_out,
    read_lock,
    tenant_lineage,
    tenant_outputs,
)
from loraline.registry.snapshot import snapshot_commit

if TYPE_CHECKING:
    from loraline.gate.decision import GateDecision


@dataclass(frozen=True)
class ProductionMeasure:
    """The production version measured at release: its metrics, and (evaluate.judge with gate.min_judge_win_rate)
    the candidate judged against its answers, metrics.json's `judge` block as evaluate/judge.py writes it."""

    metrics: dict[str, Any]
    judge: dict[str, Any] | None = None


ProductionEvaluator = Callable[[Path, Params, str, Version], ProductionMeasure]


@dataclass(frozen=True)
class ReleaseResult:
    tenant: str
    version: str
    registered_new: bool
    promoted: bool
    production_before: str | None
    production_after: str | None
    gate_passed: bool
    rules: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def release_path(root: str | Path, tenant: str) -> Path:
    return Layout(Path(root)).release_path(tenant)


def evaluate_production(root: Path, params: Params, tenant: str, production: Version) -> ProductionMeasure:
    """Production's merged model, as of its version's commit, measured like the candidate was; its adapter on
    the base when that version built no merged model (deploy.targets then: the merge folder holds a report only)."""
    from loraline.evaluate.stage import evaluate_model_answers

    layout = Layout(root)
    with tempfile.TemporaryDirectory(prefix=f"loraline-prod-{tenant}-") as tmp:
        merged = Layout().relative(Layout().merged_dir(tenant))
        model = fetch_output(root, merged, production.commit, Path(tmp) / "merged")
        if not (model / "config.json").is_file():
            adapter = Layout().relative(Layout().adapter_dir(tenant))
            model = fetch_output(root, adapter, production.commit, Path(tmp) / "adapter")
        ev = params.evaluate
        answers = evaluate_model_answers(
            model_dir=model,
            dataset_dir=layout.prepared_dataset_dir(tenant),
            base_dir=layout.base_dir,
            base_params=params.base,
            max_new_tokens=ev.max_new_tokens,
            max_examples=ev.max_examples,
            batch_size=ev.batch_size,
            device=ev.device,
            general_dir=layout.general_sample_dir(tenant),
        )
    judged = None
    if ev.judge is not None and params.gate_for(tenant).min_judge_win_rate is not None:
        judged = judge_production(layout, ev.judge, tenant, production, answers.ids, answers.predictions)
    return ProductionMeasure(answers.scores, judged)


def judge_production(
    layout: Layout, judge: JudgeParams, tenant: str, production: Version, ids: list[str], answers: list[str]
) -> dict[str, Any]:
    """The candidate's answers (the evaluation's generations.jsonl) judged against `answers`, production's to
    the same test rows: the `judge` block the gate's judge rule decides on at release."""
    from loraline.evaluate import judge as JG
    from loraline.evaluate.stage import GENERATIONS

    path = layout.evaluation_dir(tenant) / GENERATIONS
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if [r["id"] for r in rows] != ids:
        raise ReleaseRefused(
            f"{path} holds other test rows than production was measured on: "
            f"run the evaluate stage again (dvc repro {dvc_target(stage_id('evaluate', tenant))})"
        )
    against = JG.Opponent("production", {"version": production.version, "commit": production.commit})
    pairs = JG.pairings(rows, against.role, judge.max_rows, answers)
    return JG.judge_pairs(judge, pairs, against, layout.judge_cache_dir(tenant)).block


def _next_version(registry: Registry, names: list[str]) -> str:
    from loraline.registry.gto_registry import _bump_patch, _semver_key

    latest = [v.version for v in (registry.latest(n) for n in names) if v is not None]
    return _bump_patch(max(latest, key=_semver_key) if latest else None)


def _raw_dirs(root: Path, params: Params) -> list[str]:
    """Every tenant's raw_dir relative to the project (those outside it cannot be in a snapshot)."""
    rels = [os.path.relpath(t.raw_dir if t.raw_dir.is_absolute() else root / t.raw_dir, root) for t in params.tenants]
    return [Path(r).as_posix() for r in rels if not r.startswith("..")]


def _register(root: Path, params: Params, tenant: str, registry: Registry, gate: dict[str, Any]) -> tuple[str, bool]:
    """The version of the tenant's current outputs: the latest one when it records the same outputs, gate verdict
    and a consistent lineage (a release run again), else a new one over a fresh snapshot."""
    names = list(artifact_paths(tenant, params))
    latest = registry.latest(names[0])
    outputs = tenant_outputs(read_lock(root, [tenant]), tenant)
    if latest is not None and _same_candidate(latest, outputs, gate_summary(gate)):
        for name in names[1:]:  # an interrupted earlier release may have registered the adapter only
            if all(v.version != latest.version for v in registry.versions(name)):
                registry.register(name, latest.commit, latest.lineage, version=latest.version)
        return latest.version, False
    snapshot = snapshot_commit(
        root,
        f"loraline release {tenant}: the dvc.lock, params and data of this version",
        extra=_raw_dirs(root, params),
        tenant=tenant,
    )
    lineage = tenant_lineage(root, params, tenant, snapshot=snapshot)
    version = _next_version(registry, names)
    for name in names:
        registry.register(name, snapshot, lineage, version=version)
    return version, True


def _same_candidate(version: Version, outputs: dict[str, str | None], verdict: dict[str, Any] | None) -> bool:
    """Whether `version` already records these outputs and verdict; one registered while stages were stale
    (its lineage disagreeing with itself) never is, so the consistent state gets a version of its own."""
    lineage = version.lineage
    return (
        lineage.get("outputs") == outputs
        and (lineage.get("metrics") or {}).get("gate") == verdict
        and not evidence_problems(lineage.get("dvc") or {})
    )


def release_tenant(
    root: str | Path,
    params: Params,
    tenant: str,
    registry: Registry | None = None,
    promote: bool = True,
    evaluate: ProductionEvaluator = evaluate_production,
) -> ReleaseResult:
    """Register the tenant's current outputs (once per adapter content) and promote them when the gate allows."""
    from loraline.registry.gto_registry import GtoRegistry

    root = Path(root)
    layout, registry = Layout(root), registry or GtoRegistry(root)
    gate = _releasable_gate(root, params, layout, tenant)
    with registry.reading():  # reads between writes share one read of every tag (gto_tags)
        return _release_tenant(root, params, layout, tenant, registry, gate, promote, evaluate)


def _release_tenant(
    root: Path,
    params: Params,
    layout: Layout,
    tenant: str,
    registry: Registry,
    gate: dict[str, Any],
    promote: bool,
    evaluate: ProductionEvaluator,
) -> ReleaseResult:
    from loraline.gate.decision import to_json

    names = list(artifact_paths(tenant, params))  # the onnx artifact only when deploy.targets builds it
    version, registered_new = _register(root, params, tenant, registry, gate)
    current = {n: registry.production(n) for n in names}
    before = current[names[0]].version if current[names[0]] else None
    rules, passed = gate.get("rules", []), bool(gate.get("passed"))
    done = dict(
        tenant=tenant, version=version, registered_new=registered_new, production_before=before, gate_passed=passed
    )

    def finish(promoted: bool, after: str | None, reason: str, rules: list[dict[str, Any]] = rules) -> ReleaseResult:
        result = ReleaseResult(**done, promoted=promoted, production_after=after, rules=rules, reason=reason)
        io.write_json(release_path(root, tenant), result.to_json())
        return result

    if not passed:
        failed = [r for r in rules if not r.get("passed")]
        why = "; ".join(f"{r['name']}: {r.get('reason', '')}" for r in failed) or "gate.json says failed"
        return finish(False, before, f"gate failed, production left at {before or 'nothing'}: {why}")
    if not promote:
        return finish(False, before, "promotion not requested (--no-promote)")
    if all(current[n] is not None and current[n].version == version for n in names):
        return finish(False, before, f"{version} already is production")
    if before is not None and before != version:
        decision = _decide_against_production(root, params, layout, tenant, current[names[0]], evaluate)
        rules = to_json(decision)["rules"]
        if not decision.passed:
            why = "; ".join(f"{r.name}: {r.reason}" for r in decision.rules if not r.passed)
            return finish(False, before, f"not promoted against current production {before}: {why}", rules)
    try:
        _promote_together(params, registry, version, {n: current[n].version if current[n] else None for n in names})
    except PromotionConflict as exc:
        now = registry.production(names[0])
        return finish(False, now.version if now else None, str(exc), rules)
    canary = "; on canary (serve.canary)" if on_canary(params, before) else ""
    return finish(True, version, f"promoted {version} (was {before or 'nothing'}){canary}", rules)


def _releasable_gate(root: Path, params: Params, layout: Layout, tenant: str) -> dict[str, Any]:
    """The tenant's gate.json, once the project shows it describes the adapter dvc.lock records (else
    ReleaseRefused: the gate's verdict and the lineage may describe another adapter)."""
    check_artifacts_declared(root, params)
    if not layout.gate_path(tenant).exists():
        raise ReleaseRefused(
            f"{layout.gate_path(tenant)} does not exist: run the gate stage first "
            f"(dvc repro {dvc_target(stage_id('gate', tenant))})"
        )
    gate = json.loads(layout.gate_path(tenant).read_text())
    adapter = Layout().relative(Layout().adapter_dir(tenant))
    adapter_md5 = locked_out(read_lock(root, [tenant]), stage_id("train", tenant), adapter)
    if adapter_md5 is None:
        raise ReleaseRefused(f"dvc.lock records no {adapter}: run the pipeline (dvc repro) first")
    check_releasable(root, tenant)
    return gate


def _decide_against_production(
    root: Path, params: Params, layout: Layout, tenant: str, production: Version, evaluate: ProductionEvaluator
) -> GateDecision:
    """The gate again, with the current production version measured (`evaluate`) beside base and candidate."""
    from loraline.gate.decision import decide

    evaluation = json.loads(layout.evaluation_results_path(tenant).read_text())["models"]
    measured = evaluate(root, params, tenant, production)
    return decide(
        params.gate_for(tenant),
        evaluation["candidate"],
        evaluation["base"],
        measured.metrics,
        read_parity(layout, tenant),
        targets=params.deploy_for(tenant).targets,
        judge=measured.judge,
    )


def _promote_together(params: Params, registry: Registry, version: str, was: dict[str, str | None]) -> None:
    """Promote `version` of every artifact in `was` (name -> its production version now), or none of them:
    PromotionConflict when another release moved one since `was` was read."""
    with registry.transaction():  # check both before moving either, so the pair moves together
        for name in was:
            now = registry.production(name)
            if (now.version if now else None) != was[name]:
                raise PromotionConflict(name, was[name], now.version if now else None)
        for name in was:
            message = f"Promote {name} {version} to prod (loraline release, gate passed; was {was[name] or 'none'})"
            registry.promote(
                name,
                version,
                expected_current=was[name],
                message=provisional(message) if on_canary(params, was[name]) else message,
            )


def release_shared(
    root: str | Path, params: Params, tenant: str, registry: Registry | None = None, promote: bool = True
) -> ReleaseResult:
    """release_tenant against the registry shared through orchestrate.registry_remote, when one is set:
    its tags fetched first, the tags this release made pushed after (registry.sync)."""
    from loraline.registry.sync import shared_registry

    with shared_registry(root, params.orchestrate.registry_remote):
        return release_tenant(root, params, tenant, registry, promote=promote)


def run(params: Params, layout: Layout, tenant: str, *, promote: bool = True) -> ReleaseResult:
    """The flow's release step for one tenant (after its DVC stages): register, and promote if allowed."""
    return release_shared(layout.root, params, tenant, promote=promote)


def on_canary(params: Params, replaced: str | None) -> bool:
    """Whether a promotion starts a canary (registry.canary): serve.canary is set and the promotion replaces
    a version, against which serving measures the new one."""
    return params.serve.canary is not None and replaced is not None

"""The loraline pipeline as a Prefect flow: composition only, every step is a library call.

Who owns what:
- DVC owns caching and lineage. Each stage task is `dvc repro --single-item <stage>`, so a stage whose
  inputs did not change is skipped by DVC, and after the flow `dvc status` is clean and dvc.lock is
  what `dvc repro` would have written.
- Prefect owns the run: order, retries (train resumes from its checkpoint; pushes and registry writes
  are I/O that may recover; nothing else is retried, a deterministic failure would only fail again,
  and neither is a release refused for the project's state: stale stages, ReleaseRefused),
  timeouts, logs, the reports as artifacts, and the promotion decision (the release task).

Tenants run one after another, or with `parallel` N (orchestrate.parallel_tenants) up to N at once,
each pinned to its share of the GPUs, as concurrent Prefect tasks over one DVC workspace (see
flows/orchestrate.py for why that is safe and what it serializes). A tenant that fails does not
stop the others; the flow run fails at the end naming every tenant that failed and why.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from loraline.config import OrchestrateParams, Params, load_params
from loraline.flows.orchestrate import (
    DeviceSlots,
    StagePlan,
    StageRun,
    device_slots,
    each_tenant,
    plan_stages,
    project_lock,
    push_outputs,
    run_stage,
    run_stage_group,
    stage_echo,
    visible_gpus,
)
from loraline.layout import Layout, split_stage_id
from loraline.registry.base import ReleaseRefused
from loraline.release import ReleaseResult, release_shared
from loraline.serve.server import notify as notify_serving
from loraline.summary import collect_summary, gate_markdown, render_markdown, tenant_failures


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def dvc_stage(
    project_dir: str,
    stage: str,
    force: bool,
    timeout_s: float | None,
    env: dict[str, str] | None = None,
    tenant: str | None = None,
) -> StageRun:
    """One DVC stage; `env` pins it to its device slot, `tenant` marks its output lines (parallel runs)."""
    result = run_stage(project_dir, stage, force=force, timeout_s=timeout_s, env=env, echo=stage_echo(tenant))
    get_run_logger().info("%s: %s in %.1fs", stage, "ran" if result.ran else "up to date, skipped", result.seconds)
    return result


@task(task_run_name="shared-stages", cache_policy=NO_CACHE)
def dvc_shared_stages(project_dir: str, stages: list[str], force: bool, timeout_s: float | None) -> dict[str, bool]:
    """The run's tenants' documents and the base in one DVC process (orchestrate.run_stage_group)."""
    results = run_stage_group(project_dir, stages, force=force, timeout_s=timeout_s)
    ran = [r.stage for r in results if r.ran]
    seconds = results[0].seconds if results else 0.0
    get_run_logger().info("%d shared stage(s), %d ran, in %.1fs: %s", len(results), len(ran), seconds, ran or "-")
    return {r.stage: r.ran for r in results}


@task(task_run_name="dvc-push", cache_policy=NO_CACHE)
def dvc_push(project_dir: str) -> int:
    return push_outputs(project_dir)


@task(task_run_name="release-{tenant}", cache_policy=NO_CACHE)
def release(project_dir: str, tenant: str, promote: bool) -> ReleaseResult:
    params = load_params(Path(project_dir) / "params.yaml")
    with project_lock(project_dir, "registry"):  # version numbers and tags: one writer at a time
        result = release_shared(Path(project_dir), params, tenant, promote=promote)
    get_run_logger().info("release %s: %s", tenant, result.reason)
    if result.promoted:  # a running `loraline serve` on this machine serves it now, not at its next poll
        served = notify_serving(params)
        if served is not None:
            get_run_logger().info("serving told of %s %s: %s", tenant, result.version, served)
    return result


@task(task_run_name="publish-{tenant}", cache_policy=NO_CACHE)
def publish_reports(project_dir: str, tenant: str) -> None:
    """The tenant's evaluation report, metrics table and gate verdict, as Prefect artifacts."""
    params = load_params(Path(project_dir) / "params.yaml")
    layout = Layout(Path(project_dir))
    summary = collect_summary(params, layout, [tenant]).tenants[0]
    report = layout.evaluation_dir(tenant) / "report.md"
    if report.is_file():
        create_markdown_artifact(
            key=f"{tenant}-evaluation",
            markdown=report.read_text(),
            description=f"{tenant}: base vs candidate on the held-out test split",
        )
    rows = summary.metric_rows()
    if rows:
        create_table_artifact(key=f"{tenant}-metrics", table=rows, description=f"{tenant}: test-split metrics")
    create_markdown_artifact(
        key=f"{tenant}-gate",
        markdown=gate_markdown(summary),
        description=f"{tenant}: promotion gate {summary.verdict}",
    )


def retry_unless_refused(task, task_run, state) -> bool:
    """Prefect's retry condition of the I/O tasks (push, release): a failure that may recover (a git push,
    a busy registry, a promotion race) is retried; a release refused for the project's state (stages out
    of date) is not, since it would only be refused again after each retry delay."""
    return not isinstance(state.result(raise_on_failure=False), ReleaseRefused)


def _io_policy(orchestrate: OrchestrateParams) -> dict:
    return dict(
        retries=orchestrate.io_retries,
        retry_delay_seconds=orchestrate.retry_delay_seconds,
        retry_condition_fn=retry_unless_refused,
    )


def _with_policy(stage: str, orchestrate: OrchestrateParams):
    timeout_s = orchestrate.stage_timeout_minutes * 60 if orchestrate.stage_timeout_minutes else None
    retries = orchestrate.train_retries if split_stage_id(stage)[0] == "train" else 0
    return dvc_stage.with_options(retries=retries, retry_delay_seconds=orchestrate.retry_delay_seconds), timeout_s


def _run_chain(
    project_dir: str,
    stages: list[str],
    force: bool,
    orchestrate: OrchestrateParams,
    env: dict[str, str] | None = None,
    tenant: str | None = None,
) -> dict[str, bool]:
    ran = {}
    for stage in stages:
        run, timeout_s = _with_policy(stage, orchestrate)
        ran[stage] = run(project_dir, stage, force, timeout_s, env, tenant).ran
    return ran


@task(task_run_name="stages-{tenant}", cache_policy=NO_CACHE)
def tenant_stages(
    project_dir: str, tenant: str, stages: list[str], force: bool, orchestrate: OrchestrateParams, slots: DeviceSlots
) -> dict[str, bool]:
    """One tenant's chain of stages, run beside other tenants' chains, holding one device slot."""
    with slots.slot() as env:
        if env:
            get_run_logger().info("%s: stages pinned to %s", tenant, env)
        return _run_chain(project_dir, stages, force, orchestrate, env, tenant)


def _run_name() -> str:
    tenants = flow_run.parameters.get("tenants")
    return "loraline-" + ("-".join(tenants) if tenants else "all-tenants")


@flow(name="loraline", flow_run_name=_run_name, log_prints=True)
def pipeline(
    tenants: list[str] | None = None,
    project_dir: str = ".",
    promote: bool = True,
    push: bool = True,
    force: bool = False,
    parallel: int | None = None,
) -> dict:
    """Raw data to production adapters: DVC stages per tenant, then register and promote.

    `tenants`: the tenants to run (default: every tenant in params.yaml). `promote`: register
    versions but leave production alone when False. `force`: re-run stages DVC finds up to date.
    `parallel`: tenants whose stages run at once (default orchestrate.parallel_tenants).
    """
    started = time.perf_counter()
    project_dir = str(Path(project_dir).resolve())
    params = load_params(Path(project_dir) / "params.yaml")
    refuse_a_crash_loop(_run_count(), params.orchestrate.crash_retries)
    chosen = tenants or params.tenant_names
    for name in chosen:
        params.tenant_params(name)  # unknown tenants fail here, before anything runs
    plan = plan_stages(project_dir, chosen)
    orchestrate = params.orchestrate

    with project_lock(project_dir, "shared"):  # another flow run may be building the same base
        ran = dvc_shared_stages(project_dir, plan.shared, force, _with_policy("base", orchestrate)[1])
    chains, failures = _tenant_chains(project_dir, plan, force, orchestrate, parallel or orchestrate.parallel_tenants)
    for tenant, tenant_ran in chains.items():
        ran.update(tenant_ran)
        publish_reports(project_dir, tenant)  # not a failed tenant's: its reports are an earlier run's

    if push:
        dvc_push.with_options(**_io_policy(orchestrate))(project_dir)
    releases = {
        tenant: release.with_options(**_io_policy(orchestrate))(project_dir, tenant, promote)
        for tenant in chosen
        if tenant not in failures
    }
    seconds = time.perf_counter() - started
    _publish_run_summary(params, project_dir, chosen, seconds)
    if failures:
        raise RuntimeError(f"loraline pipeline failed for {', '.join(failures)}:\n" + tenant_failures(failures, "\n"))
    return {
        "seconds": seconds,
        "stages_ran": [s for s, did in ran.items() if did],
        "releases": {t: asdict(r) for t, r in releases.items()},
    }


def refuse_a_crash_loop(run_count: int, crash_retries: int) -> None:
    """A flow run whose worker or machine was lost is marked Crashed (Lost) and scheduled again by the
    automations in flows/automations.yaml, for any worker; each time it starts counts (Prefect's run_count).
    Past 1 + crash_retries starts it fails here, before any stage: a Failed run is not scheduled again, so a
    run that takes its machine down every time (its memory, say) does not loop forever."""
    if run_count > 1 + crash_retries:
        raise RuntimeError(
            f"this flow run has started {run_count} times: it crashed (its worker or machine lost) "
            f"{run_count - 1} times and was scheduled again, more than orchestrate.crash_retries ({crash_retries}); "
            "find why in its earlier runs' logs, then start a new run"
        )


def _run_count() -> int:
    """How many times this flow run has started, this time included (the server's count; 1 outside a
    deployment's or an embedded run's flow run)."""
    run_id = flow_run.get_id()
    if run_id is None:
        return 1
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).run_count


def _tenant_chains(
    project_dir: str, plan: StagePlan, force: bool, orchestrate: OrchestrateParams, parallel: int
) -> tuple[dict[str, dict[str, bool]], dict[str, Exception]]:
    """Each tenant's own stages: (stages run by tenant, failures by tenant); a failed tenant does not stop
    the others. With `parallel` > 1 (also with one tenant: concurrent flow runs, per-tenant deployments,
    share the slots) up to `parallel` tenants' chains run at once as Prefect tasks, each on its device slot."""

    def tell(tenant: str, exc: Exception) -> None:
        get_run_logger().error("tenant %s failed: %s", tenant, exc)

    if parallel <= 1:
        return each_tenant(
            plan.per_tenant,
            lambda tenant: _run_chain(project_dir, plan.per_tenant[tenant], force, orchestrate),
            on_failure=tell,
        )
    slots = DeviceSlots(project_dir, device_slots(parallel, visible_gpus()))
    futures = {
        tenant: tenant_stages.submit(project_dir, tenant, stages, force, orchestrate, quote(slots))
        for tenant, stages in plan.per_tenant.items()
    }
    return each_tenant(futures, lambda tenant: futures[tenant].result(), on_failure=tell)


def _publish_run_summary(params: Params, project_dir: str, tenants: list[str], seconds: float) -> None:
    summary = collect_summary(params, Layout(Path(project_dir)), tenants)
    create_markdown_artifact(
        key="loraline-run",
        markdown=render_markdown(summary, seconds),
        description="per tenant: gate verdict, registered version, production",
    )


if __name__ == "__main__":
    pipeline()

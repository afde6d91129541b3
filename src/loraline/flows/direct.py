"""`loraline run --no-dvc`: every stage's `run` called in this process, without DVC (no caching, no
lineage, no registry), each printing what its own `loraline <stage>` command prints (summary.py's lines).

Invariants:
- The stages run in STAGES order, each for every tenant before the next, shared ones first: every
  tenant's documents (the base is built from all of them, chosen tenants or not: without DVC there is no
  recorded data/documents to build it from) and the base, whose failure stops the run as a failed shared
  stage stops a flow run; then the chosen tenants' own stages.
- A tenant whose stage fails is reported (stderr, with its traceback) and left out of its later stages;
  the other tenants go on. The failures are collected by `orchestrate.each_tenant`, as the flows' are.
- Each stage gets what `loraline <stage>` gets by default: outputs in the standard layout, the base at
  models/base, train's periodic checkpoints; `progress` draws the stages' bars.
"""

from __future__ import annotations

import functools
import sys
import time
import traceback
from collections.abc import Callable

from loraline.config import Params
from loraline.flows.orchestrate import each_tenant
from loraline.layout import TENANT_STAGES, Layout
from loraline.summary import (
    base_line,
    documents_line,
    evaluate_line,
    export_lines,
    gate_lines,
    merge_line,
    prepare_line,
    synthesize_line,
    train_line,
)

# A tenant stage: (params, layout, tenant, progress) -> the lines its command prints.
TenantStep = Callable[[Params, Layout, str, bool], list[str]]


def run_direct(
    params: Params, layout: Layout, tenants: list[str], *, progress: bool = True, echo: Callable[[str], None] = print
) -> dict[str, Exception]:
    """The whole pipeline for `tenants`, stage by stage in this process; `echo` gets each stage's report
    lines. Returns the tenants that failed, with why (empty when every one got through the gate stage)."""
    _run_shared_stages(params, layout, progress, echo)
    failures: dict[str, Exception] = {}
    for stage in TENANT_STAGES:
        if stage == "documents":  # every tenant's, run with the shared stages
            continue
        step = _prepare_step(params, layout) if stage == "prepare" else TENANT_STEPS[stage]
        _, failed = each_tenant(
            [t for t in tenants if t not in failures],
            lambda tenant, step=step: echo("\n".join(step(params, layout, tenant, progress))),
            on_failure=functools.partial(_report_failure, stage),
        )
        failures.update(failed)
    return failures


def _run_shared_stages(params: Params, layout: Layout, progress: bool, echo: Callable[[str], None]) -> None:
    from loraline import base, documents

    for name in params.tenant_names:
        echo(documents_line(name, documents.run(params, layout, name)))
    started = time.perf_counter()
    docs = [layout.documents_dir(n) for n in params.tenant_names]  # what dvc.yaml's base stage reads
    result = base.run(params, layout, docs=docs, progress=progress)
    echo(f"{base_line(result.record)} -> {result.out_dir} ({time.perf_counter() - started:.0f}s)")


def _report_failure(stage: str, tenant: str, exc: Exception) -> None:
    print(f"loraline run: {stage}[{tenant}] failed, its later stages skipped:", file=sys.stderr)
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.flush()


def _prepare_step(params: Params, layout: Layout) -> TenantStep:
    """prepare, with the base's tokenizer loaded once for every tenant (as `loraline prepare` does)."""
    import datasets

    from loraline import prepare
    from loraline.modelling.loading import load_base_tokenizer

    datasets.disable_progress_bars()  # one bar per tenant (ours) rather than one per saved split
    tokenizer = load_base_tokenizer(layout.base_dir, params.base)

    def step(params: Params, layout: Layout, tenant: str, progress: bool) -> list[str]:
        result = prepare.run(params, layout, tenant, tokenizer=tokenizer, progress=progress)
        return [prepare_line(tenant, result.stats)]

    return step


def _synthesize(params: Params, layout: Layout, tenant: str, progress: bool) -> list[str]:
    from loraline import synthesize

    return [synthesize_line(tenant, synthesize.run(params, layout, tenant, progress=progress))]


def _train(params: Params, layout: Layout, tenant: str, progress: bool) -> list[str]:
    from loraline import train
    from loraline.registry.reference import pinned_reference

    params = pinned_reference(layout.root, params, tenant)  # a DPO reference named as a registry version
    result = train.run(params, layout, tenant, checkpoints=True, progress=progress)
    return [train_line(tenant, train.train_metrics(result.record), result.timing) + f" -> {result.out_dir}"]


def _merge(params: Params, layout: Layout, tenant: str, progress: bool) -> list[str]:
    from loraline import merge

    return [merge_line(tenant, merge.run(params, layout, tenant).report, layout)]


def _export(params: Params, layout: Layout, tenant: str, progress: bool) -> list[str]:
    from loraline import export

    return export_lines(tenant, export.run(params, layout, tenant).report, layout)


def _evaluate(params: Params, layout: Layout, tenant: str, progress: bool) -> list[str]:
    from loraline import evaluate

    return [evaluate_line(tenant, evaluate.run(params, layout, tenant, progress=progress))]


def _gate(params: Params, layout: Layout, tenant: str, progress: bool) -> list[str]:
    from loraline import gate

    return gate_lines(tenant, gate.run(params, layout, tenant))  # a failed gate is a verdict, not a failure


# The tenant stages after documents, by name (prepare's is made per run: _prepare_step).
TENANT_STEPS: dict[str, TenantStep] = {
    "synthesize": _synthesize,
    "train": _train,
    "merge": _merge,
    "export": _export,
    "evaluate": _evaluate,
    "gate": _gate,
}

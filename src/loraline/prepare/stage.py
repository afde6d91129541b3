"""The prepare stage for one tenant: raw folder to a split, chat-templated, completion-masked dataset.

Documents are not split: they are unlabelled text (for continued pretraining or retrieval), not
answers to evaluate, so they live in their own dataset; they still count as kept.
Each row is checked in order: read and map (tenants.<t>.sources), shape, max_chars, PII, control
tokens, render, max_tokens, duplicate of a kept row (pass 1: first_pass.py, rows.py), then across rows
conflicting answers (prepare.conflicts), decontamination and near-duplicates (pass 2: screening.py);
synthetic rows (train only) follow the real ones, drawn in a seeded order, until the mix quota is
reached (quality/mix.py). Rows stream
through Arrow files (stores.py) and the per-row work runs in worker processes past ~8k rows
(prepare.num_proc), with the same result for any number of them. A duplicate is
only ever a duplicate of a kept row, so every row of duplicates.jsonl points at a row of the dataset.
Every input row ends kept, rejected (with a reason), a duplicate, a near-duplicate or contaminated,
and the counts are checked to add up (stats.py) before anything is written (outputs.py, which
describes the output layout).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraline.config import Params, PrepareParams, TenantParams
from loraline.io import write_json, write_timing
from loraline.layout import PREPARED_DATASET, Layout
from loraline.modelling.loading import load_base_tokenizer
from loraline.prepare.collected import Collected
from loraline.prepare.features import DOCUMENT_FEATURES, STORE_FEATURES
from loraline.prepare.first_pass import first_pass
from loraline.prepare.general import general_sample, write_general_sample
from loraline.prepare.mapping import DETECTED, SourceSpec, assign, compile_sources
from loraline.prepare.outputs import no_rows_message, write_outputs
from loraline.prepare.pool import default_workers
from loraline.prepare.quality.decontam import TestIndex
from loraline.prepare.quality.mix import mix_synthetic
from loraline.prepare.quality.near_dup import NearDuplicateIndex
from loraline.prepare.quality.pii import PII_TYPES
from loraline.prepare.readers import list_files
from loraline.prepare.render import check_tokenizer, control_tokens
from loraline.prepare.rows import RowContext, scrubber_for, source_options
from loraline.prepare.schema import SPLITS, PrepareError, PrepareStats
from loraline.prepare.screening import Quality, follow_removed_originals, second_pass
from loraline.prepare.split import Deduplicator
from loraline.prepare.stats import OUTCOMES, by_source_entry, summarize
from loraline.prepare.stores import ArrowRows, RejectFile, RejectList
from loraline.provenance import phase, run_timing

__all__ = ["PrepareResult", "collect", "prepare_tenant", "run"]

DEFAULT_SEED = 1234  # Params.seed's default, for callers passing a PrepareParams without prepare_for()


@dataclass
class PrepareResult:
    stats: PrepareStats
    out_dir: Path
    dataset_dir: Path
    documents_dir: Path
    duplicates_path: Path
    rejected_path: Path
    stats_path: Path
    contaminated_path: Path
    card_path: Path

    @classmethod
    def written(cls, stats: PrepareStats, out_dir: Path, rejected_path: Path, stats_path: Path) -> PrepareResult:
        """The result of a run that wrote out_dir (write_outputs' layout)."""
        return cls(
            stats=stats,
            out_dir=out_dir,
            dataset_dir=out_dir / PREPARED_DATASET,
            documents_dir=out_dir / "documents",
            duplicates_path=out_dir / "duplicates.jsonl",
            rejected_path=rejected_path,
            stats_path=stats_path,
            contaminated_path=out_dir / "contaminated.jsonl",
            card_path=out_dir / "README.md",
        )


def run(
    params: Params,
    layout: Layout,
    tenant: str,
    *,
    base_dir: Path | None = None,
    out_dir: Path | None = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> PrepareResult:
    """The prepare stage for one tenant: its sources (and synthesized rows, when the synthesize stage
    wrote any) into data/prepared/<tenant>, rejects into data/rejected/<tenant>.jsonl, the general-text
    sample of the forgetting check (evaluate.general) into data/general/<tenant>, the counts people
    compare into reports/<tenant>/metrics/prepare.json, the run's timing into reports/timing/."""
    started = time.perf_counter()
    if tokenizer is None:
        with phase("tokenizer"):
            tokenizer = load_base_tokenizer(base_dir or layout.base_dir, params.base)
    # Before the tenant's rows: a bad evaluate.general fails in seconds, and no output is written before it.
    with phase("general sample"):
        general = general_sample(
            params.evaluate.general, params.prepare_for(tenant), tokenizer, params.project or layout.root
        )
    result = prepare_tenant(
        params.tenant_params(tenant),
        params.prepare_for(tenant),
        tokenizer,
        out_dir=out_dir or layout.prepared_dir(tenant),
        rejected_path=layout.rejected_path(tenant),
        stats_path=layout.prepare_stats_path(tenant),
        system_prompt=params.system_prompt_for(tenant),
        synthetic_rows=layout.synthetic_rows_path(tenant),  # absent before synthesize has run: no synthetic rows
        progress=progress,
        project=params.project,
    )
    write_general_sample(general, layout.general_sample_dir(tenant))
    write_json(layout.metrics_path("prepare", tenant), prepare_metrics(result.stats))
    write_timing(layout.timing_path("prepare", tenant), run_timing(started))
    return result


def prepare_metrics(stats: PrepareStats) -> dict[str, Any]:
    """The counts worth comparing across runs (`dvc metrics diff`); the rest is in prepare_stats.json."""
    metrics = {
        **{k: getattr(stats, k) for k in ("rows_in", *OUTCOMES)},
        "split": {s: stats.splits.get(s, 0) for s in SPLITS},
    }
    if stats.pairs:  # preference pairs by split, for a tenant that has them
        metrics["pairs"] = {s: stats.pairs.get(s, 0) for s in SPLITS}
    return metrics


def prepare_tenant(
    tenant_params: TenantParams,
    params: PrepareParams,
    tokenizer,
    *,
    out_dir: Path,
    rejected_path: Path,
    stats_path: Path,
    system_prompt: str | None = None,
    synthetic_rows: Path | None = None,
    progress: bool = False,
    project: Path | None = None,
) -> PrepareResult:
    """Prepare one tenant's raw folder. `system_prompt` defaults to the tenant's, then prepare's.

    `synthetic_rows` is the synthesize stage's rows.jsonl; when it does not exist there are no
    synthetic rows (so prepare works before that stage has run).

    Rows stream through Arrow files beside out_dir, so memory does not grow with the data's size.
    Raises PrepareError (naming the files) when no row is usable; the rejects are still written so
    they can be inspected. Raises ChatTemplateError when the tokenizer's template cannot be masked.
    Raises OutsidePathError, before any row is read or written, when raw_dir or a raw file resolves
    outside `project` (raw_dir when None) and the tenant's allow_outside_dirs.
    """
    out_dir, rejected_path, stats_path = Path(out_dir), Path(rejected_path), Path(stats_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    spill = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.spill-", dir=out_dir.parent))
    try:
        rejects = RejectFile(spill / "rejected.jsonl")
        with phase("rows"):
            collected = collect(
                tenant_params,
                params,
                tokenizer,
                system_prompt=system_prompt,
                synthetic_rows=synthetic_rows,
                progress=progress,
                spill_dir=spill,
                rejects=rejects,
                project=project,
            )
        rejects.close()
        with phase("split, dedup and write"):
            _write(
                collected,
                tenant_params,
                params,
                tokenizer,
                spill=spill,
                rejects=rejects,
                out_dir=out_dir,
                rejected_path=rejected_path,
                stats_path=stats_path,
                synthetic_rows=synthetic_rows,
                progress=progress,
            )
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return PrepareResult.written(collected.stats, out_dir, rejected_path, stats_path)


def _write(
    collected: Collected,
    tenant_params: TenantParams,
    params: PrepareParams,
    tokenizer: Any,
    *,
    spill: Path,
    rejects: RejectFile,
    out_dir: Path,
    rejected_path: Path,
    stats_path: Path,
    synthetic_rows: Path | None,
    progress: bool,
) -> None:
    """The outputs of a collection that kept rows; with none kept, only the rejects (then PrepareError)."""
    stats = collected.stats
    if stats.kept == 0:
        rejected_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(rejects.path, rejected_path)
        raise PrepareError(no_rows_message(stats, collected.rejects.summary, tenant_params, rejected_path))
    write_outputs(
        collected,
        params,
        Path(tenant_params.raw_dir),
        out_dir=out_dir,
        rejected_path=rejected_path,
        stats_path=stats_path,
        spilled_rejects=rejects.path,
        synthetic_rows=synthetic_rows,
        seed=params.seed if params.seed is not None else DEFAULT_SEED,
        progress=progress,
        tokenizer=tokenizer,
        spill_dir=spill,
    )


def collect(
    tenant_params: TenantParams,
    params: PrepareParams,
    tokenizer,
    *,
    system_prompt: str | None = None,
    synthetic_rows: Path | None = None,
    progress: bool = False,
    spill_dir: Path | None = None,
    rejects: RejectList | RejectFile | None = None,
    project: Path | None = None,
) -> Collected:
    """Read, scrub, deduplicate, decontaminate, render, split and mix every row of the tenant.

    Pass 1 streams the real rows in batches (read, map, shape, max_chars, PII, control tokens, render,
    max_tokens, then exact duplicates in row order) into a candidates store, adding test rows to the
    decontamination index. Pass 2 reads the candidates back in the same order: decontamination against
    the test split, then near-duplicates. Then the synthetic rows, in their seeded draw, through the
    same steps until the mix quota is reached. With `spill_dir` rows are kept in Arrow files there
    (bounded memory), else in lists. Every raw source must resolve inside `project` (raw_dir when None)
    or the tenant's allow_outside_dirs: a symlink out of it is refused before any row is read.
    """
    raw_dir = Path(tenant_params.raw_dir)
    files = _raw_files(tenant_params, raw_dir, project)
    check_tokenizer(tokenizer)
    if system_prompt is None:
        system_prompt = (
            tenant_params.system_prompt if tenant_params.system_prompt is not None else params.system_prompt
        )

    scrubber = scrubber_for(params)
    out = _collected(tenant_params.name, rejects, scrubber, spill_dir)
    rows_in = {rel: 0 for _, rel in files}
    seed = params.seed if params.seed is not None else DEFAULT_SEED
    controls = control_tokens(tokenizer)
    ctx = RowContext(
        tenant_params.name,
        params,
        tokenizer,
        system_prompt,
        Deduplicator(),
        controls,
        scrubber,
        options=source_options(DETECTED, params, controls, tokenizer),
    )
    q = _quality(params, seed)

    specs = compile_sources(tenant_params.sources)
    assigned = assign(files, specs)
    workers = params.num_proc or default_workers()
    first_pass(
        out, q, ctx, assigned, specs, rows_in, to_arrow=spill_dir is not None, workers=workers, progress=progress
    )
    second_pass(out, q, workers)

    if synthetic_rows is not None and Path(synthetic_rows).is_file():
        mix_synthetic(out, Path(synthetic_rows), ctx, q, seed, rows_in)
    follow_removed_originals(out, q.conflicted)
    _finish_stats(out, q, ctx, raw_dir, tokenizer, rows_in, assigned)
    return out


def _raw_files(tenant_params: TenantParams, raw_dir: Path, project: Path | None) -> list[tuple[Path, str]]:
    """The tenant's raw files, refused when raw_dir is missing or empty or a file resolves outside `project`."""
    if project is not None:
        tenant_params.check_raw_dir(project, read_as=raw_dir)  # as load_params did, for the path read from here
    if not raw_dir.is_dir():
        raise PrepareError(
            f"tenant {tenant_params.name!r}: raw folder {raw_dir} does not exist (tenants[].raw_dir in params.yaml)"
        )
    files = list_files(raw_dir)
    if not files:
        raise PrepareError(
            f"tenant {tenant_params.name!r}: raw folder {raw_dir} holds no files (hidden files are skipped)"
        )
    tenant_params.check_sources(files, project)
    return files


def _collected(
    tenant: str, rejects: RejectList | RejectFile | None, scrubber: Any, spill_dir: Path | None
) -> Collected:
    """An empty collection: rows in Arrow files under `spill_dir` (bounded memory), else in lists."""
    out = Collected(
        stats=PrepareStats(tenant=tenant), rejects=rejects if rejects is not None else RejectList(), scrubber=scrubber
    )
    if spill_dir is not None:
        out.splits = {s: ArrowRows(Path(spill_dir) / f"{s}.arrow", STORE_FEATURES) for s in SPLITS}
        out.documents = ArrowRows(Path(spill_dir) / "documents.arrow", DOCUMENT_FEATURES)
    return out


def _quality(params: PrepareParams, seed: int) -> Quality:
    """Pass 2's state: the test split's n-gram index and the near-duplicate index, each when enabled."""
    return Quality(
        TestIndex(params.decontamination) if params.decontamination.enabled else None,
        NearDuplicateIndex(params.near_dedup, seed=seed) if params.near_dedup.enabled else None,
        conflicts=params.conflicts,
        group_min_chars=params.group_min_chars,
    )


def _finish_stats(
    out: Collected,
    q: Quality,
    ctx: RowContext,
    raw_dir: Path,
    tokenizer: Any,
    rows_in: dict[str, int],
    assigned: list[tuple[Path, str, SourceSpec]],
) -> None:
    """The counts gathered along the way (conflicts, groups, PII) and the summary of every row's outcome."""
    stats = out.stats
    stats.conflicting_answers, stats.conflicting_prompts = q.conflicting_rows, len(q.repeats)
    stats.groups = q.group_stats()
    stats.pii = {kind: ctx.pii.get(kind, 0) for kind in sorted(PII_TYPES)}
    stats.pii_rows = ctx.pii_rows[0]
    summarize(out, raw_dir, tokenizer, rows_in)
    stats.sources = by_source_entry(stats, [(rel, spec) for _, rel, spec in assigned])

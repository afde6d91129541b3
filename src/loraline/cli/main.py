"""`loraline` command line: one sub-command per stage, plus `run` for the whole pipeline.

The stage commands are what dvc.yaml runs; `run` drives `dvc repro` (DVC decides what is stale and
records lineage), or calls the same stage functions directly with --no-dvc.
Heavy libraries are imported inside the commands so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from loraline.cli.feedback import add_feedback_parser
from loraline.cli.registry import add_registry_parser
from loraline.cli.serve import add_serve_parser
from loraline.config import ConfigError, Params, load_params
from loraline.dvcfiles import lock_paths, pipeline_problems, sync_pipelines
from loraline.flows.orchestrate import WorkspaceBusy, workspace_lock
from loraline.layout import EXPORT_REPORT, Layout, stage_id
from loraline.records import ExportReport
from loraline.summary import (
    base_line,
    collect_summary,
    documents_line,
    evaluate_line,
    export_lines,
    gate_lines,
    merge_line,
    prepare_line,
    render_text,
    synthesize_line,
    tenant_failures,
    train_line,
)

# `loraline run` while another holds the workspace: a temporary failure, worth trying again (sysexits' EX_TEMPFAIL).
EXIT_BUSY = 75


def _parse_set(values: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--set expects KEY=VALUE with a dotted key (e.g. base.build.max_steps=50), got {item!r}"
            )
        out[key] = yaml.safe_load(raw)
    return out


def _load(args: argparse.Namespace) -> Params:
    return load_params(args.params, overrides=_parse_set(args.set))


def _tenants(params: Params, chosen: list[str] | None) -> list[str]:
    if not chosen:
        return params.tenant_names
    for name in chosen:
        params.tenant_params(name)  # raises ConfigError naming the known tenants
    return chosen


# -- stage commands ---------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    params = _load(args)
    from loraline.registry.lineage import check_artifacts_declared

    root = Path(args.params).resolve().parent
    check_artifacts_declared(root, params, if_present=True)
    if (root / "dvc.yaml").is_file():
        problems = pipeline_problems(root, params.tenant_names)
        if problems:
            raise ConfigError("the tenants' dvc.yaml files are out of date:\n  " + "\n  ".join(problems))
    print(f"{args.params}: valid")
    print(f"  base: {params.base.model or 'built offline (base.build)'}")
    for name in params.tenant_names:
        t = params.tenant_params(name)
        train = params.train_for(name)
        print(
            f"  tenant {name}: raw_dir={t.raw_dir} quantization={train.quantization} "
            f"r={train.lora_r} overrides: train={sorted(t.train) or '-'} gate={sorted(t.gate) or '-'}"
        )
        for source in t.sources:
            mapped = ", ".join(f"{k}<-{v!r}" for k, v in source.columns.items()) or "shape detection"
            extra = "".join(
                f" {k}={getattr(source, k)}" for k in ("format", "explode", "control_tokens") if getattr(source, k)
            )
            print(f"    source {source.path}:{extra} {mapped}" + (f" roles={source.roles}" if source.roles else ""))
    return _check_dvc_cache(Path(args.params).resolve().parent)


def cmd_pipelines(args: argparse.Namespace) -> int:
    """Render pipelines/tenant.yaml into each tenant's pipelines/<tenant>/dvc.yaml (see loraline.dvcfiles)."""
    params = _load(args)
    root = Path(args.params).resolve().parent
    change = sync_pipelines(root, params.tenant_names, dry_run=args.check)
    print(change.describe())
    return 1 if args.check and (change.written or change.removed) else 0


def _check_dvc_cache(root: Path) -> int:
    """Re-hash the cache files dvc.lock's outputs point at (when the project has run): 1 when one is corrupted."""
    if not (lock_paths(root) and (root / ".dvc").is_dir()):
        return 0
    from loraline.flows.cache import QUARANTINE, check_cache

    check = check_cache(root)
    print(check.summary())
    if check.ok:
        return 0
    for bad in check.corrupt:
        print(f"loraline check: error: {bad.describe(root)}", file=sys.stderr)
    print(
        f"loraline check: to repair, `loraline run` restores each from its workspace copy when that is intact, else "
        f"moves it aside ({QUARANTINE}/) so that DVC pulls or rebuilds it; or by hand: delete the cache file, then "
        "`dvc pull` (from the remote) or `dvc repro <stage>` (rebuilds it)",
        file=sys.stderr,
    )
    return 1


def cmd_documents(args: argparse.Namespace) -> int:
    from loraline import documents

    params, layout = _load(args), Layout()
    names = _tenants(params, args.tenant)
    _one_tenant_for_out(args, names)
    for name in names:
        print(documents_line(name, documents.run(params, layout, name, out_dir=Path(args.out) if args.out else None)))
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from loraline import synthesize

    params, layout = _load(args), Layout()
    for name in _tenants(params, args.tenant):
        print(synthesize_line(name, synthesize.run(params, layout, name, progress=not args.quiet)))
    return 0


def cmd_base(args: argparse.Namespace) -> int:
    from loraline import base

    params, layout = _load(args), Layout()
    started = time.perf_counter()
    result = base.run(
        params,
        layout,
        docs=[Path(d) for d in args.docs or []],
        out_dir=Path(args.out) if args.out else None,
        progress=not args.quiet,
    )
    print(f"{base_line(result.record)} -> {result.out_dir} ({time.perf_counter() - started:.0f}s)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import datasets

    from loraline import prepare
    from loraline.modelling.loading import load_base_tokenizer

    datasets.disable_progress_bars()  # one bar per tenant (ours) rather than one per saved split

    params, layout = _load(args), Layout()
    names = _tenants(params, args.tenant)
    _one_tenant_for_out(args, names)
    tokenizer = load_base_tokenizer(
        Path(args.base) if args.base else layout.base_dir, params.base
    )  # once for all tenants
    for name in names:
        result = prepare.run(
            params,
            layout,
            name,
            out_dir=Path(args.out) if args.out else None,
            tokenizer=tokenizer,
            progress=not args.quiet,
        )
        print(prepare_line(name, result.stats))
    return 0


def _one_tenant_for_out(args: argparse.Namespace, names: list[str]) -> None:
    if args.out and len(names) > 1:
        raise ConfigError("--out names one tenant's folder: pass exactly one --tenant with it")


def cmd_inspect(args: argparse.Namespace) -> int:
    from loraline.inspection import default_cleaner, inspect_path, report_text

    path = Path(args.path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    params, layout = _load(args), Layout()
    tokenizer = None
    base_dir = Path(args.base) if args.base else layout.base_dir
    if params.base.model or (base_dir / "config.json").is_file():
        from loraline.modelling.loading import load_base_tokenizer

        tokenizer = load_base_tokenizer(base_dir, params.base)
    else:
        print(f"(no base model at {base_dir} yet: samples use loraline's ChatML template)")
    root = None
    for name in params.tenant_names:  # suggested globs relative to the tenant's raw_dir when PATH is inside it
        raw_dir = params.tenant_params(name).raw_dir.resolve()
        if path.resolve() == raw_dir or raw_dir in path.resolve().parents:
            root = raw_dir
    results = inspect_path(path.resolve(), root, clean=default_cleaner(tokenizer))
    print(report_text(results, tokenizer, color=sys.stdout.isatty()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from loraline import train
    from loraline.registry.reference import pinned_reference

    params, layout = _load(args), Layout()
    for name in _tenants(params, args.tenant):
        result = train.run(
            pinned_reference(layout.root, params, name),  # a DPO reference named as a registry version: fetched
            layout,
            name,
            base_dir=Path(args.base) if args.base else None,
            checkpoints=not args.no_checkpoints,
            progress=not args.quiet,
        )
        print(train_line(name, train.train_metrics(result.record), result.timing) + f" -> {result.out_dir}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from loraline import merge

    params, layout = _load(args), Layout()
    for name in _tenants(params, args.tenant):
        report = merge.run(params, layout, name, base_dir=Path(args.base) if args.base else None).report
        print(merge_line(name, report, layout))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from loraline import export

    params, layout = _load(args), Layout()
    for name in _tenants(params, args.tenant):
        print("\n".join(export_lines(name, export.run(params, layout, name).report, layout)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from loraline import evaluate

    params, layout = _load(args), Layout()
    for name in _tenants(params, args.tenant):
        result = evaluate.run(
            params, layout, name, base_dir=Path(args.base) if args.base else None, progress=not args.quiet
        )
        print(evaluate_line(name, result))
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from loraline import gate

    params, layout = _load(args), Layout()
    failed = []
    for name in _tenants(params, args.tenant):
        decision = gate.run(params, layout, name)
        print("\n".join(gate_lines(name, decision)))
        if not decision.passed:
            failed.append(name)
    if failed and args.strict:
        print(f"loraline gate: failed for {', '.join(failed)}", file=sys.stderr)
        return 3
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from loraline.export.runtime import OnnxGenerator

    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    messages.append({"role": "user", "content": prompt})
    gen = OnnxGenerator(args.onnx, model_file=_graph_file(args))
    print(
        gen.generate(
            messages,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    )
    return 0


def _graph_file(args: argparse.Namespace) -> str:
    """Which graph of an export folder `generate` runs: --graph (export.graphs' names), --int8 (= --graph
    int8), or a QA-LoRA model's own low-bit one; fp32 by default."""
    from loraline.export.runtime import GRAPH_FILES

    chosen = [flag for flag, on in (("--graph", args.graph), ("--int8", args.int8), ("--lowbit", args.lowbit)) if on]
    if len(chosen) > 1:
        raise SystemExit(f"loraline generate: choose one of {', '.join(chosen)}")
    if args.lowbit:
        report = Path(args.onnx) / EXPORT_REPORT
        low = ExportReport.read(report).lowbit if report.is_file() else None
        if not low or not low.file:
            raise SystemExit(
                f"loraline generate: {args.onnx} has no low-bit graph (--lowbit is for a merged QA-LoRA "
                "model's export, train.method: qalora)"
            )
        return low.file
    graph = "int8" if args.int8 else args.graph or "fp32"
    if not (Path(args.onnx) / GRAPH_FILES[graph]).is_file():
        have = [g for g, f in GRAPH_FILES.items() if (Path(args.onnx) / f).is_file()]
        raise SystemExit(
            f"loraline generate: {args.onnx} has no {graph} graph ({GRAPH_FILES[graph]}); it has: "
            f"{', '.join(have) or 'none'} (export.graphs in params.yaml says which are written)"
        )
    return GRAPH_FILES[graph]


# -- whole pipeline ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # The whole pipeline runs from the project root (where dvc.yaml is), whichever folder of the
    # project it was started in; a relative --params path stays relative to where it was typed.
    root = _project_root()
    if not Path(args.params).is_file() and args.params == "params.yaml":
        args.params = str(root / "params.yaml")
    args.params = str(Path(args.params).resolve())
    os.chdir(root)
    params = _load(args)
    tenants = _tenants(params, args.tenant)
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {args.parallel}")
    if args.set and not args.no_dvc:
        raise ConfigError("--set does not apply to a DVC run; use `dvc exp run -S key=value` or edit params.yaml")
    with workspace_lock(
        root, wait=args.wait, on_wait=lambda line: print(f"loraline run: {line}", file=sys.stderr, flush=True)
    ):
        return _run_holding_the_workspace(args, params, tenants, started)


def _run_holding_the_workspace(args: argparse.Namespace, params: Params, tenants: list[str], started: float) -> int:
    error = None
    if args.no_dvc:
        from loraline.flows.direct import run_direct

        error = tenant_failures(run_direct(params, Layout(), tenants, progress=not args.quiet)) or None
    else:
        change = sync_pipelines(Path.cwd(), params.tenant_names)  # params.yaml's tenants, each with its dvc.yaml
        if change.written or change.removed:
            print(change.describe(), flush=True)
        _repair_dvc_cache(Path.cwd())
        if not args.force and _every_stage_up_to_date(tenants):
            error = _release_without_stages(args, params, tenants)
        elif args.no_prefect:
            error = _run_without_prefect(args, params, tenants)
        else:
            error = _run_flow(args, tenants)
    print(render_text(collect_summary(load_params(args.params), tenants=tenants), time.perf_counter() - started))
    if error:
        print(f"loraline run: failed: {error}", file=sys.stderr)
        return 1
    return 0


def _repair_dvc_cache(root: Path) -> None:
    """Before DVC relies on its cache: a corrupted cache file is named and repaired (restored from the
    workspace copy, else moved aside so that DVC pulls or rebuilds it), never silently rebuilt. Only
    files changed since they were last verified are re-hashed (`loraline check` re-hashes all)."""
    from loraline.flows.cache import check_cache, repair

    if not lock_paths(root):
        return
    check = check_cache(root, incremental=True)
    print(check.summary(), flush=True)
    for bad in check.corrupt:
        print(f"loraline run: warning: {bad.describe(root)}", file=sys.stderr)
    for line in repair(check):
        print(f"loraline run: {line}", file=sys.stderr, flush=True)


def _run_without_prefect(args: argparse.Namespace, params: Params, tenants: list[str]) -> str | None:
    from loraline.flows.orchestrate import run_stages_in_parallel
    from loraline.flows.repro import reproduce

    parallel = args.parallel or params.orchestrate.parallel_tenants
    failures: dict[str, Exception] = {}
    if parallel > 1:
        ran, failures = run_stages_in_parallel(
            _project_root(), tenants, parallel, force=args.force, push=not args.no_push
        )
    else:
        targets = None if tenants == params.tenant_names else [stage_id("gate", t) for t in tenants]
        ran = reproduce(force=args.force, push=not args.no_push, targets=targets)
    print(f"dvc repro: {len(ran)} stage(s) ran" + (f": {', '.join(ran)}" if ran else " (everything up to date)"))
    _release(args, params, [t for t in tenants if t not in failures])
    return tenant_failures(failures) or None


def _every_stage_up_to_date(tenants: list[str]) -> bool:
    """Whether DVC finds every stage the tenants need up to date: one status of them all in this process
    (about a second), where running each through `dvc repro --single-item` would start 17 processes
    (about 16 s) only to skip them, and the flow would start Prefect's server for nothing (about 8 s)."""
    from loraline.flows.orchestrate import plan_stages
    from loraline.registry.consistency import dvc_status

    started = time.perf_counter()
    stages = plan_stages(_project_root(), tenants).all
    stale, _ = dvc_status(_project_root(), stages)
    if stale:
        return False
    print(
        f"loraline run: all {len(stages)} stages up to date (DVC status, {time.perf_counter() - started:.1f}s): "
        "nothing to run, so no Prefect flow run; pushing and releasing",
        flush=True,
    )
    return True


def _release_without_stages(args: argparse.Namespace, params: Params, tenants: list[str]) -> str | None:
    """What a flow run does after its stages, when none had to run: push the outputs (an earlier run's
    push may have failed) and release each tenant (an earlier run may not have promoted)."""
    from loraline.flows.orchestrate import push_outputs

    try:
        if not args.no_push:
            push_outputs(_project_root())
        _release(args, params, tenants)
    except Exception as exc:  # as a failed flow run: the summary below still shows where each tenant stands
        return str(exc)
    return None


def _release(args: argparse.Namespace, params: Params, tenants: list[str]) -> None:
    """Register each tenant's outputs and promote them when the gate allows, as the flow's release step does
    (a running `loraline serve` on this machine told of each promotion)."""
    from loraline import release
    from loraline.flows.orchestrate import project_lock
    from loraline.serve.server import notify as notify_serving

    for name in tenants:
        with project_lock(Path.cwd(), "registry"):  # a concurrent run's release may be writing tags
            result = release.run(params, Layout(), name, promote=not args.no_promote)
        print(f"release[{name}]: {result.reason}")
        if result.promoted and (served := notify_serving(params)) is not None:
            print(f"release[{name}]: serving told of {result.version}: {served}")


def _run_flow(args: argparse.Namespace, tenants: list[str]) -> str | None:
    """The Prefect flow (loraline.flows.pipeline); with no PREFECT_API_URL set, Prefect starts a
    temporary local server for the run (the embedded default)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from loraline.flows.pipeline import pipeline

    try:
        pipeline(
            tenants=args.tenant,
            project_dir=str(_project_root()),
            promote=not args.no_promote,
            push=not args.no_push,
            force=args.force,
            parallel=args.parallel,
        )
    except Exception as exc:  # the flow run holds the details; the summary below still shows what finished
        return str(exc)
    return None


def _project_root() -> Path:
    """The folder holding dvc.yaml: this one or the nearest above it (like git and dvc find theirs)."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml in {here} or any folder above it: run inside a loraline project")


# -- argument parsing -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraline",
        description="Raw data to gated, versioned LoRA/QLoRA adapters. Settings come from params.yaml.",
    )
    common, tenant = _common_options(), _tenant_option()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("check", parents=[common], help="validate params.yaml and show each tenant's resolved settings")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser(
        "pipelines",
        parents=[common],
        help="write each tenant's pipelines/<tenant>/dvc.yaml from pipelines/tenant.yaml (after adding a tenant)",
    )
    p.add_argument("--check", action="store_true", help="only say what would change; exit 1 if anything would")
    p.set_defaults(func=cmd_pipelines)
    _add_data_commands(sub, common, tenant)
    _add_model_commands(sub, common, tenant)
    add_registry_parser(sub)
    add_serve_parser(sub, common)
    add_feedback_parser(sub, common)
    _add_generate_command(sub)
    _add_run_command(sub, common, tenant)
    return parser


def _common_options() -> argparse.ArgumentParser:
    """--params, --set and --quiet: every command that reads params.yaml takes them."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="the params file to read (default: params.yaml)")
    common.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one param for this command only, dotted key, YAML value (repeatable), "
        "e.g. --set base.build.max_steps=50",
    )
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return common


def _tenant_option() -> argparse.ArgumentParser:
    tenant = argparse.ArgumentParser(add_help=False)
    tenant.add_argument(
        "--tenant", action="append", help="run for this tenant only (repeatable; default: every tenant)"
    )
    return tenant


def _add_base_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model folder written by `loraline base` (default: models/base)")


def _add_data_commands(sub: Any, common: argparse.ArgumentParser, tenant: argparse.ArgumentParser) -> None:
    """The stages up to the prepared dataset (documents, synthesize, base, prepare), and `inspect`."""
    p = sub.add_parser("documents", parents=[common, tenant], help="collect each tenant's plain documents (.txt/.md)")
    p.add_argument("--out", help="output folder (default: data/documents/<tenant>; one tenant only)")
    p.set_defaults(func=cmd_documents)

    p = sub.add_parser(
        "synthesize", parents=[common, tenant], help="generate instruction/answer rows from each tenant's documents"
    )
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser(
        "base", parents=[common], help="build the offline base model, or validate and record base.model"
    )
    p.add_argument(
        "--docs",
        nargs="+",
        metavar="DIR",
        help="folders of documents for pretraining (default: the tenants' raw folders)",
    )
    p.add_argument("--out", help="output folder (default: models/base)")
    p.set_defaults(func=cmd_base)

    p = sub.add_parser(
        "prepare", parents=[common, tenant], help="raw files to a clean, deduplicated, split, chat-templated dataset"
    )
    _add_base_option(p)
    p.add_argument("--out", help="output folder (default: data/prepared/<tenant>; one tenant only)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="what a raw file or folder holds, row shapes, a suggested sources: entry, rendered samples",
    )
    p.add_argument("path", help="a raw file, a save_to_disk folder, or a folder of them")
    p.add_argument("--base", help="base model folder whose chat template renders the samples (default: models/base)")
    p.set_defaults(func=cmd_inspect)


def _add_model_commands(sub: Any, common: argparse.ArgumentParser, tenant: argparse.ArgumentParser) -> None:
    """The stages from the adapter to the promotion decision: train, merge, export, evaluate, gate."""
    p = sub.add_parser(
        "train", parents=[common, tenant], help="train each tenant's LoRA/QLoRA adapter on its prepared train split"
    )
    _add_base_option(p)
    p.add_argument(
        "--no-checkpoints", action="store_true", help="write no periodic checkpoints (a killed run then starts over)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "merge",
        parents=[common, tenant],
        help="merge each adapter into a full-precision base and prove it behaves the same",
    )
    _add_base_option(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "export", parents=[common, tenant], help="export each merged model to ONNX with the KV cache and prove parity"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "evaluate",
        parents=[common, tenant],
        help="evaluate base, candidate and production on each tenant's test split",
    )
    _add_base_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "gate",
        parents=[common, tenant],
        help="decide promotion from the evaluation and parity reports (writes gate.json)",
    )
    p.add_argument("--strict", action="store_true", help="exit with status 3 when a tenant's gate fails")
    p.set_defaults(func=cmd_gate)


def _add_generate_command(sub: Any) -> None:
    p = sub.add_parser("generate", help="chat with an exported model through plain onnxruntime (KV cache reused)")
    p.add_argument(
        "--onnx",
        required=True,
        metavar="DIR",
        help="export folder written by `loraline export` (e.g. models/onnx/<tenant>)",
    )
    p.add_argument("--prompt", help="the user message (default: read from standard input)")
    p.add_argument("--system", help="an optional system message")
    p.add_argument(
        "--graph",
        choices=["fp32", "fp16", "int8", "int4"],
        help="which graph of the folder to run (export.graphs; default fp32)",
    )
    p.add_argument("--int8", action="store_true", help="same as --graph int8 (model.int8.onnx)")
    p.add_argument(
        "--lowbit",
        action="store_true",
        help="use a QA-LoRA model's own low-bit graph (model.int<bits>.onnx, onnxruntime MatMulNBits)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.set_defaults(func=cmd_generate)


def _add_run_command(sub: Any, common: argparse.ArgumentParser, tenant: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run",
        parents=[common, tenant],
        help="the whole pipeline: DVC stages through the Prefect flow, "
        "then register and promote each tenant's adapter",
    )
    p.add_argument("--no-prefect", action="store_true", help="run `dvc repro` and release directly, without Prefect")
    p.add_argument(
        "--no-dvc", action="store_true", help="call the stages directly: no DVC caching or lineage, no registry"
    )
    p.add_argument("--no-promote", action="store_true", help="register new versions but leave production as it is")
    p.add_argument("--force", action="store_true", help="re-run every stage even when DVC finds it up to date")
    p.add_argument("--no-push", action="store_true", help="do not push outputs to the DVC remote")
    p.add_argument(
        "--wait",
        action="store_true",
        help="when another `loraline run` holds this workspace, wait for it to end "
        f"(default: exit at once with status {EXIT_BUSY}, naming its pid)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="run up to N tenants' stages at once, each on an equal share of the "
        "visible GPUs (default: orchestrate.parallel_tenants); the outputs are those of a sequential run",
    )
    p.set_defaults(func=cmd_run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"loraline: configuration error: {exc}", file=sys.stderr)
        return 2
    except WorkspaceBusy as exc:
        print(f"loraline {args.command}: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (FileNotFoundError, ValueError) as exc:
        print(f"loraline {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        line = _write_error_line(exc)
        if line is None:
            raise
        print(f"loraline {args.command}: error: {line}", file=sys.stderr)
        return 1
    except Exception as exc:
        from dvc.exceptions import DvcException

        if not isinstance(exc, DvcException):
            raise
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        print(f"loraline {args.command}: dvc: {exc}{cause}; the stage's own error is printed above", file=sys.stderr)
        return 1


def _write_error_line(exc: OSError) -> str | None:
    """`cannot write <path>: <reason>` for an output that could not be written (loraline.io's WriteError,
    or a library's own write failing for lack of space or a read-only disk); None for any other OSError,
    whose traceback is worth seeing."""
    from loraline.io import WRITE_ERRNOS, WriteError

    if isinstance(exc, WriteError):
        return str(exc)
    if exc.errno in WRITE_ERRNOS:
        return f"cannot write {exc.filename or '(a file)'}: {exc.strerror or exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())

"""Tenants in parallel: two tenants' GPU stages on 2 GPUs at once against the same two one after another on 1.

The workload is the project's own: the base and each tenant's prepared dataset are built first (in a
scratch copy of the layout, untimed), then each tenant's chain of GPU stages runs as the commands
dvc.yaml runs (`loraline train|merge|evaluate --tenant T`), each in its own process:

    sequential   tenant A's chain, then tenant B's, both on GPU 0
    parallel     both chains at once, through the same scheduler `loraline run --parallel 2` uses
                 (flows.orchestrate.run_chains: one device slot per tenant, CUDA_VISIBLE_DEVICES)

DVC itself is left out (its bookkeeping is seconds, the same in both), so the ratio is the
scheduling gain alone. --max-steps caps each tenant's training so that the bench fits a short slot;
the ratio is what matters, not the absolute time.

    python bench/parallel_tenants.py --max-steps 300 --eval-examples 32

Needs 2 GPUs. Prints one JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("train", "merge", "evaluate")


def stage_cmd(stage: str, tenant: str, params: Path, max_steps: int | None, eval_examples: int | None) -> list[str]:
    cmd = [
        sys.executable,
        "-c",
        "import sys; from loraline.cli.main import main; sys.exit(main())",
        stage,
        "--tenant",
        tenant,
        "--params",
        str(params),
        "-q",
    ]
    if max_steps:
        cmd += ["--set", f"train.max_steps={max_steps}"]
    if stage == "evaluate" and eval_examples:
        cmd += ["--set", f"evaluate.max_examples={eval_examples}"]
    return cmd


def run_chain(
    workdir: Path, params: Path, tenant: str, env: dict[str, str], max_steps: int | None, eval_examples: int | None
) -> dict:
    started, times = time.perf_counter(), {}
    for stage in STAGES:
        t0 = time.perf_counter()
        done = subprocess.run(
            stage_cmd(stage, tenant, params, max_steps, eval_examples),
            cwd=workdir,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"{stage} --tenant {tenant} failed:\n{done.stderr[-3000:]}")
        times[stage] = round(time.perf_counter() - t0, 1)
        print(f"  {tenant} {stage} on GPU {env.get('CUDA_VISIBLE_DEVICES')}: {times[stage]} s", flush=True)
    return {
        "tenant": tenant,
        "wall_s": round(time.perf_counter() - started, 1),
        "stages_s": times,
        "gpus": env.get("CUDA_VISIBLE_DEVICES"),
    }


def prepare_workdir(workdir: Path) -> Path:
    """A copy of the project's params and raw data, with the base and prepared datasets built."""
    from loraline import base, documents, prepare, synthesize
    from loraline.config import load_params
    from loraline.layout import Layout

    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "data/raw"):
        src, dst = ROOT / name, workdir / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    os.chdir(workdir)
    params = load_params(workdir / "params.yaml")
    layout = Layout(workdir)
    for tenant in params.tenant_names:
        documents.run(params, layout, tenant)
    base.run(params, layout, docs=[layout.documents_dir(t) for t in params.tenant_names])
    for tenant in params.tenant_names:
        synthesize.run(params, layout, tenant)
        prepare.run(params, layout, tenant)
    return workdir / "params.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loraline-parallel-bench"))
    ap.add_argument(
        "--max-steps", type=int, default=300, help="cap on each tenant's optimizer steps (0: the params' own)"
    )
    ap.add_argument("--eval-examples", type=int, default=32, help="test rows evaluate generates per model (0: all)")
    ap.add_argument("--out", help="append the results as JSON lines to this file")
    a = ap.parse_args()

    import torch

    from loraline.flows.orchestrate import run_chains, visible_gpus

    gpus = visible_gpus()
    if len(gpus) < 2:
        sys.exit(f"needs 2 GPUs, sees {len(gpus)} ({torch.cuda.device_count()} by torch)")
    t0 = time.perf_counter()
    params = prepare_workdir(a.workdir)
    print(json.dumps({"prepared_s": round(time.perf_counter() - t0, 1)}), flush=True)
    from loraline.config import load_params

    tenants = load_params(params).tenant_names[:2]
    steps = a.max_steps or None

    started = time.perf_counter()
    sequential = [
        run_chain(a.workdir, params, t, {"CUDA_VISIBLE_DEVICES": gpus[0]}, steps, a.eval_examples) for t in tenants
    ]
    seq_s = time.perf_counter() - started

    started = time.perf_counter()
    results, failures = run_chains(
        a.workdir,
        {t: list(STAGES) for t in tenants},
        2,
        lambda t, stages, env: run_chain(a.workdir, params, t, env, steps, a.eval_examples),
    )
    par_s = time.perf_counter() - started
    if failures:
        sys.exit(f"parallel run failed: {failures}")

    rows = [
        {"mode": "sequential", "gpus": 1, "wall_s": round(seq_s, 1), "chains": sequential},
        {"mode": "parallel", "gpus": 2, "wall_s": round(par_s, 1), "chains": list(results.values())},
    ]
    summary = {
        "bench": "parallel_tenants",
        "tenants": tenants,
        "max_steps": steps,
        "sequential_s": round(seq_s, 1),
        "parallel_s": round(par_s, 1),
        "speedup": round(seq_s / par_s, 2),
        "gpu": torch.cuda.get_device_name(0),
    }
    for r in [*rows, summary]:
        print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "a") as fh:
            for r in [*rows, summary]:
                fh.write(json.dumps(r) + "\n")
    print()
    print("| mode | GPUs | wall s | per tenant (train / merge / evaluate s) |")
    print("|---|---|---|---|")
    for r in rows:
        per = "; ".join(
            f"{c['tenant']}: {c['wall_s']} ({' / '.join(str(v) for v in c['stages_s'].values())})" for c in r["chains"]
        )
        print(f"| {r['mode']} | {r['gpus']} | {r['wall_s']} | {per} |")
    print(f"\nspeedup (sequential / parallel): {summary['speedup']}x  (goal >= 1.8x)")


if __name__ == "__main__":
    main()

"""Which adapter recipe learns a tenant's task: held-out accuracy per JSON field, per variant.

The lever search behind the sample tenants' `train` overrides (docs/default-model.md: what the default model can
and cannot do). Every variant starts from the project's own outputs of a finished run (the built
base, the tenants' documents, synthetic rows, prepared datasets and general-text samples, as `make run` leaves them),
copied into a scratch folder, then runs the real base stage (only when a variant overrides `base.*`:
the base is rebuilt from data/documents, as dvc.yaml's base stage does), prepare (only when a variant overrides
`prepare.*`, `tenants.*.synthetic_ratio` or `tenants.*.raw_dir`), train, merge and evaluate stages
with params.yaml plus the variant's dotted overrides, and reads the evaluate stage's own metrics
(general_loss too: what the recipe forgets).
A `raw_dir` variant compares data sizes, e.g. a folder written by
`python tools/make_sample_data.py --out exp/raw400 --acme-q2-rows 400`.

    python bench/adapter_recipes.py --tenant acme-shop \
        --variant default='{}' \
        --variant tied-embeddings='{"tenants.acme-shop.train.modules_to_save": ["embed_tokens"]}'

Prints one JSON line per variant, then a table. Variants run one after another, or `--jobs N` at
once (a GPU machine: each process trains on the GPU with a few CPU threads). Minutes per variant on
2 CPU cores; compare variants measured on the same kind of machine (CPU and CUDA arithmetic differ).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

FIELDS_SHOWN = 6


def run_variant(
    project: str, params_path: str, tenant: str, name: str, overrides: dict[str, Any], scratch: str
) -> dict[str, Any]:
    from loraline import evaluate, merge, prepare, train
    from loraline.config import load_params
    from loraline.layout import Layout

    source, root = Layout(Path(project)), Path(scratch) / name
    rebuild_base = any(key.startswith("base.") for key in overrides)
    folders = [
        source.documents_dir(tenant),
        source.synthetic_dir(tenant),
        source.prepared_dataset_dir(tenant).parent,
        source.general_sample_dir(tenant),
    ]
    for folder in folders + ([] if rebuild_base else [source.base_dir]):
        if not folder.exists():
            raise SystemExit(
                f"{folder} is missing: run `make run` (or `dvc repro`) first; variants start from its outputs"
            )
        shutil.copytree(folder, root / folder.relative_to(project))
    # The merge's extra checks (4-bit reference, reload) guard releases, not a recipe comparison.
    params = load_params(
        params_path, overrides={"merge.quantized_reference": False, "merge.check_reload": False, **overrides}
    )
    layout = Layout(root)
    base_s = None
    if rebuild_base:
        from loraline import base

        started = time.perf_counter()
        # As dvc.yaml's base stage does: every tenant's documents, from data/documents. The base also
        # reads this Python's stdlib docstrings: another Python version builds another base.
        base.run(params, layout, docs=[source.documents_dir(params.tenant_names[0]).parent])
        base_s = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    # A rebuilt base has its own tokenizer (its corpus includes this Python's stdlib docstrings), so
    # the prepared token counts and limits are redone with it.
    if rebuild_base or any(
        key.startswith("prepare.") or key.endswith((".synthetic_ratio", ".raw_dir")) for key in overrides
    ):
        prepare.run(params, layout, tenant)
    trained = train.run(params, layout, tenant, checkpoints=False)
    train_s = time.perf_counter() - started
    merge.run(params, layout, tenant)
    evaluate.run(params, layout, tenant)
    metrics = json.loads((layout.evaluation_dir(tenant) / "metrics.json").read_text())
    candidate = metrics["models"]["candidate"]
    return {
        "variant": name,
        "steps": trained.record.steps.done,
        "base_s": base_s,
        "train_s": round(train_s, 1),
        "val_loss": round(trained.record.loss.final_val, 4),
        "exact_match": round(candidate["exact_match"], 3),
        "json_field_accuracy": round(candidate["json_field_accuracy"], 3),
        "general_loss": {m: round(metrics["models"][m]["general_loss"], 4) for m in ("base", "candidate")},
        "fields": {k: round(v, 3) for k, v in metrics.get("field_accuracy", {}).get("candidate", {}).items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default=".", help="a project folder after a finished run")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--variant", action="append", default=[], help="name=JSON of dotted params overrides (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, help="variants run at once")
    args = ap.parse_args()
    variants = [(name, json.loads(text)) for name, text in (v.split("=", 1) for v in args.variant)] or [
        ("default", {})
    ]
    with tempfile.TemporaryDirectory() as scratch:
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [
                pool.submit(run_variant, args.project, args.params, args.tenant, n, o, scratch) for n, o in variants
            ]
            rows, failed = [], []
            for (name, _), future in zip(variants, futures):
                try:  # a variant that fails (a diverged run refused by the merge) must not cost the others
                    rows.append(future.result())
                except Exception as exc:  # noqa: BLE001
                    failed.append(name)
                    print(
                        json.dumps({"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}), flush=True
                    )
                    continue
                print(json.dumps(rows[-1]), flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    fields = list(dict.fromkeys(k for r in rows for k in r["fields"]))[:FIELDS_SHOWN]
    print(f"\n| variant ({args.tenant}) | steps | train s | exact | field acc | " + " | ".join(fields) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(fields))
    for r in rows:
        cells = " | ".join(f"{r['fields'].get(f, float('nan')):.3f}" for f in fields)
        print(
            f"| {r['variant']} | {r['steps']} | {r['train_s']} | "
            f"{r['exact_match']:.3f} | {r['json_field_accuracy']:.3f} | {cells} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

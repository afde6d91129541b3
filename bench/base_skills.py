"""What the offline base model can do after pretraining: exact-answer accuracy per exercise kind.

The lever search behind the default `base.build` recipe (README: what the default model can and
cannot do). Each variant is params.yaml's `base.build` with overrides; it is built with the real
base stage (on CUDA when present, as the stage does) from the tenants' documents, then greedy-
decodes held-out exercises of every kind (a seed the corpus never uses) and counts exact answers.
A base that cannot copy its own drills cannot copy an order number for an adapter either.

    python bench/base_skills.py --variant default='{}' \
        --variant old-lr='{"learning_rate": 0.003, "warmup_steps": 30, "copy_drill_steps": 0}'

Prints one JSON line per variant, then a table. Minutes per variant on 2 CPU cores (the default
budget is ~6.5 min there), about a minute on a GPU; run the variants of one comparison on the same
kind of machine, since CPU and CUDA arithmetic differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraline.base.exercises import KINDS, make_exercises
from loraline.base.stage import build_base
from loraline.config import load_params
from loraline.modelling.chat import render_chat

PROBE_SEED = 98765  # never a corpus seed: the probe's exercises are unseen


def probe(model_dir: Path, per_kind: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    by_kind: dict[str, list] = {}
    for kind, messages in make_exercises(per_kind * len(KINDS) * 4, seed=PROBE_SEED):
        by_kind.setdefault(kind, []).append(messages)
    out = {}
    for kind in KINDS:
        cases = by_kind.get(kind, [])[:per_kind]
        hits = 0
        for messages in cases:
            prompt = render_chat(messages[:-1], add_generation_prompt=True)
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=64, do_sample=False)
            hits += tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip() == messages[-1]["content"]
        out[kind] = round(hits / len(cases), 3) if cases else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variant", action="append", default=[], help="name=JSON overrides of base.build (repeatable)")
    ap.add_argument("--per-kind", type=int, default=40, help="held-out exercises probed per kind")
    args = ap.parse_args()
    params = load_params(args.params)
    variants = [v.split("=", 1) for v in args.variant] or [["default", "{}"]]
    docs = [params.tenant_params(n).raw_dir for n in params.tenant_names]
    rows = []
    for name, overrides in variants:
        build = params.base.build.model_copy(update=json.loads(overrides))
        base = params.base.model_copy(update={"build": type(build)(**build.model_dump())})
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = build_base(base, seed=params.seed, raw_dirs=docs, out_dir=Path(tmp) / "base")
            wall = time.perf_counter() - started
            row = {
                "variant": name,
                "device": result.record.built_on.device,
                "steps": result.record.pretraining.steps,
                "final_loss": result.record.pretraining.final_loss,
                "build_s": round(wall, 1),
                "accuracy": probe(Path(tmp) / "base", args.per_kind),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    kinds = list(KINDS)
    print("\n| variant | device | steps | loss | " + " | ".join(kinds) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(kinds))
    for r in rows:
        cells = " | ".join("n/a" if r["accuracy"][k] is None else f"{r['accuracy'][k]:.2f}" for k in kinds)
        print(f"| {r['variant']} | {r['device']} | {r['steps']} | {r['final_loss']:.2f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

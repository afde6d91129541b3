"""Serving speed: many tenants' adapters on one vLLM server, against one merged model per tenant.

On the outputs of a finished `make run` (models/base, models/adapters/<tenant>, models/merged/<tenant>,
data/prepared/<tenant>): the trained adapters are made servable (serve.adapters) and copied under
16 tenant names (`t00`..`t15`, cycling over the real tenants), then one vLLM server (the serving
environment) serves them all. By default each adapter is its rank-16 LoRA pairs alone, as the issue
specifies and as a real base's adapters are; `--servable` serves the production adapters as they
are (their trained embeddings as rank-256 LoRA, see serve.adapters). Requests are the held-out test
prompts of the real tenants, sent to /v1/completions as token ids, greedy, at concurrency 1, 8 and
32, spread round-robin over 1, 4 or 16 of the tenant names. Reported per cell: output tokens/s, p50
and p95 request latency.

The baseline is what a team without multi-LoRA serving does: one merged model per tenant in
transformers, one request at a time (greedy generate with the KV cache), on the same prompts.

    make run && make serve-env
    .venv/bin/python bench/serve_speed.py --python .serve-venv/bin/python --requests 64 \\
        --out bench/results/serve_speed.jsonl

Prints one JSON line per cell, then a table with the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

N_NAMES = 16
CONCURRENCY = (1, 8, 32)
SPREAD = (1, 4, 16)


def prompts(tenants: list[str], n: int) -> list[tuple[str, list[int]]]:
    """(real tenant, prompt token ids) of the first held-out test rows, alternating tenants."""
    import datasets

    from loraline.modelling.constants import IGNORE_INDEX

    rows = []
    for tenant in tenants:
        test = datasets.load_from_disk(f"data/prepared/{tenant}/dataset")["test"]
        for i in range(min(n, len(test))):
            ids, labels = test[i]["input_ids"], test[i]["labels"]
            rows.append((tenant, ids[: next(j for j, x in enumerate(labels) if x != IGNORE_INDEX)]))
    out = []
    for i in range(n):  # interleave
        out.append(rows[(i % len(tenants)) * (len(rows) // len(tenants)) + i // len(tenants)])
    return out


def lora_only(adapter: Path, dest: Path) -> Path:
    """The adapter's LoRA pairs alone (its trained embeddings dropped): a rank-r adapter as a real
    base's would be; it answers differently from the production adapter, which speed does not mind."""
    from safetensors.torch import load_file, save_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(modules_to_save=None, ensure_weight_tying=False)
    dest.mkdir(parents=True)
    (dest / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".lora_" in k}, dest / "adapter_model.safetensors")
    return dest


def servable_names(tenants: list[str], root: Path, rank_r_only: bool) -> dict[str, Path]:
    from loraline.serve.adapters import make_servable

    if rank_r_only:
        real = {t: lora_only(Path(f"models/adapters/{t}"), root / "real" / t) for t in tenants}
    else:
        real = {
            t: make_servable(Path(f"models/adapters/{t}"), Path("models/base"), root / "real" / t).path
            for t in tenants
        }
    names = {}
    for i in range(N_NAMES):
        src = real[tenants[i % len(tenants)]]
        dest = root / f"t{i:02d}"
        shutil.copytree(src, dest)
        names[f"t{i:02d}"] = dest
    return names


async def run_cell(
    url: str, names: list[str], work: list[tuple[str, list[int]]], concurrency: int, max_tokens: int
) -> dict:
    latencies: list[float] = []
    out_tokens = 0
    queue = list(enumerate(work))

    async with httpx.AsyncClient(timeout=600) as client:

        async def worker():
            nonlocal out_tokens
            while queue:
                i, (_, prompt) = queue.pop(0)
                body = {"model": names[i % len(names)], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                out_tokens += r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(q[18], 3),
        "requests": len(latencies),
        "output_tokens": out_tokens,
        "wall_s": round(wall, 1),
    }


def naive_baseline(work: list[tuple[str, list[int]]], max_tokens: int) -> dict:
    """One merged model per tenant (transformers), one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained("models/base")
    models = {
        t: AutoModelForCausalLM.from_pretrained(f"models/merged/{t}", dtype=torch.float32).eval()
        for t in {t for t, _ in work}
    }
    latencies, out_tokens = [], 0
    started = time.perf_counter()
    for tenant, prompt in work:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = models[tenant].generate(
                torch.tensor([prompt]),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        latencies.append(time.perf_counter() - t0)
        out_tokens += out.shape[1] - len(prompt)
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=20)
    return {
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(q[18], 3),
        "requests": len(work),
        "output_tokens": out_tokens,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--python", required=True, help="the serving environment's Python (make serve-env: .serve-venv/bin/python)"
    )
    ap.add_argument(
        "--tenant", action="append", help="real tenants whose adapters and prompts are used (default: params.yaml's)"
    )
    ap.add_argument("--requests", type=int, default=64, help="requests per cell")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=8311)
    ap.add_argument("--out", help="append the results as JSON lines to this file")
    ap.add_argument(
        "--servable",
        action="store_true",
        help="serve the production adapters as they are (trained embeddings "
        "as rank-256 LoRA) instead of their rank-r LoRA pairs",
    )
    a = ap.parse_args()

    from loraline.config import ServeParams, load_params
    from loraline.serve.engine import Engine, engine_command, lora_rank_for

    tenants = a.tenant or load_params("params.yaml").tenant_names
    work = prompts(tenants, a.requests)
    results = []

    def record(r: dict) -> None:
        r["date"] = time.strftime("%Y-%m-%d")
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        names = servable_names(tenants, Path(tmp), rank_r_only=not a.servable)
        rank = lora_rank_for([json.loads((p / "adapter_config.json").read_text())["r"] for p in names.values()])
        context = json.loads(Path("models/base/config.json").read_text())["max_position_embeddings"]
        params = ServeParams(
            engine_port=a.port, max_loras=N_NAMES, dtype="float32", engine_args=["--max-num-seqs", "32"]
        )
        cmd = engine_command(
            Path(a.python),
            Path("models/base"),
            params,
            dtype=params.dtype,
            lora_rank=rank,
            max_loras=N_NAMES,
            max_model_len=context,
            on_cpu=True,
        )
        engine = Engine.start(cmd, params, Path(tmp) / "engine.log", on_cpu=True)
        try:
            for name, path in names.items():
                engine.load(name, path)
            asyncio.run(run_cell(engine.url, ["t00"], work[:4], 1, a.max_tokens))  # warm-up
            for spread in SPREAD:
                for conc in CONCURRENCY:
                    cell = asyncio.run(run_cell(engine.url, list(names)[:spread], work, conc, a.max_tokens))
                    record(
                        {"mode": "vllm multi-LoRA", "lora_rank": rank, "tenants": spread, "concurrency": conc, **cell}
                    )
        finally:
            engine.stop()
    record(
        {
            "mode": "naive: merged model per tenant, one request at a time",
            "tenants": len(tenants),
            "concurrency": 1,
            **naive_baseline(work, a.max_tokens),
        }
    )
    print(table(results))


def table(results: list[dict]) -> str:
    naive = next(r for r in results if r["mode"].startswith("naive"))
    one = {r["concurrency"]: r for r in results if r["mode"] == "vllm multi-LoRA" and r["tenants"] == 1}
    rows = [
        "| tenants | concurrency | output tokens/s | p50 s | p95 s | vs 1 tenant | vs naive |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["mode"].startswith("naive"):
            continue
        rows.append(
            f"| {r['tenants']} | {r['concurrency']} | {r['output_tokens_per_s']} | {r['p50_s']} | {r['p95_s']} | "
            f"{r['output_tokens_per_s'] / one[r['concurrency']]['output_tokens_per_s']:.2f}x | "
            f"{r['output_tokens_per_s'] / naive['output_tokens_per_s']:.2f}x |"
        )
    rows.append(f"| naive | 1 | {naive['output_tokens_per_s']} | {naive['p50_s']} | {naive['p95_s']} | - | 1.00x |")
    return "\n".join(rows)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

"""Generation speed on CPU: PyTorch eager (merged, fp32) vs onnxruntime fp32 vs onnxruntime int8.

All three use a KV cache (transformers' DynamicCache; the exported graph's present -> past) and
greedy decoding on the same prompts in the same run; the ratio against PyTorch eager is the figure.
The prompts are the tenant's held-out test rows rendered with its chat template.

    python bench/infer_speed.py --tenant acme-shop --prompts 16 --max-new-tokens 48 --threads 2

Needs the merge and export stages' outputs (models/merged/<tenant>, models/onnx/<tenant>).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def prompts_for(tenant: str, n: int) -> list[list[dict]]:
    import datasets

    test = datasets.load_from_disk(f"data/prepared/{tenant}/dataset")["test"]
    out = []
    for messages in test.select(range(min(n, len(test))))["messages"]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append(messages[:last])
    return out


def torch_runner(merged: Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()

    def run(messages, max_new_tokens):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
        return out.shape[1] - ids.shape[1]

    return run


def onnx_runner(onnx_dir: Path, model_file: str, threads: int):
    from loraline.export.runtime import OnnxGenerator

    gen = OnnxGenerator(onnx_dir, model_file=model_file, threads=threads)

    def run(messages, max_new_tokens):
        return len(gen.generate_ids(gen.encode(messages), max_new_tokens=max_new_tokens))

    return run


def measure(run, prompts, max_new_tokens: int) -> dict:
    run(prompts[0], 4)  # warm-up: first-call allocations and graph optimisation
    tokens, start = 0, time.perf_counter()
    for messages in prompts:
        tokens += run(messages, max_new_tokens)
    wall = time.perf_counter() - start
    return {"new_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenant", default="acme-shop")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="append the results as JSON lines to this file")
    a = ap.parse_args()
    prompts = prompts_for(a.tenant, a.prompts)
    runners = {
        "pytorch-eager-fp32": lambda: torch_runner(Path(f"models/merged/{a.tenant}"), a.threads),
        "onnxruntime-fp32": lambda: onnx_runner(Path(f"models/onnx/{a.tenant}"), "model.onnx", a.threads),
        "onnxruntime-int8": lambda: onnx_runner(Path(f"models/onnx/{a.tenant}"), "model.int8.onnx", a.threads),
    }
    results = []
    for name, make in runners.items():
        r = {
            "runtime": name,
            "tenant": a.tenant,
            "prompts": len(prompts),
            "threads": a.threads,
            **measure(make(), prompts, a.max_new_tokens),
        }
        results.append(r)
        print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in results)
    base = results[0]["tokens_per_s"]
    print("\n| runtime | new tokens | tokens/s | vs PyTorch eager |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['runtime']} | {r['new_tokens']} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()

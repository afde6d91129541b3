"""Sharded QLoRA capacity: which llama shapes train on 1 GPU and on 2 with train.sharding: fsdp.

Runs the real train stage (`loraline.train.train_adapter`, NF4 + double quant, LoRA r=16 on all
linear layers, paged AdamW, checkpointing every layer, packed rows of <= 2048 tokens, one row per
GPU per step) for a few optimizer steps on each (shape, GPUs) asked for, each in its own torchrun
launch. The weights are random (no disk holds a 405B checkpoint here): the bench hands the
sharded loader a tensor source that draws each tensor, seeded by its name, where the stage would
read it from safetensors; everything else is the stage as users run it. A run that runs out of
GPU memory is reported as not fitting, with where it failed.

    python bench/sharded_capacity.py --run llama-70b:1 --run llama-70b:2 --run llama-405b:2 --run llama-405b:1

Prints one JSON line per run, then a table: peak memory per GPU, base weights held per GPU,
useful tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# The published configs of these families (hidden, intermediate, layers, heads, kv heads, vocab).
SHAPES = {
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "llama-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "llama-405b": dict(
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}
STEPS = 3


def make_base(shape: str, root: Path) -> Path:
    """A base folder without weights: the config, a tokenizer (pad id, chat template) and a record."""
    from transformers import LlamaConfig

    from loraline.base.tokenizer import train_tokenizer
    from loraline.io import write_json
    from loraline.modelling.chat import save_tokenizer

    base = root / "base"
    LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=False, **SHAPES[shape]).save_pretrained(base)
    save_tokenizer(train_tokenizer(["benchmark text only"] * 4, vocab_size=300), base)
    write_json(
        base / "base_record.json",
        {
            "source": "built",
            "model_ref": ".",
            "architecture": "LlamaForCausalLM",
            "note": "random weights for bench/sharded_capacity.py",
            "files": {"weights": "random"},
        },
    )
    return base


def make_dataset(shape: str, rows: int, root: Path) -> Path:
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, SHAPES[shape]["vocab_size"], 2048).astype("int32").tolist() for _ in range(rows)]
    val = [rng.integers(0, SHAPES[shape]["vocab_size"], 64).astype("int32").tolist()]
    out = root / "dataset"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}),
            "validation": datasets.Dataset.from_dict({"input_ids": val, "labels": val}),
        }
    ).save_to_disk(str(out))
    return out


def random_tensors(base: Path):
    """(names, reader) of the model's tensors, each drawn on the device when asked, seeded by name."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.bfloat16)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}

    def read(name: str, device):
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], dtype=torch.bfloat16, device=device)
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shapes[name], generator=gen, dtype=torch.bfloat16, device=device) * 0.02

    return set(shapes), read


def rank_run(shape: str, gpus: int, root: Path) -> None:
    """One torchrun rank: the train stage with the random tensor source; rank 0 prints the result."""
    import torch

    import loraline.train.sharded as sharded
    from loraline.config import BaseParams, TrainParams
    from loraline.train import train_adapter

    source = random_tensors(root / "base")
    real_load = sharded.load_sharded_base
    sharded.load_sharded_base = lambda *a, **k: real_load(*a, **{**k, "tensors": source})
    params = TrainParams(
        quantization="nf4",
        double_quant=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules="all-linear",
        optimizer="paged_adamw_32bit",
        learning_rate=1e-4,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_steps=STEPS,
        batch_size=1,
        grad_accum=1,
        packing=True,
        max_seq_len=2048,
        gradient_checkpointing=True,
        eval_every=10_000,
        save_every=10_000,
        seed=0,
        devices=gpus,
        sharding="fsdp",
    )
    rank = int(os.environ.get("RANK", "0"))
    started = time.perf_counter()
    try:
        result = train_adapter(
            params,
            base_dir=root / "base",
            base_params=BaseParams(),
            dataset_dir=root / "dataset",
            out_dir=root / "adapter",
        )
    except torch.OutOfMemoryError as exc:
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(
            json.dumps(
                {
                    "shape": shape,
                    "gpus": gpus,
                    "fits": False,
                    "rank": rank,
                    "peak_gib": round(peak, 1),
                    "error": str(exc).splitlines()[0][:200],
                }
            ),
            flush=True,
        )
        raise SystemExit(3) from None
    if rank == 0:
        rec, facts = result.record, result.record.sharding
        print(
            json.dumps(
                {
                    "shape": shape,
                    "gpus": gpus,
                    "fits": True,
                    "steps": rec.steps.done,
                    "peak_gib": round(result.timing["peak_memory"]["bytes"] / 2**30, 1),
                    "layer_weights_gib_per_gpu": round(facts.layer_bytes_held / 2**30, 1),
                    "layer_weights_gib": round(facts.layer_bytes / 2**30, 1),
                    "whole_weights_gib": round(facts.whole_bytes / 2**30, 1),
                    "useful_tokens_per_s": round(result.timing["tokens_per_s"]),  # all GPUs together
                    "train_losses": [
                        round(float(x.split(",")[1]), 4) for x in result.train_curve.read_text().splitlines()[1:]
                    ],
                    "stage_wall_s": round(time.perf_counter() - started, 1),
                }
            ),
            flush=True,
        )


def launch(shape: str, gpus: int, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        make_base(shape, root)
        make_dataset(shape, rows=STEPS * gpus, root=root)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={gpus}",
            __file__,
            "--rank-run",
            shape,
            str(gpus),
            str(root),
        ]
        env = {
            **os.environ,
            "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1",
        }
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"shape": shape, "gpus": gpus, "fits": None, "error": f"no result within {timeout} s"}
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        if not lines:
            sys.stderr.write(proc.stderr[-4000:])
            return {
                "shape": shape,
                "gpus": gpus,
                "fits": None,
                "error": f"exit {proc.returncode}: "
                f"{proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else ''}",
            }
        return lines[0]


def table(results: list[dict]) -> str:
    rows = [
        "| shape | GPUs | trains | peak GiB per GPU "
        "| 4-bit layer weights per GPU (of all) | whole on every GPU | useful tokens/s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("fits"):
            rows.append(
                f"| {r['shape']} | {r['gpus']} | yes | {r['peak_gib']} | {r['layer_weights_gib_per_gpu']} GiB "
                f"({r['layer_weights_gib']}) | {r['whole_weights_gib']} GiB | {r['useful_tokens_per_s']:,} |"
            )
        else:
            rows.append(
                f"| {r['shape']} | {r['gpus']} | no: {r.get('error', '')[:80]} "
                f"| {r.get('peak_gib', '-')} | - | - | - |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", metavar="SHAPE:GPUS", help=f"repeatable; shapes: {', '.join(SHAPES)}")
    ap.add_argument("--timeout", type=int, default=540, help="seconds per run")
    ap.add_argument("--out", help="append every result as a JSON line to this file")
    ap.add_argument("--rank-run", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_run:
        shape, gpus, root = a.rank_run
        rank_run(shape, int(gpus), Path(root))
        return
    results = []
    for spec in a.run or ["llama-8b:2"]:
        shape, gpus = spec.split(":")
        r = launch(shape, int(gpus), a.timeout)
        r["date"] = time.strftime("%Y-%m-%d")
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()

"""Training speed: loraline's train stage against the peer (textbook QLoRA recipe), same GPU, same run.

The peer is ../shared/bench/peer_qlora.py (transformers + peft + bitsandbytes, NF4 + double quant,
bf16 compute, r=16 all-linear, gradient checkpointing, paged AdamW 32-bit, padded batches of 4).
Ours runs the real `loraline.train.train_adapter` on the same workload: the same example lengths
(the peer's seeded workload), the same architecture shapes with random weights (seed 0), the same
LoRA rank, targets and quantization; every token of an example is a trained token in both.

Each recipe runs in its own process so that peak-memory figures are not shared. Ours is timed over
the whole training loop (first steps included) and its peak memory covers loading too, so both of
our figures are, if anything, pessimistic against the peer's (which skips two warm-up batches).

    python bench/train_speed.py --shape llama-1b --shape llama-8b --out bench-results.jsonl

Needs CUDA and bitsandbytes. Prints one JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PEER = HERE.parent.parent / "shared" / "bench" / "peer_qlora.py"


def load_peer(path: Path):
    spec = importlib.util.spec_from_file_location("peer_qlora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_base(shape: dict, root: Path) -> Path:
    """A base folder in the base stage's layout: random bf16 weights of the shape, our tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraline.base.tokenizer import save_tokenizer, train_tokenizer
    from loraline.io import write_json
    from loraline.provenance import sha256_file

    base = root / "base"
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=8192, **shape)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base)
    del model
    torch.cuda.empty_cache()
    # Token ids are random; the tokenizer only supplies the pad id and chat template the stage reads.
    save_tokenizer(train_tokenizer(["benchmark text only"] * 4, vocab_size=300), base)
    write_json(base / "base_record.json", {
        "source": "built", "model_ref": ".", "architecture": "LlamaForCausalLM",
        "note": "random weights (seed 0) for bench/train_speed.py",
        "files": {"config.json": sha256_file(base / "config.json"), "weights": "random-seed-0"},
    })
    return base


def make_dataset(lengths: list[int], vocab: int, root: Path) -> Path:
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, vocab, n).astype("int32").tolist() for n in lengths]
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    # One short validation example: the stage evaluates at step 0; its cost is negligible here.
    val_ids = rng.integers(0, vocab, 64).astype("int32").tolist()
    validation = datasets.Dataset.from_dict({"input_ids": [val_ids], "labels": [val_ids]})
    out = root / "dataset"
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(out))
    return out


def run_ours(shape_name: str, peer_path: Path, examples: int, batch: int, checkpointing: bool) -> dict:
    import torch

    from loraline.config import BaseParams, TrainParams
    from loraline.train import train_adapter

    peer = load_peer(peer_path)
    lengths = peer.workload(examples, 2048)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        base = make_base(peer.SHAPES[shape_name], root)
        data = make_dataset(lengths, peer.SHAPES[shape_name]["vocab_size"], root)
        params = TrainParams(
            quantization="nf4", double_quant=True, lora_r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules="all-linear", optimizer="paged_adamw_32bit", learning_rate=1e-4,
            lr_scheduler="constant", warmup_ratio=0.0, epochs=1, batch_size=batch, grad_accum=1,
            packing=True, max_seq_len=2048, gradient_checkpointing=checkpointing,
            eval_every=10_000, save_every=10_000, seed=0,
        )
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train_adapter(params, base_dir=base, base_params=BaseParams(), dataset_dir=data, out_dir=root / "adapter")
        rec = result.record
    useful = sum(lengths)
    return dict(
        recipe="loraline", shape=shape_name, examples=examples, batch_rows=batch, steps=rec["steps"]["done"],
        useful_tokens=useful, tokens_seen=rec["tokens_seen"]["useful"], gradient_checkpointing=checkpointing,
        useful_tokens_per_s=round(rec["tokens_per_s"]), stage_wall_s=round(time.perf_counter() - started, 1),
        peak_gib=round(rec["peak_memory"]["bytes"] / 2**30, 2),
    )


def run_in_subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    peers = {r["shape"]: r for r in results if r["recipe"] != "loraline"}
    rows = ["| shape | recipe | useful tokens/s | peak GiB | speed vs peer | memory vs peer |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        p = peers.get(r["shape"])
        speed = f"{r['useful_tokens_per_s'] / p['useful_tokens_per_s']:.2f}x" if p else "-"
        mem = f"{r['peak_gib'] / p['peak_gib']:.2f}x" if p else "-"
        rows.append(f"| {r['shape']} | {r['recipe']} | {r['useful_tokens_per_s']:,} | {r['peak_gib']} | {speed} | {mem} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", choices=["llama-1b", "llama-8b"], help="repeatable (default: llama-1b)")
    ap.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="path to peer_qlora.py")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="rows per micro-batch (peer: examples per batch)")
    ap.add_argument("--no-checkpointing", action="store_true", help="ours without gradient checkpointing")
    ap.add_argument("--out", help="append every result as a JSON line to this file")
    ap.add_argument("--only", choices=["ours", "peer"], help=argparse.SUPPRESS)  # one run, in a child process
    a = ap.parse_args()
    shapes = a.shape or ["llama-1b"]
    if a.only == "ours":
        print(json.dumps(run_ours(shapes[0], a.peer, a.examples, a.batch, not a.no_checkpointing)), flush=True)
        return
    results = []
    for shape in shapes:
        peer = subprocess.run([sys.executable, str(a.peer), "--shape", shape, "--examples", str(a.examples),
                               "--batch", str(a.batch)], capture_output=True, text=True)
        if peer.returncode != 0:
            raise RuntimeError(f"peer failed on {shape}:\n{peer.stderr[-3000:]}")
        results.append(json.loads([x for x in peer.stdout.splitlines() if x.startswith("{")][-1]))
        print(json.dumps(results[-1]), flush=True)
        extra = ["--no-checkpointing"] if a.no_checkpointing else []
        results.append(run_in_subprocess(["--only", "ours", "--shape", shape, "--peer", str(a.peer),
                                          "--examples", str(a.examples), "--batch", str(a.batch), *extra]))
        print(json.dumps(results[-1]), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in results[-2:])
    print()
    print(table(results))


if __name__ == "__main__":
    main()

"""LongLoRA training speed: S2-Attn against full attention at long context, same GPU, same run.

The real train stage (`loraline.train.train_adapter`) with `train.long_context` on a base of the
peer's llama-1b shape (random bf16 weights, seed 0, a 4,096-token context), extended to 8k, 16k, 32k and
64k tokens: QLoRA NF4, r=16 on all linear layers, embeddings and norms trained, gradient
checkpointing, one row of `target_len` tokens per step. "full" trains with s2_attn off (flash varlen
attention over the whole example: full causal attention), "s2" with groups of target_len / 4.
Every configuration runs in its own process, so peak-memory figures are not shared.

    python bench/long_context_speed.py --lengths 8192 16384 32768 65536 --steps 10 --out long.jsonl

Needs CUDA and bitsandbytes. Prints one JSON line per run, then a table with S2's speed-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BASE_CONTEXT = 4096


def run_one(shape: str, length: int, mode: str, steps: int, root: Path) -> dict:
    import torch

    from loraline.config import BaseParams, TrainParams
    from loraline.train import train_adapter

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
        max_steps=steps,
        batch_size=1,
        grad_accum=1,
        packing=True,
        max_seq_len=length,
        gradient_checkpointing=True,
        eval_every=10_000,
        save_every=10_000,
        seed=0,
        long_context={"target_len": length, "rope_scaling": "linear", "s2_attn": mode == "s2", "group_ratio": 0.25},
    )
    torch.cuda.reset_peak_memory_stats()
    out = Path(tempfile.mkdtemp(dir=root))
    result = train_adapter(
        params,
        base_dir=root / "base",
        base_params=BaseParams(),
        dataset_dir=root / f"data-{length}",
        out_dir=out / "adapter",
    )
    rec = result.record
    return dict(
        shape=shape,
        length=length,
        mode=mode,
        steps=rec.steps.done,
        attention=rec.speed.attention,
        tokens_per_s=round(result.timing["tokens_per_s"]),
        s_per_step=round(length / result.timing["tokens_per_s"], 3),
        peak_gib=round(result.timing["peak_memory"]["bytes"] / 2**30, 2),
        first_loss=float((out / "adapter" / "train_loss.csv").read_text().splitlines()[1].split(",")[1]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peer", type=Path, default=HERE.parent.parent / "shared" / "bench" / "peer_qlora.py")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", nargs=3, metavar=("LENGTH", "MODE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(
            "RESULT " + json.dumps(run_one(args.shape, int(args.one[0]), args.one[1], args.steps, Path(args.one[2]))),
            flush=True,
        )
        return

    import train_speed

    root = Path(tempfile.mkdtemp(prefix="long-bench-"))
    shape = train_speed.load_peer(args.peer).SHAPES[args.shape]
    train_speed.make_base(shape, root, max_position_embeddings=BASE_CONTEXT)
    for length in args.lengths:  # `steps` examples of exactly `length` tokens, one per step
        ds = train_speed.make_dataset([length] * args.steps, shape["vocab_size"], root)
        ds.rename(root / f"data-{length}")
    results = []
    for length in args.lengths:
        for mode in ("full", "s2"):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--shape",
                    args.shape,
                    "--steps",
                    str(args.steps),
                    "--one",
                    str(length),
                    mode,
                    str(root),
                ],
                capture_output=True,
                text=True,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            res = (
                json.loads(line[7:])
                if line
                else {
                    "shape": args.shape,
                    "length": length,
                    "mode": mode,
                    "error": (proc.stderr or proc.stdout)[-600:],
                }
            )
            print(json.dumps(res), flush=True)
            results.append(res)
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(json.dumps(res) + "\n")
    print(f"\n{'length':>7} {'mode':>5} {'s/step':>8} {'tok/s':>8} {'peak GiB':>9} {'speed-up':>9}")
    by = {(r["length"], r["mode"]): r for r in results}
    for r in results:
        full = by.get((r["length"], "full"), {})
        up = f"{full['s_per_step'] / r['s_per_step']:.2f}x" if "s_per_step" in r and "s_per_step" in full else ""
        if "error" in r:
            print(f"{r['length']:>7} {r['mode']:>5}  error: {r['error'][-120:]!r}")
        else:
            print(
                f"{r['length']:>7} {r['mode']:>5} {r['s_per_step']:>8} "
                f"{r['tokens_per_s']:>8} {r['peak_gib']:>9} {up:>9}"
            )


if __name__ == "__main__":
    main()

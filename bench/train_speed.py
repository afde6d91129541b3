"""Training speed: loraline's train stage against the peer (textbook QLoRA recipe), same GPU, same run.

The peer is ../shared/bench/peer_qlora.py (transformers + peft + bitsandbytes, NF4 + double quant,
bf16 compute, r=16 all-linear, gradient checkpointing, paged AdamW 32-bit, padded batches of 4).
Ours runs the real `loraline.train.train_adapter` on the same workload: the same example lengths
(the peer's seeded workload), the same architecture shapes with random weights (seed 0), the same
LoRA rank, targets and quantization; every token of an example is a trained token in both.

Each recipe runs in its own process so that peak-memory figures are not shared. Ours is timed over
the whole training loop (first steps and the step-0 evaluation included) and its peak memory
covers loading too, so both of our figures are, if anything, pessimistic against the peer's
(which skips two warm-up batches).

Configurations of ours (--config, repeatable; cumulative, for the ablation):
    packing    the previous loraline: packing only, every speed option off, checkpointing, 4 rows
    fused-ce   + chunked linear + cross-entropy (no full-vocabulary logits)
    bf16       + embeddings/norms/lm_head kept in bf16 (no fp32 upcast of the non-quantized weights)
    varlen     + flash varlen attention, micro-batch laid out as one row (no pad tokens)
    final      + the shape's micro-batch and checkpointing (SHAPE_FINAL): the stage's defaults otherwise
    qalora     final's settings with train.method qalora (INT4, groups of 32): QA-LoRA beside QLoRA
    default    not cumulative: the train section of the repository's params.yaml as a user gets it
               (train.batch_size auto, no checkpointing, dropout), only max_seq_len raised to the
               workload's 2048 and one epoch; compare it with final (issue 36: at least 80%)
    dpo        final's settings with train.objective dpo (beta 0.1, reference: the base) on the pair dataset
    orpo       final's settings with train.objective orpo (lambda 0.1) on the pair dataset

Preference objectives (dpo, orpo; issue 41) train on a pair dataset made from the same workload
(make_pair_dataset, the prepare stage's pair columns): each chosen conversation is SFT's example,
token for token, its first quarter the context (labels -100) and the rest the answer; the rejected
conversation is the same context and an answer of the same length whose every token is shifted by a
seeded nonzero offset. Both sequences of a pair go through forward and backward, so their useful
tokens count both, context and answer (twice the SFT workload's tokens). Their tokens/s is the
stage's clock over the whole training loop, which includes DPO's one reference pass over every train
and validation pair before the first step (also timed alone: reference_s) and the step-0 evaluation.
Each is compared with `final` (SFT on the same examples, every token a target) run in the same
invocation: speed and peak memory ratios, a "preference-vs-sft" line. The stage never splits a pair,
so a pair whose example is longer than 1024 tokens is a packed row of its own, longer than 2048.
One GPU, within a 10-minute device command (512 examples: the published workload):
    python bench/train_speed.py --shape llama-1b --no-peer --config final --config dpo --config orpo --out bench.jsonl

--shape tiny is a CPU-sized model (2 layers, hidden 64, LoRA on the unquantized fp32 base, adamw_torch)
on its own seeded lengths of 16-96 tokens, without the peer or MFU: a smoke run of this script's paths
(tests/unit/bench), no benchmark.

Also printed: MFU = useful tokens/s x 6 x N / the card's bf16 matmul rate, measured in the same
run (an 8192^3 bf16 product), N = the weights of every matmul (decoder linears + lm_head); and a
loss-agreement check (--agree-steps): the same steps, same data and seed, with every speed option
off and with the final configuration, per-step training losses compared.

    python bench/train_speed.py --shape llama-1b --shape llama-8b --out bench.jsonl
    python bench/train_speed.py --shape llama-8b --no-peer --examples 640 --config final --config final+devices=2
    python bench/train_speed.py --no-peer --examples 256 --config final --config default
        (params.yaml's defaults, batch auto, against final on llama-1b)
        (data-parallel scaling: the same examples on 1 and on 2 GPUs, the same per-GPU micro-batch)

Needs CUDA and bitsandbytes (--shape tiny: neither). Prints one JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
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


MAX_LEN = 2048  # the workload's longest example (COMMON's max_seq_len)
# A CPU-sized shape for smoke runs of this script: LoRA on the unquantized base, short examples.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=512,
)
TINY_PARAMS = dict(quantization="none", optimizer="adamw_torch", max_seq_len=256, num_threads=1)
TINY_LENGTHS = (16, 96)  # a pair (two sequences) fits TINY_PARAMS' max_seq_len


def shape_dims(shape_name: str, peer_path: Path) -> dict:
    """The architecture of a shape: the peer's (the published configs), or TINY_SHAPE."""
    return dict(TINY_SHAPE) if shape_name == "tiny" else load_peer(peer_path).SHAPES[shape_name]


def workload(shape_name: str, peer_path: Path, examples: int) -> list[int]:
    """Example lengths: the peer's seeded workload (rows of up to MAX_LEN tokens); tiny: its own, seed 0."""
    if shape_name == "tiny":
        rng = random.Random(0)
        return [rng.randint(*TINY_LENGTHS) for _ in range(examples)]
    return load_peer(peer_path).workload(examples, MAX_LEN)


def make_base(shape: dict, root: Path, max_position_embeddings: int = 8192) -> Path:
    """A base folder in the base stage's layout: random bf16 weights of the shape, our tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraline.base.tokenizer import train_tokenizer
    from loraline.io import write_json
    from loraline.modelling.chat import save_tokenizer
    from loraline.provenance import sha256_file

    base = root / "base"
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max_position_embeddings, **shape)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # the CPU: --shape tiny
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base)
    del model
    torch.cuda.empty_cache()
    # Token ids are random; the tokenizer only supplies the pad id and chat template the stage reads.
    save_tokenizer(train_tokenizer(["benchmark text only"] * 4, vocab_size=300), base)
    write_json(
        base / "base_record.json",
        {
            "source": "built",
            "model_ref": ".",
            "architecture": "LlamaForCausalLM",
            "note": "random weights (seed 0) for bench/train_speed.py",
            "files": {"config.json": sha256_file(base / "config.json"), "weights": "random-seed-0"},
        },
    )
    return base


def make_dataset(lengths: list[int], vocab: int, root: Path) -> Path:
    """SFT rows: random token ids of the workload's lengths, every token a target."""
    import datasets

    ids, val_ids = token_ids(lengths, vocab)
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    # One short validation example: the stage evaluates at step 0; its cost is negligible here.
    validation = datasets.Dataset.from_dict({"input_ids": [val_ids], "labels": [val_ids]})
    out = root / "dataset"
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(out))
    return out


def token_ids(lengths: list[int], vocab: int) -> tuple[list[list[int]], list[int]]:
    """The workload's token ids (seed 0): one list per example, then the 64-token validation example."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, vocab, n).astype("int32").tolist() for n in lengths]
    return ids, rng.integers(0, vocab, 64).astype("int32").tolist()


PAIR_CONTEXT_SHARE = 0.25  # of each example's tokens: the context the chosen and rejected answers share


def make_pair_dataset(lengths: list[int], vocab: int, root: Path) -> Path:
    """Preference pairs on the same workload, in the prepared dataset's pair columns (input_ids/labels: context
    + chosen answer; prepare.features.PREFERENCE_COLUMNS: the rejected one). The chosen conversation is
    make_dataset's example, token for token, its answer the tokens after the context; the rejected answer has
    the same length, each token shifted by a nonzero offset drawn from a generator of its own (seed 1), so
    every rejected answer token differs from the chosen one and the pairs repeat exactly."""
    import datasets
    import numpy as np

    from loraline.prepare.features import PREFERENCE_FEATURES

    ids, val_ids = token_ids(lengths, vocab)
    rng = np.random.default_rng(1)
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            **PREFERENCE_FEATURES,
        }
    )
    splits = {
        split: datasets.Dataset.from_dict(pair_columns(chosen, vocab, rng), features=features)
        for split, chosen in (("train", ids), ("validation", [val_ids]))
    }
    out = root / "pairs"
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def pair_columns(chosen: list[list[int]], vocab: int, rng) -> dict[str, list]:
    """The columns of one split's pairs, one per chosen conversation (see make_pair_dataset)."""
    from loraline.modelling.constants import IGNORE_INDEX
    from loraline.prepare.features import PREFERENCE_COLUMNS

    cols: dict[str, list] = {k: [] for k in ("input_ids", "labels", *PREFERENCE_COLUMNS)}
    for ids in chosen:
        context = min(len(ids) - 1, max(1, int(len(ids) * PAIR_CONTEXT_SHARE)))
        answer = ids[context:]
        rejected = [(t + int(k)) % vocab for t, k in zip(answer, rng.integers(1, vocab, len(answer)))]
        masked = [IGNORE_INDEX] * context
        cols["input_ids"].append(ids)
        cols["labels"].append(masked + answer)
        cols["rejected"].append(" ".join(map(str, rejected)))  # random ids have no words: the answer's ids as text
        cols["rejected_input_ids"].append(ids[:context] + rejected)
        cols["rejected_labels"].append(masked + rejected)
        cols["n_rejected_tokens"].append(len(ids))
    return cols


# Cumulative configurations (TrainParams overrides on top of COMMON); "final" adds SHAPE_FINAL.
OFF = dict(
    fused_cross_entropy=False,
    upcast_non_quantized=True,
    varlen_attention=False,
    gradient_checkpointing=True,
    batch_size=4,
)
CONFIGS = {
    "packing": OFF,
    "fused-ce": {**OFF, "fused_cross_entropy": True},
    "bf16": {**OFF, "fused_cross_entropy": True, "upcast_non_quantized": False},
    "varlen": {**OFF, "fused_cross_entropy": True, "upcast_non_quantized": False, "varlen_attention": True},
    "final": {},  # the stage's defaults + SHAPE_FINAL
    # QA-LoRA on the same workload: the base quantized group-wise (INT4, groups of 32) by our own
    # quantizer, the pooled-input adapter; its loss curve is compared with final's
    "qalora": {"method": "qalora", "qalora": {"bits": 4, "group_size": 32}},
    # Preference objectives (issue 41) with final's settings, on the pair dataset (make_pair_dataset)
    "dpo": {"objective": "dpo"},
    "orpo": {"objective": "orpo"},
}
FINAL_LIKE = ("final", "qalora", "dpo", "orpo")  # the configurations that take SHAPE_FINAL
# Micro-batch (packed rows of <= 2048 tokens, laid end to end) and checkpointing per shape, chosen
# to stay under the peer's peak memory (15.9 GiB llama-1b, 21.5 GiB llama-8b).
SHAPE_FINAL = {
    "llama-1b": dict(batch_size=8, gradient_checkpointing=True, checkpoint_fraction=0.75),
    "llama-8b": dict(batch_size=8, gradient_checkpointing=True, checkpoint_fraction=1.0),
    "tiny": dict(batch_size=2, gradient_checkpointing=False),
}
COMMON = dict(
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
    epochs=1,
    grad_accum=1,
    packing=True,
    max_seq_len=2048,
    eval_every=10_000,
    save_every=10_000,
    seed=0,
)


def our_params(shape: str, config: str, overrides: dict | None = None):
    """A named configuration, optionally with overrides: "final+batch_size=8+checkpoint_fraction=1.0"."""
    from loraline.config import TrainParams

    name, *extra = config.split("+")
    own = {k: json.loads(v) for k, v in (x.split("=", 1) for x in extra)}
    tiny = TINY_PARAMS if shape == "tiny" else {}
    if name == "default":
        return TrainParams(**{**stage_defaults(), **tiny, **own, **(overrides or {})})
    fields = {
        **COMMON,
        **tiny,
        **CONFIGS[name],
        **(SHAPE_FINAL[shape] if name in FINAL_LIKE else {}),
        **own,
        **(overrides or {}),
    }
    return TrainParams(**fields)


def stage_defaults() -> dict:
    """params.yaml's train section (what the train stage runs with), on the benchmark's workload: rows of up to
    2048 tokens (the stage's max_seq_len refuses longer examples), one epoch, no evaluation or checkpoints."""
    from loraline.config import load_params

    train = load_params(HERE.parent / "params.yaml").train.model_dump()
    return {
        **train,
        "max_seq_len": COMMON["max_seq_len"],
        "epochs": 1,
        "max_steps": None,
        "seed": 0,
        "eval_every": COMMON["eval_every"],
        "save_every": COMMON["save_every"],
    }


def matmul_params(shape: dict) -> int:
    """Weights of every matmul per token (decoder linears + lm_head; the input embedding is a lookup)."""
    h, i, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (h * (2 * h + 2 * kv) + 3 * h * i) + v * h


def measure_matmul_tflops() -> float:
    """The card's bf16 matmul rate on random data: mean of 10 8192^3 products after 3 warm-ups."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return round(tflops, 1)


def build(shape_name: str, peer_path: Path, examples: int, root: Path) -> None:
    """The base, the SFT dataset and the pair dataset of the same workload, under root."""
    shape = shape_dims(shape_name, peer_path)
    make_base(shape, root)
    lengths = workload(shape_name, peer_path, examples)
    make_dataset(lengths, shape["vocab_size"], root)
    make_pair_dataset(lengths, shape["vocab_size"], root)


def run_ours(
    shape_name: str, peer_path: Path, examples: int, root: Path, config: str, overrides: dict, profile: bool
) -> dict:
    import torch

    from loraline.config import BaseParams
    from loraline.train import train_adapter

    lengths = workload(shape_name, peer_path, examples)
    params = our_params(shape_name, config, overrides)
    pairs = params.objective != "sft"
    out = Path(tempfile.mkdtemp(dir=root))
    prof = _profile_steps() if profile else None
    reference_s = _time_reference_pass() if params.objective == "dpo" else []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        result = train_adapter(
            params,
            base_dir=root / "base",
            base_params=BaseParams(),
            dataset_dir=root / ("pairs" if pairs else "dataset"),
            out_dir=out / "adapter",
        )
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
    rec = result.record
    # Pairs: the chosen and the rejected sequence, each as long as the example, both trained on
    useful = sum(lengths) * (2 if pairs else 1)
    losses = [float(line.split(",")[1]) for line in (out / "adapter" / "train_loss.csv").read_text().splitlines()[1:]]
    res = dict(
        recipe="loraline",
        config=config,
        objective=params.objective,
        shape=shape_name,
        examples=examples,
        batch_rows=rec.batch.rows,
        batch=rec.batch.note,
        grad_accum=params.grad_accum,
        devices=params.devices,
        steps=rec.steps.done,
        useful_tokens=useful,
        tokens_seen=rec.tokens_seen.useful,
        gradient_checkpointing=params.gradient_checkpointing,
        speed=rec.speed.model_dump(exclude_unset=True),
        useful_tokens_per_s=round(result.timing["tokens_per_s"]),
        stage_wall_s=round(time.perf_counter() - started, 1),
        peak_gib=round(result.timing["peak_memory"]["bytes"] / 2**30, 2),  # per GPU: the highest rank's
        train_losses=[round(x, 5) for x in losses],
    )
    if reference_s:  # in this process (one device): DPO's reference pass, inside the loop's clock
        res["reference_s"] = round(reference_s[0], 2)
    if prof is not None:
        res["profile"] = prof.table
    return res


def _time_reference_pass() -> list[float]:
    """Time DPO's reference pass (DpoObjective.start, before the first step) in this process: the list gets
    its seconds. The pass ends with its log-probs copied to the host, so the clock waits for the GPU."""
    from loraline.train.preference import DpoObjective

    real, spent = DpoObjective.start, []

    def start(self, run):
        began = time.perf_counter()
        real(self, run)
        spent.append(time.perf_counter() - began)

    DpoObjective.start = start
    return spent


def _profile_steps():
    """Profile optimizer steps 2-3 (a short run) and keep the top kernels by GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import loraline.train.loop as loop

    real = loop.train_step
    prof = profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=1, warmup=0, active=2, repeat=1),
    )

    class Holder:
        table = ""

        def __exit__(self, *exc):
            loop.train_step = real
            prof.__exit__(None, None, None)
            Holder.table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
            print(Holder.table, file=sys.stderr)

    def step(run, planned):
        out = real(run, planned)
        torch.cuda.synchronize()
        prof.step()
        return out

    prof.__enter__()
    loop.train_step = step
    return Holder()


def run_in_subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-6000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return json.loads(lines[-1])


AGREE_TOLERANCE = 1e-3  # relative, per step: bf16 kernels differ between the paths (flash vs masked SDPA, chunked CE)


def agreement(reference: dict, final: dict) -> dict:
    a, b = reference["train_losses"], final["train_losses"]
    gaps = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    return dict(
        recipe="agreement",
        shape=final["shape"],
        steps=len(gaps),
        reference=a,
        final=b,
        max_rel_gap=round(max(gaps), 6),
        last_rel_gap=round(gaps[-1], 6),
        tolerance=AGREE_TOLERANCE,
        ok=len(a) == len(b) and max(gaps) <= AGREE_TOLERANCE,
    )


def versus_sft(results: list[dict], shape: str) -> list[dict]:
    """Each preference run of the shape against `final` (SFT on the same examples) of the same invocation."""
    ours = [r for r in results if r["recipe"] == "loraline" and r["shape"] == shape and not r.get("agree")]
    sft = next((r for r in ours if r["config"] == "final"), None)
    if sft is None:
        return []
    return [
        dict(
            recipe="preference-vs-sft",
            shape=shape,
            config=r["config"],
            objective=r["objective"],
            useful_tokens_per_s=r["useful_tokens_per_s"],
            sft_useful_tokens_per_s=sft["useful_tokens_per_s"],
            speed_vs_sft=round(r["useful_tokens_per_s"] / sft["useful_tokens_per_s"], 3),
            peak_gib=r["peak_gib"],
            sft_peak_gib=sft["peak_gib"],
            memory_vs_sft=round(r["peak_gib"] / sft["peak_gib"], 3),
            reference_s=r.get("reference_s"),
        )
        for r in ours
        if r["objective"] != "sft"
    ]


def table(results: list[dict], tflops: float | None) -> str:
    peers = {r["shape"]: r for r in results if r["recipe"] == "peer-textbook-qlora"}
    rows = [
        "| shape | recipe | GPUs | useful tokens/s | peak GiB per GPU "
        "| speed vs peer | memory vs peer | MFU per GPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "useful_tokens_per_s" not in r or r.get("agree") or r["recipe"] == "preference-vs-sft":
            continue  # preference-vs-sft: the lines below the table
        p = peers.get(r["shape"])
        speed = f"{r['useful_tokens_per_s'] / p['useful_tokens_per_s']:.2f}x" if p else "-"
        mem = f"{r['peak_gib'] / p['peak_gib']:.2f}x" if p else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        name = r["recipe"] if r["recipe"] != "loraline" else f"loraline ({r['config']})"
        gpus = r.get("devices", 1)
        rows.append(
            f"| {r['shape']} | {name} | {gpus} | {r['useful_tokens_per_s']:,} "
            f"| {r['peak_gib']} | {speed} | {mem} | {mfu} |"
        )
    for r in results:  # does each recipe learn the workload (QA-LoRA's pooled adapter beside QLoRA's)
        losses = r.get("train_losses") if r["recipe"] == "loraline" and not r.get("agree") else None
        if losses:
            k = max(1, len(losses) // 10)
            rows.append(
                f"\ntraining loss, {r['shape']} {r['config']}: mean of the first {k} steps {sum(losses[:k]) / k:.4f} "
                f"-> of the last {k} {sum(losses[-k:]) / k:.4f}"
            )
    for r in results:
        if r["recipe"] == "preference-vs-sft":
            reference = f", its reference pass {r['reference_s']} s included" if r.get("reference_s") else ""
            rows.append(
                f"\n{r['objective']} against SFT (final), {r['shape']}, same examples, same run: "
                f"{r['useful_tokens_per_s']:,} useful tokens/s (chosen + rejected{reference}) vs "
                f"{r['sft_useful_tokens_per_s']:,} = {r['speed_vs_sft']:.2f}x; "
                f"peak {r['peak_gib']} vs {r['sft_peak_gib']} GiB = {r['memory_vs_sft']:.2f}x"
            )
    for r in results:
        if r["recipe"] == "agreement":
            rows.append(
                f"\nloss agreement, {r['shape']}, {r['steps']} steps, speed options off vs final: "
                f"max relative gap {r['max_rel_gap']:.2e}, after the last step {r['last_rel_gap']:.2e} "
                f"({'within' if r['ok'] else 'OUTSIDE'} the tolerance {r['tolerance']:.0e})"
            )
    if tflops:
        rows.append(f"\nMFU against the bf16 matmul rate measured in this run: {tflops} TFLOP/s (8192^3, random data)")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        action="append",
        choices=["llama-1b", "llama-8b", "tiny"],
        help="repeatable (default: llama-1b); tiny: a CPU smoke run, no benchmark",
    )
    ap.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="path to peer_qlora.py")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="the peer's examples per batch")
    ap.add_argument(
        "--config",
        action="append",
        help=f"ours, repeatable (default: final): one of {', '.join(CONFIGS)}, optionally +KEY=JSON...",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra TrainParams override for ours (all configs)",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the peer (exploration only: ratios need it)")
    ap.add_argument("--agree-steps", type=int, default=0, help="loss-agreement check over this many steps (0: skip)")
    ap.add_argument("--agree-shape", default="llama-1b", help="the shape the agreement check runs on")
    ap.add_argument(
        "--profile", action="store_true", help="also a short profiled run of the last config (top kernels)"
    )
    ap.add_argument("--out", help="append every result as a JSON line to this file")
    ap.add_argument("--only", choices=["ours", "build"], help=argparse.SUPPRESS)  # one job, in a child process
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--profile-run", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    shapes = a.shape or ["llama-1b"]
    configs = a.config or ["final"]
    overrides = {k: json.loads(v) for k, v in (x.split("=", 1) for x in a.set)}
    if a.only == "build":
        build(shapes[0], a.peer, a.examples, a.root)
        print(json.dumps({"built": str(a.root)}), flush=True)
        return
    if a.only == "ours":
        print(
            json.dumps(run_ours(shapes[0], a.peer, a.examples, a.root, configs[0], overrides, a.profile_run)),
            flush=True,
        )
        return

    import torch

    tflops = measure_matmul_tflops() if torch.cuda.is_available() else None  # None: no MFU (--shape tiny)
    print(json.dumps({"bf16_matmul_tflops": tflops}), flush=True)
    results: list[dict] = []

    def record(r: dict) -> None:
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")

    for shape in shapes:
        n_params = matmul_params(shape_dims(shape, a.peer))
        if not a.no_peer and shape != "tiny":  # the peer has no tiny shape (and needs CUDA)
            peer = subprocess.run(
                [
                    sys.executable,
                    str(a.peer),
                    "--shape",
                    shape,
                    "--examples",
                    str(a.examples),
                    "--batch",
                    str(a.batch),
                ],
                capture_output=True,
                text=True,
            )
            if peer.returncode != 0:
                raise RuntimeError(f"peer failed on {shape}:\n{peer.stderr[-3000:]}")
            r = json.loads([x for x in peer.stdout.splitlines() if x.startswith("{")][-1])
            r["mfu"] = r["useful_tokens_per_s"] * 6 * n_params / (tflops * 1e12) if tflops else None
            record(r)
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            common = [
                "--shape",
                shape,
                "--peer",
                str(a.peer),
                "--examples",
                str(a.examples),
                "--root",
                tmp,
                *[x for kv in a.set for x in ("--set", kv)],
            ]
            run_in_subprocess(["--only", "build", *common])
            for config in configs:
                r = run_in_subprocess(["--only", "ours", "--config", config, *common])
                r["mfu"] = (  # per GPU
                    r["useful_tokens_per_s"] * 6 * n_params / (tflops * 1e12 * r["devices"]) if tflops else None
                )
                record(r)
            for r in versus_sft(results, shape):
                record(r)
            if a.agree_steps and shape == a.agree_shape:
                final = our_params(shape, configs[-1])
                if not isinstance(final.batch_size, int):
                    sys.exit(
                        "--agree-steps compares with the last --config at a fixed "
                        f"batch; {configs[-1]} has batch_size {final.batch_size}"
                    )
                # The same optimizer steps: the reference takes the final micro-batch in halves or
                # single rows (grad_accum), since the unoptimized path needs more memory per row.
                ref_rows = 1
                steps = ["--set", f"max_steps={a.agree_steps}", "--set", "learning_rate=1e-3"]
                ref = run_in_subprocess(
                    [
                        "--only",
                        "ours",
                        "--config",
                        "packing",
                        *common,
                        *steps,
                        "--set",
                        f"batch_size={ref_rows}",
                        "--set",
                        f"grad_accum={final.batch_size // ref_rows}",
                    ]
                )
                fin = run_in_subprocess(["--only", "ours", "--config", configs[-1], *common, *steps])
                ref["agree"] = fin["agree"] = True
                record(agreement(ref, fin))
            if a.profile:
                r = run_in_subprocess(
                    ["--only", "ours", "--config", configs[-1], *common, "--profile-run", "--set", "max_steps=4"]
                )
                print(r.get("profile", ""), flush=True)
        torch.cuda.empty_cache()
    print()
    print(table(results, tflops))
    if any(r["recipe"] == "agreement" and not r["ok"] for r in results):
        sys.exit("loss agreement outside the tolerance")


if __name__ == "__main__":
    main()

"""LongLoRA on the CPU default: the built base (1,024 tokens) extended to 4,096, against the references.

Runs the real stages on long documents: Python's own standard-library sources (on every machine, no
download), copied as text documents into a tenant's raw folder, through prepare (prepare.document_rows:
rows of target_len tokens, split per document, so the test documents are never trained on), train,
merge, and the evaluate stage's long-context measures (held-out perplexity by length, passkey):

    base            the built base as it is (its rope knows 1,024 positions)
    base+rope       the same weights with the rope scaled (position interpolation), no training
    longlora        train.long_context with S2-Attn (groups of target_len / 4), embeddings and norms trained
    lora-full       the same budget (steps, rows, seed) with full attention: the reference LongLoRA
                    should come close to (the paper: within a few percent in perplexity)

Caveat: the base pretrained on standard-library docstrings, which these sources contain; that favours
every model alike and does not change the comparison.

    python bench/long_context_quality.py --base models/base --steps 120 --out long_quality.json

Prints a table last: perplexity by length, passkey accuracy, the median seconds of one training step
(forward and backward of one row, evaluation left out) and the whole train stage's seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(raw_dir: Path, count: int, min_chars: int, max_chars: int) -> list[str]:
    """The first `count` standard-library modules (sorted by path) of min..max characters, as .txt documents."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    picked = []
    for path in sorted(STDLIB.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if min_chars <= len(text) <= max_chars:
            (raw_dir / f"{path.stem}.txt").write_text(text, encoding="utf-8")
            picked.append(path.name)
            if len(picked) == count:
                break
    return picked


def step_seconds(base: Path, target: int, s2: bool, repeats: int = 4) -> float:
    """Median wall time of one training step (forward + backward, one row of `target` tokens) of the
    QLoRA model the train stage builds for train.long_context, evaluation passes left out."""
    import statistics
    import time

    import torch

    from loraline.config import TrainParams
    from loraline.train.model import attach_lora, load_base_model, with_long_context_trainables

    params = TrainParams(
        quantization="nf4", lora_dropout=0.0, max_seq_len=target, long_context={"target_len": target, "s2_attn": s2}
    )
    model = load_base_model(params, base, torch.device("cpu"))
    model = attach_lora(with_long_context_trainables(params, model), model).train()
    ids = torch.randint(5, model.config.vocab_size, (1, target), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids, position_ids=torch.arange(target)[None]).loss.backward()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times[1:]), 3)


def main() -> None:
    import torch

    from loraline.config import BaseParams, PrepareParams, TenantParams, TrainParams
    from loraline.evaluate import long_context as LC
    from loraline.evaluate.generate import loaded_model
    from loraline.merge.stage import merge_adapter
    from loraline.modelling.loading import load_base_config, load_base_tokenizer
    from loraline.prepare.stage import prepare_tenant
    from loraline.train import train_adapter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("models/base"))
    ap.add_argument("--target", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--docs", type=int, default=80)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="long-quality-"))
    base_params = BaseParams()
    tok = load_base_tokenizer(args.base, base_params)
    original = int(load_base_config(args.base).max_position_embeddings)
    picked = stdlib_documents(work / "raw", args.docs, min_chars=12_000, max_chars=120_000)
    prepared = prepare_tenant(
        TenantParams(name="stdlib", raw_dir=work / "raw"),
        PrepareParams(max_chars=200_000, max_tokens=args.target, document_rows=args.target, seed=1234),
        tok,
        out_dir=work / "prepared",
        rejected_path=work / "rejected.jsonl",
        stats_path=work / "stats.json",
    )
    stats = json.loads((work / "stats.json").read_text())
    print(f"documents: {len(picked)} stdlib modules -> rows {stats['document_rows']}", flush=True)

    results: dict[str, dict] = {}
    models: dict[str, tuple[str, dict]] = {"base": (str(args.base), {})}
    for name, s2 in (("longlora", True), ("lora-full", False)):
        params = TrainParams(
            quantization="nf4",
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            optimizer="adamw_torch",
            learning_rate=args.learning_rate,
            warmup_ratio=0.05,
            max_steps=args.steps,
            batch_size=1,
            grad_accum=1,
            max_seq_len=args.target,
            eval_every=10_000,
            save_every=10_000,
            seed=1234,
            num_threads=args.threads,
            long_context={"target_len": args.target, "s2_attn": s2},
        )
        started = time.perf_counter()
        trained = train_adapter(
            params,
            base_dir=args.base,
            base_params=base_params,
            dataset_dir=prepared.dataset_dir,
            out_dir=work / name / "adapter",
        )
        train_s = time.perf_counter() - started
        merged = merge_adapter(
            base_dir=args.base,
            base_params=base_params,
            adapter_dir=trained.out_dir,
            out_dir=work / name / "merged",
            quantized_reference=False,
        )
        results[name] = {
            "train_s": round(train_s, 1),
            "step_s": step_seconds(args.base, args.target, s2),
            "merge_passed": merged.passed,
            "final_train_loss": trained.record.loss.final_train,
        }
        models[name] = (str(merged.out_dir), {})
        print(f"{name}: {train_s:.0f}s, {results[name]}", flush=True)

    from transformers import AutoConfig

    scaled = AutoConfig.from_pretrained(models["longlora"][0])
    base_config = load_base_config(args.base)
    for key in ("rope_parameters", "max_position_embeddings"):
        setattr(base_config, key, getattr(scaled, key))
    models = {
        "base": models["base"],
        "base+rope": (str(args.base), {"config": base_config}),
        "longlora": models["longlora"],
        "lora-full": models["lora-full"],
    }

    import datasets

    held_out = datasets.load_from_disk(str(prepared.dataset_dir))["test_documents"]
    stream = LC.held_out_stream(held_out["input_ids"], None)
    lengths = LC.lengths_between(original, args.target)
    cpu = torch.device("cpu")
    for name, (path, kwargs) in models.items():
        with loaded_model(path, cpu, **kwargs) as model:
            results.setdefault(name, {})
            results[name]["perplexity"] = LC.perplexity_by_length(model, stream, lengths)
            results[name]["passkey"] = LC.passkey_retrieval(model, tok, lengths)
    report = {
        "documents": picked,
        "held_out_tokens": len(stream),
        "lengths": lengths,
        "steps": args.steps,
        "target": args.target,
        "original": original,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nheld-out: {len(held_out)} rows of test documents, "
        f"{len(stream)} tokens; {args.steps} steps of {args.target} tokens"
    )
    head = "".join(f"{'ppl@' + str(n):>11}" for n in lengths) + "".join(f"{'key@' + str(n):>9}" for n in lengths)
    print(f"{'model':<10}{head}{'s/step':>8}{'stage s':>9}")
    for name, r in results.items():
        ppl = "".join(f"{(r['perplexity'][str(n)]['perplexity'] or float('nan')):>11.2f}" for n in lengths)
        key = "".join(f"{r['passkey']['by_length'][str(n)]:>9.2f}" for n in lengths)
        print(f"{name:<10}{ppl}{key}{r.get('step_s', ''):>8}{r.get('train_s', ''):>9}")


if __name__ == "__main__":
    main()

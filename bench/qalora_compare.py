"""QA-LoRA against QLoRA with and without quantization after training, on one tenant's data and seed.

    python bench/qalora_compare.py --tenant globex-it --bits 4 3 2 --out bench/results/qalora.jsonl

Starts from a finished run's outputs (the built base and the tenant's prepared dataset, as `make run`
leaves them) and runs the real train, merge and export stages in a scratch folder:

  (a) qalora    QA-LoRA at each bit width: the adapter folded into the zero points (merge), exported
                as MatMulNBits on its own codes (export's low-bit graph)
  (b) qlora     QLoRA NF4 -> full-precision merge (the pipeline's default), the float32 ONNX graph
  (c) rtn       (b) quantized after training: round to nearest with the same group size, our
                quantizer, exported as MatMulNBits the same way as (a)
      ort-rtn   (b)'s ONNX graph through onnxruntime's MatMulNBits quantizer (integer zero points;
                2 and 4 bits, it has no 3-bit one)
  (a) served    (a)'s adapter as `loraline serve` puts it on the shared float base (the pooled A
                re-expressed as plain LoRA, serve/adapters.py), merged into the float base in PyTorch
                and exported as a float32 graph: what serving answers with. Also: how many of the
                merge stage's probes it answers as the merged low-bit model does (the deployment check)

Every model is scored the same way, through onnxruntime on the CPU on the tenant's held-out test
rows: answer loss, exact match, token F1 (JSON field accuracy where the answers are JSON), graph size
on disk and greedy generation tokens/s. (a) also gets its unmerged adapter's answer loss (PyTorch, the
adapter on its quantized base): merged must be within 0.5% of it. Prints one JSON line per model,
then a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _test_rows(dataset_dir: Path, limit: int | None) -> dict[str, list]:
    import datasets

    from loraline.modelling.conversation import split_conversation

    ds = datasets.load_from_disk(str(dataset_dir))["test"]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    cols = ds.select_columns(["messages", "input_ids", "labels"]).to_dict()
    contexts, refs = zip(*(split_conversation(m) for m in cols["messages"]), strict=True)
    return {
        "contexts": list(contexts),
        "references": list(refs),
        "input_ids": cols["input_ids"],
        "labels": cols["labels"],
    }


def score_onnx(
    onnx_dir: Path, file: str, rows: dict[str, list], max_new_tokens: int, threads: int | None
) -> dict[str, Any]:
    """Answer loss, exact match, F1 (and JSON field accuracy), size and greedy tokens/s of one graph."""
    from loraline.evaluate import metrics as M
    from loraline.evaluate.generate import encode_prompt
    from loraline.export.onnx_export import graph_bytes
    from loraline.export.runtime import OnnxGenerator
    from loraline.modelling.constants import IGNORE_INDEX

    gen = OnnxGenerator(onnx_dir, file, threads=threads)
    nll, count = 0.0, 0
    for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
        x = np.asarray([ids], dtype=np.int64)
        logits, _ = gen.forward(x, np.ones_like(x), gen.empty_past(1))
        logits = logits[0, :-1].astype(np.float64)
        target = np.asarray(labels[1:])
        keep = target != IGNORE_INDEX
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz[keep] - logits[keep, target[keep]]).sum())
        count += int(keep.sum())
    preds, generated, started = [], 0, time.perf_counter()
    for context in rows["contexts"]:
        out = gen.generate_ids(encode_prompt(gen.tokenizer, context), max_new_tokens=max_new_tokens)
        generated += len(out)
        preds.append(gen.tokenizer.decode(out, skip_special_tokens=True))
    seconds = time.perf_counter() - started
    refs = rows["references"]
    scores = M.aggregate(preds, refs, M.expects_json(refs))
    return {
        "answer_loss": round(nll / max(count, 1), 5),
        **{k: round(v, 4) for k, v in scores.items() if k in ("exact_match", "token_f1", "json_field_accuracy")},
        "bytes": graph_bytes(onnx_dir, file),
        "tokens_per_s": round(generated / seconds, 1),
    }


def unmerged_qalora_loss(base_dir: Path, adapter_dir: Path, rows: dict[str, list], bits: int, group: int) -> float:
    import torch

    from loraline.evaluate.generate import answer_loss
    from loraline.modelling.loading import load_base_causal_lm
    from loraline.modelling.qalora import load_qalora_adapter

    model = load_qalora_adapter(
        load_base_causal_lm(base_dir, "cpu", torch.float32), adapter_dir, bits=bits, group_size=group
    )
    model.eval()
    return answer_loss(model, rows["input_ids"], rows["labels"], 0, 1).loss  # one row a batch: no padding


def served_on_float_base(
    base_dir: Path, base_params: Any, adapter_dir: Path, merged_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """(a)'s adapter as serving runs it on the float base, written as a float merged folder (the
    low-bit files removed, so export writes the float graph), with its probe agreement against the
    merged low-bit model as the deployment check of `loraline serve` measures it.

    The servable adapter (make_servable: trained embeddings as LoRA on embed_tokens and lm_head) is
    scored unmerged: peft's merge would add both pairs to a tied base's one matrix. The folder is the
    same function merged through the adapter with its pooled A unpooled and its embeddings kept whole."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from loraline.layout import QALORA_QUANTIZED, QALORA_TORCHAO
    from loraline.modelling.loading import load_base_causal_lm, load_base_tokenizer
    from loraline.modelling.parity import run_probes
    from loraline.serve.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, make_servable, unpool_qalora, write_adapter

    ref = json.loads((merged_dir / "merge_report.json").read_text(encoding="utf-8"))["probe_reference"]
    tok = load_base_tokenizer(base_dir, base_params)
    servable = make_servable(adapter_dir, base_dir, out_dir.parent / "servable").path
    with torch.no_grad():
        served = PeftModel.from_pretrained(load_base_causal_lm(base_dir, "cpu", torch.float32), str(servable)).eval()
        answers = run_probes(served, tok, ref["prompts"], ref["max_new_tokens"])
        unpooled = out_dir.parent / "unpooled"
        write_adapter(
            unpooled,
            *unpool_qalora(
                json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")),
                load_file(str(adapter_dir / ADAPTER_WEIGHTS)),
            ),
        )
        model = (
            PeftModel.from_pretrained(load_base_causal_lm(base_dir, "cpu", torch.float32), str(unpooled))
            .merge_and_unload()
            .eval()
        )
        ids = torch.tensor([ref["prompts"][0]])
        gap = float((model(input_ids=ids).logits - served(input_ids=ids).logits).abs().max())
    if gap > 1e-3:
        raise SystemExit(f"the merged served model is not the servable adapter's function (max logit gap {gap})")
    agree = sum(a.strip() == b.strip() for a, b in zip(answers.texts, ref["texts"], strict=True))
    shutil.copytree(merged_dir, out_dir, ignore=shutil.ignore_patterns(QALORA_QUANTIZED, QALORA_TORCHAO))
    model.save_pretrained(out_dir, safe_serialization=True)
    return {"probes_as_merged": agree, "probes": len(ref["texts"])}


def rtn_model(merged_dir: Path, out_dir: Path, bits: int, group: int) -> None:
    """(b)'s merged model with every linear layer but the head rounded to nearest at `bits` (our
    quantizer, float32 scale and zero point per group), written as a merged QA-LoRA folder is."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraline.layout import QALORA_QUANTIZED
    from loraline.modelling.qalora import dequantize_linears, quantize_linears, quantized_layers, save_quantized_layers

    shutil.copytree(merged_dir, out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    quantize_linears(model, bits=bits, group_size=group)
    layers = quantized_layers(model)
    dequantize_linears(model, torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_quantized_layers(layers, out_dir / QALORA_QUANTIZED)


def ort_rtn(onnx_dir: Path, merged_dir: Path, out_dir: Path, bits: int, group: int) -> str:
    """onnxruntime's MatMulNBits quantizer on (b)'s float graph, on the same layers (not the head)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from safetensors.torch import load_file

    from loraline.export.lowbit import weight_key

    weights = load_file(str(merged_dir / "model.safetensors"))
    linear = {
        weight_key(w.T.contiguous().numpy())
        for n, w in weights.items()
        if w.ndim == 2 and "embed" not in n and "lm_head" not in n
    }
    model = onnx.load(str(onnx_dir / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    include = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and weight_key(numpy_helper.to_array(inits[n.input[1]])) in linear
    ]
    shutil.copytree(onnx_dir, out_dir)
    config = DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=False, bits=bits)
    quant = MatMulNBitsQuantizer(
        model, bits=bits, block_size=group, is_symmetric=False, nodes_to_include=include, algo_config=config
    )
    quant.process()
    file = f"model.ort-int{bits}.onnx"
    quant.model.save_model_to_file(str(out_dir / file), False)
    return file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=".", help="a project whose `make run` has finished (default: .)")
    ap.add_argument("--params", default=None, help="params.yaml (default: the project's)")
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--max-examples", type=int, default=None, help="held-out rows scored (default: all)")
    ap.add_argument(
        "--max-steps", type=int, default=None, help="training steps of every adapter (default: the tenant's epochs)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own choice)")
    ap.add_argument("--scratch", default=None, help="where models are written (default: a temporary folder, removed)")
    ap.add_argument("--out", default=None, help="append the JSON lines here too")
    args = ap.parse_args(argv)

    from loraline.config import load_params
    from loraline.export.build import export_onnx
    from loraline.layout import Layout
    from loraline.merge.stage import merge_adapter
    from loraline.train import train_adapter

    project = Path(args.project).resolve()
    params = load_params(args.params or project / "params.yaml")
    layout, tenant = Layout(project), args.tenant
    base_dir, dataset_dir = layout.base_dir, layout.prepared_dataset_dir(tenant)
    for folder in (base_dir, dataset_dir):
        if not folder.exists():
            raise SystemExit(f"{folder} is missing: run `make run` (or `dvc repro`) first")
    rows = _test_rows(dataset_dir, args.max_examples)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="qalora-compare-"))
    scratch.mkdir(parents=True, exist_ok=True)
    train_params = params.train_for(tenant)
    if args.max_steps is not None:
        train_params = train_params.model_copy(update={"max_steps": args.max_steps})
    inputs = {"base_dir": base_dir, "base_params": params.base, "dataset_dir": dataset_dir}
    results: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def build(name: str, train_update: dict[str, Any]) -> tuple[Path, Path, float]:
        started = time.perf_counter()
        adapter = scratch / name / "adapter"
        variant = type(train_params).model_validate(
            {**train_params.model_dump(), **train_update}
        )  # validated, as params.yaml is
        train_adapter(variant, out_dir=adapter, **inputs)
        train_s = time.perf_counter() - started
        merged = merge_adapter(
            base_dir=base_dir,
            base_params=params.base,
            adapter_dir=adapter,
            out_dir=scratch / name / "merged",
            quantized_reference=False,
            check_reload=False,
        ).out_dir
        return adapter, merged, train_s

    common = {
        "tenant": tenant,
        "group_size": args.group_size,
        "test_rows": len(rows["references"]),
        "seed": train_params.seed,
    }
    _, qlora_merged, train_s = build("qlora", {"method": "lora"})
    qlora_onnx = export_onnx(model_dir=qlora_merged, out_dir=scratch / "qlora" / "onnx", max_new_tokens=8).out_dir
    emit(
        {
            **common,
            "model": "(b) qlora nf4 -> fp32 merge",
            "bits": 32,
            "train_s": round(train_s, 1),
            **score_onnx(qlora_onnx, "model.onnx", rows, args.max_new_tokens, args.threads),
        }
    )
    float_bytes = results[-1]["bytes"]
    for bits in args.bits:
        name = f"qalora-int{bits}"
        adapter, merged, train_s = build(
            name, {"method": "qalora", "qalora": {"bits": bits, "group_size": args.group_size}}
        )
        export = export_onnx(model_dir=merged, out_dir=scratch / name / "onnx", max_new_tokens=8)
        row = score_onnx(export.out_dir, export.report.lowbit.file, rows, args.max_new_tokens, args.threads)
        unmerged = unmerged_qalora_loss(base_dir, adapter, rows, bits, args.group_size)
        emit(
            {
                **common,
                "model": f"(a) qalora int{bits} merged",
                "bits": bits,
                "train_s": round(train_s, 1),
                **row,
                "unmerged_answer_loss": round(unmerged, 5),
                "merged_vs_unmerged_loss": round(row["answer_loss"] / unmerged - 1, 5),
                "size_vs_fp32": round(row["bytes"] / float_bytes, 3),
            }
        )
        served_dir = scratch / name / "served-merged"
        probes = served_on_float_base(base_dir, params.base, adapter, merged, served_dir)
        export = export_onnx(model_dir=served_dir, out_dir=scratch / name / "served-onnx", max_new_tokens=8)
        row = score_onnx(export.out_dir, "model.onnx", rows, args.max_new_tokens, args.threads)
        emit(
            {
                **common,
                "model": f"(a) qalora int{bits} served on the float base",
                "bits": bits,
                **row,
                **probes,
                "size_vs_fp32": round(row["bytes"] / float_bytes, 3),
            }
        )

        rtn_dir = scratch / f"rtn-int{bits}"
        rtn_model(qlora_merged, rtn_dir / "merged", bits, args.group_size)
        export = export_onnx(model_dir=rtn_dir / "merged", out_dir=rtn_dir / "onnx", max_new_tokens=8)
        row = score_onnx(export.out_dir, export.report.lowbit.file, rows, args.max_new_tokens, args.threads)
        emit(
            {
                **common,
                "model": f"(c) qlora -> rtn int{bits}",
                "bits": bits,
                **row,
                "size_vs_fp32": round(row["bytes"] / float_bytes, 3),
            }
        )
        if bits in (2, 4):
            file = ort_rtn(qlora_onnx, qlora_merged, scratch / f"ort-int{bits}", bits, args.group_size)
            row = score_onnx(scratch / f"ort-int{bits}", file, rows, args.max_new_tokens, args.threads)
            emit(
                {
                    **common,
                    "model": f"(c) qlora -> onnxruntime matmulnbits int{bits}",
                    "bits": bits,
                    **row,
                    "size_vs_fp32": round(row["bytes"] / float_bytes, 3),
                }
            )

    print(
        f"\n| model ({tenant}, groups of {args.group_size}) | answer loss "
        "| exact match | token F1 | field acc | MB | x fp32 | tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['model']} | {r['answer_loss']:.4f} | {r.get('exact_match', 0):.3f} | {r.get('token_f1', 0):.3f} | "
            f"{r.get('json_field_accuracy', float('nan')):.3f} | {r['bytes'] / 1e6:.2f} "
            f"| {r['bytes'] / float_bytes:.2f} | {r['tokens_per_s']} |"
        )
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

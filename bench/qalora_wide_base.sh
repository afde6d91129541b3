#!/bin/bash
# QA-LoRA against QLoRA on a wider base than the default (docs/benchmarks.md: "On a wider base").
# Run from the project root on a CUDA machine with loraline importable; writes into this checkout
# (data/, models/, reports/) and into $OUT_DIR. About 20 minutes on one H200 with 16 CPU cores:
# the base and the adapters train on the GPU, merges, exports and onnxruntime scoring run on the CPU.
set -euo pipefail
OUT_DIR=${OUT_DIR:-bench/results/wide}; mkdir -p "$OUT_DIR"
TENANT=${TENANT:-globex-it}
WIDE='base.build.on_cuda={hidden_size: 1024, intermediate_size: 3072, num_layers: 8, num_heads: 16, num_kv_heads: 4, max_steps: 1500}'
for t in $(python3 -c 'from loraline.config import load_params; print(" ".join(load_params("params.yaml").tenant_names))'); do
  loraline documents --tenant "$t" --quiet
  loraline synthesize --tenant "$t" --quiet
done
loraline base --docs data/documents --set "$WIDE"
cp models/base/base_record.json "$OUT_DIR/"
loraline prepare --tenant "$TENANT"
python3 bench/qalora_compare.py --tenant "$TENANT" --bits 4 2 --threads 16 --scratch /tmp/qalora-wide --out "$OUT_DIR/qalora_compare.jsonl"
# The same comparison through the pipeline's own stages: train.qalora.reference, merge, evaluate.
S=(--set "tenants.$TENANT.train.method=qalora" --set "tenants.$TENANT.train.qalora.bits=4"
   --set "tenants.$TENANT.train.qalora.group_size=32" --set "tenants.$TENANT.train.qalora.reference=true")
loraline train --tenant "$TENANT" "${S[@]}"
loraline merge --tenant "$TENANT" "${S[@]}"
loraline evaluate --tenant "$TENANT" "${S[@]}"
cp "reports/$TENANT/evaluation/metrics.json" "$OUT_DIR/evaluation_metrics.json"
cp "reports/$TENANT/evaluation/report.md" "$OUT_DIR/evaluation_report.md"

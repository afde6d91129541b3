"""What the train stage writes next to the adapter: the loss curve and train_record.json's pieces."""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from loraline import io
from loraline.base.stage import RECORD as BASE_RECORD

LOSS_CURVE = "loss_curve.csv"


def loss_curve_csv(history: list[dict[str, Any]]) -> str:
    """step,train_loss,val_loss,lr: one row per optimizer step (step 0 = the base model's validation
    loss); val_loss is empty between evaluations, train_loss and lr are empty at step 0. Empty CSV
    fields are nulls to `dvc plots` (Vega-Lite drops them), so each line is drawn from its own points."""

    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.6g}"

    lines = ["step,train_loss,val_loss,lr"]
    lines += [f"{r['step']},{cell(r['train_loss'])},{cell(r['val_loss'])},{cell(r['lr'])}" for r in history]
    return "\n".join(lines) + "\n"


def write_loss_curve(path: Path, history: list[dict[str, Any]]) -> Path:
    return io.atomic_write_text(path, loss_curve_csv(history))


def base_model_hash(base_record: dict[str, Any]) -> str:
    """One hash for the base model: over the recorded file hashes (built or local folder), else the
    hub id and revision (a hub model the base stage could not hash; pinned only by a commit revision)."""
    files = {k: v for k, v in (base_record.get("files") or {}).items() if k != BASE_RECORD}
    if files:
        payload = json.dumps(files, sort_keys=True)
    else:
        payload = f"{base_record.get('model_ref')}@{base_record.get('revision')}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {"bytes": int(rss * scale), "kind": "process_max_rss"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def final_train_loss(history: list[dict[str, Any]], n: int = 10) -> float | None:
    """Mean of the last n steps' train loss (one step's loss is noisy)."""
    losses = [r["train_loss"] for r in history if r["train_loss"] is not None][-n:]
    return sum(losses) / len(losses) if losses else None

"""What the train stage writes next to the adapter: the loss curve and train_record.json's pieces."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch

from loraline import io

TRAIN_CURVE = "train_loss.csv"
VAL_CURVE = "val_loss.csv"


def _cell(v: float) -> str:
    return f"{v:.6g}"


def curves_csv(history: list[dict[str, Any]]) -> tuple[str, str]:
    """(train_loss.csv, val_loss.csv): step,train_loss,lr for every optimizer step, and step,val_loss
    for every evaluation (step 0 = the base model). Two files with no empty cells, because DVC's
    renderers read every cell of a plotted column as a number (an empty one plots as 0 in Vega or
    fails float() in the markdown renderer); dvc.yaml overlays them on the shared x axis `step`."""
    train = ["step,train_loss,lr"] + [
        f"{r['step']},{_cell(r['train_loss'])},{_cell(r['lr'])}" for r in history if r["train_loss"] is not None
    ]
    val = ["step,val_loss"] + [f"{r['step']},{_cell(r['val_loss'])}" for r in history if r["val_loss"] is not None]
    return "\n".join(train) + "\n", "\n".join(val) + "\n"


def write_curves(out_dir: Path, history: list[dict[str, Any]]) -> tuple[Path, Path]:
    train, val = curves_csv(history)
    return io.atomic_write_text(out_dir / TRAIN_CURVE, train), io.atomic_write_text(out_dir / VAL_CURVE, val)


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


def preference_summary(
    history: list[dict[str, Any]], names: tuple[str, ...], shipped_step: int | None, n: int = 10
) -> dict[str, dict[str, float | None] | None]:
    """A preference objective's metrics (records.PreferenceMetrics fields) from the history: `train` the mean of
    the last n steps, `base_val` at step 0, `final_val` at `shipped_step` (the best step when early stopping
    shipped it) or the last evaluation."""
    steps = [r for r in history if r["train_loss"] is not None][-n:]
    evals = [r for r in history if r["val_loss"] is not None]

    def mean(key: str) -> float | None:
        values = [r[key] for r in steps if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    def at(row: dict[str, Any] | None) -> dict[str, float | None] | None:
        return None if row is None else {"loss": row["val_loss"], **{m: row.get(f"val_{m}") for m in names}}

    shipped = [r for r in evals if r["step"] == shipped_step] if shipped_step is not None else evals[-1:]
    trained = [r for r in evals if r["step"] > 0]
    return {
        "train": {"loss": final_train_loss(history, n), **{m: mean(f"train_{m}") for m in names}} if steps else None,
        "base_val": at(next((r for r in evals if r["step"] == 0), None)),
        "final_val": at(shipped[-1] if shipped and shipped[-1]["step"] > 0 else (trained[-1] if trained else None)),
    }

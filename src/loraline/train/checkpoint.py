"""Periodic checkpoints and resume, in safetensors + JSON only (the house rule: never unpickle).

    checkpoint_dir/step-00000040/
        adapter.safetensors     every trainable tensor, by its parameter name
        best.safetensors        the best-validation adapter so far (only with early stopping)
        objective.safetensors   what the objective keeps beyond the weights (only DPO: its reference log-probs)
        optimizer.safetensors   every tensor of the optimizer and RNG states
        state.json              fingerprint, step, data position (epoch, step in epoch), loop progress (history, best
                                validation loss, token counts), optimizer/scheduler structure
                                and scalars, python/numpy RNG states of every data-parallel rank, the resolved
                                micro-batch (train.batch_size auto resumes with it, never probing again)

A checkpoint is written into a temporary sibling folder and renamed into place (io.atomic_dir), so
a step-N folder that exists is complete; a kill mid-write leaves only a hidden temporary folder,
which the next start removes. The last KEEP checkpoints are kept.

Resuming is only allowed from a checkpoint with the same fingerprint (params, data hash, base model
hash); checkpoints of another run are discarded with a warning, never silently reused.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loraline import io

FORMAT = 2  # 2: one RNG state per data-parallel rank
KEEP = 2
STATE = "state.json"
OBJECTIVE = "objective.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


# --- encoding nested state (optimizer / scheduler state_dicts) as JSON + named tensors ------------


def encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of `obj`; tensors move into `tensors` under their path; int keys and tuples survive."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {path} of type {type(obj).__name__}")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        return {k: decode(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    return obj


# --- RNG states -----------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's RNG states: (JSON-able python/numpy states, torch CPU and current-GPU tensors).

    Only the current GPU's generator: a data-parallel rank owns one GPU, and reading the others'
    would create a CUDA context on each of them."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    meta = {"python": [version, list(state), gauss_next], "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


# --- save / find / load ---------------------------------------------------------------------------


def step_dir(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"step-{step:08d}"


def save(
    checkpoint_dir: Path,
    *,
    step: int,
    fingerprint: str,
    trainable: dict[str, torch.nn.Parameter],
    best: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, Any],
    position: dict[str, int],
    keep: int = KEEP,
    rng: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None,
    batch: dict[str, Any] | None = None,
    objective: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write step-N atomically, then prune to the last `keep`. `rng`: every rank's RNG states
    (capture_rng_state, gathered in rank order); default this process's states as they are now. `batch`: the
    micro-batch the run resolved (autobatch.BatchChoice), which a resumed train.batch_size auto run reuses.
    `objective`: the objective's state (Objective.state), written only when it holds something."""
    final = step_dir(checkpoint_dir, step)
    tensors: dict[str, torch.Tensor] = {}
    rng = rng if rng is not None else [capture_rng_state()]
    for rank, (_, rank_tensors) in enumerate(rng):
        tensors.update({f"rank{rank}.{name}": t for name, t in rank_tensors.items()})
    state = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "step": step,
        "data_position": position,  # where the next step starts: epoch and optimizer step within it
        "progress": progress,
        "optimizer": encode(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": encode(scheduler.state_dict(), "scheduler", tensors),
        "rng": [meta for meta, _ in rng],
        "batch": batch,
    }
    with io.atomic_dir(final) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, tmp / "adapter.safetensors")
        if best is not None:
            save_file(best, tmp / "best.safetensors")
        if objective:
            save_file({k: t.detach().cpu().contiguous() for k, t in objective.items()}, tmp / OBJECTIVE)
        save_file(tensors, tmp / "optimizer.safetensors")
        io.write_json(tmp / STATE, state)
    for old in _step_dirs(checkpoint_dir)[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in Path(checkpoint_dir).iterdir() if Path(checkpoint_dir).is_dir() else ():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resumable(checkpoint_dir: Path, fingerprint: str) -> Checkpoint | None:
    """The newest checkpoint of this very run; stale temporaries and other runs' checkpoints are removed."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    for p in checkpoint_dir.glob(".step-*.tmp-*"):  # a write that a kill interrupted
        shutil.rmtree(p, ignore_errors=True)
    found: Checkpoint | None = None
    for step, path in reversed(_step_dirs(checkpoint_dir)):
        try:
            state = json.loads((path / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        if state.get("format") == FORMAT and state.get("fingerprint") == fingerprint:
            found = found or Checkpoint(path, step, state)
        else:
            log.warning("discarding checkpoint %s: it belongs to a run with other params, data or base model", path)
            shutil.rmtree(path, ignore_errors=True)
    return found


def load(
    ckpt: Checkpoint,
    *,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
) -> dict[str, torch.Tensor] | None:
    """Restore weights, optimizer, scheduler and (this rank's) RNG states in place; returns the best
    adapter (if saved)."""
    weights = load_file(ckpt.path / "adapter.safetensors")
    if set(weights) != set(trainable):
        raise RuntimeError(f"checkpoint {ckpt.path} does not match the model's trainable parameters")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    tensors = load_file(ckpt.path / "optimizer.safetensors")
    optimizer.load_state_dict(decode(ckpt.state["optimizer"], tensors))
    scheduler.load_state_dict(decode(ckpt.state["scheduler"], tensors))
    prefix = f"rank{rank}."
    restore_rng(
        ckpt.state["rng"][rank], {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
    )
    best = ckpt.path / "best.safetensors"
    return load_file(best) if best.exists() else None


def objective_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The objective's state saved with the checkpoint (empty when it kept none)."""
    path = ckpt.path / OBJECTIVE
    return load_file(path) if path.exists() else {}

"""One rank of a data-parallel train stage: `torchrun ... -m loraline.train.worker SPEC.json`.

Started by loraline.train.distributed.launch, never by hand: the spec carries the typed params
(as JSON, validated again here) and the folders, so every rank trains exactly what the launcher
was asked to train. Rank 0 writes the adapter and the run's timing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loraline import io
from loraline.config import BaseParams, TrainParams
from loraline.train.distributed import world_from_env
from loraline.train.remote import Target
from loraline.train.stage import train_adapter


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        return _train(spec)
    except Exception as exc:  # the launcher shows this, not torchrun's wall of text
        rank = world_from_env().rank
        Path(spec["result_path"]).with_name(f"error-rank{rank}.txt").write_text(
            f"{type(exc).__name__}: {exc}", encoding="utf-8"
        )
        raise


def _train(spec: dict) -> int:
    result = train_adapter(
        TrainParams.model_validate(spec["train"]),
        base_dir=Path(spec["base_dir"]),
        base_params=BaseParams.model_validate(spec["base"]),
        dataset_dir=Path(spec["dataset_dir"]),
        out_dir=Path(spec["out_dir"]),
        checkpoint_dir=Path(spec["checkpoint_dir"]) if spec.get("checkpoint_dir") else None,
        checkpoint_remote=Target.from_dict(spec.get("checkpoint_remote")),
        progress=spec.get("progress", False),
    )
    if world_from_env().main:
        io.write_json(Path(spec["result_path"]), {"timing": result.timing})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

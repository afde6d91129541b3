"""Everything a registered version must answer about its origin, gathered from what DVC already recorded.

dvc.lock is the source of truth for content (it is what `dvc repro` checked and `dvc push` stored),
so the lineage quotes its md5s rather than re-hashing folders; the snapshot commit then pins that
dvc.lock, params.yaml and the raw data in git. Only non-secret facts go in: hashes, params,
metrics, versions. It is written into a git tag, which is shared with whoever can fetch the repo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from loraline.config import ConfigError, Params
from loraline.layout import Layout, stage_id
from loraline.provenance import library_versions
from loraline.records import RecordError, TrainRecord
from loraline.registry.consistency import entry_hashes, evidence_problems, lock_stages, read_lock, tenant_stages
from loraline.registry.snapshot import head_commit


def artifact_paths(tenant: str, params: Params | None = None) -> dict[str, str]:
    """The registry's artifact names for a tenant and the DVC output each versions: <tenant>-adapter, and
    <tenant>-onnx when the tenant's deploy.targets builds it (every target when `params` is not given)."""
    return (
        Layout().artifacts(tenant) if params is None else Layout().artifacts(tenant, params.deploy_for(tenant).targets)
    )


def missing_artifacts(root: str | Path, params: Params) -> dict[str, str]:
    """Artifacts params.yaml's tenants need that dvc.yaml's `artifacts:` lacks (or declares at another path)."""
    path = Path(root) / "dvc.yaml"
    declared = (yaml.safe_load(path.read_text()) or {}).get("artifacts") or {} if path.exists() else {}
    want = {name: rel for t in params.tenant_names for name, rel in artifact_paths(t, params).items()}
    return {name: rel for name, rel in want.items() if (declared.get(name) or {}).get("path") != rel}


def check_artifacts_declared(root: str | Path, params: Params, if_present: bool = False) -> None:
    """Fail naming the entries to add: DVC cannot template `artifacts:` per tenant, so they are listed by hand.

    `if_present`: pass silently when `root` has no dvc.yaml (a params file checked on its own)."""
    if if_present and not (Path(root) / "dvc.yaml").exists():
        return
    missing = missing_artifacts(root, params)
    if missing:
        entries = "".join(f"  {name}:\n    path: {rel}\n    type: model\n" for name, rel in missing.items())
        raise ConfigError(
            f"dvc.yaml's artifacts: section lacks {', '.join(missing)} (one adapter entry per tenant in params.yaml, "
            "and one onnx entry per tenant whose deploy.targets has onnx; "
            f"DVC does not generate them). Add:\nartifacts:\n{entries}"
        )


def locked_out(lock: dict[str, Any], stage: str, path: str) -> str | None:
    """The md5 dvc.lock records for `stage`'s output `path` (None when the stage has not run)."""
    return entry_hashes((lock.get(stage) or {}).get("outs")).get(path)


def tenant_outputs(lock: dict[str, Any], tenant: str) -> dict[str, str | None]:
    """The hashes dvc.lock records for the tenant's adapter, merged model and ONNX export, and the base."""
    rel = Layout()  # dvc.lock names outputs relative to the project root
    return {
        "adapter": locked_out(lock, stage_id("train", tenant), rel.relative(rel.adapter_dir(tenant))),
        "merged": locked_out(lock, stage_id("merge", tenant), rel.relative(rel.merged_dir(tenant))),
        "onnx": locked_out(lock, stage_id("export", tenant), rel.relative(rel.onnx_dir(tenant))),
        "base": locked_out(lock, stage_id("base"), rel.relative(rel.base_dir)),
    }


def gate_summary(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    """The verdict a version's lineage keeps of gate.json: passed and the failed rules."""
    return None if gate is None else {"passed": gate.get("passed"), "failed": gate.get("failed", [])}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train_data_sha256(path: Path) -> str | None:
    """The train record's data hash; None when there is no readable record (lineage records what it finds)."""
    try:
        return TrainRecord.read(path).data.sha256
    except (OSError, RecordError):
        return None


def tenant_lineage(root: str | Path, params: Params, tenant: str, snapshot: str | None = None) -> dict[str, Any]:
    """Hashes, params, metrics and library versions behind the tenant's current DVC outputs (JSON-safe)."""
    root, layout = Path(root), Layout(Path(root))
    params.tenant_params(tenant)
    lock = read_lock(root, [tenant])
    stages = lock_stages(lock, tenant_stages(tenant))
    rel = Layout()  # dvc.lock names outputs relative to the project root
    evaluation = _json(layout.evaluation_results_path(tenant)) or {}
    problems = evidence_problems(stages)
    return {
        "tenant": tenant,
        "git": {"head": head_commit(root), "snapshot": snapshot},
        "outputs": tenant_outputs(lock, tenant),
        # dvc.lock's chain: whether merge, export, evaluate and gate ran on the outputs recorded here
        "consistency": {"consistent": not problems, "problems": problems},
        "data": {
            "prepared_md5": locked_out(lock, stage_id("prepare", tenant), rel.relative(rel.prepared_dir(tenant))),
            "train_data_sha256": _train_data_sha256(layout.train_record_path(tenant)),
            "raw_dir": str(params.tenant_params(tenant).raw_dir),
        },
        "dvc": stages,
        "params": {
            "train": params.train_for(tenant).model_dump(mode="json"),
            "gate": params.gate_for(tenant).model_dump(mode="json"),
            "deploy": params.deploy_for(tenant).model_dump(mode="json"),
            **{s: getattr(params, s).model_dump(mode="json") for s in ("prepare", "merge", "export", "evaluate")},
        },
        "metrics": {
            "eval": evaluation.get("models"),
            "test_rows": evaluation.get("test_rows"),
            "gate": gate_summary(_json(layout.gate_path(tenant))),
        },
        "libraries": library_versions(),
    }


def fetch_output(root: str | Path, path: str, commit: str, dest: Path) -> Path:
    """`dvc get <root> <path> --rev <commit>`: a DVC output as of a version's commit, from the local
    cache when it has it, else the DVC remote."""
    from dvc.repo import Repo

    Repo.get(str(root), path, out=str(dest), rev=commit)
    return dest

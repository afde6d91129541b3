"""bench/scale_tenants.py's fixtures and measurements at their smallest: 2 generated tenants, a 10-tag registry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from loraline.config import load_params
from loraline.dvcfiles import read_lock
from loraline.registry.gto_registry import GtoRegistry

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "scale_tenants.py"
PER_TENANT = ("documents", "synthesize", "prepare", "train", "merge", "export", "evaluate", "gate")


def _bench():
    spec = importlib.util.spec_from_file_location("scale_tenants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_tenants_are_a_valid_project_with_a_lock_entry_per_stage(tmp_path):
    bench = _bench()
    project = tmp_path / "p"
    bench.make_tenant_project(project, 2)
    params = load_params(project / "params.yaml")
    assert params.tenant_names == ["t0000", "t0001"]
    assert (project / "data/raw/t0001/orders.jsonl").read_bytes().count(b"\n") == 30
    assert sorted(p.name for p in (project / "pipelines").iterdir()) == ["t0000", "t0001", "tenant.yaml"]
    lock = read_lock(project)
    assert set(lock) == {"base"} | {f"{s}@{t}" for s in PER_TENANT for t in ("t0000", "t0001")}
    assert set(read_lock(project, ["t0001"])) == {"base"} | {f"{s}@t0001" for s in PER_TENANT}
    assert lock["train@t0001"]["outs"][0]["path"] == "models/adapters/t0001"
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["artifacts"]
    assert sorted(declared) == ["t0000-adapter", "t0000-onnx", "t0001-adapter", "t0001-onnx"]


def test_registry_tags_read_as_loraline_wrote_them_and_the_poll_is_measured(tmp_path):
    bench = _bench()
    repo = tmp_path / "registry"
    tenants, tags = bench.make_registry(repo, 10)
    assert (tenants, tags) == (1, 8)  # 2 versions of adapter and onnx, each registered and promoted
    registry = GtoRegistry(repo)
    assert [v.version for v in registry.versions("t0000-onnx")] == ["v0.0.1", "v0.0.2"]
    assert registry.production("t0000-adapter").version == "v0.0.2"
    assert registry.latest("t0000-adapter").lineage["tenant"] == "t0000"
    [poll] = bench.run_child(["registry", str(repo), "serving poll"], repo, 120)
    assert poll["served"] == 1 and poll["wall_s"] >= 0
    assert (poll["registry_reads"], poll["tag_reads"], poll["artifact_reads"]) == (0, 1, 0)  # never GTO's state
    assert poll["tag_parses"] == 8
    [again] = bench.run_child(["registry", str(repo), "serving poll again"], repo, 120)
    assert (again["served"], again["tag_reads"], again["tag_parses"]) == (1, 1, 0)  # nothing changed: nothing parsed
    [release] = bench.run_child(["registry", str(repo), "release+promote"], repo, 120)
    assert (release["registry_reads"], release["version"]) == (0, "v0.0.3")  # written without GTO's state
    timed_out = dict(kind="op", section="registry", tags=8, tenants=1, op="serving poll", wall_s=5.0, timeout=True)
    table = bench.render_table([dict(kind="op", section="registry", tags=8, tenants=1, **poll), timed_out])
    assert "| registry | 8 tags, 1 tenants | serving poll |" in table and ">5 (timeout)" in table

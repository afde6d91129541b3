"""End to end through Prefect (test harness server): the flow drives the real DVC stages, publishes
its artifacts, registers GTO versions and promotes; re-runs are idempotent; one tenant's change
re-runs and promotes only that tenant; a failed gate or a failed stage leaves production alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from e2e_project import PER_TENANT, assert_new_rows_rerun, make_tiny_project, sh, stages_run

from loraline.dvcfiles import read_lock
from loraline.layout import tenant_dvc_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TENANTS = ("acme-shop", "globex-it")


@pytest.fixture(scope="module")
def harness():
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, harness) -> Path:
    dest = make_tiny_project(tmp_path_factory.mktemp("prefect") / "project")
    saved = dict(os.environ)
    # the registry commits version snapshots: git needs an identity, whatever the machine has
    os.environ.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t.invalid",
        DVC_NO_ANALYTICS="1",
    )
    yield dest
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def pipeline(project: Path):
    spec = importlib.util.spec_from_file_location("loraline_flow_under_test", project / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pipeline


def tags(project: Path) -> set[str]:
    return set(subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True, check=True).stdout.split())


def stages_ran(state) -> set[str]:
    return set(state.result()["stages_ran"])


def release(project: Path, tenant: str) -> dict:
    return json.loads((project / "reports" / tenant / "release.json").read_text())


@pytest.fixture(scope="module")
def first(project: Path, pipeline):
    state = pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    return state


def test_first_run_runs_every_stage_registers_and_promotes(project: Path, first):
    result = first.result()
    assert set(result["releases"]) == set(TENANTS)
    assert set(result["stages_ran"]) == {"base"} | {f"{s}@{t}" for s in PER_TENANT for t in TENANTS}
    for tenant in TENANTS:
        r = release(project, tenant)
        assert r["version"] == "v0.0.1" and r["registered_new"] and r["promoted"], r
        assert r["production_after"] == "v0.0.1"
    assert {f"{t}-{kind}@v0.0.1" for t in TENANTS for kind in ("adapter", "onnx")} <= tags(project)
    assert {f"{t}-{kind}#prod#1" for t in TENANTS for kind in ("adapter", "onnx")} <= tags(project)
    # DVC owns lineage: after the flow nothing is stale and `dvc repro` has nothing to add
    lock = read_lock(project)
    assert stages_run(sh("dvc", "repro", "--all-pipelines", cwd=project)) == set()
    assert read_lock(project) == lock
    assert "up to date" in sh("dvc", "status", cwd=project)


def test_first_run_publishes_reports_as_prefect_artifacts(first):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    for tenant in TENANTS:
        assert {f"{tenant}-evaluation", f"{tenant}-metrics", f"{tenant}-gate"} <= keys
    assert "loraline-run" in keys


def _tag_lock(project: Path, tag: str, tenant: str) -> dict:
    """The dvc.lock entries a registry tag's version was built from: the root's and its tenant's."""
    stages = {}
    for path in ("dvc.lock", tenant_dvc_file(tenant, "dvc.lock")):
        shown = subprocess.run(
            ["git", "show", f"{tag}:{path}"], cwd=project, capture_output=True, text=True, check=True
        )
        stages.update(yaml.safe_load(shown.stdout)["stages"])
    return stages


def _interval(project: Path, stage: str) -> tuple[float, float]:
    from datetime import datetime

    timing = json.loads((project / "reports" / "timing" / f"{stage}.json").read_text())
    end = datetime.fromisoformat(timing["finished_at"]).timestamp()
    return end - timing["wall_s"], end


def test_tenants_in_parallel_end_exactly_where_the_sequential_run_did(project: Path, pipeline, first):
    """Every stage forced again, two tenants at once in one workspace: the same dvc.lock entries,
    no lost update, and nothing new for the registry (the same adapters, so the same versions)."""
    lock_before = read_lock(project)
    tags_before = tags(project)
    state = pipeline(project_dir=str(project), force=True, parallel=2, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["stages_ran"]) == {"base"} | {f"{s}@{t}" for s in PER_TENANT for t in TENANTS}
    assert read_lock(project) == lock_before
    from loraline.tools import tool, tool_env

    status = subprocess.run(
        [tool("dvc"), "status"], cwd=project, env=tool_env(), capture_output=True, text=True, check=True
    )
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    assert tags(project) == tags_before
    for tenant in TENANTS:
        assert not result["releases"][tenant]["registered_new"], result["releases"][tenant]
        own = {name: entry for name, entry in lock_before.items() if name.partition("@")[2] in ("", tenant)}
        assert _tag_lock(project, f"{tenant}-adapter@v0.0.1", tenant) == own
    # and it was parallel: some stage of one tenant ran while one of the other tenant did
    spans = {
        t: [_interval(project, f"{s}@{t}") for s in ("prepare", "train", "merge", "export", "evaluate")]
        for t in TENANTS
    }
    assert any(a0 < b1 and b0 < a1 for a0, a1 in spans[TENANTS[0]] for b0, b1 in spans[TENANTS[1]]), spans


def test_second_run_reruns_nothing_and_promotes_nothing(project: Path, pipeline, first):
    before = tags(project)
    state = pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    assert stages_ran(state) == set()
    assert tags(project) == before
    for tenant in TENANTS:
        r = release(project, tenant)
        assert not r["registered_new"] and not r["promoted"] and r["production_after"] == "v0.0.1"


def test_one_tenants_new_data_reruns_and_releases_only_that_tenant(project: Path, pipeline, first):
    before = tags(project)
    target = sorted((project / "data" / "raw" / "acme-shop").glob("*.jsonl"))[0]
    with target.open("a", encoding="utf-8") as fh:
        fh.write(
            json.dumps(
                {
                    "instruction": "Extract the order request as JSON.",
                    "input": "Hi, please cancel order 55120.",
                    "output": '{"intent": "cancel"}',
                }
            )
            + "\n"
        )
    state = pipeline(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    assert_new_rows_rerun(stages_ran(state), "acme-shop")
    new_tags = tags(project) - before
    assert {"acme-shop-adapter@v0.0.2", "acme-shop-onnx@v0.0.2"} <= new_tags
    assert not any(t.startswith("globex-it") for t in new_tags)
    acme = release(project, "acme-shop")
    assert acme["version"] == "v0.0.2" and acme["registered_new"]
    assert acme["production_before"] == "v0.0.1"
    # the promotion was decided against the production version, on the candidate's test split
    prod_rule = next(r for r in acme["rules"] if r["name"] == "no_regression_vs_prod")
    assert prod_rule["reason"] != "no production version"
    assert acme["production_after"] == ("v0.0.2" if acme["promoted"] else "v0.0.1")


def test_rollback_and_consumers_fetch_production_with_dvc_artifacts_get(project: Path, first, tmp_path: Path):
    if release(project, "acme-shop")["production_after"] != "v0.0.2":  # the release may have kept v0.0.1
        sh("loraline", "registry", "promote", "acme-shop", "v0.0.2", "--reason", "e2e", cwd=project)
    weights = "adapter_model.safetensors"

    def prod_adapter(dest: Path) -> bytes:
        sh("dvc", "artifacts", "get", ".", "acme-shop-adapter", "--stage", "prod", "-o", str(dest), cwd=project)
        return (dest / weights).read_bytes()

    assert prod_adapter(tmp_path / "v2") == (project / "models" / "adapters" / "acme-shop" / weights).read_bytes()
    out = sh("loraline", "registry", "rollback", "acme-shop", cwd=project)
    assert "v0.0.2 -> v0.0.1" in out
    sh(
        "dvc",
        "get",
        ".",
        "models/adapters/acme-shop",
        "--rev",
        "acme-shop-adapter@v0.0.1",
        "-o",
        str(tmp_path / "ref"),
        cwd=project,
    )
    assert prod_adapter(tmp_path / "v1") == (tmp_path / "ref" / weights).read_bytes()
    assert (tmp_path / "v1" / weights).read_bytes() != (tmp_path / "v2" / weights).read_bytes()
    shown = sh("loraline", "registry", "show", "acme-shop-adapter", cwd=project)
    assert "production v0.0.1" in shown


def test_failed_gate_registers_but_leaves_production(project: Path, pipeline, first):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"]["globex-it"]["train"] = {"learning_rate": 0.0005}  # a new adapter...
    params["tenants"]["globex-it"]["gate"] = {"min_gain_over_base": 1000.0}  # ...that cannot pass
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prod_before = {t for t in tags(project) if t.startswith("globex-it") and "#prod#" in t}

    state = pipeline(tenants=["globex-it"], project_dir=str(project), return_state=True)

    assert state.is_completed(), state.message  # a failed gate is a verdict, not a crash
    r = release(project, "globex-it")
    assert r["registered_new"] and r["version"] == "v0.0.2"
    assert not r["promoted"] and r["production_after"] == "v0.0.1"
    assert "beats_base" in r["reason"]
    assert {t for t in tags(project) if t.startswith("globex-it") and "#prod#" in t} == prod_before


def test_stage_failing_midway_fails_the_run_clearly_and_writes_nothing(project: Path, pipeline, first):
    params = yaml.safe_load((project / "params.yaml").read_text())
    # the merge is computed, then refused by its parity check before anything is written
    params["tenants"]["acme-shop"]["gate"] = {"max_merge_logit_diff": 1e-15}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = tags(project)

    state = pipeline(tenants=["acme-shop"], project_dir=str(project), return_state=True)

    assert state.is_failed()
    with pytest.raises(RuntimeError) as info:
        state.result()
    message = str(info.value)
    assert "merge@acme-shop" in message and "acme-shop" in message
    assert "logit" in message.lower()
    merged = project / "models" / "merged"
    assert not (merged / "acme-shop").exists()
    assert not [p for p in merged.iterdir() if p.name.startswith(".acme-shop")], "no temporary leftovers"
    assert tags(project) == before

"""Canary rollout end to end (serve.canary): the real vLLM server (CPU) behind the gateway, the real `openai`
client, the real registry and DVC, on the tiny project. A good version promoted on canary is kept; a broken
adapter (it fails the deployment check) and a version the engine fails on (its adapter gone from vLLM, the
error path) are rolled back in the registry by the server itself; no client request fails meanwhile.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml
from e2e_project import copy_project, sh
from e2e_serve import events, start_serve

from loraline.layout import dvc_target
from loraline.registry.canary import decision_tag, read_decision
from loraline.registry.gto_registry import GtoRegistry
from loraline.registry.snapshot import snapshot_commit

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.serve]
TENANT, ARTIFACTS = "acme-shop", ("acme-shop-adapter", "acme-shop-onnx")
CANARY = {"fraction": 0.5, "min_requests": 4, "max_error_rate": 0.2, "max_latency_ratio": 5}


@pytest.fixture(scope="module")
def project(tmp_path_factory, built) -> Path:
    project = copy_project(built.project, tmp_path_factory.mktemp("canary") / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["serve"]["canary"] = CANARY  # promotions from here on are canaries
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("loraline", "registry", "release", cwd=project)
    assert out.count("prod none -> v0.0.1") == 2 and "on canary" not in out, out  # a first production replaces nothing
    return project


@pytest.fixture(scope="module")
def server(project: Path):
    serving = start_serve(project)
    yield serving.url, f"http://127.0.0.1:{serving.engine_port}"
    serving.proc.terminate()
    serving.proc.wait(60)


def _models(url: str) -> dict[str, dict]:
    try:
        return {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]}
    except httpx.HTTPError:
        return {}


def _traffic_until(url: str, event: str, version: str, project: Path, timeout_s: float = 240) -> list[str]:
    """Chat requests one after another (the openai client, no retries: any failure fails the test) until the
    events file has `event` for `version`; the versions that answered, from the x-loraline-version header."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answered, deadline = [], time.monotonic() + timeout_s
    while not any(e["event"] == event and e["version"] == version for e in events(project)):
        assert time.monotonic() < deadline, (
            f"no {event} for {version} after {len(answered)} requests: {events(project)[-3:]}"
        )
        raw = client.chat.completions.with_raw_response.create(
            model=TENANT,
            messages=[{"role": "user", "content": "Where is my order 12345?"}],
            max_tokens=4,
            temperature=0,
        )
        assert raw.parse().model == TENANT and raw.parse().choices[0].message.content is not None
        answered.append(raw.headers["x-loraline-version"])
    return answered


def _register(project: Path, commit: str, lineage: dict) -> str:
    registry = GtoRegistry(project)
    version = None
    for name in ARTIFACTS:
        version = registry.register(name, commit, lineage, version=version).version
    return version


def _same_build(project: Path, version: str) -> str:
    """A new version of the very build `version` is (the same tree in a commit of its own), registered."""
    old = GtoRegistry(project).version(ARTIFACTS[0], version)
    commit = sh(
        "git",
        "commit-tree",
        f"{old.commit}^{{tree}}",
        "-p",
        old.commit,
        "-m",
        f"e2e: {version}'s build again",
        cwd=project,
    ).strip()
    return _register(project, commit, old.lineage)


def _corrupted_build(project: Path) -> str:
    """A version whose adapter is noise: written into the DVC output, committed by DVC, snapshotted, registered."""
    import torch
    from safetensors.torch import load_file, save_file

    sh("dvc", "unprotect", "models/adapters/acme-shop", cwd=project)
    weights = project / "models" / "adapters" / "acme-shop" / "adapter_model.safetensors"
    noise = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=noise) * 2 for k, v in load_file(weights).items()}, weights)
    sh("dvc", "commit", "--force", dvc_target("train@acme-shop"), cwd=project)
    commit = snapshot_commit(project, "e2e: acme-shop's adapter replaced by noise")
    return _register(project, commit, {"note": "e2e: a deliberately corrupted adapter"})


def _production(project: Path) -> list[str]:
    return [GtoRegistry(project).production(name).version for name in ARTIFACTS]


def test_a_good_canary_is_kept_and_broken_ones_are_rolled_back_with_no_failed_request(project, server):
    url, engine = server
    assert {t: m["version"] for t, m in _models(url).items()} == {"acme-shop": "v0.0.1", "globex-it": "v0.0.1"}

    # 1. a good version: half of the requests, then all of them once min_requests answered well
    good = _same_build(project, "v0.0.1")
    out = sh("loraline", "registry", "promote", TENANT, good, "--reason", "canary e2e: good", cwd=project)
    assert "on canary (serve.canary)" in out
    answered = _traffic_until(url, "canary_kept", good, project)
    assert {"v0.0.1", good} <= set(answered)
    assert _production(project) == [good, good]
    number = GtoRegistry(project).history(ARTIFACTS[0])[-1].number
    kept = read_decision(project, ARTIFACTS[0], number)
    assert (
        kept.kept
        and kept.facts["canary"]["answers"] >= CANARY["min_requests"]
        and kept.by.startswith("loraline serve on ")
    )
    _wait_until(
        lambda: "canary" not in _models(url)[TENANT], project
    )  # the event is written just before the route moves
    assert set(_traffic_until_count(url, 3)) == {good}

    # 2. a corrupted adapter: the deployment check refuses it and the server rolls the registry back at once
    broken = _corrupted_build(project)
    sh("loraline", "registry", "promote", TENANT, broken, "--reason", "canary e2e: corrupted", cwd=project)
    answered = _traffic_until(url, "check_failed", broken, project)
    assert set(answered) <= {good}  # it never took a request
    failed = [e for e in events(project) if e["event"] == "check_failed" and e["version"] == broken][-1]
    assert failed["registry"]["kept"] is False and failed["registry"]["reason"].startswith("deployment check failed")
    assert _production(project) == [good, good]
    rollback = GtoRegistry(project).history(ARTIFACTS[0])[-1]
    assert (
        rollback.version == good
        and "after the canary of" in rollback.message
        and "deployment check failed" in rollback.message
    )

    # 3. a version the engine fails on: its adapter taken out of vLLM behind the gateway's back, as an
    # engine restart or eviction would; its requests are answered by the stable version, then it is rolled back
    lost = _same_build(project, good)
    sh("loraline", "registry", "promote", TENANT, lost, "--reason", "canary e2e: engine loses it", cwd=project)
    _wait_until(lambda: _models(url)[TENANT].get("canary", {}).get("version") == lost, project)
    assert (
        httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": f"{TENANT}@{lost}"}, timeout=30).status_code
        == 200
    )
    answered = _traffic_until(url, "canary_rolled_back", lost, project)
    assert set(answered) == {good}  # every canary request was answered again by the stable version
    rolled = [e for e in events(project) if e["event"] == "canary_rolled_back"][-1]
    assert rolled["reason"].startswith("error rate 1.00") and rolled["serving"] == good
    assert _production(project) == [good, good]
    number = GtoRegistry(project).history(ARTIFACTS[0])[-2].number
    assert "error rate 1.00" in sh("git", "tag", "--list", "-n1", decision_tag(ARTIFACTS[0], number), cwd=project)
    assert GtoRegistry(project).history(ARTIFACTS[0])[-1].message.count("serve.canary.max_error_rate 0.2") == 1


def _traffic_until_count(url: str, n: int) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return [
        client.chat.completions.with_raw_response.create(
            model=TENANT, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        ).headers["x-loraline-version"]
        for _ in range(n)
    ]


def _wait_until(condition, project: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, events(project)[-3:]
        time.sleep(0.5)

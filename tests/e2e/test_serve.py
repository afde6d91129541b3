"""`loraline serve` end to end: the real vLLM server (CPU) behind the gateway, the real `openai` client,
the real registry, on the tiny project's two promoted tenants (the serving environment: e2e_serve).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from e2e_project import _env, sh
from e2e_serve import KEYS, TENANTS, client, events, free_port, released_copy, served, serving_python, start_serve

from loraline.layout import dvc_target
from loraline.tools import tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.serve]


@pytest.fixture(scope="module")
def project(tmp_path_factory, built) -> Path:
    return released_copy(built.project, tmp_path_factory.mktemp("serve") / "project")


@pytest.fixture(scope="module")
def server(project: Path):
    serving = start_serve(project, keys=KEYS)
    proc, engine_port = serving.proc, serving.engine_port
    engine_group = json.loads((project / ".loraline" / "serve" / "engine.pid").read_text())["engine"]["pid"]
    yield serving.url, proc
    # Killed outright, as the OOM killer or kill -9 would: vLLM runs in a session of its own and must
    # still end with it (a parent-death signal), its engine core too, freeing its port.
    os.killpg(proc.pid, 9)
    proc.wait(60)
    deadline = time.monotonic() + 15
    while (_group(engine_group) or not _port_free(engine_port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group(engine_group) and _port_free(engine_port), (
        f"the vLLM engine (processes {_group(engine_group)}, port {engine_port}) outlived a killed loraline serve"
    )
    assert not _engines_on(engine_port)


def _group(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (vLLM's API server and its engine core)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, _, group = (entry / "stat").read_text().rsplit(") ", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(group) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _engines_on(port: int) -> list[int]:
    """Live processes whose command line is a vLLM server on `port`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or it ended while we looked
            continue
        if b"vllm.entrypoints.openai.api_server" in argv and str(port).encode() in argv:
            found.append(int(entry.name))
    return found


def test_a_start_fails_at_once_naming_a_taken_port(project, tmp_path):
    """Before vLLM starts: a port already listened on is named with its param and its holder (this
    test's own socket here), instead of a gateway talking to whatever answers there."""
    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())  # a project of its own: no pid file
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for param, other in (("serve.engine_port", "serve.port"), ("serve.port", "serve.engine_port")):
            cmd = [
                tool("loraline"),
                "serve",
                "--python",
                serving_python(),
                "--set",
                f"{param}={port}",
                "--set",
                f"{other}={free_port()}",
            ]
            started = time.monotonic()
            out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
            assert out.returncode == 1 and time.monotonic() - started < 60, out.stderr[-3000:]
            assert (
                f"loraline serve: error: port {port} on 127.0.0.1 ({param}) is already in use by pid {os.getpid()} ("
                in out.stderr
            )
            assert "Traceback" not in out.stderr
    assert not (tmp_path / "reports" / "serve" / "engine.log").exists()  # vLLM was never started


def test_every_tenant_is_answered_by_its_production_adapter(project, server):
    url, _ = server
    assert served(url) == dict.fromkeys(TENANTS, "v0.0.1")
    loaded = [e for e in events(project) if e["event"] == "served"]
    assert {e["tenant"] for e in loaded} == set(TENANTS)
    assert all(e["check"]["agreement"] == 1.0 for e in loaded)  # greedy answers = the merged model's
    for tenant in TENANTS:
        raw = client(url, tenant).chat.completions.with_raw_response.create(
            model=tenant,
            messages=[{"role": "user", "content": "Where is my order 12345?"}],
            max_tokens=8,
            temperature=0,
        )
        reply = raw.parse()
        assert raw.headers["x-loraline-version"] == "v0.0.1" and reply.model == tenant
        assert reply.choices[0].message.content is not None


def test_streaming_keys_unknown_models_and_overlong_prompts(server):
    from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

    url, _ = server
    acme = client(url)
    stream = acme.chat.completions.create(
        model="acme-shop", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks and all(c.model == "acme-shop" for c in chunks)
    # acme-shop's key: globex-it's model is answered as a model that does not exist is
    with pytest.raises(NotFoundError, match="does not exist or you do not have access to it"):
        acme.chat.completions.create(model="globex-it", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    key = {"Authorization": f"Bearer {KEYS['acme-shop']}"}
    other, none = (
        httpx.post(f"{url}/v1/completions", json={"model": m, "prompt": "hi"}, headers=key)
        for m in ("globex-it", "initech")
    )
    assert other.status_code == none.status_code == 404 and other.text.replace("globex-it", "initech") == none.text
    assert httpx.get(f"{url}/health").json() == {"engine": True}  # no key: up or down, no tenant named
    assert httpx.get(f"{url}/health", headers=key).json() == {"engine": True, "serving": {"acme-shop": "v0.0.1"}}
    for body in ([{"model": "acme-shop"}], {"model": ["acme-shop"], "prompt": "hi"}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=key)
        assert r.status_code == 400 and "must be" in r.json()["error"]["message"], r.text
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="not-a-key", max_retries=0).completions.create(
            model="acme-shop", prompt="hi", max_tokens=4
        )
    assert (
        httpx.post(f"{url}/v1/completions", json={"model": "acme-shop", "prompt": "hi"}).status_code == 401
    )  # no key
    with pytest.raises(BadRequestError):
        acme.completions.create(model="acme-shop", prompt="word " * 600, max_tokens=4)
    with pytest.raises(NotFoundError, match="does not exist"):
        acme.chat.completions.create(model="initech", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_promotion_and_rollback_are_served_without_a_restart_and_a_corrupt_version_is_refused(project, server):
    url, proc = server
    # a second acme-shop version: another learning rate for that tenant only, registered, promoted by hand
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"]["acme-shop"]["train"] = {"learning_rate": 0.004}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("dvc", "repro", dvc_target("gate@acme-shop"), cwd=project)
    sh("loraline", "registry", "release", "--tenant", "acme-shop", "--no-promote", cwd=project)
    sh("loraline", "registry", "promote", "acme-shop", "v0.0.2", "--force", "--reason", "serve e2e", cwd=project)
    _wait_for(url, "acme-shop", "v0.0.2")
    reply = client(url).chat.completions.with_raw_response.create(
        model="acme-shop", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert reply.headers["x-loraline-version"] == "v0.0.2"
    promoted = [e for e in events(project) if e["event"] == "served" and e["version"] == "v0.0.2"][-1]
    assert promoted["previous"] == "v0.0.1" and promoted["since_promotion_s"] < 60

    sh("loraline", "registry", "rollback", "acme-shop", cwd=project)
    _wait_for(url, "acme-shop", "v0.0.1")

    # v0.0.2's servable adapter altered on disk after it was prepared: promoting it again must fail
    # the deployment check and leave v0.0.1 served
    import torch
    from safetensors.torch import load_file, save_file

    [servable] = (project / ".loraline" / "serve" / "versions" / "acme-shop").glob(
        "v0.0.2-*/servable/adapter_model.safetensors"
    )
    noise = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=noise) * 2 for k, v in load_file(servable).items()}, servable)
    sh(
        "loraline",
        "registry",
        "promote",
        "acme-shop",
        "v0.0.2",
        "--force",
        "--reason",
        "serve e2e: corrupted",
        cwd=project,
    )
    deadline = time.monotonic() + 120
    while not [e for e in events(project) if e["event"] == "check_failed"] and time.monotonic() < deadline:
        time.sleep(1)
    failed = [e for e in events(project) if e["event"] == "check_failed"]
    assert failed and failed[-1]["version"] == "v0.0.2" and failed[-1]["serving"] == "v0.0.1", events(project)
    assert served(url)["acme-shop"] == "v0.0.1"
    assert proc.poll() is None  # one server process throughout


def _wait_for(url: str, tenant: str, version: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while served(url).get(tenant) != version:
        assert time.monotonic() < deadline, f"{tenant} not served at {version}: {served(url)}"
        time.sleep(0.5)

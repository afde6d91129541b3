"""Shared by the end-to-end tests that start the real `loraline serve` (vLLM on the CPU behind the gateway):
the serving Python, a released copy of the built tiny project, and a server started on free ports.

The serving environment is LORALINE_SERVE_PYTHON when set (a Python with vLLM), else the project's
.serve-venv built from its lock (`make serve-env`; the first build downloads vLLM from the registry).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from e2e_project import REPO, _env, copy_project, sh

from loraline.tools import tool

TENANTS = ("acme-shop", "globex-it")
KEYS = {"acme-shop": "key-for-acme", "globex-it": "key-for-globex"}  # serve.auth: one key per tenant


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_python() -> str:
    given = os.environ.get("LORALINE_SERVE_PYTHON")
    if given:
        return given
    from loraline.serve.environment import ensure_serving_env

    return str(ensure_serving_env(REPO / ".serve-venv").python)


def released_copy(built: Path, dest: Path) -> Path:
    """A copy of the built project at `dest` whose tenants are all released to production as v0.0.1."""
    project = copy_project(built, dest)
    out = sh("loraline", "registry", "release", cwd=project)
    assert out.count("prod none -> v0.0.1") == len(TENANTS), out
    return project


@dataclass(frozen=True)
class Serving:
    url: str  # the gateway
    proc: subprocess.Popen  # `loraline serve`, leader of its own session
    engine_port: int
    log: Path  # what it printed


def start_serve(project: Path, *overrides: str, keys: dict[str, str] | None = None) -> Serving:
    """`loraline serve` started in `project` on free ports (serve.auth with `keys`: tenant -> key), once every
    tenant is served; the caller stops it."""
    port, engine_port = free_port(), free_port()
    overrides = (
        f"serve.port={port}",
        f"serve.engine_port={engine_port}",
        "serve.poll_seconds=1",
        "serve.max_model_len=256",
        *(("serve.auth=true",) if keys else ()),
        *overrides,
    )
    cmd = [tool("loraline"), "serve", "--python", serving_python(), *[x for o in overrides for x in ("--set", o)]]
    log_path = project / "serve.log"
    env = {**_env(), **{f"LORALINE_SERVE_KEY_{t.upper().replace('-', '_')}": k for t, k in (keys or {}).items()}}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-4000:]
        try:
            if len(served(url, keys)) == len(TENANTS):
                return Serving(url, proc, engine_port, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, 15)
    raise AssertionError("serve did not come up:\n" + log_path.read_text()[-4000:])


def served(url: str, keys: dict[str, str] | None = KEYS) -> dict[str, str]:
    """tenant -> served version, as each tenant's own key sees /v1/models (all at once without keys)."""
    out = {}
    for key in (keys or {None: None}).values():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = httpx.get(f"{url}/v1/models", headers=headers, timeout=5).json()["data"]
        out.update({m["id"]: m["version"] for m in data})
    return out


def client(url: str, tenant: str = "acme-shop"):
    """The `openai` client with `tenant`'s key, no retries (a failure fails the test)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=KEYS[tenant], max_retries=0)


def events(project: Path) -> list[dict]:
    """reports/serve/events.jsonl: what the server did (served, check_failed, ...)."""
    path = project / "reports" / "serve" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

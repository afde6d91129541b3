"""`loraline serve`: the engine started on the base, every tenant's production version loaded and
checked, the gateway in front, and the registry followed until stopped (Ctrl-C stops it all)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from loraline.config import Params
from loraline.layout import Layout
from loraline.modelling.loading import resolve_base_model_path
from loraline.registry.canary import CanaryDecision, read_decision, record_decision
from loraline.serve.canary import Verdict
from loraline.serve.claims import claim
from loraline.serve.deployment import Deployment
from loraline.serve.engine import Engine, engine_command, engine_dtype, lora_rank_for, on_cpu
from loraline.serve.versions import ADAPTER_SUFFIX, Production, prepare_version, production_versions

log = logging.getLogger(__name__)
FALLBACK_RANK = 256  # nothing in production yet: room for adapters with trained embeddings (serve.adapters)


@dataclass(frozen=True)
class ServeFolders:
    """Where serving keeps its state, under the project: prepared versions, the engine's log, events."""

    root: Path

    @property
    def cache(self) -> Path:
        return self.root / ".loraline" / "serve" / "versions"

    @property
    def pid_file(self) -> Path:
        return self.root / ".loraline" / "serve" / "engine.pid"

    @property
    def engine_log(self) -> Path:
        return self.root / "reports" / "serve" / "engine.log"

    @property
    def events(self) -> Path:
        return self.root / "reports" / "serve" / "events.jsonl"


def start_deployment(params: Params, layout: Layout, python: Path) -> tuple[Engine, Deployment]:
    """The engine running and every tenant's production version served (each one checked)."""
    root, folders, tenants = layout.root, ServeFolders(layout.root), params.tenant_names
    base_dir = layout.base_dir
    prepare = partial(prepare_version, root, base_dir=base_dir, cache=folders.cache)  # (tenant, version, commit)
    remote, canary = params.orchestrate.registry_remote, params.serve.canary is not None
    production = _read_production(root, tenants, remote, canary)
    versions = [(t, p.version, p.commit) for t, p in production.items()] + [
        (t, *p.stable) for t, p in production.items() if p.stable
    ]
    ranks = [prepare(*v).rank for v in versions]
    rank = params.serve.max_lora_rank or lora_rank_for(ranks or [FALLBACK_RANK])
    model = Path(resolve_base_model_path(base_dir))
    cmd = engine_command(
        python,
        model,
        params.serve,
        dtype=engine_dtype(params.serve, params.merge.dtype),
        lora_rank=rank,
        max_loras=params.serve.max_loras or 2 * len(tenants),
        max_model_len=params.serve.max_model_len or _context(model),
        on_cpu=on_cpu(),
    )
    engine = Engine.start(cmd, params.serve, folders.engine_log, on_cpu(), pid_file=folders.pid_file)
    deployment = Deployment(
        engine,
        params.serve,
        prepare,
        partial(_read_production, root, tenants, remote, canary),
        folders.events,
        RegistryCanaryRecords(root, remote, replica_name()) if canary else None,
    )
    try:
        deployment.sync()
    except BaseException:
        engine.stop()
        raise
    return engine, deployment


def serve(params: Params, layout: Layout, python: Path) -> None:
    import uvicorn

    from loraline.serve.gateway import create_app, tenant_keys
    from loraline.serve.traffic import TrafficLog

    keys = tenant_keys(params.tenant_names, dict(os.environ)) if params.serve.auth else None  # before anything starts
    s = params.serve
    claim(ServeFolders(layout.root).pid_file, engine_port=s.engine_port, host=s.host, port=s.port)
    engine, deployment = start_deployment(params, layout, python)
    stop = threading.Event()
    watcher = threading.Thread(target=deployment.watch, args=(stop,), daemon=True, name="registry-watcher")
    watcher.start()
    traffic = TrafficLog(layout.traffic_root) if s.log_traffic else None
    print(
        f"serving {', '.join(f'{t} {v.version}' for t, v in sorted(deployment.routes.items())) or 'no tenant yet'} "
        f"on http://{s.host}:{s.port}/v1 (OpenAI API; the model is the "
        f"tenant's name); events: {ServeFolders(layout.root).events}"
        + (f"; traffic and feedback: {traffic.root}/<tenant>/" if traffic else ""),
        flush=True,
    )
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it
    # found. Python's default one ends the process on the spot, skipping `finally`, and the engine
    # (in a session of its own) would outlive us holding its memory and GPU: exit through Python instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(
            create_app(deployment, engine.url, keys, traffic=traffic),
            host=s.host,
            port=s.port,
            log_level="warning",
            access_log=False,
        )
    finally:
        stop.set()
        engine.stop()


def notify(params: Params) -> dict | None:
    """Tell a running gateway on this machine to read the registry now (the flow's release step);
    None when nothing is listening (no server running is not an error)."""
    import httpx

    try:
        r = httpx.post(f"http://127.0.0.1:{params.serve.port}/loraline/refresh", timeout=600)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else {"status": r.status_code, "body": r.text[:300]}


def _read_production(root: Path, tenants: list[str], remote: str | None, canary: bool) -> dict[str, Production]:
    """Production per tenant; with orchestrate.registry_remote, after fetching the remote's tags, so a
    replica on another machine follows promotions (and canary decisions) made anywhere."""
    if remote:
        from loraline.registry.sync import fetch_tags

        fetch_tags(root, remote)
    return production_versions(root, tenants, canary)


@dataclass(frozen=True)
class RegistryCanaryRecords:
    """Canary decisions kept as registry tags (registry.canary), against the registry remote when there is one."""

    root: Path
    remote: str | None
    replica: str  # who decides, in the tag message

    def decide(self, tenant: str, number: int, version: str, verdict: Verdict) -> CanaryDecision | None:
        return record_decision(
            self.root,
            self.remote,
            tenant,
            number,
            version,
            kept=verdict.keep,
            reason=verdict.reason,
            facts=verdict.facts(),
            by=self.replica,
        )

    def decision(self, tenant: str, number: int) -> CanaryDecision | None:
        return read_decision(self.root, tenant + ADAPTER_SUFFIX, number)


def replica_name() -> str:
    return f"loraline serve on {socket.gethostname()} (pid {os.getpid()})"


def _context(model: Path) -> int | None:
    config = model / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None

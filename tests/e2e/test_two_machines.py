"""Workers on two machines, simulated on one host with the real components: two clones of the project (each
cloned from a bare git repository, the project's `origin`, which is also the registry remote), one Prefect
server, one process work pool, a `prefect worker` per clone, and an S3 API (moto's server on 127.0.0.1) as
the DVC default remote that carries the data and the training checkpoints between them.

Both per-tenant deployments are triggered together; each worker takes one (`--limit 1`). globex-it is
retrained (`force`), and its worker (process tree and all: what losing a machine leaves) is SIGKILLed once a
checkpoint is on S3. The automations in flows/automations.yaml mark the silent run Lost and schedule it
again; the other worker runs it, training resumes from the pushed step, and the adapter is byte-identical to
the built project's uninterrupted one. At the end the registry remote holds exactly one version and one
promotion per artifact, and a third clone gets exactly the production artifacts from it and from S3.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from e2e_project import REPO, _env, copy_project, wait_for_prefect
from e2e_serve import events, free_port, served, serving_python

from loraline.tools import tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TENANTS = ("acme-shop", "globex-it")
RETRAINED = "globex-it"  # retrained on one machine, which is lost mid-training
# The S3 secret key: in the workers' environment only. Drawn per run: the built project holds this file (a copy of
# the repository), so a fixed string would be found in git by the very check that it is not.
SECRET = f"e2e-secret-{secrets.token_hex(8)}"
BUCKET = "loraline"
# The flow-run heartbeat (Prefect's minimum) and how long a silent run lives: three heartbeats, as
# flows/automations.yaml has it (with two, one heartbeat late under CI load made a live run Lost).
HEARTBEAT_S, SILENT_S = 30, 90
POLL_S = 1  # the serving replica's serve.poll_seconds


def run(env: dict, *cmd: str, cwd: Path, timeout: float = 600) -> str:
    if cmd[0] in ("dvc", "prefect", "loraline"):
        cmd = (tool(cmd[0]), *cmd[1:])
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@contextlib.contextmanager
def s3_server() -> Iterator[tuple[str, object]]:
    """(endpoint, boto3 client) of moto's S3 server on 127.0.0.1, with the bucket."""
    pytest.importorskip("moto.moto_server.threaded_moto_server", reason="moto[server] is not installed (dev extra)")
    pytest.importorskip("dvc_s3", reason="dvc-s3 is not installed (dev extra): DVC cannot reach S3 remotes")
    import boto3
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="e2e",
            aws_secret_access_key=SECRET,
        )
        s3.create_bucket(Bucket=BUCKET)
        yield endpoint, s3
    finally:
        server.stop()


@contextlib.contextmanager
def prefect_server(env: dict) -> Iterator[subprocess.Popen]:
    """`prefect server start` on a free port (PREFECT_API_URL set in `env`); it starts while the caller goes on
    (wait_until_up before using it)."""
    port = free_port()
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def machine_env(tmp: Path) -> dict:
    """What every 'machine' shares: git identity, the S3 credentials (environment only), Prefect settings."""
    env = {k: v for k, v in _env().items() if not k.startswith(("AWS_", "PREFECT_")) and k != "PWD"}
    env.update(
        AWS_ACCESS_KEY_ID="e2e",
        AWS_SECRET_ACCESS_KEY=SECRET,
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S),
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    return env


def publish_origin(built: Path, tmp: Path, env: dict, endpoint: str) -> Path:
    """The project as its first machine leaves it: built, pushed to the S3 remote, committed with that remote
    and orchestrate.registry_remote: origin, and pushed to a bare repository. Returns the bare repository."""
    project = copy_project(built, tmp / "first-machine")
    run(env, "dvc", "remote", "add", "--default", "s3", f"s3://{BUCKET}/project", cwd=project)
    run(env, "dvc", "remote", "modify", "s3", "endpointurl", endpoint, cwd=project)
    run(env, "dvc", "remote", "modify", "s3", "region", "us-east-1", cwd=project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["orchestrate"]["registry_remote"] = "origin"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(env, "git", "add", "-A", cwd=project)
    run(env, "git", "commit", "-qm", "built; S3 remote; registry shared through origin", cwd=project)
    run(env, "dvc", "push", cwd=project)
    bare = tmp / "origin.git"
    run(env, "git", "init", "-q", "--bare", str(bare), cwd=tmp)
    run(env, "git", "push", "-q", str(bare), "HEAD:refs/heads/main", cwd=project)
    run(env, "git", "symbolic-ref", "HEAD", "refs/heads/main", cwd=bare)
    return bare


def new_machine(bare: Path, dest: Path, env: dict) -> Path:
    """A machine joining: `git clone` of origin, `dvc pull` from S3."""
    return new_machines(bare, [dest], env)[0]


def new_machines(bare: Path, dests: list[Path], env: dict) -> list[Path]:
    """Machines joining at once: each a `git clone` of origin and a `dvc pull` from S3 (the pulls side by side)."""
    for dest in dests:
        dest.parent.mkdir(parents=True, exist_ok=True)
        run(env, "git", "clone", "-q", str(bare), str(dest), cwd=dest.parent)
    pulls = [
        subprocess.Popen([tool("dvc"), "pull"], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for d in dests
    ]
    for dest, pull in zip(dests, pulls, strict=True):
        out = pull.communicate(timeout=600)[0].decode(errors="replace")
        assert pull.returncode == 0, f"dvc pull in {dest} failed:\n{out[-3000:]}"
    return dests


def start_worker(clone: Path, env: dict, name: str) -> subprocess.Popen:
    """`prefect worker start` in `clone` (its PWD: where prefect.yaml's pull step runs its flows), one run at
    a time, in a session of its own; its output in <clone>/../<name>.log."""
    log = (clone.parent / f"{name}.log").open("w")
    return subprocess.Popen(
        [
            tool("prefect"),
            "worker",
            "start",
            "--pool",
            "loraline",
            "--type",
            "process",
            "--limit",
            "1",
            "--name",
            name,
        ],
        cwd=clone,
        env={**env, "PWD": str(clone)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_machine(worker: subprocess.Popen) -> list[int]:
    """SIGKILL the worker and every process under it (the flow run, `dvc repro`, the training: stages run in
    sessions of their own, so the worker's process group alone would leave them running), as losing the
    machine would. Frozen first (SIGSTOP) until no new process appears, so none escapes."""
    frozen: set[int] = set()
    while True:
        tree = {worker.pid, *descendants(worker.pid)}
        if tree <= frozen:
            break
        for pid in tree - frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= tree
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.wait(30)
    return sorted(frozen)


def stop_worker(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            kill_machine(worker)


def api(env: dict, path: str, body: dict | None = None):
    url = env["PREFECT_API_URL"] + path
    r = httpx.post(url, json=body, timeout=30) if body is not None else httpx.get(url, timeout=30)
    r.raise_for_status()
    return r.json()


def flow_run(env: dict, run_id: str) -> dict:
    return api(env, f"/flow_runs/{run_id}")


def state_history(env: dict, run_id: str) -> list[str]:
    states = api(env, f"/flow_run_states/?flow_run_id={run_id}")
    return [s["name"] for s in sorted(states, key=lambda s: s["timestamp"])]


def wait_for(what: str, check, timeout_s: float, every_s: float = 1.0, logs: list[Path] = ()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every_s)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs if p.is_file())
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tails}")


def pushed_steps(s3, tenant: str) -> list[int]:
    """The complete checkpoint steps of `tenant` on S3 (train/remote.py's layout: a step is complete iff its
    marker exists)."""
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"project/loraline-checkpoints/{tenant}/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    return sorted(int(m.group(1)) for k in keys if (m := re.search(r"/step-(\d+)/complete\.json$", k)))


def remote_tags(bare: Path) -> set[str]:
    out = subprocess.run(["git", "tag", "--list"], cwd=bare, capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory, built):
    """Everything set up, both deployments triggered and run to the end, the first machine lost midway; with
    the serving test selected, a serving replica on a machine of its own follows the registry meanwhile."""
    tmp = tmp_path_factory.mktemp("two-machines")
    env = machine_env(tmp)
    with_replica = any(i.get_closest_marker("serve") and i.module is request.module for i in request.session.items)
    with s3_server() as (endpoint, s3), prefect_server(env) as server, contextlib.ExitStack() as stack:
        bare = publish_origin(built.project, tmp, env, endpoint)
        a, b = new_machines(bare, [tmp / "a" / "project", tmp / "b" / "project"], env)
        replica = (
            stack.enter_context(serving_replica(bare, tmp / "replica" / "project", env)) if with_replica else None
        )
        wait_for_prefect(server, env["PREFECT_API_URL"])
        run(env, "prefect", "--no-prompt", "work-pool", "create", "loraline", "--type", "process", cwd=a)
        # PWD unset: prefect.yaml's pull step keeps `{{ $PWD }}`, which each worker resolves to its own clone
        run(env, "prefect", "--no-prompt", "deploy", "--all", cwd=a)
        automations = yaml.safe_load((REPO / "flows" / "automations.yaml").read_text())
        automations["automations"][0]["trigger"]["within"] = SILENT_S
        run(env, "prefect", "--no-prompt", "automation", "create", "--from-json", json.dumps(automations), cwd=a)
        workers = {"a": start_worker(a, env, "worker-a"), "b": start_worker(b, env, "worker-b")}
        logs = [tmp / "a" / "worker-a.log", tmp / "b" / "worker-b.log"]
        try:
            started = time.monotonic()
            # The second tenant's run is triggered once a worker has claimed the first: when both idle workers try
            # to claim one scheduled run, Prefect's worker that loses keeps the run's slot in its limiter, and later
            # refuses that run as a "Duplicate submission", which would leave the retried run with no worker.
            runs = {RETRAINED: trigger(env, a, RETRAINED, force=True)}
            claimed = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CRASHED")
            wait_for(
                "a worker to claim the first run",
                lambda: flow_run(env, runs[RETRAINED])["state"]["type"] in claimed,
                300,
                logs=logs,
            )
            runs["acme-shop"] = trigger(env, a, "acme-shop")
            lost = lose_the_machine_of(env, runs[RETRAINED], workers, s3, logs)
            for tenant, run_id in runs.items():
                wait_for(
                    f"{tenant}'s flow run to end",
                    lambda r=run_id: flow_run(env, r)["state"]["type"] in ("COMPLETED", "FAILED", "CANCELLED"),
                    timeout_s=900,
                    every_s=3,
                    logs=logs,
                )
            wall_s = time.monotonic() - started
        finally:
            for worker in workers.values():
                stop_worker(worker)
        yield {
            "env": env,
            "s3": s3,
            "bare": bare,
            "tmp": tmp,
            "clones": {"a": a, "b": b},
            "runs": runs,
            "lost": lost,
            "logs": logs,
            "wall_s": wall_s,
            "history": {t: state_history(env, r) for t, r in runs.items()},
            "final": {t: flow_run(env, r) for t, r in runs.items()},
            "replica": replica,
        }


@contextlib.contextmanager
def serving_replica(bare: Path, dest: Path, env: dict) -> Iterator[dict]:
    """`loraline serve` on a machine of its own (a clone with orchestrate.registry_remote: origin, as
    committed), started before any promotion: it follows the registry remote alone (serve.port is not the
    one the flows notify, so nothing but its own polling tells it)."""
    project = new_machine(bare, dest, env)
    url_port = free_port()
    overrides = {
        "serve.port": url_port,
        "serve.engine_port": free_port(),
        "serve.poll_seconds": POLL_S,
        "serve.max_model_len": 256,
        "serve.max_lora_rank": 8,  # nothing in production at its start: the tiny adapters' rank, not the fallback
    }
    cmd = [tool("loraline"), "serve", "--python", serving_python()]
    cmd += [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    log = dest.parent / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield {"project": project, "url": f"http://127.0.0.1:{url_port}", "proc": proc, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def trigger(env: dict, cwd: Path, tenant: str, force: bool = False) -> str:
    extra = ("--param", "force=true") if force else ()
    out = run(env, "prefect", "--no-prompt", "deployment", "run", f"loraline/{tenant}", *extra, cwd=cwd)
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)


def lose_the_machine_of(env: dict, run_id: str, workers: dict, s3, logs: list[Path]) -> dict:
    """Once the run trains and a checkpoint is on S3, SIGKILL the process tree of the worker running it."""

    def running_on() -> str | None:
        info = flow_run(env, run_id)
        pid = info.get("infrastructure_pid")
        if info["state"]["type"] != "RUNNING" or not pid:
            return None
        pid = int(str(pid).rsplit(":", 1)[-1])
        return next((name for name, w in workers.items() if pid in descendants(w.pid)), None)

    name = wait_for("the retrained tenant's run to start on a worker", running_on, 300, logs=logs)
    steps = wait_for(
        "a checkpoint of the retrained tenant on S3", lambda: pushed_steps(s3, RETRAINED), 600, 0.2, logs=logs
    )
    killed = kill_machine(workers[name])
    return {"worker": name, "pushed": max(pushed_steps(s3, RETRAINED)), "first_seen": steps, "killed": killed}


def test_the_lost_run_is_retried_on_the_other_worker_and_resumes(cluster, built):
    lost, final = cluster["lost"], cluster["final"][RETRAINED]
    assert final["state"]["type"] == "COMPLETED", (cluster["history"], cluster["logs"])
    history = cluster["history"][RETRAINED]
    lost_at = history.index("Lost")  # marked by the first automation, then scheduled again by the second
    assert history[lost_at - 1 : lost_at + 2] == ["Running", "Lost", "AwaitingRetry"], history
    assert history[-1] == "Completed" and history.count("Running") == 2, history
    assert final["run_count"] == 2  # one start each side of the loss, within orchestrate.crash_retries
    other = "b" if lost["worker"] == "a" else "a"
    clone = cluster["clones"][other]
    log = (clone.parent / f"worker-{other}.log").read_text()
    assert cluster["runs"][RETRAINED] in log, "the surviving worker ran the retried flow run"
    weights = f"models/adapters/{RETRAINED}/adapter_model.safetensors"
    assert not (cluster["clones"][lost["worker"]] / weights).exists()  # the lost machine never finished
    timing = json.loads((clone / "reports" / "timing" / f"train@{RETRAINED}.json").read_text())
    assert timing["resumed_from_step"] == lost["pushed"], (timing, lost)  # the newest step on S3 at the loss
    # byte for byte the adapter of the built project's run, which was never interrupted
    reference = json.loads((built.project / "reports" / "timing" / f"train@{RETRAINED}.json").read_text())
    assert reference["resumed_from_step"] is None
    assert (clone / weights).read_bytes() == (built.project / weights).read_bytes()
    assert pushed_steps(cluster["s3"], RETRAINED) == []  # the adapter is written: its checkpoints are gone


def test_every_tenant_is_released_and_promoted_once_in_the_registry_remote(cluster):
    for tenant in TENANTS:
        assert cluster["final"][tenant]["state"]["type"] == "COMPLETED", cluster["history"]
    expected = {
        f"{t}-{kind}{suffix}" for t in TENANTS for kind in ("adapter", "onnx") for suffix in ("@v0.0.1", "#prod#1")
    }
    assert remote_tags(cluster["bare"]) == expected


def test_a_third_machine_gets_exactly_the_production_artifacts(cluster, built, tmp_path):
    env, bare = cluster["env"], cluster["bare"]
    third = new_machine(bare, tmp_path / "project", env)
    assert run(env, "dvc", "status", cwd=third).strip() == "Data and pipelines are up to date."
    for tenant in TENANTS:
        dest = tmp_path / f"{tenant}-prod"
        run(env, "dvc", "artifacts", "get", ".", f"{tenant}-adapter", "--stage", "prod", "-o", str(dest), cwd=third)
        weights = "adapter_model.safetensors"
        assert (dest / weights).read_bytes() == (third / "models" / "adapters" / tenant / weights).read_bytes()
        assert (dest / weights).read_bytes() == (built.project / "models" / "adapters" / tenant / weights).read_bytes()


def test_no_secret_reaches_git(cluster):
    bare = cluster["bare"]
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)"], cwd=bare, capture_output=True, text=True, check=True
    ).stdout.split()
    assert refs
    found = subprocess.run(["git", "grep", "-l", SECRET, *refs], cwd=bare, capture_output=True, text=True)
    assert found.returncode == 1 and not found.stdout, found.stdout  # 1: no match anywhere
    config = subprocess.run(
        ["git", "show", "main:.dvc/config"], cwd=bare, capture_output=True, text=True, check=True
    ).stdout
    assert "endpointurl" in config and "secret" not in config.lower() and "access_key" not in config


@pytest.mark.serve
def test_a_serving_replica_elsewhere_follows_a_promotion_made_by_a_worker(cluster):
    replica = cluster["replica"]
    assert replica is not None
    wait_for(
        "the replica to serve every tenant's production version",
        lambda: _served_or_none(replica["url"]) == dict.fromkeys(TENANTS, "v0.0.1"),
        timeout_s=600,
        every_s=1,
        logs=[replica["log"]],
    )
    assert replica["proc"].poll() is None
    [loaded] = [e for e in events(replica["project"]) if e["event"] == "served" and e["tenant"] == RETRAINED]
    assert loaded["version"] == "v0.0.1" and loaded["check"]["agreement"] == 1.0  # its deployment check passed
    # promoted by a worker minutes after the replica started: seen at its next poll plus a `git fetch`
    assert loaded["since_promotion_s"] - loaded["swap_s"] < POLL_S + 20, loaded
    assert served(replica["url"], None) == dict.fromkeys(TENANTS, "v0.0.1")


def _served_or_none(url: str) -> dict | None:
    try:
        return served(url, None)
    except httpx.HTTPError:
        return None

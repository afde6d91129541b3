"""Driving DVC stages one at a time, for an orchestrator (flows/) that wants per-stage control.

DVC stays the owner of caching and lineage: every stage runs through `dvc repro --single-item`, so
after a run `dvc status` is clean and the dvc.lock files are exactly what a plain `dvc repro -P` writes.
What this module adds is what an orchestrator needs around that: the stages in dependency order (the
stages' data flow, which a test checks against DVC's own graph), a timeout that really stops the
stage's process tree, a typed result per stage, and an error that carries the stage's last output
lines, so a failed flow run says why without anyone opening a terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from loraline.layout import (
    BASE_INPUT_STAGES,
    SHARED_STAGES,
    TENANT_STAGES,
    dvc_target,
    stage_id,
    tenant_dvc_file,
)
from loraline.progress import ENV as PROGRESS_ENV
from loraline.progress import mode_for_children
from loraline.tools import tool, tool_env

__all__ = [
    "DeviceSlots",
    "StageFailed",
    "StagePlan",
    "StageRun",
    "StageTimeout",
    "device_slots",
    "each_tenant",
    "plan_stages",
    "project_lock",
    "push_outputs",
    "run_chains",
    "run_stage",
    "run_stage_group",
    "run_stages_in_parallel",
    "stage_echo",
    "visible_gpus",
    "WorkspaceBusy",
    "workspace_lock",
]

T = TypeVar("T")
_RAN = re.compile(r"Running stage '(?:[^':]*:)?([^':]+)'")  # a tenant's stage is named by its file: `path:id`
_FAILED = re.compile(r"failed to reproduce '(?:[^':]*:)?([^':]+)'")
_TAIL_LINES = 40


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message names the stage and ends with its last output lines."""

    def __init__(self, stage: str, returncode: int, tail: list[str], headline: str | None = None):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        shown = "\n".join(f"    {line}" for line in tail) or "    (no output)"
        super().__init__(f"{headline or f'stage {stage} failed (exit {returncode})'}; its last output:\n{shown}")


class StageTimeout(StageFailed):
    def __init__(self, stage: str, seconds: float, tail: list[str]):
        super().__init__(stage, -1, tail, f"stage {stage} timed out after {seconds:.0f}s and was stopped")


@dataclass(frozen=True)
class StageRun:
    stage: str
    ran: bool  # False: DVC found it up to date and skipped it
    seconds: float


@dataclass(frozen=True)
class StagePlan:
    """The stages a run needs, in an order that respects every dependency.

    `shared` are the stages every chosen tenant needs (the base model, and the document collection of
    every tenant the base is built from); `per_tenant[t]` are tenant t's other stages (`<name>@<t>`).
    """

    shared: list[str]
    per_tenant: dict[str, list[str]] = field(default_factory=dict)

    @property
    def all(self) -> list[str]:
        return self.shared + [s for stages in self.per_tenant.values() for s in stages]


def plan_stages(root: str | Path, tenants: Iterable[str]) -> StagePlan:
    """The stages to run for `tenants`, dependencies first: their documents and the base, then each tenant's own
    chain in the data's order (layout.STAGES).

    The base is built from whatever data/documents holds (dvc.lock records its hash): a run for some tenants
    refreshes their documents, not every tenant's, so a run for one tenant costs the same at 10 tenants or 1,000.
    A run for every tenant (the default) refreshes them all first, as `dvc repro -P` does.

    Planned from the stage names rather than from DVC's graph of the whole repository: that graph parses every
    tenant's dvc.yaml, 0.18 s a tenant. tests/unit/flows/test_orchestrate.py checks the plan against DVC's graph."""
    root = Path(root)
    tenants = list(tenants)
    unknown = [t for t in tenants if not (root / tenant_dvc_file(t)).is_file()]
    if unknown:
        raise ValueError(
            f"no stages for tenant(s) {', '.join(unknown)}: {', '.join(tenant_dvc_file(t) for t in unknown)} "
            "missing (`loraline pipelines` writes one for each tenant in params.yaml)"
        )
    shared = [stage_id(s, t) for s in BASE_INPUT_STAGES for t in tenants] + list(SHARED_STAGES)
    per_tenant = {t: [stage_id(s, t) for s in TENANT_STAGES if s not in BASE_INPUT_STAGES] for t in tenants}
    return StagePlan(shared=shared, per_tenant=per_tenant)


def _run_streaming(
    cmd: list[str],
    cwd: Path,
    timeout_s: float | None,
    echo: Callable[[str], None] | None,
    env: dict[str, str] | None = None,
) -> tuple[int, list[str], bool, set[str]]:
    """Run `cmd`, passing its output through (progress bars included) and keeping the last lines.

    Returns (exit code, last lines, timed out, the ids of the stages DVC said it was running).

    The process gets its own session so that a timeout can stop the whole tree (dvc -> loraline).
    """
    # the stage's progress: bars when this process's stderr is a terminal, else lines (loraline.progress)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**tool_env(), PROGRESS_ENV: mode_for_children(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    timed_out = threading.Event()
    ran: set[str] = set()

    def stop() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(5)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, stop) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode(errors="replace")
            if echo:
                echo(text)
            line = text.rstrip("\n").split("\r")[-1].rstrip()  # a progress bar's last state
            if line:
                tail.append(line)
                ran.update(_RAN.findall(line))
        returncode = proc.wait()
    finally:
        if timer:
            timer.cancel()
    return returncode, list(tail), timed_out.is_set(), ran


def _echo_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def run_stage(
    root: str | Path,
    stage: str,
    *,
    force: bool = False,
    timeout_s: float | None = None,
    echo: Callable[[str], None] | None = _echo_stderr,
    env: dict[str, str] | None = None,
) -> StageRun:
    """`dvc repro --single-item <stage>`: runs it when its deps, params or code changed, else skips.

    `env`: variables added to the stage's environment (e.g. CUDA_VISIBLE_DEVICES pinning it to a GPU).
    It waits for DVC's repository lock rather than failing when another stage holds it.

    Raises StageFailed (or StageTimeout) naming the stage, with its last output lines. The stage's
    own outputs are written atomically and DVC removes stale outputs before running, so a failure
    leaves no half-written output behind.
    """
    return run_stage_group(root, [stage], force=force, timeout_s=timeout_s, echo=echo, env=env)[0]


def run_stage_group(
    root: str | Path,
    stages: list[str],
    *,
    force: bool = False,
    timeout_s: float | None = None,
    echo: Callable[[str], None] | None = _echo_stderr,
    env: dict[str, str] | None = None,
) -> list[StageRun]:
    """`dvc repro --single-item <stage>...`: `stages` (in an order that respects their dependencies) in one DVC
    process, each run when changed, else skipped. For the shared stages, the tenants' documents and the base:
    one process each would cost a DVC start-up (about a second) per tenant. StageFailed names the stage DVC
    failed on; `seconds` is the group's, on each."""
    if not stages:
        return []
    cmd = [tool("dvc"), "--wait-for-lock", "repro", "--single-item", *(dvc_target(s) for s in stages)]
    if force:
        cmd.append("--force")
    started = time.perf_counter()
    returncode, tail, timed_out, ran = _run_streaming(cmd, Path(root), timeout_s, echo, env)
    seconds = time.perf_counter() - started
    named = f"{len(stages)} stages ({stages[0]} ... {stages[-1]})" if len(stages) > 1 else stages[0]
    if timed_out:
        raise StageTimeout(named, timeout_s or 0.0, tail)
    if returncode != 0:
        failed = named if len(stages) == 1 else next((m[1] for x in reversed(tail) if (m := _FAILED.search(x))), named)
        raise StageFailed(failed, returncode, tail)
    return [StageRun(stage=s, ran=s in ran, seconds=seconds) for s in stages]


def push_outputs(root: str | Path, echo: Callable[[str], None] | None = _echo_stderr) -> int:
    """`dvc push` to the default remote so registered versions can be fetched elsewhere.

    Returns the number of files pushed (0 when the project has no default remote).
    """
    from dvc.repo import Repo

    with Repo(str(root), _wait_for_lock=True) as repo:  # another flow run's stage may hold it briefly
        if not repo.config.get("core", {}).get("remote"):
            if echo:
                echo("dvc push: no default remote configured, skipped\n")
            return 0
        pushed = repo.push()
    if echo:
        echo(f"dvc push: {pushed} file(s) pushed\n")
    return int(pushed)


# ---- tenants in parallel -------------------------------------------------------------------------


def _lock_file(root: str | Path, name: str):
    folder = Path(root) / ".dvc" / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"loraline-{name}.lock", "a")


@contextlib.contextmanager
def project_lock(root: str | Path, name: str) -> Iterator[None]:
    """An exclusive lock shared by every process working in this project (flow runs, CLI runs);
    blocks until it is free. Held for the shared stages and for registry writes."""
    with _lock_file(root, name) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class WorkspaceBusy(RuntimeError):
    """Another `loraline run` holds this workspace; the message names its pid and start time."""


@contextlib.contextmanager
def workspace_lock(
    root: str | Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Held by `loraline run` from start to end: one run per workspace.

    Two runs at once would run the same stages against each other, and the second would stop at DVC's
    read/write lock with advice (delete .dvc/tmp/rwlock) that is dangerous while the first runs. The
    lock file (.dvc/tmp/loraline-run.lock) holds the holder's pid and start time for that message; the
    kernel releases the lock when its process ends, however it ends, so a crashed run leaves nothing
    to clean up. Raises WorkspaceBusy when it is held, or (`wait`) tells `on_wait` and waits for it.
    """
    with _lock_file(root, "run") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f"another loraline run ({_run_lock_holder(Path(fh.name))}) holds this workspace"
            if not wait:
                raise WorkspaceBusy(f"{holder}; wait for it to end, or pass --wait to start when it does") from None
            if on_wait:
                on_wait(f"{holder}: waiting for it to end")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.truncate(0)
            fh.write(
                json.dumps(
                    {"pid": os.getpid(), "started_at": datetime.now().astimezone().isoformat(timespec="seconds")}
                )
            )
            fh.flush()
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_lock_holder(path: Path) -> str:
    """`pid N, started at T` from the lock file (the holder may not have written it yet: a moment's grace)."""
    for _ in range(20):
        try:
            facts = json.loads(path.read_text(encoding="utf-8"))
            return f"pid {facts['pid']}, started at {facts['started_at']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "pid unknown"


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES when set ("" = none), else every GPU."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def device_slots(parallel: int, gpus: list[str], cpus: int | None = None) -> list[dict[str, str]]:
    """What each of `parallel` concurrent tenants sees: an equal share of the GPUs (at least one;
    tenants share GPUs round-robin when there are more tenants than GPUs) and of the CPU threads.

    On a GPU machine each slot also gets cpus/parallel threads (OMP_NUM_THREADS, unless set): the
    stages' CPU-side work (loading, merging, ONNX export) would otherwise run N x all-cores threads
    and slow every tenant down several fold (measured: merge 27 s alone, 140 s beside another).
    On a CPU machine nothing is pinned: CPU float sums depend on the thread count, and keeping it
    is what makes a parallel run's outputs byte-identical to a sequential run's."""
    if not gpus:
        return [{} for _ in range(parallel)]
    per = max(1, len(gpus) // parallel)
    threads = (
        {}
        if "OMP_NUM_THREADS" in os.environ
        else {"OMP_NUM_THREADS": str(max(1, (cpus or os.cpu_count() or 1) // parallel))}
    )
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(gpus[(i * per + k) % len(gpus)] for k in range(per)), **threads}
        for i in range(parallel)
    ]


class DeviceSlots:
    """A machine-wide pool of device slots: a tenant's stages hold one slot from their first stage to
    their last. Slot i is a file lock in the project (.dvc/tmp/loraline-slot-<i>.lock), so threads
    of one run and separate runs (e.g. two per-tenant Prefect deployments at once) share one pool
    and never put two tenants on the same slot's GPUs."""

    def __init__(self, root: str | Path, slots: list[dict[str, str]], poll_s: float = 1.0):
        self.root, self.slots, self.poll_s = root, slots, poll_s

    @contextlib.contextmanager
    def slot(self) -> Iterator[dict[str, str]]:
        while True:
            for i, env in enumerate(self.slots):
                with _lock_file(self.root, f"slot-{i}") as fh:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    try:
                        yield env
                    finally:
                        fcntl.flock(fh, fcntl.LOCK_UN)
                    return
            time.sleep(self.poll_s)


def stage_echo(tenant: str | None) -> Callable[[str], None]:
    """Where a stage's output goes: through as it is, or (`tenant`, for concurrent tenants) one whole
    line at a time, each marked with its tenant."""
    if tenant is None:
        return _echo_stderr

    def echo(text: str) -> None:
        line = text.rstrip("\n").split("\r")[-1]
        if line.strip():
            _echo_stderr(f"[{tenant}] {line}\n")

    return echo


def run_chains(
    root: str | Path,
    chains: dict[str, list[str]],
    parallel: int,
    run_chain: Callable[[str, list[str], dict[str, str]], T],
) -> tuple[dict[str, T], dict[str, Exception]]:
    """Run each tenant's stage chain, up to `parallel` tenants at once, each with its device slot.

    Returns (results, failures) by tenant: a tenant that fails does not stop the others."""
    slots = DeviceSlots(root, device_slots(parallel, visible_gpus()))

    def one(tenant: str) -> T:
        with slots.slot() as env:
            return run_chain(tenant, chains[tenant], env)

    return each_tenant(chains, one, parallel=max(1, parallel))


def each_tenant(
    tenants: Iterable[str],
    work: Callable[[str], T],
    *,
    parallel: int = 1,
    on_failure: Callable[[str, Exception], None] | None = None,
) -> tuple[dict[str, T], dict[str, Exception]]:
    """`work(tenant)` for each tenant, one after another or (`parallel` > 1) up to `parallel` at once in
    threads: the one place a run (the flow, `loraline run --no-prefect` or `--no-dvc`) collects per-tenant
    failures. Returns (results, failures) by tenant: a tenant whose work raises does not stop the others;
    `on_failure` hears of each failure as it is collected."""
    results: dict[str, T] = {}
    failures: dict[str, Exception] = {}

    def collect(tenant: str, outcome: Callable[[], T]) -> None:
        try:
            results[tenant] = outcome()
        except Exception as exc:  # one tenant's failure must not stop the others
            failures[tenant] = exc
            if on_failure:
                on_failure(tenant, exc)

    if parallel <= 1:
        for tenant in tenants:
            collect(tenant, functools.partial(work, tenant))
        return results, failures
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="tenant") as pool:
        futures = {tenant: pool.submit(work, tenant) for tenant in tenants}
        for tenant, future in futures.items():
            collect(tenant, future.result)
    return results, failures


def run_stages_in_parallel(
    root: str | Path, tenants: list[str], parallel: int, *, force: bool = False, push: bool = True
) -> tuple[list[str], dict[str, Exception]]:
    """Without an orchestrator: the shared stages (under the project lock), then up to `parallel`
    tenants' stage chains at once, then `dvc push`. Returns (stages that ran, failures by tenant)."""
    plan = plan_stages(root, tenants)
    with project_lock(root, "shared"):
        ran = [r.stage for r in run_stage_group(root, plan.shared, force=force) if r.ran]

    def chain(tenant: str, stages: list[str], env: dict[str, str]) -> list[str]:
        return [s for s in stages if run_stage(root, s, force=force, env=env, echo=stage_echo(tenant)).ran]

    results, failures = run_chains(root, plan.per_tenant, parallel, chain)
    for done in results.values():
        ran += done
    if push:
        push_outputs(root)
    return ran, failures

"""The engine: vLLM's OpenAI-compatible server, in the serving environment, on 127.0.0.1.

Started with the base model and LoRA enabled, with runtime adapter loading on
(VLLM_ALLOW_RUNTIME_LORA_UPDATING), so versions come and go without a restart. Only the gateway
talks to it; it listens on the loopback interface alone. It ends with the `loraline serve` that
started it, however that ends (a parent-death signal, _die_with_parent), and is recorded in a pid
file while it runs, so a start finds and stops what a killed serve left (serve.claims).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraline.config import ServeParams
from loraline.serve.adapters import VLLM_RANKS, serving_rank
from loraline.serve.claims import EngineRecord, command, group_members, listeners, record_engine, release

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class EngineError(RuntimeError):
    pass


def lora_rank_for(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's."""
    need = max(ranks, default=VLLM_RANKS[0])
    if need > VLLM_RANKS[-1]:
        raise EngineError(f"an adapter has LoRA rank {need}, above the largest vLLM serves ({VLLM_RANKS[-1]})")
    return serving_rank(need)


def engine_dtype(params: ServeParams, merge_dtype: str) -> str:
    """vLLM's --dtype: serve.dtype, where `merge` means the merged model's own precision. vLLM's `auto`
    serves a float32 model in 16 bits, and greedy answers then part from the float32 merged model's
    wherever two tokens are within a tenth of a logit: the deployment check refuses such versions."""
    return merge_dtype if params.dtype == "merge" else params.dtype


def engine_command(
    python: Path,
    model: Path,
    params: ServeParams,
    *,
    dtype: str,
    lora_rank: int,
    max_loras: int,
    max_model_len: int | None,
    on_cpu: bool,
) -> list[str]:
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(params.engine_port),
        "--enable-lora",
        "--max-lora-rank",
        str(lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-cpu-loras",
        str(max_loras),
        "--dtype",
        dtype,
        "--disable-uvicorn-access-log",
    ]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if on_cpu:
        cmd += ["--enforce-eager"]
    return cmd + list(params.engine_args)


@dataclass
class Engine:
    """A running vLLM server and the calls the gateway makes to it."""

    url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    log_from: int = 0  # where this start's lines begin in the (appended) log
    pid_file: Path | None = None
    record: EngineRecord | None = None

    @classmethod
    def start(
        cls, cmd: list[str], params: ServeParams, log_path: Path, on_cpu: bool, pid_file: Path | None = None
    ) -> Engine:
        """vLLM started and answering, or an EngineError (and nothing left running). Call it from the
        main thread: the engine is told to end when the thread that started it ends (see _die_with_parent).
        `pid_file`: where the engine is recorded while it runs (serve.claims)."""
        if threading.current_thread() is not threading.main_thread():
            raise EngineError(
                "Engine.start must run on the main thread: the engine ends when the thread that started it does"
            )
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        if on_cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{params.cpu_kv_cache_gib:g}")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_from = log_path.stat().st_size if log_path.is_file() else 0
        log.info("starting vLLM: %s (its log: %s)", " ".join(cmd), log_path)
        # its own session: Ctrl-C in the terminal reaches `loraline serve` alone, which stops the engine in order
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        engine = cls(f"http://127.0.0.1:{params.engine_port}", process, log_path, log_from, pid_file)
        try:
            if pid_file is not None:
                engine.record = record_engine(pid_file, process.pid, params.engine_port)
            engine.wait_ready(params.startup_timeout_s)
        except BaseException:
            engine.stop()
            raise
        return engine

    def wait_ready(self, timeout_s: float) -> None:
        """Until our own process answers /health: another server already on the port (an orphan of
        an earlier start, say) answers too, and must not pass for ours."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EngineError(self._exit_message())
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200 and self._listening_is_ours():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise EngineError(f"vLLM did not answer {self.url}/health within {timeout_s:.0f} s (serve.startup_timeout_s)")

    def _listening_is_ours(self) -> bool:
        """Whether a process of our engine's group listens on its port (True where /proc cannot tell)."""
        if self.process is None or not Path("/proc/net/tcp").is_file():
            return True
        ours = group_members(self.process.pid)
        return any(pid in ours for pid in listeners(int(self.url.rsplit(":", 1)[1])))

    def _exit_message(self) -> str:
        tail = ""
        if self.log_path is not None and self.log_path.is_file():
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_from)
                tail = fh.read().decode(errors="replace")[-3000:]
        if "Address already in use" in tail:
            port = self.url.rsplit(":", 1)[1]
            holders = ", ".join(f"pid {p} ({command(p)})" for p in listeners(int(port))) or "another process"
            return (
                f"vLLM could not listen on 127.0.0.1:{port} (serve.engine_port): it is taken by {holders}. "
                f"Stop it, or choose another port with --set serve.engine_port=<port>"
            )
        return f"vLLM exited with {self.process.returncode} while starting:\n{tail}"

    def load(self, name: str, path: Path) -> None:
        r = httpx.post(
            f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=300
        )
        if r.status_code != 200:
            raise EngineError(f"vLLM refused to load {name} from {path}: {r.status_code} {r.text[:500]}")

    def unload(self, name: str) -> None:
        r = httpx.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        if r.status_code != 200:
            log.warning("vLLM did not unload %s: %s %s", name, r.status_code, r.text[:300])

    def loaded(self) -> set[str]:
        return {m["id"] for m in httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]}

    def greedy(self, name: str, prompt: list[int], max_tokens: int) -> str:
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=300)
        if r.status_code != 200:
            raise EngineError(f"probe through {name} failed: {r.status_code} {r.text[:300]}")
        return r.json()["choices"][0]["text"]

    def stop(self) -> None:
        """SIGTERM to the engine's process group (vLLM stops its engine core), SIGKILL after 30 s."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.pid_file is not None and self.record is not None:
            release(self.pid_file, self.record)


def _die_with_parent(parent: int):
    """The engine's preexec_fn: Linux sends it SIGTERM when the thread that forked it ends, so a
    `loraline serve` killed outright (kill -9) does not leave vLLM running, holding its port and
    memory (SIGTERM: vLLM then stops its engine core itself). The signal is tied to the forking
    thread, not the process, hence Engine.start's main-thread rule. A parent already gone before
    the call: the engine exits at once. Elsewhere than Linux: nothing (the pid file still catches
    a stale engine at the next start)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must not load libraries
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def on_cpu() -> bool:
    from loraline.serve.environment import default_flavour

    return default_flavour() == "cpu"

"""The engine: vLLM's OpenAI-compatible server, in the serving environment, on 127.0.0.1.

Started with the base model and LoRA enabled, with runtime adapter loading on
(VLLM_ALLOW_RUNTIME_LORA_UPDATING), so versions come and go without a restart. Only the gateway
talks to it; it listens on the loopback interface alone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraline.config import ServeParams
from loraline.serve.adapters import VLLM_RANKS, serving_rank

log = logging.getLogger(__name__)


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


def engine_command(python: Path, model: Path, params: ServeParams, *, dtype: str, lora_rank: int, max_loras: int,
                   max_model_len: int | None, on_cpu: bool) -> list[str]:
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(params.engine_port), "--enable-lora", "--max-lora-rank", str(lora_rank), "--max-loras", str(max_loras),
        "--max-cpu-loras", str(max_loras), "--dtype", dtype, "--disable-uvicorn-access-log",
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

    @classmethod
    def start(cls, cmd: list[str], params: ServeParams, log_path: Path, on_cpu: bool) -> Engine:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        if on_cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{params.cpu_kv_cache_gib:g}")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM: %s (its log: %s)", " ".join(cmd), log_path)
        with open(log_path, "ab") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        engine = cls(f"http://127.0.0.1:{params.engine_port}", process)
        engine.wait_ready(params.startup_timeout_s, log_path)
        return engine

    def wait_ready(self, timeout_s: float, log_path: Path | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.is_file() else ""
                raise EngineError(f"vLLM exited with {self.process.returncode} while starting:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise EngineError(f"vLLM did not answer {self.url}/health within {timeout_s:.0f} s (serve.startup_timeout_s)")

    def load(self, name: str, path: Path) -> None:
        r = httpx.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=300)
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
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)


def on_cpu() -> bool:
    from loraline.serve.environment import default_flavour

    return default_flavour() == "cpu"

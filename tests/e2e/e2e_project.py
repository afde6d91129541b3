"""Shared by the end-to-end tests: a fresh git+DVC copy of the repository on a tiny configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from loraline.tools import TOOLS, tool, tool_env

REPO = Path(__file__).resolve().parents[2]
TINY_BUILD = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "max_position_embeddings": 512,
    "seq_len": 64,
    "batch_size": 4,
    "max_steps": 8,
    "warmup_steps": 2,
    "max_stdlib_chars": 20000,
    "exercises": 40,
    "copy_drill_steps": 2,
}
PER_TENANT = ("documents", "synthesize", "prepare", "train", "merge", "export", "evaluate", "gate")
# Appending instruction rows changes no document, so synthesize (it reads the documents only) is skipped.
ON_NEW_ROWS = tuple(s for s in PER_TENANT if s != "synthesize")
TINY_TRAIN = {"max_steps": 6, "batch_size": 4, "eval_every": 3, "save_every": 3, "lora_r": 4, "lora_alpha": 8}


def _env() -> dict[str, str]:
    env = tool_env()
    env.update(
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t.invalid",
    )
    return env


def sh(*cmd: str, cwd: Path) -> str:
    """Run `cmd`; our tools (dvc, prefect, gto, loraline) from the project's environment, never PATH."""
    if cmd[0] in TOOLS:
        cmd = (tool(cmd[0]), *cmd[1:])
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout + proc.stderr


def stages_run(output: str) -> set[str]:
    """The ids (`train@acme-shop`) of the stages DVC's output says it ran (it names a tenant's stage by its
    file: `pipelines/acme-shop/dvc.yaml:train@acme-shop`)."""
    return set(re.findall(r"Running stage '(?:[^':]*:)?([^':]+)'", output))


def assert_new_rows_rerun(ran: set[str], tenant: str) -> None:
    """What appending rows to `tenant`'s raw data re-runs: its stages from documents to evaluate, and the
    gate when its evidence (the evaluation, the merge and export parity metrics) changed, which six
    tiny training steps may leave as it was. Never a stage of another tenant, nor the base."""
    every = {f"{stage}@{tenant}" for stage in ON_NEW_ROWS}
    assert every - {f"gate@{tenant}"} <= ran <= every, sorted(ran)


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a project at `dest`, as another clone after the same runs would be: its git history,
    DVC cache, dvc.lock and outputs. Nothing in a project names its own folder, so the copy works as is."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def make_tiny_project(dest: Path) -> Path:
    """A fresh git+DVC project at `dest` holding exactly the repository's files, with a tiny base model."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["base"]["build"].update(TINY_BUILD)
    params["train"].update(TINY_TRAIN)
    # six tiny training steps improve answer loss by about 1%: enough to promote, far from the default 5%
    params["gate"]["min_gain_over_base"] = 0.001
    for tenant in params["tenants"].values():
        # the sample tenants' task-metric bars and adapter recipes are for the default model, not a toy
        for section in ("gate", "train", "synthetic_ratio"):
            tenant.pop(section, None)
    params["evaluate"].update({"max_examples": 6, "max_new_tokens": 12, "examples_in_report": 2})
    params["export"].update({"max_new_tokens": 8})
    # the deployment check replays the drawn probes on test_serve.py's serve.max_model_len 256: prompt + 32 tokens fit
    params["merge"].update({"probe_max_tokens": 192})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-qm", "fixture", cwd=dest)
    return dest


def wait_for_prefect(server: subprocess.Popen, api_url: str, timeout_s: float = 120) -> None:
    """Until the Prefect server started as `server` answers /health at `api_url` (RuntimeError if it exits or
    does not within `timeout_s`)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(api_url + "/health", timeout=2):
                return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("prefect server did not start") from None
            time.sleep(1)

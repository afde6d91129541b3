"""The loop from served answers to the next adapter, run once on a project where `make run` finished (the README's
"Preferences and feedback"): every step is the real command a team runs, and the table at the end holds what
each one did.

1. `loraline serve --set serve.log_traffic=true` (vLLM behind the gateway), serving the tenant's production adapter;
2. reviewers: the `openai` client asks `--requests` questions of the tenant's train split; an answer equal to
   the reference gets a thumbs up, any other a thumbs down with the reference as its rewrite
   (POST /loraline/feedback with the response id);
3. `loraline feedback export --tenant T`: accepted answers -> SFT rows, rewrites -> pairs, PII masked, into
   the tenant's raw_dir;
4. params.yaml: the tenant's `train.objective: dpo`, its reference the production version (`T@vX.Y.Z`);
5. `loraline run --tenant T`: prepare, DPO from production, merge, export, evaluate, gate, release, promote;
6. the running server picks the new production version up (serve.poll_seconds), with its deployment check.

    python tools/feedback_loop.py [--tenant acme-shop] [--requests 48] [--max-steps 40] [--python PATH]

It edits the project's params.yaml and raw_dir (as a person would): run it in a clone made for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

TIMEOUT_S = 900  # vLLM's start on 2 CPU cores takes a few minutes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    project = args.project.resolve()
    rows: list[tuple[str, Any]] = []
    server, url, log = start_server(project, args.python)
    try:
        before = wait_served(url, args.tenant, None)
        rows.append(("production served before", before))
        asked = ask_and_review(url, args.tenant, train_questions(project, args.tenant, args.requests))
        rows += [("answers (whole)", len(asked)), ("thumbs up (exact)", sum(up for up, _ in asked))]
        rows.append(("rewrites (reference)", sum(not up for up, _ in asked)))
        rows.append(("feedback export", last_line(loraline(project, "feedback", "export", "--tenant", args.tenant))))
        set_dpo(project / "params.yaml", args.tenant, f"{args.tenant}@{before}", args.max_steps)
        started = time.monotonic()
        out = loraline(project, "run", "--tenant", args.tenant, "--quiet")
        rows.append(("loraline run (s)", round(time.monotonic() - started)))
        rows += outcomes(project, args.tenant, out)
        after = wait_served(url, args.tenant, before)
        rows.append(("production served after", after))
    finally:
        stop(server)
    print("\n| step | outcome |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nserver log: {log}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=Path("."))
    ap.add_argument("--tenant", default="acme-shop")
    ap.add_argument("--requests", type=int, default=48, help="questions the reviewers ask and rate")
    ap.add_argument("--max-steps", type=int, default=40, help="train.max_steps of the DPO run")
    ap.add_argument("--python", help="a Python with vLLM for `loraline serve --python` (default: its .serve-venv)")
    return ap.parse_args(argv)


def loraline(project: Path, *argv: str) -> str:
    """A loraline command in `project`; its output (stderr included), or SystemExit with it when it fails."""
    done = subprocess.run(
        [shutil.which("loraline") or "loraline", *argv], cwd=project, capture_output=True, text=True, check=False
    )
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"loraline {' '.join(argv)} failed ({done.returncode}):\n{out[-4000:]}")
    return out


def start_server(project: Path, python: str | None) -> tuple[subprocess.Popen, str, Path]:
    port, engine_port = free_port(), free_port()
    sets = [f"serve.port={port}", f"serve.engine_port={engine_port}", "serve.log_traffic=true", "serve.poll_seconds=2"]
    log = project / "logs" / "feedback_loop_serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [shutil.which("loraline") or "loraline", "serve", *[x for s in sets for x in ("--set", s)]]
    cmd += ["--python", python] if python else []
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=project, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_served(url: str, tenant: str, other_than: str | None) -> str:
    """The version the gateway serves for `tenant`, once it serves one other than `other_than`."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            models = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            version = next((m["version"] for m in models if m["id"] == tenant), None)
            if version is not None and version != other_than:
                return version
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(2)
    raise SystemExit(f"the server did not serve a version of {tenant} other than {other_than} in {TIMEOUT_S} s")


def train_questions(project: Path, tenant: str, n: int) -> list[tuple[list[dict], str]]:
    """The first `n` conversations of the tenant's prepared train split: (context, the reference answer)."""
    from datasets import load_from_disk

    train = load_from_disk(str(project / "data" / "prepared" / tenant / "dataset"))["train"]
    out = []
    for messages in train["messages"]:
        if messages[-1]["role"] == "assistant" and len(out) < n:
            out.append((messages[:-1], messages[-1]["content"]))
    return out


def ask_and_review(url: str, tenant: str, questions: list[tuple[list[dict], str]]) -> list[tuple[bool, str]]:
    """Each question asked through the `openai` client, then rated: (thumbs up?, response id)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    out = []
    for messages, reference in questions:
        reply = client.chat.completions.create(model=tenant, messages=messages, max_tokens=64, temperature=0.0)
        answer = (reply.choices[0].message.content or "").strip()
        up = answer == reference.strip()
        body = {"id": reply.id, "rating": "up"} if up else {"id": reply.id, "rating": "down", "rewrite": reference}
        httpx.post(f"{url}/loraline/feedback", json=body, timeout=30).raise_for_status()
        out.append((up, reply.id))
    return out


def set_dpo(params_path: Path, tenant: str, reference: str, max_steps: int) -> None:
    """The tenant's train section in params.yaml (a one-line mapping, as the sample's) gains the DPO keys."""
    text = params_path.read_text(encoding="utf-8")
    block = re.search(rf"^  {re.escape(tenant)}:\n((?:    .*\n|\s*#.*\n|\n)*)", text, re.M)
    line = re.search(r"^    train: \{(.*)\}[^\n]*$", block.group(1), re.M) if block else None
    if line is None:
        raise SystemExit(f"{params_path}: tenants.{tenant}.train is not a one-line mapping; set the DPO keys by hand")
    keys = f"objective: dpo, preference: {{reference: '{reference}'}}, max_steps: {max_steps}, "
    start = block.start(1) + line.start(1)
    params_path.write_text(text[:start] + keys + text[start:], encoding="utf-8")


def outcomes(project: Path, tenant: str, out: str) -> list[tuple[str, Any]]:
    """What the DPO run's stages recorded: pairs, rewards, the preference metrics and the gate."""
    reports = project / "reports" / tenant
    stats = json.loads((reports / "prepare_stats.json").read_text())
    record = json.loads((project / "models" / "adapters" / tenant / "train_record.json").read_text())
    metrics = json.loads((reports / "eval_metrics.json").read_text())["models"]
    gate = json.loads((reports / "gate.json").read_text())
    pref = record.get("preference", {})
    rows: list[tuple[str, Any]] = [
        ("pairs (train/validation/test)", stats.get("pairs")),
        ("DPO reference", pref.get("reference")),
        (
            "validation reward accuracy",
            f"{pref['base_val']['reward_accuracy']} -> {pref['final_val']['reward_accuracy']}",
        ),
    ]
    for key in ("preference_accuracy", "json_field_accuracy", "answer_loss"):
        rows.append((key, {m: round(v[key], 3) for m, v in metrics.items() if v.get(key) is not None}))
    rows.append(("gate", "passed" if gate["passed"] else f"failed: {gate.get('failed')}"))
    rows.append(("release", next((ln for ln in out.splitlines() if "prod " in ln and "->" in ln), "(no line)")))
    return rows


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())

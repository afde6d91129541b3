"""evaluate.judge end to end: the tiny project's own base served by the real vLLM server (CPU, the serving
environment, an API key required) is the judge of `dvc repro gate@acme-shop`. What is checked is the
mechanics (requests, verdict counts, cache, key handling, the gate rule), not the tiny model's judgement.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest
import yaml
from e2e_project import _env, copy_project, stages_run
from e2e_serve import free_port, serving_python

from loraline.config import ServeParams
from loraline.layout import dvc_target
from loraline.serve.engine import Engine, engine_command, on_cpu
from loraline.tools import tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.serve]
TENANT = "acme-shop"
KEY_ENV = "LORALINE_E2E_JUDGE_KEY"
KEY = (
    f"sk-e2e-judge-{secrets.token_hex(8)}"  # made here: the project copy holds this file, which must not hold the key
)
ROWS = 3  # evaluate.judge.max_rows; the tiny project evaluates 6 test rows


@pytest.fixture(scope="module")
def judge(tmp_path_factory, built):
    """(project, base_url, model): a copy of the built project, and vLLM serving its base, asking for KEY."""
    tmp = tmp_path_factory.mktemp("judge")
    project = copy_project(built.project, tmp / "project")
    params = ServeParams(engine_port=free_port())
    model = project / "models" / "base"
    # the judge's prompt is longer than the tiny base's 512 positions: vLLM is let past them (mechanics only)
    cmd = engine_command(
        Path(serving_python()),
        model,
        params,
        dtype="float32",
        lora_rank=8,
        max_loras=1,
        max_model_len=2048,
        on_cpu=on_cpu(),
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_API_KEY", KEY)
        env.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
        engine = Engine.start(cmd, params, tmp / "engine.log", on_cpu())  # the log outside the project
    yield project, f"{engine.url}/v1", str(model)
    engine.stop()


def _run(project: Path, *cmd: str, key: bool) -> subprocess.CompletedProcess:
    env = {**_env(), **({KEY_ENV: KEY} if key else {})}
    return subprocess.run([tool(cmd[0]), *cmd[1:]], cwd=project, env=env, capture_output=True, text=True, timeout=900)


def test_the_served_base_judges_the_candidate_and_the_gate_reads_its_win_rate(judge):
    project, base_url, model = judge
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["judge"] = {
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV, "max_retries": 1, "timeout_s": 120},
        "model": model,
        "max_rows": ROWS,
        "max_tokens": 8,
    }
    params["gate"]["min_judge_win_rate"] = 0.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    done = _run(project, "dvc", "repro", dvc_target(f"gate@{TENANT}"), key=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert stages_run(done.stdout + done.stderr) == {f"evaluate@{TENANT}", f"gate@{TENANT}"}

    evaluation = project / "reports" / TENANT / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    block = metrics["judge"]
    assert block["against"] == "base" and block["model"] == model and block["endpoint"] == base_url.split("/")[2]
    assert block["rows"] == ROWS and block["comparisons"] == 2 * ROWS
    assert (
        block["valid"] + block["invalid"] == 2 * ROWS
        and block["wins"] + block["losses"] + block["ties"] == block["valid"]
    )
    judgements = [json.loads(line) for line in (evaluation / "judgements.jsonl").read_text().splitlines()]
    assert len(judgements) == ROWS and all(len(r["comparisons"]) == 2 for r in judgements)
    assert sum(c["outcome"] == "invalid" for r in judgements for c in r["comparisons"]) == block["invalid"]
    assert (
        metrics["models"]["candidate"]["judge_win_rate"] == block["win_rate"]
        and metrics["models"]["base"]["judge_win_rate"] == 0.5
    )
    assert "## LLM judge" in (evaluation / "report.md").read_text()
    usage = json.loads((project / "reports" / "timing" / f"evaluate@{TENANT}.json").read_text())["judge"]
    assert usage["requests"] >= 1 and usage["requests"] + usage["cache_hits"] == 2 * ROWS

    rule = next(
        r
        for r in json.loads((project / "reports" / TENANT / "gate.json").read_text())["rules"]
        if r["name"] == "judge_win_rate"
    )
    assert rule["threshold"] == 0.0 and rule["value"] == block["win_rate"]
    assert rule["passed"] is (block["win_rate"] is not None)  # fails only when no verdict was valid

    # Again, without the key: every request is in the cache, so nothing is sent and the outputs repeat.
    before = (evaluation / "metrics.json").read_bytes(), (evaluation / "judgements.jsonl").read_bytes()
    again = _run(project, "loraline", "evaluate", "--tenant", TENANT, "--quiet", key=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ((evaluation / "metrics.json").read_bytes(), (evaluation / "judgements.jsonl").read_bytes()) == before
    usage = json.loads((project / "reports" / "timing" / f"evaluate@{TENANT}.json").read_text())["judge"]
    assert usage == {"requests": 0, "cache_hits": 2 * ROWS, "retries": 0}

    # A new request without the key: the server refuses it, and the stage fails naming the setting, writing nothing.
    refused = _run(
        project, "loraline", "evaluate", "--tenant", TENANT, "--quiet", "--set", "evaluate.judge.seed=1", key=False
    )
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr and "evaluate.judge.endpoint" in refused.stderr
    assert ((evaluation / "metrics.json").read_bytes(), (evaluation / "judgements.jsonl").read_bytes()) == before

    for path in project.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 5 * 2**20:
            assert KEY.encode() not in path.read_bytes(), path

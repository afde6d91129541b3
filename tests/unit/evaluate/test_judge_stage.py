"""evaluate_tenant with evaluate.judge set: the tiny models of test_evaluate_stage.py judged by a small local
server (judge_helpers.FakeJudge); what metrics.json, judgements.jsonl and report.md hold, and what a failure leaves."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
from judge_helpers import KEY_ENV, SECRET, FakeJudge, judge_params, verdict
from test_evaluate_stage import GENERATIONS, METRICS, REPORT, EvaluateError, Setup, evaluate_tenant, setup  # noqa: F401

from loraline.evaluate.judge import JUDGEMENTS
from loraline.layout import BASE_RECORD
from loraline.provenance import hash_tree

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = 8  # evaluated test rows
JUDGED = 5


@pytest.fixture(autouse=True)
def api_key(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def first_unless_worse(a: str, b: str) -> str:
    """A judge biased to the first position: A unless B sorts first. The tiny models often answer alike,
    and two equal answers then give the candidate one win and one loss."""
    return verdict("A" if a <= b else "B")


def _outcome(rule, candidate: str, other: str, candidate_as: str) -> str:
    a, b = (candidate, other) if candidate_as == "A" else (other, candidate)
    return "win" if json.loads(rule(a, b))["verdict"] == candidate_as else "loss"


def _evaluate(setup: Setup, out: Path, url: str, cache: Path, **kw):
    return evaluate_tenant(
        out_dir=out,
        judge=judge_params(url, max_rows=JUDGED),
        judge_cache_dir=cache,
        **setup.kwargs(max_examples=ROWS, **kw),
    )


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_candidate_is_judged_against_the_base_in_both_orders(setup: Setup, tmp_path: Path):
    cache = tmp_path / ".cache" / "judge" / "toy"
    with FakeJudge(first_unless_worse) as server:
        result = _evaluate(setup, tmp_path / "eval", server.base_url, cache)
        sent = len(server.requests)
        again = _evaluate(setup, tmp_path / "again", server.base_url, cache)
        assert len(server.requests) == sent  # the second run is answered from the cache
    assert 0 < sent <= 2 * JUDGED and result.judge_usage["requests"] == sent and again.judge_usage["requests"] == 0
    assert (tmp_path / "eval" / METRICS).read_bytes() == (tmp_path / "again" / METRICS).read_bytes()
    assert (tmp_path / "eval" / JUDGEMENTS).read_bytes() == (tmp_path / "again" / JUDGEMENTS).read_bytes()

    metrics = json.loads((tmp_path / "eval" / METRICS).read_text())
    block = metrics["judge"]
    assert block["against"] == "base" and block["rows"] == JUDGED and block["comparisons"] == 2 * JUDGED
    assert block["against_model"] == {
        "base_record_sha256": hashlib.sha256((setup.base_dir / BASE_RECORD).read_bytes()).hexdigest()
    }
    assert block["endpoint"] == server.base_url.split("//")[1].split("/")[0] and block["model"] == "judge-7b"
    # the verdicts, recomputed from the answers generations.jsonl holds
    generations = {r["id"]: r["predictions"] for r in _read(tmp_path / "eval" / GENERATIONS)}
    judged = _read(tmp_path / "eval" / JUDGEMENTS)
    assert len(judged) == JUDGED and len(generations) == ROWS
    outcomes = [
        [
            _outcome(
                first_unless_worse,
                generations[row["id"]]["candidate"],
                generations[row["id"]]["base"],
                x["candidate_as"],
            )
            for x in row["comparisons"]
        ]
        for row in judged
    ]
    assert [[x["outcome"] for x in row["comparisons"]] for row in judged] == outcomes
    assert [[x["candidate_as"] for x in row["comparisons"]] for row in judged] == [["A", "B"]] * JUDGED
    wins = sum(o.count("win") for o in outcomes)
    assert (block["wins"], block["losses"], block["ties"], block["invalid"]) == (wins, 2 * JUDGED - wins, 0, 0)
    assert block["win_rate"] == pytest.approx(wins / (2 * JUDGED))
    assert block["consistent_rows"] == sum(o[0] == o[1] for o in outcomes)
    assert metrics["models"]["candidate"]["judge_win_rate"] == block["win_rate"]
    assert metrics["models"]["base"]["judge_win_rate"] == 0.5
    report = (tmp_path / "eval" / REPORT).read_text()
    assert "## LLM judge" in report and "The candidate against **base** (base_record_sha256" in report
    assert f"{JUDGED} test rows, each in both orders" in report
    for path in tmp_path.rglob("*"):  # outputs and cache alike
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path


def test_with_a_production_model_the_candidate_is_judged_against_it(setup: Setup, tmp_path: Path):
    with FakeJudge(first_unless_worse) as server:
        result = _evaluate(setup, tmp_path / "eval", server.base_url, None, production_dir=setup.base_dir)
    block = result.metrics["judge"]
    assert block["against"] == "production" and block["against_model"] == {"sha256": hash_tree(setup.base_dir)}
    models = result.metrics["models"]
    assert models["production"]["judge_win_rate"] == 0.5 and "judge_win_rate" not in models["base"]
    assert models["candidate"]["judge_win_rate"] == block["win_rate"]


def test_an_unreachable_judge_fails_the_stage_naming_the_setting_and_leaves_the_outputs_alone(
    setup: Setup, tmp_path: Path
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    out = tmp_path / "eval"
    out.mkdir()
    (out / METRICS).write_text("{}")  # what an earlier run wrote
    params = judge_params(url, endpoint={"base_url": url, "api_key_env": KEY_ENV, "max_retries": 0})
    with pytest.raises(EvaluateError) as info:
        evaluate_tenant(
            out_dir=out, judge=params, judge_cache_dir=None, **setup.kwargs(max_examples=2, max_new_tokens=2)
        )
    message = str(info.value)
    assert message.startswith("evaluate.judge: ") and "evaluate.judge.endpoint.base_url" in message
    assert f"{url}/chat/completions" in message and SECRET not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"] and [p.name for p in out.iterdir()] == [METRICS]
    assert (out / METRICS).read_text() == "{}"

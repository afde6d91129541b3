"""The LLM judge (evaluate/judge.py) against a small OpenAI-compatible server on 127.0.0.1: verdicts read
from replies, both orders, the win-rate arithmetic, the cache, the key, an unreachable endpoint."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
from judge_helpers import KEY_ENV, SECRET, FakeJudge, judge_params, longer_wins, verdict

from loraline.config import GateParams, JudgeParams, load_params
from loraline.evaluate.judge import (
    DEFAULT_RUBRIC,
    Opponent,
    Pairing,
    endpoint_host,
    judge_pairs,
    judged_rows,
    pairings,
    parse_verdict,
    render,
)
from loraline.gate.decision import DEFAULT_LOWER_IS_BETTER, decide
from loraline.modelling.endpoint import EndpointError

BASE = Opponent("base", {"base_record_sha256": "ab" * 32})


@pytest.fixture(autouse=True)
def api_key(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def _pairs(candidate: list[str], other: list[str]) -> list[Pairing]:
    return [
        Pairing(f"row-{i}", f"question {i}?", f"reference {i}", c, o) for i, (c, o) in enumerate(zip(candidate, other))
    ]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"reason": "B is wrong", "verdict": "A"}', "A"),
        ('```json\n{"verdict": "b", "reason": "shorter"}\n```', "B"),
        ('Both say the same. {"Verdict": "Tie"}', "tie"),
        ("A", "A"),
        (" b.\n", "B"),
        ("**Tie**", "tie"),
        ("[[B]]", "B"),
        ("Answer A", "A"),
        ('{"reason": "{nested}", "verdict": " A "}', "A"),
        ("I think A is better", None),
        ("", None),
        ('{"verdict": "C"}', None),
        ('{"winner": "A"}', None),
        ('{"verdict": 1}', None),
        ("AB", None),
    ],
)
def test_verdicts_are_read_from_json_or_a_lone_word_and_nothing_else(reply, expected):
    assert parse_verdict(reply) == expected


def test_both_orders_are_asked_and_the_win_rate_counts_wins_and_half_ties(tmp_path: Path):
    candidate = ["a long answer", "long answer two", "x", "same"]
    other = ["short", "short", "a longer one", "same"]
    with FakeJudge(longer_wins) as server:
        judged = judge_pairs(judge_params(server.base_url), _pairs(candidate, other), BASE, tmp_path / "cache")
    bodies = server.chats()
    # row 3's answers are the same text: its second order is the same request, answered from the cache
    assert len(bodies) == 7 and judged.usage == {"requests": 7, "cache_hits": 1, "retries": 0}
    assert all(r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    for i, (first, second) in enumerate(zip(bodies[:6:2], bodies[1:6:2])):  # candidate as A, then as B
        assert f"[Answer A]\n{candidate[i]}\n\n[Answer B]\n{other[i]}\n" in first["messages"][1]["content"]
        assert f"[Answer A]\n{other[i]}\n\n[Answer B]\n{candidate[i]}\n" in second["messages"][1]["content"]
        assert f"[Reference answer]\nreference {i}" in first["messages"][1]["content"]
    body = bodies[0]
    assert (
        body["model"] == "judge-7b" and body["temperature"] == 0.0 and body["seed"] == 0 and body["max_tokens"] == 256
    )
    assert body["messages"][0] == {"role": "system", "content": DEFAULT_RUBRIC}
    block = judged.block
    assert (block["wins"], block["losses"], block["ties"], block["invalid"], block["valid"]) == (4, 2, 2, 0, 8)
    assert block["win_rate"] == pytest.approx((4 + 2 / 2) / 8)
    assert block["position_bias"] == {"first_wins": 3, "second_wins": 3, "first_share": 0.5}
    assert (block["rows"], block["comparisons"], block["consistent_rows"], block["inconsistent_rows"]) == (4, 8, 4, 0)
    assert block["against"] == "base" and block["against_model"] == BASE.identity
    assert block["endpoint"] == f"127.0.0.1:{server.httpd.server_address[1]}" and block["model"] == "judge-7b"
    assert block["rubric_sha256"] == hashlib.sha256(DEFAULT_RUBRIC.encode()).hexdigest() and block["default_rubric"]
    assert [r["id"] for r in judged.rows] == ["row-0", "row-1", "row-2", "row-3"]
    assert [c["outcome"] for c in judged.rows[2]["comparisons"]] == ["loss", "loss"]
    assert judged.rows[0]["comparisons"][1] == {
        "candidate_as": "B",
        "verdict": "B",
        "outcome": "win",
        "reply": verdict("B"),
    }


def test_a_judge_that_always_picks_the_first_position_shows_as_bias_not_as_a_winner(tmp_path: Path):
    with FakeJudge(lambda a, b: "A") as server:
        block = judge_pairs(judge_params(server.base_url), _pairs(["good"] * 3, ["bad"] * 3), BASE, None).block
    assert block["win_rate"] == 0.5 and (block["wins"], block["losses"]) == (3, 3)
    assert block["position_bias"] == {"first_wins": 6, "second_wins": 0, "first_share": 1.0}
    assert (block["consistent_rows"], block["inconsistent_rows"]) == (0, 3)


def test_unparseable_replies_are_invalid_never_a_win(tmp_path: Path):
    replies = iter([verdict("A"), "The first answer, clearly.", "Sorry, I can't judge that.", verdict("tie")])
    with FakeJudge(lambda a, b: next(replies)) as server:
        judged = judge_pairs(judge_params(server.base_url), _pairs(["c1", "c2"], ["o1", "o2"]), BASE, None)
    block = judged.block
    assert (block["wins"], block["losses"], block["ties"], block["invalid"], block["valid"]) == (1, 0, 1, 2, 2)
    assert block["win_rate"] == 0.75  # (1 win + 1 tie / 2) / 2 valid: the invalid verdicts count for neither side
    assert (block["consistent_rows"], block["inconsistent_rows"]) == (0, 0)  # no row has two valid verdicts
    assert judged.rows[0]["comparisons"][1] == {
        "candidate_as": "B",
        "verdict": None,
        "outcome": "invalid",
        "reply": "The first answer, clearly.",
    }
    with FakeJudge(lambda a, b: "no idea") as server:
        none_valid = judge_pairs(judge_params(server.base_url), _pairs(["c"], ["o"]), BASE, None).block
    assert none_valid["win_rate"] is None and none_valid["invalid"] == 2
    assert "| n/a | 0 | 0 | 0 | 2 |" in "\n".join(render({**none_valid}))


def test_a_second_run_is_served_from_the_cache_which_holds_no_key(tmp_path: Path):
    pairs = _pairs(["alpha answer", "b"], ["a", "beta answer"])
    cache = tmp_path / ".cache" / "judge" / "t1"
    with FakeJudge(longer_wins, fail=[429, 503]) as server:
        first = judge_pairs(judge_params(server.base_url), pairs, BASE, cache, sleep=lambda s: None)
        sent = len(server.requests)
        second = judge_pairs(judge_params(server.base_url), pairs, BASE, cache)
        assert len(server.requests) == sent == 4 + 2  # two retried
    assert first.usage == {"requests": 6, "cache_hits": 0, "retries": 2}
    assert second.usage == {"requests": 0, "cache_hits": 4, "retries": 0}
    assert first.block == second.block and first.rows == second.rows
    cached = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
    assert len(cached) == 4 and all(c["request"]["model"] == "judge-7b" for c in cached)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path
    # another judge model, rubric or seed is another request
    with FakeJudge(longer_wins) as server:
        judge_pairs(judge_params(server.base_url, rubric="Prefer the shorter answer."), pairs, BASE, cache)
        judge_pairs(judge_params(server.base_url, seed=1), pairs, BASE, cache)
        assert len(server.requests) == 8
    assert server.chats()[0]["messages"][0]["content"] == "Prefer the shorter answer."


def test_without_reference_the_judge_sees_question_and_answers_only(tmp_path: Path):
    with FakeJudge(longer_wins) as server:
        block = judge_pairs(
            judge_params(server.base_url, with_reference=False, rubric="Be strict."), _pairs(["c"], ["o"]), BASE, None
        ).block
    content = server.chats()[0]["messages"][1]["content"]
    assert (
        "[Reference answer]" not in content
        and "reference 0" not in content
        and "[User message]\nquestion 0?" in content
    )
    assert not block["default_rubric"] and not block["with_reference"]
    assert block["rubric_sha256"] == hashlib.sha256(b"Be strict.").hexdigest()


def test_an_unreachable_endpoint_names_the_setting_and_the_url_not_the_key(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(EndpointError) as info:
        judge_pairs(
            judge_params(url, endpoint={"base_url": url, "api_key_env": KEY_ENV, "max_retries": 1, "backoff_s": 0}),
            _pairs(["c"], ["o"]),
            BASE,
            tmp_path / "cache",
        )
    message = str(info.value)
    assert (
        f"{url}/chat/completions" in message
        and "evaluate.judge.endpoint.base_url" in message
        and SECRET not in message
    )
    assert not (tmp_path / "cache").exists()


def test_an_http_error_that_is_not_retried_fails_at_once_naming_the_setting():
    with FakeJudge(longer_wins, fail=[401]) as server:
        with pytest.raises(EndpointError, match="HTTP 401") as info:
            judge_pairs(judge_params(server.base_url), _pairs(["c"], ["o"]), BASE, None)
    message = str(info.value)
    assert len(server.requests) == 1 and server.base_url in message and SECRET not in message
    assert f"check evaluate.judge.endpoint: its base_url, and the key in ${KEY_ENV}" in message


def test_the_judged_rows_are_a_fixed_sample_in_test_order():
    ids = [f"id-{i}" for i in range(50)]
    picked = judged_rows(ids, 10)
    assert len(picked) == 10 and picked == sorted(picked) and picked == judged_rows(ids, 10)
    assert picked == sorted(sorted(range(50), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())[:10])
    assert picked != list(range(10))  # spread over the split, not its head
    assert judged_rows(ids, None) == judged_rows(ids, 50) == list(range(50))
    rows = [
        {"id": i, "prompt": "q", "reference": "r", "predictions": {"candidate": f"c{n}", "base": f"b{n}"}}
        for n, i in enumerate(ids)
    ]
    pairs = pairings(rows, "base", 10)
    assert [p.row_id for p in pairs] == [ids[i] for i in picked] and pairs[0].other == f"b{picked[0]}"
    assert pairings(rows, "production", 10, [f"p{n}" for n in range(50)])[0].other == f"p{picked[0]}"


def test_only_the_endpoint_host_is_recorded():
    assert endpoint_host("https://user:sk-secret@api.example.com/v1?key=sk-secret") == "api.example.com"
    assert endpoint_host("http://127.0.0.1:8000/v1") == "127.0.0.1:8000"


def test_the_judge_is_off_by_default_and_needs_an_endpoint_and_a_model():
    params = load_params(Path(__file__).parents[3] / "params.yaml")
    assert params.evaluate.judge is None and params.gate.min_judge_win_rate is None
    with pytest.raises(ValueError, match="needs endpoint.base_url"):
        JudgeParams(endpoint={}, model="m")
    with pytest.raises(ValueError, match="model"):
        JudgeParams(endpoint={"base_url": "http://127.0.0.1:1/v1"})
    with pytest.raises(ValueError, match="less than or equal to 1"):
        GateParams(min_judge_win_rate=1.5)


# --- the gate -----------------------------------------------------------------------------------------

PARITY = {"merge_max_logit_diff": 0.0, "export_max_logit_diff": 0.0}
JUDGE = {
    "against": "production",
    "against_model": {"version": "v0.0.1", "commit": "c" * 40},
    "comparisons": 20,
    "wins": 10,
    "losses": 6,
    "ties": 2,
    "invalid": 2,
    "win_rate": 11 / 18,
}


def test_the_judge_rule_passes_at_the_threshold_and_names_what_the_rate_is_against():
    gate = GateParams(min_judge_win_rate=11 / 18)
    rule = decide(gate, {"answer_loss": 1.0}, {"answer_loss": 2.0}, None, PARITY, judge=JUDGE).rule("judge_win_rate")
    assert rule.passed and rule.value == pytest.approx(11 / 18)
    assert (
        "against production (version v0.0.1, commit cccccccccccc)" in rule.reason and "2 invalid of 20" in rule.reason
    )
    assert rule.values == {
        "wins": 10.0,
        "losses": 6.0,
        "ties": 2.0,
        "invalid": 2.0,
        "win_rate": pytest.approx(11 / 18),
    }
    higher = GateParams(min_judge_win_rate=0.62)
    assert (
        not decide(higher, {"answer_loss": 1.0}, {"answer_loss": 2.0}, None, PARITY, judge=JUDGE)
        .rule("judge_win_rate")
        .passed
    )


def test_the_judge_rule_fails_on_missing_evidence_and_is_off_by_default():
    # general_loss unchanged: the forgetting check passes, so the gate's verdict is the judge rule's
    candidate, base = {"answer_loss": 1.0, "general_loss": 3.0}, {"answer_loss": 2.0, "general_loss": 3.0}
    off = decide(GateParams(), candidate, base, None, PARITY, judge=None)
    assert off.passed and off.rule("judge_win_rate").reason == "no judge rule (gate.min_judge_win_rate is null)"
    gate = GateParams(min_judge_win_rate=0.5)
    missing = decide(gate, candidate, base, None, PARITY).rule("judge_win_rate")
    assert not missing.passed and "needs evaluate.judge" in missing.reason
    invalid = decide(gate, candidate, base, None, PARITY, judge={**JUDGE, "win_rate": None}).rule("judge_win_rate")
    assert not invalid.passed and "no valid verdict" in invalid.reason


@pytest.mark.parametrize("rate, passed", [(0.6, True), (0.52, False), (0.45, False)])
def test_judge_win_rate_as_the_primary_metric_is_higher_is_better_against_the_even_base(rate, passed):
    assert "judge_win_rate" not in DEFAULT_LOWER_IS_BETTER
    gate = GateParams(primary_metric="judge_win_rate", min_gain_over_base=0.05)
    rule = decide(gate, {"judge_win_rate": rate}, {"judge_win_rate": 0.5}, None, PARITY).rule("beats_base")
    assert rule.passed is passed and rule.value == pytest.approx((rate - 0.5) / 0.5)
    assert "higher is better" in rule.reason


def test_the_gate_stage_decides_on_the_evaluations_judge_block(tmp_path: Path):
    from loraline.config import parse_params
    from loraline.gate.stage import run
    from loraline.layout import Layout

    layout = Layout(tmp_path)
    params = parse_params({"tenants": {"t1": {"raw_dir": "raw"}}, "gate": {"min_judge_win_rate": 0.6}})
    evaluation = {
        "models": {
            "base": {"answer_loss": 2.0, "general_loss": 3.0},
            "candidate": {"answer_loss": 1.0, "general_loss": 3.0},
        }
    }  # no forgetting
    for stage in ("merge", "export"):
        layout.metrics_path(stage, "t1").parent.mkdir(parents=True, exist_ok=True)
        layout.metrics_path(stage, "t1").write_text(json.dumps({"max_abs_logit_diff": 0.0}))
    layout.evaluation_results_path("t1").write_text(json.dumps(evaluation))
    assert run(params, layout, "t1").failed == ["judge_win_rate"]  # set, but the evaluation has no judge block
    judged = {**JUDGE, "against": "base", "against_model": {"base_record_sha256": "ab" * 32}}
    layout.evaluation_results_path("t1").write_text(json.dumps({**evaluation, "judge": judged}))
    decision = run(params, layout, "t1")
    assert (
        decision.passed
        and "against base (base_record_sha256 abababababab) 0.6111 >= 0.6" in decision.rule("judge_win_rate").reason
    )
    rule = json.loads(layout.gate_path("t1").read_text())["rules"][-1]
    assert rule["name"] == "judge_win_rate" and rule["value"] == pytest.approx(11 / 18) and rule["threshold"] == 0.6

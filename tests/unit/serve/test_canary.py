"""The canary's routing, counting and verdict (serve.canary), without an engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraline.config import CanaryParams, ConfigError, parse_params
from loraline.serve.canary import Canary, Outcome
from loraline.serve.versions import ServedVersion

STABLE = ServedVersion("acme", "v0.0.1", "c1", Path("s"), 16, None)
NEW = ServedVersion("acme", "v0.0.2", "c2", Path("n"), 16, None)


def canary(**params) -> Canary:
    return Canary(2, NEW, STABLE, CanaryParams(**params))


def answers(c: Canary, served: ServedVersion, n: int, ok: bool = True, seconds: float = 1.0, tokens: int = 10) -> None:
    for _ in range(n):
        c.record(served, Outcome(ok, seconds, tokens))


def test_requests_without_a_client_are_split_exactly_by_the_fraction():
    c = canary(fraction=0.25)
    picks = [c.takes(None) for _ in range(400)]
    assert sum(picks) == 100 and picks[:8] == [False, False, False, True] * 2
    assert all(canary(fraction=1).takes(None) for _ in range(10))


def test_a_client_stays_on_its_side_and_clients_split_near_the_fraction():
    c = canary(fraction=0.3)
    sides = {f"user-{i}": c.takes(f"user-{i}") for i in range(2000)}
    assert all(c.takes(u) == side for u, side in list(sides.items())[:200])  # sticky, whatever came between
    assert canary(fraction=0.3).takes("user-7") == sides["user-7"]  # another replica sends the client the same way
    assert 0.26 < sum(sides.values()) / len(sides) < 0.34
    assert c.keyless == 0  # clients never move the counter of anonymous requests


def test_no_verdict_before_min_requests_on_the_canary_and_on_the_stable_version():
    c = canary(fraction=0.5, min_requests=4)
    answers(c, NEW, 3)
    answers(c, STABLE, 10)
    assert c.verdict() is None
    answers(c, NEW, 1)
    assert c.verdict().keep
    c = canary(fraction=0.5, min_requests=4)
    answers(c, NEW, 4)
    answers(c, STABLE, 3)
    assert c.verdict() is None  # the latency comparison waits for as many answers from the stable version


def test_an_error_rate_over_the_bound_rolls_back_without_waiting_for_the_stable_version():
    c = canary(min_requests=4, max_error_rate=0.25)
    answers(c, NEW, 3)
    answers(c, NEW, 1, ok=False)
    assert c.verdict() is None  # 0.25 is within the bound: the latency comparison still waits for the stable version
    answers(c, NEW, 1, ok=False)
    verdict = c.verdict()
    assert not verdict.keep and verdict.reason.startswith(
        "error rate 0.40 (2 of 5 answers) above serve.canary.max_error_rate 0.25"
    )
    assert verdict.canary["errors"] == 2 and verdict.stable["answers"] == 0


def test_a_canary_slower_per_output_token_than_the_bound_rolls_back():
    c = canary(fraction=0.5, min_requests=3, max_latency_ratio=1.5)
    answers(c, STABLE, 3, seconds=1.0, tokens=10)  # 100 ms a token
    answers(c, NEW, 3, seconds=1.0, tokens=5)  # 200 ms a token: fewer tokens in the same time
    verdict = c.verdict()
    assert not verdict.keep and verdict.latency_ratio == 2.0
    assert "median 200.0 ms per output token, 2.00 times v0.0.1's 100.0 ms" in verdict.reason
    c = canary(fraction=0.5, min_requests=3, max_latency_ratio=1.5)
    answers(c, STABLE, 3, seconds=1.0, tokens=10)
    answers(c, NEW, 3, seconds=1.4, tokens=10)
    assert c.verdict().keep and c.verdict().latency_ratio == 1.4


def test_errors_and_empty_answers_count_as_answers_but_give_no_latency_sample():
    c = canary(min_requests=1, max_error_rate=1)
    c.record(NEW, Outcome(False, 9.0, 0))
    c.record(NEW, Outcome(True, 2.0, 0))
    c.record(NEW, Outcome(True, 1.0, 4))
    c.record(
        ServedVersion("acme", "v0.0.9", "c9", Path("x"), 16, None), Outcome(True, 1.0, 1)
    )  # neither side: not counted
    assert (c.on_canary.answers, c.on_canary.errors, c.on_canary.per_token_s) == (3, 1, [0.25])
    assert c.on_stable.answers == 0


def test_with_the_whole_traffic_on_the_canary_latency_is_not_compared():
    c = canary(fraction=1, min_requests=2)
    answers(c, NEW, 2, seconds=100)
    verdict = c.verdict()
    assert verdict.keep and verdict.latency_ratio is None and "latency not compared" in verdict.reason


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("fraction", 0, "serve.canary.fraction: Input should be greater than 0"),
        ("fraction", 1.5, "serve.canary.fraction: Input should be less than or equal to 1"),
        ("min_requests", 0, "serve.canary.min_requests: Input should be greater than or equal to 1"),
        ("max_error_rate", -0.1, "serve.canary.max_error_rate: Input should be greater than or equal to 0"),
        ("max_latency_ratio", 0, "serve.canary.max_latency_ratio: Input should be greater than 0"),
    ],
)
def test_bad_canary_params_name_their_key(key, value, words):
    with pytest.raises(ConfigError, match=words):
        parse_params({"serve": {"canary": {key: value}}})

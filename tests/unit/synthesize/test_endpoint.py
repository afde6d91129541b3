"""The OpenAI-compatible generator against a small server on 127.0.0.1 (synth_helpers.FakeOpenAI)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from synth_helpers import SECRET, FakeOpenAI, endpoint_params

from loraline.config import SeedTask
from loraline.modelling.endpoint import RateLimiter
from loraline.synthesize import SynthesizeError, synthesize_tenant
from loraline.synthesize.prompt import TEMPLATE_SHA256


@pytest.fixture(autouse=True)
def api_key(monkeypatch) -> None:
    monkeypatch.setenv("LORALINE_TEST_KEY", SECRET)


def run(documents: Path, tmp: Path, params, name: str = "out", **kwargs):
    return synthesize_tenant(
        "lampwick",
        params,
        documents,
        tmp / name / "synthetic",
        tmp / name / "stats.json",
        seed=3,
        cache_dir=tmp / ".cache" / "synth" / "lampwick",
        **kwargs,
    )


def test_auth_retries_cache_and_no_key_on_disk(documents: Path, tmp_path: Path) -> None:
    seeds = [SeedTask(instruction="Customer email: can I return a lamp?", output="Yes, within 30 days.")]
    with FakeOpenAI(fail=[429, 500]) as server:
        first = run(documents, tmp_path, endpoint_params(server.base_url), seed_tasks=seeds)
        sent = len(server.requests)
        second = run(documents, tmp_path, endpoint_params(server.base_url), name="again", seed_tasks=seeds)
        assert len(server.requests) == sent  # the re-run is served from the cache
    assert all(r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    assert all(r["path"] == "/v1/chat/completions" for r in server.requests)
    bodies = [r["body"] for r in server.requests]
    assert bodies[0] == bodies[1] == bodies[2]  # 429 and 500 retried with the same request
    passages = len(bodies) - 2
    assert first.usage == {"requests": passages + 2, "cache_hits": 0, "retries": 2}
    assert second.usage == {"requests": 0, "cache_hits": passages, "retries": 0}
    assert first.rows_path.read_bytes() == second.rows_path.read_bytes()
    assert (
        first.stats_path.read_bytes() == second.stats_path.read_bytes()
    )  # counters that differ stay out of the stats
    body = bodies[0]
    assert body["model"] == "teacher-7b" and body["temperature"] == 0.0 and isinstance(body["seed"], int)
    assert "Customer email: can I return a lamp?" in body["messages"][-1]["content"]  # seed task as few-shot
    rows = [json.loads(x) for x in first.rows_path.read_text().splitlines()]
    assert rows and first.kept == len(rows)
    for row in rows:
        prov = row["provenance"]
        assert prov["generator"] == "openai" and prov["model"] == "teacher-7b" and prov["seed_tasks"] == [0]
        assert prov["prompt_template_sha256"] == TEMPLATE_SHA256
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path


def test_requests_are_spaced_by_the_rate_limit(documents: Path, tmp_path: Path) -> None:
    with FakeOpenAI() as server:
        run(documents, tmp_path, endpoint_params(server.base_url, requests_per_minute=600))  # 0.1 s apart
    times = [r["t"] for r in server.requests]
    assert len(times) >= 3
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.09


def test_rate_limiter_waits_only_what_is_left() -> None:
    now, slept = [100.0], []

    def sleep(s: float) -> None:
        slept.append(round(s, 6))
        now[0] += s

    limiter = RateLimiter(per_minute=30, clock=lambda: now[0], sleep=sleep)  # 2 s apart
    limiter.wait()
    now[0] += 0.5
    limiter.wait()
    now[0] += 5
    limiter.wait()
    assert slept == [1.5]


def test_unparseable_replies_are_rejects_not_crashes(documents: Path, tmp_path: Path) -> None:
    with FakeOpenAI(reply="Sure! Here are some questions about the passage.") as server:
        result = run(documents, tmp_path, endpoint_params(server.base_url))
    assert result.kept == 0 and result.rejected == {"unparseable": result.generated} and result.generated > 0
    reject = json.loads(result.rejected_path.read_text().splitlines()[0])
    assert reject["reason"] == "unparseable" and "not JSON" in reject["detail"]


def test_unreachable_endpoint_names_the_url_not_the_key(documents: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(SynthesizeError) as info:
        run(documents, tmp_path, endpoint_params(url, max_retries=1))
    message = str(info.value)
    assert f"{url}/chat/completions" in message and "after 2 attempt(s)" in message and SECRET not in message
    assert not (tmp_path / "out" / "synthetic").exists()  # nothing half-written


def test_client_errors_fail_at_once(documents: Path, tmp_path: Path) -> None:
    with FakeOpenAI(fail=[401]) as server:
        with pytest.raises(SynthesizeError) as info:
            run(documents, tmp_path, endpoint_params(server.base_url))
    assert len(server.requests) == 1
    assert "HTTP 401" in str(info.value) and server.base_url in str(info.value) and SECRET not in str(info.value)


def test_openai_generator_needs_a_url_and_a_model() -> None:
    from loraline.config import SynthesizeParams

    with pytest.raises(ValueError, match="endpoint.base_url"):
        SynthesizeParams(generator="openai", model="m")
    with pytest.raises(ValueError, match="needs synthesize.model"):
        SynthesizeParams(generator="openai", endpoint={"base_url": "http://127.0.0.1:1/v1"})

"""The gateway under a canary: the split, the counts per version, and a canary's server error answered by the
stable version, with a scripted upstream in place of vLLM (the real engine: tests/e2e/test_serve_canary.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from loraline.config import CanaryParams, ServeParams
from loraline.serve.canary import Canary
from loraline.serve.deployment import Deployment
from loraline.serve.gateway import VERSION_HEADER, create_app
from loraline.serve.versions import ServedVersion

seen: list[str] = []  # the engine names requests reached, in order


async def completions(request: Request):
    """v0.0.1 answers; v0.0.2 (the canary) fails as `broken` says: 500, or 404 as vLLM does for an adapter it lacks."""
    body = json.loads(await request.body())
    seen.append(body["model"])
    if len(body.get("prompt", "")) > 20:
        return JSONResponse({"error": {"message": "maximum context length is 16 tokens"}}, status_code=400)
    if body["model"] == "acme@v0.0.2" and BROKEN["status"]:
        return JSONResponse({"error": {"message": "engine failure"}}, status_code=BROKEN["status"])
    if body.get("stream"):

        async def events():
            for word in ("hel", "lo", "!"):
                yield f"data: {json.dumps({'model': body['model'], 'choices': [{'text': word}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"model": body["model"], "choices": [{"text": "hello"}], "usage": {"completion_tokens": 4}})


BROKEN = {"status": 0}
UPSTREAM = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture
def gateway(tmp_path):
    seen.clear()
    BROKEN["status"] = 0
    stable = ServedVersion("acme", "v0.0.1", "c1", tmp_path, 16, None)
    new = ServedVersion("acme", "v0.0.2", "c2", tmp_path, 16, None)
    params = CanaryParams(
        fraction=0.5, min_requests=1000
    )  # no verdict here: these tests look at one request at a time
    deployment = Deployment(None, ServeParams(canary=params), None, lambda: {}, tmp_path / "events.jsonl")
    deployment.routes["acme"] = stable
    deployment.canaries["acme"] = canary = Canary(2, new, stable, params)
    with TestClient(create_app(deployment, "http://engine", transport=httpx.ASGITransport(app=UPSTREAM))) as c:
        yield c, deployment, canary


def post(c, **extra):
    return c.post("/v1/completions", json={"model": "acme", "prompt": "hi", **extra.pop("body", {})}, **extra)


def test_requests_are_split_and_each_answer_is_counted_for_the_version_that_gave_it(gateway):
    c, deployment, canary = gateway
    versions = [post(c).headers[VERSION_HEADER] for _ in range(4)]
    assert versions == ["v0.0.1", "v0.0.2"] * 2 and seen == ["acme@v0.0.1", "acme@v0.0.2"] * 2
    assert (canary.on_canary.answers, canary.on_stable.answers) == (2, 2)
    assert len(canary.on_canary.per_token_s) == 2  # usage.completion_tokens: a latency sample per answer
    [model] = c.get("/v1/models").json()["data"]
    assert model["version"] == "v0.0.1" and model["canary"] == {"version": "v0.0.2", "commit": "c2", "fraction": 0.5}


def test_a_client_named_by_user_or_header_stays_on_one_side(gateway):
    c, _, canary = gateway
    by_user = {post(c, body={"user": "alice"}).headers[VERSION_HEADER] for _ in range(4)}
    by_header = {post(c, headers={"X-Client-Id": "alice"}).headers[VERSION_HEADER] for _ in range(4)}
    assert len(by_user) == 1 and by_user == by_header == {"v0.0.2" if canary.takes("alice") else "v0.0.1"}
    assert canary.keyless == 0


@pytest.mark.parametrize("status", [500, 404])
def test_a_canary_server_error_is_answered_by_the_stable_version_and_counted_against_the_canary(gateway, status):
    c, deployment, canary = gateway
    BROKEN["status"] = status
    answers = [post(c) for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4 and {r.headers[VERSION_HEADER] for r in answers} == {"v0.0.1"}
    assert seen == ["acme@v0.0.1", "acme@v0.0.2", "acme@v0.0.1"] * 2  # each canary request retried once, on v0.0.1
    assert (canary.on_canary.answers, canary.on_canary.errors, canary.on_stable.answers) == (2, 2, 4)
    assert deployment._inflight["acme@v0.0.1"] == deployment._inflight["acme@v0.0.2"] == 0
    assert c.app.state.admission.in_flight == 0


def test_a_clients_error_is_not_retried_nor_counted(gateway):
    c, _, canary = gateway
    post(c)  # the next request goes to the canary
    r = post(c, body={"prompt": "x" * 40})
    assert r.status_code == 400 and r.headers[VERSION_HEADER] == "v0.0.2" and seen[-1] == "acme@v0.0.2"
    assert (canary.on_canary.answers, canary.on_stable.answers) == (0, 1)


def test_a_stream_counts_its_chunks_and_a_failed_stream_start_goes_to_the_stable_version(gateway):
    c, _, canary = gateway
    for _ in range(2):
        with c.stream("POST", "/v1/completions", json={"model": "acme", "prompt": "hi", "stream": True}) as r:
            list(r.iter_lines())
    assert canary.on_canary.answers == 1 and canary.on_canary.per_token_s[0] > 0  # 3 chunks
    BROKEN["status"] = 503
    for _ in range(2):
        with c.stream("POST", "/v1/completions", json={"model": "acme", "prompt": "hi", "stream": True}) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert r.status_code == 200 and r.headers[VERSION_HEADER] == "v0.0.1" and len(chunks) == 3
    assert (canary.on_canary.answers, canary.on_canary.errors, canary.on_stable.answers) == (2, 1, 3)


def test_a_stream_broken_midway_counts_as_the_canarys_error(tmp_path):
    from test_gateway import _Broken

    stable = ServedVersion("acme", "v0.0.1", "c1", tmp_path, 16, None)
    new = ServedVersion("acme", "v0.0.2", "c2", tmp_path, 16, None)
    params = CanaryParams(fraction=1, min_requests=1000)
    deployment = Deployment(None, ServeParams(canary=params), None, lambda: {}, tmp_path / "events.jsonl")
    deployment.routes["acme"] = stable
    deployment.canaries["acme"] = canary = Canary(2, new, stable, params)
    with (
        TestClient(create_app(deployment, "http://engine", transport=_Broken(mid_stream=True))) as c,
        pytest.raises(httpx.ReadError),
    ):
        with c.stream("POST", "/v1/completions", json={"model": "acme", "prompt": "hi", "stream": True}) as r:
            list(r.iter_lines())  # the first chunk reached the client: too late to go to v0.0.1
    assert (canary.on_canary.answers, canary.on_canary.errors, canary.on_stable.answers) == (1, 1, 0)
    assert deployment._inflight["acme@v0.0.2"] == 0

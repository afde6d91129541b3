"""The gateway's routing, renaming, streaming and errors, with a scripted upstream in place of vLLM
(the real engine: tests/e2e/test_serve.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from loraline.config import ServeParams
from loraline.serve.deployment import Deployment
from loraline.serve.gateway import VERSION_HEADER, create_app
from loraline.serve.versions import ServedVersion

seen: list[dict] = []


async def completions(request: Request):
    body = json.loads(await request.body())
    seen.append(body)
    if len(body.get("prompt", "")) > 20:
        return JSONResponse(
            {"error": {"message": "maximum context length is 16 tokens", "code": 400}}, status_code=400
        )
    if body.get("stream"):

        async def events():
            for word in ("hel", "lo"):
                yield f"data: {json.dumps({'model': body['model'], 'choices': [{'text': word}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"model": body["model"], "choices": [{"text": "hello"}]})


UPSTREAM = Starlette(
    routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", lambda r: JSONResponse({}))]
)


@pytest.fixture
def client(tmp_path):
    seen.clear()
    deployment = Deployment(None, ServeParams(), None, lambda: {}, tmp_path / "events.jsonl")
    deployment.routes["acme"] = ServedVersion("acme", "v0.0.2", "abc123", tmp_path, 16, None)
    app = create_app(deployment, "http://engine", transport=httpx.ASGITransport(app=UPSTREAM))
    with TestClient(app) as c:
        yield c, deployment


def test_a_tenant_name_reaches_its_served_version_and_comes_back_as_the_tenant(client):
    c, deployment = client
    r = c.post("/v1/completions", json={"model": "acme", "prompt": "hi"})
    assert r.status_code == 200 and r.json()["model"] == "acme" and r.headers[VERSION_HEADER] == "v0.0.2"
    assert seen[-1]["model"] == "acme@v0.0.2"
    assert deployment._inflight["acme@v0.0.2"] == 0  # counted while in flight, released after


def test_streaming_passes_through_chunk_by_chunk(client):
    c, deployment = client
    with c.stream("POST", "/v1/completions", json={"model": "acme", "prompt": "hi", "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert r.headers[VERSION_HEADER] == "v0.0.2"
    assert [json.loads(x[6:])["model"] for x in lines] == ["acme", "acme"]
    assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines) == "hello"
    assert deployment._inflight["acme@v0.0.2"] == 0


def test_unknown_models_get_openai_404_and_engine_errors_pass_through(client):
    c, _ = client
    r = c.post("/v1/completions", json={"model": "nobody", "prompt": "hi"})
    assert (
        r.status_code == 404
        and "nobody" in r.json()["error"]["message"]
        and "Served: acme" in r.json()["error"]["message"]
    )
    r = c.post("/v1/completions", json={"model": "acme", "prompt": "x" * 40})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert c.post("/v1/completions", content=b"not json").status_code == 400


def test_models_list_every_tenant_with_its_version(client):
    c, _ = client
    [m] = c.get("/v1/models").json()["data"]
    assert (m["id"], m["version"], m["commit"]) == ("acme", "v0.0.2", "abc123")


def test_refresh_is_refused_from_other_machines(tmp_path):
    deployment = Deployment(None, ServeParams(), None, lambda: {}, tmp_path / "e.jsonl")
    app = create_app(deployment, "http://engine", transport=httpx.ASGITransport(app=UPSTREAM))
    with TestClient(app, client=("10.1.2.3", 5000)) as c:
        assert c.post("/loraline/refresh").status_code == 403
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        assert c.post("/loraline/refresh").json() == {"events": [], "serving": {}}


def _authed_app(tmp_path):
    from loraline.serve.gateway import tenant_keys

    deployment = Deployment(None, ServeParams(auth=True), None, lambda: {}, tmp_path / "e.jsonl")
    for t in ("acme", "globex"):
        deployment.routes[t] = ServedVersion(t, "v0.0.1", "c", tmp_path, 16, None)
    keys = tenant_keys(
        ["acme", "globex"], {"LORALINE_SERVE_KEY_ACME": "k-acme", "LORALINE_SERVE_KEY_GLOBEX": "k-globex"}
    )
    return create_app(deployment, "http://engine", keys, transport=httpx.ASGITransport(app=UPSTREAM))


def test_with_auth_each_key_calls_its_own_tenant_only(tmp_path):
    body = {"model": "acme", "prompt": "hi"}
    with TestClient(_authed_app(tmp_path)) as c:
        assert c.post("/v1/completions", json=body).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-acme"}).status_code == 200
        assert [m["id"] for m in c.get("/v1/models", headers={"Authorization": "Bearer k-globex"}).json()["data"]] == [
            "globex"
        ]
        assert c.get("/v1/models").status_code == 401


def test_a_key_cannot_tell_another_tenant_from_one_that_does_not_exist(tmp_path):
    key = {"Authorization": "Bearer k-globex"}
    with TestClient(_authed_app(tmp_path)) as c:
        other = c.post("/v1/completions", json={"model": "acme", "prompt": "hi"}, headers=key)  # exists, globex's key
        none = c.post("/v1/completions", json={"model": "initech", "prompt": "hi"}, headers=key)  # does not exist
    assert other.status_code == none.status_code == 404
    assert other.text.replace("acme", "initech") == none.text
    assert (
        none.json()["error"]["message"]
        == "The model `initech` does not exist or you do not have access to it (this key calls `globex`)"
    )


def test_health_says_up_or_down_alone_without_a_valid_key(tmp_path, client):
    with TestClient(_authed_app(tmp_path)) as c:
        assert c.get("/health").json() == {"engine": True}
        assert c.get("/health", headers={"Authorization": "Bearer wrong"}).json() == {"engine": True}
        assert c.get("/health", headers={"Authorization": "Bearer k-acme"}).json() == {
            "engine": True,
            "serving": {"acme": "v0.0.1"},
        }
    c, _ = client  # without serve.auth: every tenant, as before
    assert c.get("/health").json() == {"engine": True, "serving": {"acme": "v0.0.2"}}


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ([{"model": "acme"}], "the request body must be a JSON object, not an array"),
        ("acme", "the request body must be a JSON object, not a string"),
        (3, "the request body must be a JSON object, not a number"),
        ({"model": ["acme"], "prompt": "hi"}, "`model` must be a string, the tenant's name, not an array"),
        ({"prompt": "hi"}, "`model` must be a string, the tenant's name, not null"),
    ],
)
def test_bodies_that_are_not_objects_and_models_that_are_not_strings_are_400(client, body, said):
    c, _ = client
    r = c.post("/v1/chat/completions", json=body)
    assert (
        r.status_code == 400
        and r.json()["error"]["message"] == said
        and r.json()["error"]["type"] == "BadRequestError"
    )
    assert c.app.state.admission.in_flight == 0


def _gateway(tmp_path, transport: httpx.AsyncBaseTransport, **serve) -> tuple[Starlette, Deployment]:
    deployment = Deployment(None, ServeParams(**serve), None, lambda: {}, tmp_path / "events.jsonl")
    deployment.routes["acme"] = ServedVersion("acme", "v0.0.2", "abc123", tmp_path, 16, None)
    return create_app(deployment, "http://engine", transport=transport), deployment


def test_past_max_queue_a_request_is_answered_429_at_once_and_the_others_are_served(tmp_path):
    async def scenario():
        gate = asyncio.Event()  # the engine answers nothing until the test says so

        async def slow(request: Request):
            body = json.loads(await request.body())
            await gate.wait()
            return JSONResponse({"model": body["model"], "choices": [{"text": "ok"}]})

        engine = Starlette(routes=[Route("/v1/completions", slow, methods=["POST"])])
        app, deployment = _gateway(tmp_path, httpx.ASGITransport(app=engine), max_queue=2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
            calls = [
                asyncio.create_task(c.post("/v1/completions", json={"model": "acme", "prompt": "hi"}))
                for _ in range(3)
            ]
            first, waiting = await asyncio.wait(calls, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            in_flight = app.state.admission.in_flight
            gate.set()
            return [t.result() for t in first], in_flight, await asyncio.gather(*waiting), app, deployment

    [shed], in_flight, answered, app, deployment = asyncio.run(scenario())
    assert (
        shed.status_code == 429 and shed.headers["retry-after"] == "1" and in_flight == 2
    )  # while the other two waited
    assert shed.json()["error"] == {
        "message": "the server is busy: 2 requests are in progress (serve.max_queue); retry in 1 s",
        "type": "RateLimitError",
        "param": None,
        "code": 429,
    }
    assert [r.status_code for r in answered] == [200, 200] and all(r.json()["model"] == "acme" for r in answered)
    assert app.state.admission.in_flight == 0 and deployment._inflight["acme@v0.0.2"] == 0


class _Broken(httpx.AsyncBaseTransport):
    """An engine that cannot be reached, or (mid_stream) one that fails after its first chunk."""

    def __init__(self, mid_stream: bool) -> None:
        self.mid_stream = mid_stream

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.mid_stream:
            raise httpx.ConnectError("connection refused", request=request)

        async def chunks():
            yield b'data: {"model": "acme@v0.0.2", "choices": [{"text": "hel"}]}\n\n'
            raise httpx.ReadError("the engine went away", request=request)

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())


def test_the_count_returns_to_zero_after_streams_engine_errors_and_failures(client, tmp_path):
    c, deployment = client
    with c.stream("POST", "/v1/completions", json={"model": "acme", "prompt": "hi", "stream": True}) as r:
        assert c.app.state.admission.in_flight == 1  # a stream counts until its last chunk
        assert len([line for line in r.iter_lines() if line.startswith("data: {")]) == 2
    assert (
        c.post("/v1/completions", json={"model": "acme", "prompt": "x" * 40}).status_code == 400
    )  # the engine's error
    assert c.app.state.admission.in_flight == 0 and deployment._inflight["acme@v0.0.2"] == 0

    app, deployment = _gateway(tmp_path, _Broken(mid_stream=False), max_queue=1)
    with TestClient(app) as gw:
        r = gw.post("/v1/completions", json={"model": "acme", "prompt": "hi"})
    assert (
        r.status_code == 502
        and r.json()["error"]["type"] == "APIConnectionError"
        and app.state.admission.in_flight == 0
    )

    app, deployment = _gateway(tmp_path, _Broken(mid_stream=True), max_queue=1)
    with TestClient(app) as gw, pytest.raises(httpx.ReadError):
        with gw.stream("POST", "/v1/completions", json={"model": "acme", "prompt": "hi", "stream": True}) as r:
            list(r.iter_lines())
    assert app.state.admission.in_flight == 0 and deployment._inflight["acme@v0.0.2"] == 0


def test_max_queue_zero_sets_no_limit(tmp_path):
    app, _ = _gateway(tmp_path, httpx.ASGITransport(app=UPSTREAM), max_queue=0)
    assert all(app.state.admission.take() for _ in range(1000))  # any number


def test_auth_needs_one_distinct_key_per_tenant():
    from loraline.serve.gateway import tenant_keys

    with pytest.raises(ValueError, match="LORALINE_SERVE_KEY_GLOBEX_IT is not set"):
        tenant_keys(["acme", "globex-it"], {"LORALINE_SERVE_KEY_ACME": "a"})
    with pytest.raises(ValueError, match="the same key"):
        tenant_keys(["a", "b"], {"LORALINE_SERVE_KEY_A": "k", "LORALINE_SERVE_KEY_B": "k"})

"""The gateway's routing, renaming, streaming and errors, with a scripted upstream in place of vLLM
(the real engine: tests/e2e/test_serve.py)."""

from __future__ import annotations

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
        return JSONResponse({"error": {"message": "maximum context length is 16 tokens", "code": 400}}, status_code=400)
    if body.get("stream"):
        async def events():
            for word in ("hel", "lo"):
                yield f'data: {json.dumps({"model": body["model"], "choices": [{"text": word}]})}\n\n'
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"model": body["model"], "choices": [{"text": "hello"}]})


UPSTREAM = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", lambda r: JSONResponse({}))])


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
    assert r.status_code == 404 and "nobody" in r.json()["error"]["message"] and "Served: acme" in r.json()["error"]["message"]
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


def test_with_auth_each_key_calls_its_own_tenant_only(tmp_path):
    from loraline.serve.gateway import tenant_keys

    deployment = Deployment(None, ServeParams(auth=True), None, lambda: {}, tmp_path / "e.jsonl")
    for t in ("acme", "globex"):
        deployment.routes[t] = ServedVersion(t, "v0.0.1", "c", tmp_path, 16, None)
    keys = tenant_keys(["acme", "globex"], {"LORALINE_SERVE_KEY_ACME": "k-acme", "LORALINE_SERVE_KEY_GLOBEX": "k-globex"})
    app = create_app(deployment, "http://engine", keys, transport=httpx.ASGITransport(app=UPSTREAM))
    body = {"model": "acme", "prompt": "hi"}
    with TestClient(app) as c:
        assert c.post("/v1/completions", json=body).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-globex"}).status_code == 403
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-acme"}).status_code == 200
        unknown = c.post("/v1/completions", json={"model": "initech"}, headers={"Authorization": "Bearer k-acme"})
        assert unknown.status_code == 404 and "globex" not in unknown.text  # names no other tenant
        assert [m["id"] for m in c.get("/v1/models", headers={"Authorization": "Bearer k-globex"}).json()["data"]] == ["globex"]
        assert c.get("/v1/models").status_code == 401


def test_auth_needs_one_distinct_key_per_tenant():
    from loraline.serve.gateway import tenant_keys

    with pytest.raises(ValueError, match="LORALINE_SERVE_KEY_GLOBEX_IT is not set"):
        tenant_keys(["acme", "globex-it"], {"LORALINE_SERVE_KEY_ACME": "a"})
    with pytest.raises(ValueError, match="the same key"):
        tenant_keys(["a", "b"], {"LORALINE_SERVE_KEY_A": "k", "LORALINE_SERVE_KEY_B": "k"})

"""serve.log_traffic through the gateway: chat answers (whole and streamed) logged per tenant and day, feedback
authenticated as the tenant's requests, unknown ids, and nothing written when off. A scripted upstream stands in
for vLLM. The e2e test (real vLLM, `openai` client; issue 41) still has to show: `loraline serve` with
serve.log_traffic and serve.auth; `client.chat.completions.create` whole and with stream=True, whose `reply.id`
(or the chunks' id) is the logged id; a feedback POST with the same key right after each (the stream's too), another
tenant's key getting 404; `loraline feedback export` then `loraline prepare` reading the file (SFT and pair rows
counted in prepare_stats once the preference shape lands); and no key bytes anywhere under logs/."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from loraline.config import ServeParams
from loraline.serve.deployment import Deployment
from loraline.serve.gateway import create_app, tenant_keys
from loraline.serve.traffic import TrafficLog, read_events
from loraline.serve.versions import ServedVersion

KEYS = {"LORALINE_SERVE_KEY_ACME": "k-acme-secret", "LORALINE_SERVE_KEY_GLOBEX": "k-globex-secret"}
ASK = [{"role": "user", "content": "Where is order 48213?"}]
counter = [0]


async def chat(request: Request):
    body = json.loads(await request.body())
    counter[0] += 1
    rid = f"chatcmpl-{counter[0]}"
    if body["messages"][-1]["content"] == "fail":
        return JSONResponse({"error": {"message": "bad request", "code": 400}}, status_code=400)
    if body.get("stream"):

        async def events():
            yield f"data: {json.dumps({'id': rid, 'model': body['model'], 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"  # noqa: E501
            for word in ("at the ", "depot"):
                chunk = {"id": rid, "model": body["model"], "choices": [{"index": 0, "delta": {"content": word}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    message = {"role": "assistant", "content": "at the depot"}
    return JSONResponse({"id": rid, "model": body["model"], "choices": [{"index": 0, "message": message}]})


async def completions(request: Request):
    body = json.loads(await request.body())
    return JSONResponse({"id": "cmpl-1", "model": body["model"], "choices": [{"text": "hello"}]})


UPSTREAM = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 23, 59, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def _app(tmp_path, *, auth: bool = True, log_traffic: bool = True, clock=None):
    deployment = Deployment(None, ServeParams(auth=auth), None, lambda: {}, tmp_path / "events.jsonl")
    for t in ("acme", "globex"):
        deployment.routes[t] = ServedVersion(t, "v0.0.3", "c", tmp_path, 16, None)
    keys = tenant_keys(["acme", "globex"], KEYS) if auth else None
    traffic = TrafficLog(tmp_path / "logs" / "traffic", clock=clock or Clock()) if log_traffic else None
    return create_app(deployment, "http://engine", keys, transport=httpx.ASGITransport(app=UPSTREAM), traffic=traffic)


def _as(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer k-{tenant}-secret"}


def _events(tmp_path, tenant: str = "acme"):
    return [e for _, _, e in read_events(tmp_path / "logs" / "traffic" / tenant)]


def test_a_chat_answer_is_logged_with_its_id_version_messages_and_text_and_no_key(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        r = c.post("/v1/chat/completions", json={"model": "acme", "messages": ASK, "user": "u-7"}, headers=_as("acme"))
    [event] = _events(tmp_path)
    assert (event.id, event.tenant, event.version, event.messages, event.response) == (
        r.json()["id"],
        "acme",
        "v0.0.3",
        ASK,
        "at the depot",
    )
    assert event.time.startswith("2024-05-01T23:59")
    written = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("*.jsonl"))
    assert b"secret" not in written and b"Bearer" not in written and b"u-7" not in written


def test_a_streamed_answer_is_logged_whole_before_the_client_is_sent_its_end(tmp_path):
    app, sent = _app(tmp_path), []
    body = json.dumps({"model": "acme", "messages": ASK, "stream": True}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", b"Bearer k-acme-secret"), (b"content-type", b"application/json")],
        "query_string": b"",
    }

    requested = []

    async def receive():  # the body once, then a client that stays connected
        if requested:
            await asyncio.Event().wait()
        requested.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):  # what the client is sent, and what the log holds at that moment
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append((message["body"].decode(), len(_events(tmp_path))))

    asyncio.run(app(scope, receive, send))
    done = next(i for i, (chunk, _) in enumerate(sent) if "[DONE]" in chunk)
    assert [n for _, n in sent[: done + 1]] == [0] * done + [1]  # logged between the last delta and the end
    [event] = _events(tmp_path)
    assert event.response == "at the depot" and event.id.startswith("chatcmpl-")
    with TestClient(app) as c:  # feedback sent right after the end finds the answer
        feedback = c.post("/loraline/feedback", json={"id": event.id, "rating": "up"}, headers=_as("acme"))
    assert feedback.status_code == 200 and [e.event for e in _events(tmp_path)] == ["response", "feedback"]


def test_feedback_is_recorded_on_its_own_day_and_joined_by_id(tmp_path):
    clock = Clock()
    with TestClient(_app(tmp_path, clock=clock)) as c:
        rid = c.post("/v1/chat/completions", json={"model": "acme", "messages": ASK}, headers=_as("acme")).json()["id"]
        clock.now = datetime(2024, 5, 2, 0, 1, tzinfo=timezone.utc)  # after midnight UTC
        r = c.post(
            "/loraline/feedback",
            json={"id": rid, "rating": "down", "rewrite": "In Leeds.", "comment": "wrong depot"},
            headers=_as("acme"),
        )
    assert r.status_code == 200 and r.json()["id"] == rid and r.json()["model"] == "acme"
    folder = tmp_path / "logs" / "traffic" / "acme"
    assert sorted(p.name for p in folder.iterdir()) == ["2024-05-01.jsonl", "2024-05-02.jsonl"]
    feedback = _events(tmp_path)[1]
    assert (feedback.rating, feedback.rewrite, feedback.comment) == ("down", "In Leeds.", "wrong depot")


def test_feedback_needs_the_tenants_key_and_another_tenants_id_is_unknown(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        rid = c.post("/v1/chat/completions", json={"model": "acme", "messages": ASK}, headers=_as("acme")).json()["id"]
        body = {"id": rid, "rating": "down"}
        assert c.post("/loraline/feedback", json=body).status_code == 401
        assert c.post("/loraline/feedback", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        other = c.post("/loraline/feedback", json=body, headers=_as("globex"))
        never = c.post("/loraline/feedback", json={**body, "id": "chatcmpl-none"}, headers=_as("globex"))
        named = c.post("/loraline/feedback", json={**body, "model": "acme"}, headers=_as("globex"))
    assert other.status_code == never.status_code == named.status_code == 404
    assert other.json()["error"]["message"] == f"no answer with id {rid!r} was given to `globex` (serve.log_traffic)"
    assert other.text.replace(rid, "chatcmpl-none") == never.text  # nothing learnt about acme's answers
    assert [e.event for e in _events(tmp_path)] == ["response"] and not _events(tmp_path, "globex")


def test_bad_feedback_bodies_are_400_with_a_clear_message(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        bad = c.post("/loraline/feedback", json={"id": "chatcmpl-1", "rating": "great"}, headers=_as("acme"))
        array = c.post("/loraline/feedback", json=[1], headers=_as("acme"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    assert bad.json()["error"]["message"] == '`rating` must be "up", "down" or a finite number, not \'great\''
    assert array.status_code == 400 and "must be a JSON object, not an array" in array.json()["error"]["message"]


def test_without_auth_feedback_finds_the_tenant_by_the_answer(tmp_path):
    with TestClient(_app(tmp_path, auth=False)) as c:
        rid = c.post("/v1/chat/completions", json={"model": "globex", "messages": ASK}).json()["id"]
        assert c.post("/loraline/feedback", json={"id": rid, "rating": 4}).json()["model"] == "globex"
        assert c.post("/loraline/feedback", json={"id": rid, "rating": 4, "model": "acme"}).status_code == 404
        assert c.post("/loraline/feedback", json={"id": rid, "rating": 4, "model": "../globex"}).status_code == 404
    assert [getattr(e, "rating", "answer") for e in _events(tmp_path, "globex")] == ["answer", 4]


def test_errors_and_plain_completions_are_not_logged(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        fail = [{"role": "user", "content": "fail"}]
        assert (
            c.post("/v1/chat/completions", json={"model": "acme", "messages": fail}, headers=_as("acme")).status_code
            == 400
        )
        assert (
            c.post("/v1/completions", json={"model": "acme", "prompt": "hi"}, headers=_as("acme")).status_code == 200
        )
    assert not (tmp_path / "logs").exists()


def test_with_log_traffic_off_nothing_is_written_and_feedback_is_refused(tmp_path):
    with TestClient(_app(tmp_path, log_traffic=False)) as c:
        body = {"model": "acme", "messages": ASK}
        rid = c.post("/v1/chat/completions", json=body, headers=_as("acme")).json()["id"]
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=_as("acme")) as r:
            list(r.iter_lines())
        refused = c.post("/loraline/feedback", json={"id": rid, "rating": "up"}, headers=_as("acme"))
    assert refused.status_code == 404 and "serve.log_traffic is off" in refused.json()["error"]["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no logs/ folder, nothing else either

"""The gateway: the OpenAI-compatible endpoint clients call, in front of the engine.

Clients name the tenant as the model. The gateway forwards the request to the version the tenant
is served at (serve.deployment), streaming included, names the tenant again in the response, and
says which version answered in the `x-loraline-version` header; `/v1/models` lists every tenant
with its version and commit. Errors of the engine (a prompt over the context: 400) pass through;
errors of its own come in OpenAI's error shape: a body that is not a JSON object, or a `model`
that is not a string, is a 400; an unknown tenant a 404. With serve.auth, each tenant's key calls
that tenant only: 401 without a valid key, and another tenant's model is the same 404 as an
unknown one (a key must not learn which tenants exist); /v1/models lists the caller's tenant
alone, and /health says up or down alone without a valid key (with one: its tenant's version).
At most serve.max_queue requests are at the engine at once (a stream until its last chunk): one
more is a 429 with Retry-After at once, rather than a wait behind all of them.
Under a canary (serve.canary), the tenant's requests are split between its two versions
(serve.canary: sticky per client where the request names one), each answer is counted for the
version that gave it, and a request the canary fails with a server error is sent once more, to the
stable version, before the client has seen a byte (a stream broken midway cannot be); so is one
that a version being replaced fails. /v1/models names the canary beside the tenant's version.
`POST /loraline/refresh` (from this machine only) makes the gateway read the registry now: the
flow's release step calls it after a promotion. Request bodies and headers are never logged, except
that with serve.log_traffic each answered chat completion (200) goes to its tenant's traffic log
(serve.traffic: the messages, the answer, a stream's once its end is read and before the client sees
that end, so feedback sent right after it finds it), and `POST /loraline/feedback` records feedback
on a logged answer: authenticated as the tenant's requests are, an id that the caller's tenant was
not answered with is a 404, whoever it belongs to. Headers (keys) are never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraline.serve.canary import Outcome
from loraline.serve.deployment import Deployment
from loraline.serve.traffic import Capture, FeedbackError, TrafficLog, feedback_from_body
from loraline.serve.versions import ServedVersion

log = logging.getLogger(__name__)
VERSION_HEADER = "x-loraline-version"
CHAT = "/v1/chat/completions"
FORWARDED = (CHAT, "/v1/completions")
# A slot frees whenever any request in flight ends: with max_queue of them at the engine, that is
# far more often than one request's own duration (64 requests of about 50 s each on 2 CPU cores:
# one every 0.8 s). The OpenAI client waits this long before its own retry.
RETRY_AFTER_S = 1
JSON_TYPES = {
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def openai_error(
    status: int, message: str, kind: str, param: str | None = "model", headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}},
        status_code=status,
        headers=headers,
    )


def key_variable(tenant: str) -> str:
    return "LORALINE_SERVE_KEY_" + tenant.upper().replace("-", "_")


def tenant_keys(tenants: list[str], environ: dict[str, str]) -> dict[str, str]:
    """tenant -> its key, from the environment (serve.auth); a missing or shared key is an error."""
    missing = [key_variable(t) for t in tenants if not environ.get(key_variable(t))]
    if missing:
        raise ValueError(
            f"serve.auth is on but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "set one key per tenant in the environment"
        )
    keys = {t: environ[key_variable(t)] for t in tenants}
    if len(set(keys.values())) != len(keys):
        raise ValueError("serve.auth: two tenants have the same key; each tenant needs its own")
    return keys


def create_app(
    deployment: Deployment,
    engine_url: str,
    keys: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    traffic: TrafficLog | None = None,
) -> Starlette:
    """`keys` (tenant -> key): each key may call its tenant only; None: no key asked for.
    `transport` replaces the network to the engine (tests). `traffic`: where chat answers and feedback are
    logged (serve.log_traffic); None: nothing is, and feedback is refused."""
    client = httpx.AsyncClient(base_url=engine_url, timeout=httpx.Timeout(600, connect=10), transport=transport)
    gateway = Gateway(deployment, client, keys, Admission(deployment.params.max_queue), traffic)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await client.aclose()

    app = Starlette(routes=gateway.routes(), lifespan=lifespan)
    app.state.admission = gateway.admission
    return app


@dataclass
class Gateway:
    """The gateway's endpoints over one engine client: listing, health and refresh, and the forwarded
    OpenAI requests. `keys`: tenant -> key (serve.auth), None when no key is asked for."""

    deployment: Deployment
    client: httpx.AsyncClient
    keys: dict[str, str] | None
    admission: Admission
    traffic: TrafficLog | None = None

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models),
            Route("/health", self.health),
            Route("/loraline/refresh", self.refresh, methods=["POST"]),
            Route("/loraline/feedback", self.feedback, methods=["POST"]),
            *(Route(path, self.forward, methods=["POST"]) for path in FORWARDED),
        ]

    def caller(self, request: Request) -> str | None:
        """The tenant whose key the request carries (compared in constant time); None: no valid key."""
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
        found = None
        for tenant, key in (self.keys or {}).items():
            if hmac.compare_digest(given, key.encode()):
                found = tenant
        return found

    # -- listing and operations ------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        visible = self.deployment.routes
        if self.keys is not None:
            who = self.caller(request)
            if who is None:
                return openai_error(401, "a valid API key is required", "AuthenticationError")
            visible = {t: v for t, v in visible.items() if t == who}
        data = [
            {
                "id": t,
                "object": "model",
                "owned_by": "loraline",
                "version": v.version,
                "commit": v.commit,
                **self.on_canary(t),
            }
            for t, v in sorted(visible.items())
        ]
        return JSONResponse({"object": "list", "data": data})

    def on_canary(self, tenant: str) -> dict[str, Any]:
        """A canary's version and share beside the tenant's version ({} when none)."""
        canary = self.deployment.canaries.get(tenant)
        if canary is None:
            return {}
        return {
            "canary": {
                "version": canary.version.version,
                "commit": canary.version.commit,
                "fraction": canary.params.fraction,
            }
        }

    async def refresh(self, request: Request) -> Response:
        if request.client is None or request.client.host not in ("127.0.0.1", "::1"):
            return openai_error(403, "refresh is allowed from this machine only", "PermissionDeniedError")
        events = await asyncio.to_thread(self.deployment.sync)
        return JSONResponse({"events": events, "serving": {t: v.version for t, v in self.deployment.routes.items()}})

    async def health(self, request: Request) -> Response:
        """200 while the engine answers, 503 otherwise. With keys: the versions only to a valid key, its own
        tenant's."""
        try:
            ok = (await self.client.get("/health")).status_code == 200
        except httpx.HTTPError:
            ok = False
        serving = {t: v.version for t, v in self.deployment.routes.items()}
        if self.keys is not None:
            who = self.caller(request)
            serving = {t: v for t, v in serving.items() if t == who} if who else None
        return JSONResponse(
            {"engine": ok, **({"serving": serving} if serving is not None else {})}, status_code=200 if ok else 503
        )

    async def caller_and_body(self, request: Request) -> tuple[str | None, dict[str, Any]] | Response:
        """The key's tenant (None without serve.auth) and the JSON object body, or the error response to send."""
        who = self.caller(request) if self.keys is not None else None
        if self.keys is not None and who is None:
            return openai_error(401, "a valid API key is required", "AuthenticationError")
        body = await json_object(request)
        if isinstance(body, Response):
            return body
        return who, body

    # -- feedback --------------------------------------------------------------------------------

    async def feedback(self, request: Request) -> Response:
        """Feedback on an answer the caller's tenant was given, appended to that tenant's traffic log."""
        if self.traffic is None:
            return openai_error(404, "feedback is not collected: serve.log_traffic is off", "NotFoundError", None)
        called = await self.caller_and_body(request)
        if isinstance(called, Response):
            return called
        who, body = called
        try:
            event = feedback_from_body(body, "", self.traffic.now())
        except FeedbackError as exc:
            return openai_error(400, str(exc), "BadRequestError", exc.field)
        tenant = await asyncio.to_thread(self.owner, event.id, body.get("model"), who)
        if tenant is None:  # the same answer for another tenant's id as for one never given
            whose = f" to `{who}`" if who else f" to `{body['model']}`" if body.get("model") else ""
            return openai_error(
                404, f"no answer with id {event.id!r} was given{whose} (serve.log_traffic)", "NotFoundError", "id"
            )
        event = replace(event, tenant=tenant)
        await asyncio.to_thread(self.traffic.append, event)
        return JSONResponse({"object": "loraline.feedback", "id": event.id, "model": tenant, "time": event.time})

    def owner(self, response_id: str, model: str | None, who: str | None) -> str | None:
        """The tenant whose log holds the answer: the key's tenant with serve.auth (`model`, when given, must
        be it); without, `model` or else any tenant with a log. None: no such answer for them."""
        if who is not None:
            candidates = [who] if model in (None, who) else []
        else:
            logged = self.traffic.tenants()
            candidates = logged if model is None else [model] if model in logged else []
        return next((t for t in candidates if self.traffic.knows(t, response_id)), None)

    # -- forwarded requests ----------------------------------------------------------------------

    async def forward(self, request: Request) -> Response:
        called = await self.caller_and_body(request)
        if isinstance(called, Response):
            return called
        who, body = called
        tenant = body.get("model")
        if not isinstance(tenant, str):
            return openai_error(
                400,
                f"`model` must be a string, the tenant's name, not {JSON_TYPES.get(type(tenant), 'an object')}",
                "BadRequestError",
            )
        allowed = self.keys is None or tenant == who
        served = self.deployment.acquire(tenant, client_of(request, body)) if allowed else None
        if served is None:
            return self.not_found(tenant, who)
        if not self.admission.take():
            self.deployment.release(served)
            return openai_error(
                429,
                f"the server is busy: {self.admission.limit} requests are in progress (serve.max_queue); "
                f"retry in {RETRY_AFTER_S} s",
                "RateLimitError",
                None,
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        ticket = Ticket(self.deployment, self.admission, served)
        try:
            return await self.relay(
                request.url.path, body, ticket, tenant, self.capture(request.url.path, body, tenant)
            )
        except BaseException:
            ticket.close()
            raise

    def not_found(self, tenant: str, who: str | None) -> Response:
        if self.keys is None:
            served = ", ".join(sorted(self.deployment.routes)) or "none yet"
            return openai_error(404, f"The model `{tenant}` does not exist. Served: {served}", "NotFoundError")
        # the same answer for another tenant's model as for one that does not exist
        return openai_error(
            404,
            f"The model `{tenant}` does not exist or you do not have access to it (this key calls `{who}`)",
            "NotFoundError",
        )

    async def send(self, path: str, body: dict[str, Any], served: ServedVersion) -> httpx.Response | httpx.HTTPError:
        """The engine's answer (its body not read yet), or the error that stopped it."""
        try:
            return await self.client.send(
                self.client.build_request("POST", path, json={**body, "model": served.served_name}), stream=True
            )
        except httpx.HTTPError as exc:
            return exc

    def capture(self, path: str, body: dict[str, Any], tenant: str) -> Capture | None:
        """What to gather of the answer for the traffic log: chat completions only, with serve.log_traffic."""
        messages = body.get("messages")
        if self.traffic is None or path != CHAT or not isinstance(messages, list):
            return None
        return Capture(self.traffic, tenant, messages)

    async def relay(
        self, path: str, body: dict[str, Any], ticket: Ticket, tenant: str, capture: Capture | None = None
    ) -> Response:
        """The engine's answer, renamed; the ticket closes once it is over (for a stream: after its last chunk).
        A server error of a version other than the tenant's route (a canary) is answered by the route instead,
        before the client sees a byte."""
        started = time.monotonic()
        upstream = await self.send(path, body, ticket.served)
        if _failed(upstream) and (stable := self.deployment.fall_back(ticket.served)) is not None:
            if isinstance(upstream, httpx.Response):
                await upstream.aclose()
            ticket.move_to(stable, Outcome(False, time.monotonic() - started, 0))
            started = time.monotonic()
            upstream = await self.send(path, body, ticket.served)
        if isinstance(upstream, httpx.HTTPError):
            ticket.close(Outcome(False, time.monotonic() - started, 0))
            return openai_error(502, f"the engine did not answer: {upstream}", "APIConnectionError", None)
        answer = EngineAnswer(upstream, ticket, tenant, started, capture if upstream.status_code == 200 else None)
        return await answer.whole() if not body.get("stream") else answer.stream()


@dataclass
class EngineAnswer:
    """The engine's answer to one forwarded request, relayed to the client with the engine's name for the
    version replaced by the tenant's, and the version in the x-loraline-version header; the ticket closes
    with what the answer says about the version once it is over."""

    upstream: httpx.Response
    ticket: Ticket
    tenant: str
    started: float
    capture: Capture | None = None  # gathers the answer for the traffic log (None: not logged)

    @property
    def rename(self) -> tuple[bytes, bytes]:
        return json.dumps(self.ticket.served.served_name).encode(), json.dumps(self.tenant).encode()

    @property
    def headers(self) -> dict[str, str]:
        return {VERSION_HEADER: self.ticket.served.version}

    @property
    def content_type(self) -> str:
        return self.upstream.headers.get("content-type", "application/json")

    async def whole(self) -> Response:
        status = self.upstream.status_code
        try:
            payload = await self.upstream.aread()
        except httpx.HTTPError as exc:
            self.ticket.close(Outcome(False, time.monotonic() - self.started, 0))
            return openai_error(502, f"the engine's answer broke off: {exc}", "APIConnectionError", None)
        finally:
            await self.upstream.aclose()
        self.ticket.close(_outcome(status, time.monotonic() - self.started, _completion_tokens(payload)))
        if self.capture is not None:
            self.capture.whole(payload)
            await self.record()
        return Response(
            payload.replace(*self.rename), status_code=status, media_type=self.content_type, headers=self.headers
        )

    def stream(self) -> Response:
        upstream, rename, status, chunks = self.upstream, self.rename, self.upstream.status_code, StreamCount()
        capture = self.capture

        async def lines():
            try:
                async for line in upstream.aiter_lines():  # server-sent events: one JSON chunk per data line
                    chunks.data += line.startswith("data: {")
                    if capture is not None:
                        capture.chunk(line)
                        if line.strip() == "data: [DONE]":  # logged before the client can read the end
                            await self.record()
                    yield line.encode().replace(*rename) + b"\n"
            except httpx.HTTPError:
                chunks.broken = True
                raise
            chunks.complete = True
            if capture is not None:
                await self.record()  # a stream that ended without [DONE]

        async def finish() -> None:
            seconds = time.monotonic() - self.started
            self.ticket.close(
                Outcome(False, seconds, 0)
                if chunks.broken
                else _outcome(status, seconds, chunks.data)
                if chunks.complete
                else None
            )
            await upstream.aclose()

        return Relayed(lines(), finish, status_code=status, media_type=self.content_type, headers=self.headers)

    async def record(self) -> None:
        """Append the captured answer to the traffic log (once). A log that cannot be written is reported and
        the answer still goes out: serving does not stop for it."""
        event = self.capture.event(self.ticket.served.version) if self.capture is not None else None
        if event is None:
            return
        try:
            await asyncio.to_thread(self.capture.log.append, event)
        except OSError as exc:
            log.error("traffic log: response %s of %s not recorded: %s", event.id, event.tenant, exc)


@dataclass
class Ticket:
    """A forwarded request's hold on the engine: its admission slot and the version it is in flight on,
    given back once however the request ends, with what its answer says about that version."""

    deployment: Deployment
    admission: Admission
    served: ServedVersion
    closed: bool = False

    def move_to(self, other: ServedVersion, outcome: Outcome) -> None:
        """The request goes to `other` (already counted in flight there); `outcome` is the first version's."""
        self.deployment.release(self.served, outcome)
        self.served = other

    def close(self, outcome: Outcome | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.admission.give_back()
            self.deployment.release(self.served, outcome)


@dataclass
class StreamCount:
    data: int = 0  # data chunks relayed: about one output token each
    complete: bool = False  # the engine ended the stream
    broken: bool = False  # the engine's stream failed midway


def client_of(request: Request, body: dict[str, Any]) -> str | None:
    """Who sent the request, where it says so (a canary keeps a client on one side): OpenAI's `user`, else
    X-Client-Id."""
    user = body.get("user")
    return user if isinstance(user, str) and user else request.headers.get("x-client-id") or None


def _failed(answer: httpx.Response | httpx.HTTPError) -> bool:
    return isinstance(answer, httpx.HTTPError) or server_error(answer.status_code)


def server_error(status: int) -> bool:
    """Whether the engine's status counts against the version: a 5xx, or a 404 for the engine name the gateway
    routed to (the engine no longer has that adapter). Other 4xx are the client's request."""
    return status >= 500 or status == 404


def _outcome(status: int, seconds: float, tokens: int) -> Outcome | None:
    if server_error(status):
        return Outcome(False, seconds, 0)
    return Outcome(True, seconds, tokens) if status < 400 else None


def _completion_tokens(payload: bytes) -> int:
    """usage.completion_tokens of an engine's JSON answer (0 when it has none)."""
    try:
        usage = json.loads(payload).get("usage") or {}
    except (ValueError, AttributeError):
        return 0
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else 0


@dataclass
class Admission:
    """Requests at the engine now, against serve.max_queue (0: no limit). The gateway's requests all
    run on one event loop, so a plain counter is exact."""

    limit: int
    in_flight: int = 0

    def take(self) -> bool:
        if self.limit and self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def give_back(self) -> None:
        self.in_flight -= 1


class Relayed(StreamingResponse):
    """A streamed answer whose `finish` runs once it is over, however that happens: sent whole, the
    client gone, the engine failing mid-stream. A generator's own `finally` would not run for a
    response that never started iterating it, and the request would count as in flight for ever."""

    def __init__(self, content: AsyncIterator[bytes], finish: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.finish = finish

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.finish()


async def json_object(request: Request) -> dict[str, Any] | Response:
    """The request's JSON object, or the 400 that says what it is instead."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        return openai_error(400, "the request body is not JSON", "BadRequestError", None)
    if not isinstance(body, dict):
        return openai_error(
            400,
            f"the request body must be a JSON object, not {JSON_TYPES.get(type(body), 'another value')}",
            "BadRequestError",
            None,
        )
    return body

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
`POST /loraline/refresh` (from this machine only) makes the gateway read the registry now: the
flow's release step calls it after a promotion. Request bodies and headers are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraline.serve.deployment import Deployment
from loraline.serve.versions import ServedVersion

VERSION_HEADER = "x-loraline-version"
FORWARDED = ("/v1/chat/completions", "/v1/completions")
# A slot frees whenever any request in flight ends: with max_queue of them at the engine, that is
# far more often than one request's own duration (64 requests of about 50 s each on 2 CPU cores:
# one every 0.8 s). The OpenAI client waits this long before its own retry.
RETRY_AFTER_S = 1
JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}


def openai_error(status: int, message: str, kind: str, param: str | None = "model", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status, headers=headers)


def key_variable(tenant: str) -> str:
    return "LORALINE_SERVE_KEY_" + tenant.upper().replace("-", "_")


def tenant_keys(tenants: list[str], environ: dict[str, str]) -> dict[str, str]:
    """tenant -> its key, from the environment (serve.auth); a missing or shared key is an error."""
    missing = [key_variable(t) for t in tenants if not environ.get(key_variable(t))]
    if missing:
        raise ValueError(f"serve.auth is on but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                         "set one key per tenant in the environment")
    keys = {t: environ[key_variable(t)] for t in tenants}
    if len(set(keys.values())) != len(keys):
        raise ValueError("serve.auth: two tenants have the same key; each tenant needs its own")
    return keys


def create_app(
    deployment: Deployment, engine_url: str, keys: dict[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """`keys` (tenant -> key): each key may call its tenant only; None: no key asked for.
    `transport` replaces the network to the engine (tests)."""
    client = httpx.AsyncClient(base_url=engine_url, timeout=httpx.Timeout(600, connect=10), transport=transport)
    admission = Admission(deployment.params.max_queue)

    def caller(request: Request) -> str | None:
        """The tenant whose key the request carries (compared in constant time); None: no valid key."""
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
        found = None
        for tenant, key in (keys or {}).items():
            if hmac.compare_digest(given, key.encode()):
                found = tenant
        return found

    async def models(request: Request) -> Response:
        visible = deployment.routes
        if keys is not None:
            who = caller(request)
            if who is None:
                return openai_error(401, "a valid API key is required", "AuthenticationError")
            visible = {t: v for t, v in visible.items() if t == who}
        data = [{"id": t, "object": "model", "owned_by": "loraline", "version": v.version, "commit": v.commit}
                for t, v in sorted(visible.items())]
        return JSONResponse({"object": "list", "data": data})

    async def forward(request: Request) -> Response:
        who = caller(request) if keys is not None else None
        if keys is not None and who is None:
            return openai_error(401, "a valid API key is required", "AuthenticationError")
        body = await json_object(request)
        if isinstance(body, Response):
            return body
        tenant = body.get("model")
        if not isinstance(tenant, str):
            return openai_error(400, f"`model` must be a string, the tenant's name, not {JSON_TYPES.get(type(tenant), 'an object')}",
                                "BadRequestError")
        served = deployment.acquire(tenant) if keys is None or tenant == who else None
        if served is None:
            return not_found(tenant, who)
        if not admission.take():
            deployment.release(served)
            return openai_error(429, f"the server is busy: {admission.limit} requests are in progress (serve.max_queue); "
                                f"retry in {RETRY_AFTER_S} s", "RateLimitError", None, {"Retry-After": str(RETRY_AFTER_S)})
        done = _once(lambda: (admission.give_back(), deployment.release(served)))
        try:
            return await relay(request.url.path, body, served, tenant, done)
        except BaseException:
            done()
            raise

    def not_found(tenant: str, who: str | None) -> Response:
        if keys is None:
            return openai_error(404, f"The model `{tenant}` does not exist. Served: {', '.join(sorted(deployment.routes)) or 'none yet'}",
                                "NotFoundError")
        # the same answer for another tenant's model as for one that does not exist
        return openai_error(404, f"The model `{tenant}` does not exist or you do not have access to it (this key calls `{who}`)",
                            "NotFoundError")

    async def relay(path: str, body: dict[str, Any], served: ServedVersion, tenant: str, done: Callable[[], None]) -> Response:
        """The engine's answer, renamed; `done` runs once it is over (for a stream: after its last chunk)."""
        body["model"] = served.served_name
        rename = (json.dumps(served.served_name).encode(), json.dumps(tenant).encode())
        headers = {VERSION_HEADER: served.version}
        try:
            upstream = await client.send(client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as exc:
            done()
            return openai_error(502, f"the engine did not answer: {exc}", "APIConnectionError", None)
        content_type = upstream.headers.get("content-type", "application/json")
        if not body.get("stream"):
            try:
                payload = await upstream.aread()
            finally:
                done()
                await upstream.aclose()
            return Response(payload.replace(*rename), status_code=upstream.status_code, media_type=content_type, headers=headers)

        async def lines():
            async for line in upstream.aiter_lines():  # server-sent events: one JSON chunk per data line
                yield line.encode().replace(*rename) + b"\n"

        async def finish() -> None:
            done()
            await upstream.aclose()

        return Relayed(lines(), finish, status_code=upstream.status_code, media_type=content_type, headers=headers)

    async def refresh(request: Request) -> Response:
        if request.client is None or request.client.host not in ("127.0.0.1", "::1"):
            return openai_error(403, "refresh is allowed from this machine only", "PermissionDeniedError")
        events = await asyncio.to_thread(deployment.sync)
        return JSONResponse({"events": events, "serving": {t: v.version for t, v in deployment.routes.items()}})

    async def health(request: Request) -> Response:
        """200 while the engine answers, 503 otherwise. With keys: the versions only to a valid key, its own tenant's."""
        try:
            ok = (await client.get("/health")).status_code == 200
        except httpx.HTTPError:
            ok = False
        serving = {t: v.version for t, v in deployment.routes.items()}
        if keys is not None:
            who = caller(request)
            serving = {t: v for t, v in serving.items() if t == who} if who else None
        return JSONResponse({"engine": ok, **({"serving": serving} if serving is not None else {})}, status_code=200 if ok else 503)

    routes = [Route("/v1/models", models), Route("/health", health), Route("/loraline/refresh", refresh, methods=["POST"])]
    routes += [Route(path, forward, methods=["POST"]) for path in FORWARDED]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await client.aclose()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.admission = admission
    return app


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
        return openai_error(400, f"the request body must be a JSON object, not {JSON_TYPES.get(type(body), 'another value')}",
                            "BadRequestError", None)
    return body


def _once(action: Callable[[], object]) -> Callable[[], None]:
    ran = False

    def run() -> None:
        nonlocal ran
        if not ran:
            ran = True
            action()

    return run

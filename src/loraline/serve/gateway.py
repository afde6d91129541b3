"""The gateway: the OpenAI-compatible endpoint clients call, in front of the engine.

Clients name the tenant as the model. The gateway forwards the request to the version the tenant
is served at (serve.deployment), streaming included, names the tenant again in the response, and
says which version answered in the `x-loraline-version` header; `/v1/models` lists every tenant
with its version and commit. Errors of the engine (a prompt over the context: 400) pass through;
an unknown tenant is a 404 in OpenAI's error shape. With serve.auth, each tenant's key calls that
tenant only (401 without a valid key, 403 for another tenant's model), and /v1/models lists the
caller's tenant alone. `POST /loraline/refresh` (from this machine
only) makes the gateway read the registry now: the flow's release step calls it after a promotion.
Request bodies and headers are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraline.serve.deployment import Deployment

VERSION_HEADER = "x-loraline-version"
FORWARDED = ("/v1/chat/completions", "/v1/completions")


def openai_error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": "model", "code": status}}, status_code=status)


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
        try:
            body: dict[str, Any] = json.loads(await request.body())
        except ValueError:
            return openai_error(400, "the request body is not JSON", "BadRequestError")
        tenant = body.get("model")
        if keys is not None and tenant != who and tenant in deployment.routes:
            return openai_error(403, f"this key may call the model `{who}` only", "PermissionDeniedError")
        served = deployment.acquire(tenant) if isinstance(tenant, str) and (keys is None or tenant == who) else None
        if served is None:  # with keys, the message names no other tenant
            known = (", ".join(sorted(deployment.routes)) or "none yet") if keys is None else who
            return openai_error(404, f"The model `{tenant}` does not exist. Served: {known}", "NotFoundError")
        body["model"] = served.served_name
        rename = (json.dumps(served.served_name).encode(), json.dumps(tenant).encode())
        headers = {VERSION_HEADER: served.version}
        try:
            upstream = await client.send(client.build_request("POST", request.url.path, json=body), stream=True)
        except httpx.HTTPError as exc:
            deployment.release(served)
            return openai_error(502, f"the engine did not answer: {exc}", "APIConnectionError")
        content_type = upstream.headers.get("content-type", "application/json")
        if not body.get("stream"):
            try:
                payload = await upstream.aread()
            finally:
                await upstream.aclose()
                deployment.release(served)
            return Response(payload.replace(*rename), status_code=upstream.status_code, media_type=content_type, headers=headers)

        async def lines():
            try:
                async for line in upstream.aiter_lines():  # server-sent events: one JSON chunk per data line
                    yield line.encode().replace(*rename) + b"\n"
            finally:
                await upstream.aclose()
                deployment.release(served)

        return StreamingResponse(lines(), status_code=upstream.status_code, media_type=content_type, headers=headers)

    async def refresh(request: Request) -> Response:
        if request.client is None or request.client.host not in ("127.0.0.1", "::1"):
            return openai_error(403, "refresh is allowed from this machine only", "PermissionDeniedError")
        events = await asyncio.to_thread(deployment.sync)
        return JSONResponse({"events": events, "serving": {t: v.version for t, v in deployment.routes.items()}})

    async def health(request: Request) -> Response:
        try:
            ok = (await client.get("/health")).status_code == 200
        except httpx.HTTPError:
            ok = False
        return JSONResponse({"engine": ok, "serving": {t: v.version for t, v in deployment.routes.items()}}, status_code=200 if ok else 503)

    routes = [Route("/v1/models", models), Route("/health", health), Route("/loraline/refresh", refresh, methods=["POST"])]
    routes += [Route(path, forward, methods=["POST"]) for path in FORWARDED]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)

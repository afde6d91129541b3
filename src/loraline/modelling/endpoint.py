"""An OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI and the like) through
`POST {base_url}/chat/completions` with the standard library: the synthesize stage's teacher
(`synthesize.generator: openai`) and the evaluate stage's judge (`evaluate.judge`).

The key is read from the environment variable that the endpoint's `api_key_env` names, at the
moment of each request; it goes in the Authorization header only, never in a message, log, cache
or report. HTTP 429, 5xx, timeouts and dropped connections are retried with exponential backoff and
jitter (at most `max_retries` times, honouring Retry-After); other errors fail at once with the URL
and the status. Requests start at least 60/`requests_per_minute` seconds apart. Replies are cached
(request_cache.py), so a re-run sends nothing. Errors name the params key of the endpoint
(`setting`, e.g. evaluate.judge.endpoint), so the user knows which setting to check.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraline.config import SynthEndpointParams
from loraline.modelling.request_cache import RequestCache, request_key

MAX_BACKOFF_S = 60.0
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointError(ValueError):
    """The endpoint cannot answer (unreachable, an HTTP error that is not retried, a reply that is no chat
    completion)."""


class ChatClient:
    """One chat-completion call with cache, rate limit and retries; counts what it did.
    `setting`: the params key of the endpoint settings, named in errors."""

    def __init__(
        self,
        base_url: str,
        api_key_env: str,
        *,
        requests_per_minute: float,
        max_retries: int,
        backoff_s: float,
        timeout_s: float,
        cache_dir: Path | None,
        setting: str,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.setting = setting
        self.api_key_env = api_key_env
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
        self.cache = RequestCache(cache_dir)
        self.limiter = RateLimiter(requests_per_minute, sleep=sleep)
        self.sleep = sleep
        self._jitter = random.Random()  # timing only: never affects the rows
        self.counts = {"requests": 0, "cache_hits": 0, "retries": 0}

    @classmethod
    def from_params(
        cls,
        endpoint: SynthEndpointParams,
        setting: str,
        cache_dir: Path | None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ChatClient:
        if not endpoint.base_url:
            raise EndpointError(f"{setting}.base_url is not set")
        return cls(
            endpoint.base_url,
            endpoint.api_key_env,
            requests_per_minute=endpoint.requests_per_minute,
            max_retries=endpoint.max_retries,
            backoff_s=endpoint.backoff_s,
            timeout_s=endpoint.timeout_s,
            cache_dir=cache_dir,
            setting=setting,
            sleep=sleep,
        )

    def chat(self, body: dict[str, Any]) -> str:
        key = request_key(body)
        cached = self.cache.get(key)
        if cached is not None:
            self.counts["cache_hits"] += 1
            return cached
        reply = self._post(body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                f"{self.url}: reply is not a chat completion (no choices[0].message.content): "
                f"{json.dumps(reply)[:300]}"
            ) from None
        content = content if isinstance(content, str) else ""
        self.cache.put(key, body, content)
        return content

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        secret = os.environ.get(self.api_key_env)
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        return headers

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.counts["retries"] += 1
            self.limiter.wait()
            self.counts["requests"] += 1
            request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            retry_after: float | None = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
                try:
                    return json.loads(payload)
                except json.JSONDecodeError:
                    raise EndpointError(f"{self.url}: reply is not JSON: {payload[:200]!r}") from None
            except urllib.error.HTTPError as exc:
                detail = _safe(exc.read()[:300].decode("utf-8", "replace"), self.api_key_env)
                last = f"HTTP {exc.code} {exc.reason}: {detail}"
                if exc.code not in RETRY_STATUS:
                    raise EndpointError(
                        f"POST {self.url} failed: {last} (check {self.setting}: its base_url, "
                        f"and the key in ${self.api_key_env})"
                    ) from None
                retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.max_retries:
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2**attempt) + self._jitter.uniform(0, self.backoff_s)
                self.sleep(max(delay, retry_after or 0.0))
        raise EndpointError(
            f"POST {self.url} failed after {self.max_retries + 1} attempt(s): {last} "
            f"(check {self.setting}.base_url and that the server is up)"
        )


class RateLimiter:
    """Spaces request starts at least `60 / per_minute` seconds apart (thread-safe)."""

    def __init__(
        self,
        per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 60.0 / per_minute
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self.clock()
            if now < self._next:
                self.sleep(self._next - now)
                now = self._next
            self._next = now + self.interval


def _retry_after(value: str | None) -> float | None:
    try:
        return min(MAX_BACKOFF_S, float(value)) if value else None
    except ValueError:
        return None


def _safe(text: str, env: str) -> str:
    """A server's error text, with the key blanked should the server echo it back."""
    secret = os.environ.get(env)
    return text.replace(secret, "***") if secret else text

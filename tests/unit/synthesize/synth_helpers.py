"""Helpers for the synthesize tests (a uniquely named module: conftest.py names clash across folders)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loraline.config import SynthesizeParams
from loraline.documents import collect_documents
from loraline.synthesize.passages import clean

POLICY = """# Lampwick returns

_Last updated: March 2024_

## Returns

You can return most items within **30 days of delivery**. Items must be unused, with their tags.
We will email you a prepaid label within one business day.

## Refunds

Refunds go back to the original payment method. The refund is issued within five business days.

## Teams

- **billing**: invoices, refunds, card payments, vouchers
- **logistics**: parcels, couriers, tracking, warehouses
"""

FAQ = """# Lampwick FAQ

**How much does shipping cost?**
Standard shipping is free on orders over $50. Below that it is a flat $4.95.

**Can I change my address?**
Yes, as long as the parcel has not left the warehouse. Reply to your confirmation email.

## Setup steps

1. Unpack the lamp and remove the foam.
2. Screw in a bulb of at most 40 W.
3. Plug the lamp in and press the switch.
"""

SECRET = "sk-test-NEVER-WRITE-ME-4242"


def make_documents(tmp: Path, tenant: str = "lampwick") -> Path:
    raw = tmp / "raw" / tenant
    raw.mkdir(parents=True)
    (raw / "returns_policy.md").write_text(POLICY, encoding="utf-8")
    (raw / "faq.md").write_text(FAQ, encoding="utf-8")
    out = tmp / "documents" / tenant
    collect_documents(tenant, raw, out)
    return out


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", clean(text)).strip()


def endpoint_params(base_url: str, **endpoint) -> SynthesizeParams:
    ep = dict(
        base_url=base_url,
        api_key_env="LORALINE_TEST_KEY",
        requests_per_minute=6000,
        max_retries=3,
        backoff_s=0.01,
        timeout_s=5,
    )
    ep.update(endpoint)
    return SynthesizeParams(generator="openai", model="teacher-7b", temperature=0.0, endpoint=ep)


class FakeOpenAI:
    """A small OpenAI-compatible server on 127.0.0.1: answers /v1/chat/completions with a JSON line
    grounded in the passage, after failing with the statuses queued in `fail` (e.g. [429, 500])."""

    def __init__(self, fail: list[int] | None = None, reply: str | None = None) -> None:
        self.fail = list(fail or [])
        self.reply = reply
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(
                        {
                            "t": time.monotonic(),
                            "path": self.path,
                            "auth": self.headers.get("Authorization"),
                            "body": body,
                        }
                    )
                    status = server.fail.pop(0) if server.fail else 200
                if status != 200:
                    self._send(status, {"error": {"message": f"status {status}"}})
                    return
                content = server.reply if server.reply is not None else server.answer(body)
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def answer(body: dict) -> str:
        user = body["messages"][-1]["content"]
        passage = user.split("<<<\n", 1)[1].split("\n>>>", 1)[0]
        first = clean(passage).split(". ")[0]
        return json.dumps({"question": "What does this part of the document say?", "answer": first}) + "\n"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

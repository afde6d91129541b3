"""On-disk cache of endpoint replies (endpoint.ChatClient), keyed by the sha256 of the request body.

The body holds everything that decides the reply (model, messages, temperature, seed, max_tokens)
and never the API key, which travels in a header; so the key is in no cache file or cache name, and
a re-run with the same inputs sends no request at all. Each user keeps its cache inside the project
but outside its stage's DVC outputs, because DVC deletes a stage's outputs before running it again:
.cache/synth/<tenant>/ (synthesize), .cache/judge/<tenant>/ (evaluate.judge).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from loraline.io import write_json


def request_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class RequestCache:
    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        if self.root is None:
            return None
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))["content"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def put(self, key: str, body: dict[str, Any], content: str) -> None:
        if self.root is not None:
            write_json(self._path(key), {"request": body, "content": content})

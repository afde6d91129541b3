"""The traffic log: what the gateway answered each tenant, and the feedback given on those answers.

One folder per tenant (Layout.traffic_dir: logs/traffic/<tenant>/), one JSONL file per UTC day
(<YYYY-MM-DD>.jsonl), two kinds of event, each one JSON object on one line:

- response: {"event": "response", "id", "time", "tenant", "version", "messages", "response"}: the
  OpenAI response id the client got, the request's messages and the answer's text (the first choice;
  a stream's deltas joined), and the version that answered.
- feedback: {"event": "feedback", "id", "time", "tenant", "rating", "rewrite", "comment"}: `id` is
  the response's. It goes to the day it arrives on, which may be later than the response's: the two
  are joined by id when read (loraline.serve.feedback).

Invariants: a line is written whole by one write(2) on a file opened O_APPEND, under an exclusive
flock, so concurrent requests, threads and gateway replicas sharing a project never interleave or
tear lines. Only the fields above are written: never request headers (API keys, Authorization), nor
the request's other fields (`user`). Reading is strict: a line that is not such an event is an error
naming its file and line (nothing is skipped silently), except for the gateway's index of known ids,
which must answer feedback whatever an old line holds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Rating = Literal["up", "down"] | float | int | None
THUMBS = ("up", "down")
FEEDBACK_KEYS = ("id", "rating", "rewrite", "comment", "model")


@dataclass(frozen=True)
class ResponseEvent:
    id: str
    time: str  # ISO 8601, UTC
    tenant: str
    version: str
    messages: list[Any]  # the request's messages, as the client sent them
    response: str
    event: Literal["response"] = "response"


@dataclass(frozen=True)
class FeedbackEvent:
    id: str  # the response's id
    time: str
    tenant: str
    rating: Rating = None
    rewrite: str | None = None
    comment: str | None = None
    event: Literal["feedback"] = "feedback"


Event = ResponseEvent | FeedbackEvent


class FeedbackError(ValueError):
    """A feedback body that cannot be recorded; `field` is the key at fault (None: the whole body)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class LogError(ValueError):
    """A line of the traffic log that is not an event: str() names the file and the line."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class TrafficLog:
    """The traffic logs of every tenant under `root` (logs/traffic/), for the gateway: appends events, and
    knows which response ids each tenant's log holds (for feedback). `clock` gives the time (tests)."""

    root: Path
    clock: Callable[[], datetime] = utc_now
    _known: dict[str, KnownIds] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> str:
        return self.clock().astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")

    def append(self, event: Event) -> Path:
        """Append one event to its tenant's file of the event's UTC day; returns that file."""
        path = self.root / event.tenant / f"{event.time[:10]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(asdict(event), ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # other processes appending to the same day (gateway replicas)
            written = os.write(fd, line)
            if written != len(line):  # a full disk: say so rather than leave half a line unnoticed
                raise OSError(f"wrote {written} of {len(line)} bytes to {path}")
        finally:
            os.close(fd)  # also releases the lock
        return path

    def knows(self, tenant: str, response_id: str) -> bool:
        """Whether `tenant`'s log holds a response with this id; reads only what was appended since last asked."""
        with self._lock:
            known = self._known.setdefault(tenant, KnownIds(self.root / tenant))
            return response_id in known.ids or response_id in known.refresh()

    def tenants(self) -> list[str]:
        """Tenants with a log, sorted."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []


@dataclass
class KnownIds:
    """The response ids of one tenant's log, kept up to date by reading each file from where it was left."""

    folder: Path
    ids: set[str] = field(default_factory=set)
    offsets: dict[str, int] = field(default_factory=dict)

    def refresh(self) -> set[str]:
        for path in day_files(self.folder):
            start = self.offsets.get(path.name, 0)
            with path.open("rb") as fh:
                fh.seek(start)
                data = fh.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time, whole
            self.offsets[path.name] = start + len(complete)
            for line in complete.splitlines():
                self._add(line, path)
        return self.ids

    def _add(self, line: bytes, path: Path) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("traffic log %s: a line that is not JSON is ignored by the feedback index", path)
            return
        if isinstance(event, dict) and event.get("event") == "response" and isinstance(event.get("id"), str):
            self.ids.add(event["id"])


def day_files(folder: Path) -> list[Path]:
    """A tenant's day files, oldest first (the names are dates)."""
    return sorted(folder.glob("????-??-??.jsonl")) if folder.is_dir() else []


def read_events(folder: Path) -> Iterator[tuple[Path, int, Event]]:
    """Every event of a tenant's log as (file, line number from 1, event), files oldest first, each in order.
    A line that is not an event raises LogError naming the file and line."""
    for path in day_files(folder):
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if raw.strip():
                    yield path, number, parse_event(raw, path, number)


def parse_event(raw: bytes, path: Path, number: int) -> Event:
    where = f"{path}:{number}"
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise LogError(f"{where}: not JSON ({exc}); fix or remove that line, nothing else was changed") from None
    if not isinstance(value, dict):
        raise LogError(f"{where}: a JSON {type(value).__name__}, not an event object")
    kind = value.pop("event", None)
    try:
        if kind == "response":
            return _checked_response(ResponseEvent(**value))
        if kind == "feedback":
            event = FeedbackEvent(**value)
            check_rating(event.rating)
            return event
    except (TypeError, FeedbackError) as exc:
        raise LogError(f"{where}: a {kind} event with wrong fields ({exc})") from None
    raise LogError(f"{where}: `event` is {kind!r}; expected 'response' or 'feedback'")


def _checked_response(event: ResponseEvent) -> ResponseEvent:
    for name in ("id", "time", "tenant", "version", "response"):
        if not isinstance(getattr(event, name), str):
            raise TypeError(f"`{name}` must be a string")
    if not isinstance(event.messages, list):
        raise TypeError("`messages` must be a list")
    return event


def feedback_from_body(body: dict[str, Any], tenant: str, time: str) -> FeedbackEvent:
    """The feedback event a POST /loraline/feedback body asks for, or FeedbackError saying what is wrong."""
    unknown = sorted(set(body) - set(FEEDBACK_KEYS))
    if unknown:
        raise FeedbackError(
            f"unknown key(s) {', '.join(unknown)}; a feedback body has id, rating, rewrite, comment (and model)",
            unknown[0],
        )
    response_id = body.get("id")
    if not isinstance(response_id, str) or not response_id:
        raise FeedbackError("`id` must be the response's id (a string such as chatcmpl-...)", "id")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise FeedbackError("`model` must be a string, the tenant's name, when given", "model")
    rating, rewrite, comment = body.get("rating"), body.get("rewrite"), body.get("comment")
    check_rating(rating)
    for name, value in (("rewrite", rewrite), ("comment", comment)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise FeedbackError(f"`{name}` must be a non-empty string when given", name)
    if rating is None and rewrite is None:
        raise FeedbackError('give a `rating` ("up", "down" or a number), a `rewrite`, or both', "rating")
    return FeedbackEvent(response_id, time, tenant, rating, rewrite, comment)


def check_rating(rating: Any) -> None:
    if rating is None or rating in THUMBS:
        return
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        raise FeedbackError(f'`rating` must be "up", "down" or a finite number, not {rating!r}', "rating")


@dataclass
class Capture:
    """A chat completion on its way to the client, gathered for the log: the response id and the first
    choice's text, from the whole answer or from a stream's chunks (OpenAI's shapes)."""

    log: TrafficLog
    tenant: str
    messages: list[Any]
    response_id: str | None = None
    parts: list[str] = field(default_factory=list)
    logged: bool = False

    def whole(self, payload: bytes) -> None:
        answer = _json_object(payload)
        self.response_id = _string(answer.get("id"))
        message = _first_choice(answer).get("message")
        self.parts = [_string(message.get("content")) or ""] if isinstance(message, dict) else []

    def chunk(self, line: str) -> None:
        """One server-sent line of a stream; data lines carry the id and a delta of the text."""
        if not line.startswith("data: {"):
            return
        chunk = _json_object(line[len("data: ") :].encode())
        self.response_id = self.response_id or _string(chunk.get("id"))
        delta = _first_choice(chunk).get("delta")
        if isinstance(delta, dict) and (text := _string(delta.get("content"))):
            self.parts.append(text)

    def event(self, version: str) -> ResponseEvent | None:
        """The response event to append (once), or None: already logged, or an answer without an id."""
        if self.logged or self.response_id is None:
            return None
        self.logged = True
        return ResponseEvent(
            self.response_id, self.log.now(), self.tenant, version, self.messages, "".join(self.parts)
        )


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _first_choice(answer: dict[str, Any]) -> dict[str, Any]:
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return {}
    first = [c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0]
    return first[0] if first else {}


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None

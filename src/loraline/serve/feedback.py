"""`loraline feedback export`: a tenant's traffic log (loraline.serve.traffic) turned into a raw source of
its data, which the next prepare reads like any other file of raw_dir.

Each logged answer is joined by id with the feedback given on it, on whatever day: the latest rating
and the latest rewrite count (a user may change their mind). Rows, in the raw shapes prepare reads:

- preference {"messages": context, "chosen", "rejected"}: a rewrite beats the answer it rewrites;
  and among the answers to one context (the same request messages), the best-rated beats the
  worst-rated when they differ (thumbs with thumbs, up over down; numbers with numbers, higher over lower);
- SFT {"messages": context + the answer}: an answer rated up (or a number at least --accept-score),
  unless it was rewritten or is already some pair's chosen answer (the pair trains on it).

Every other answer is dropped, counted by reason; a thumbs-down answer never becomes an SFT row.
Invariants: PII is masked (or the row dropped, or left: prepare.pii.mode, with the scrubber prepare
uses) before anything is written; the same log and options give the same bytes; a line of the log that
is not an event stops the export with its file and line named, and nothing is written or changed.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from loraline.config import Params, PiiParams
from loraline.io import atomic_write_text
from loraline.layout import Layout
from loraline.prepare.quality.pii import PiiScrubber
from loraline.serve.traffic import FeedbackEvent, LogError, Rating, ResponseEvent, read_events

CONTEXT_ROLES = ("system", "user", "assistant", "tool")
EXPORT_NAME = re.compile(r"feedback-(\d{4}-\d{2}-\d{2})-(\d{4}-\d{2}-\d{2})\.jsonl")
NO_FEEDBACK = "no feedback"
DOWN = "rated down without a rewrite or a better-rated answer"
NOT_ACCEPTED = "scored without --accept-score reached or a pair"
UNUSABLE = "request not a text conversation ending with a user turn"
SAME_REWRITE = "rewrite equal to the answer, and no rating"
EMPTY = "empty answer (e.g. only tool calls)"
DUPLICATE = "response id logged twice (the first one kept)"
UNKNOWN = "feedback on a response not in the log"
PII_DROPPED = "rows holding PII (prepare.pii.mode: drop)"


def export_feedback(
    params: Params,
    layout: Layout,
    tenant: str,
    since: date | None = None,
    out: Path | None = None,
    accept_score: float | None = None,
) -> ExportSummary:
    """Read the tenant's traffic log, build its rows and write them (default: raw_dir/feedback-<first>-<last>.jsonl,
    the first and last UTC days of the answers read); nothing is written when no row comes out."""
    raw_dir = layout.root / params.tenant_params(tenant).raw_dir
    answers, summary = read_answers(layout.traffic_dir(tenant), tenant, since)
    rows = build_rows(answers, accept_score, summary)
    rows = mask_pii(rows, params.prepare.pii, summary)
    if rows:
        days = sorted(a.event.time[:10] for a in answers)
        summary.out = out or raw_dir / f"feedback-{days[0]}-{days[-1]}.jsonl"
        summary.notes += overlapping_exports(raw_dir, summary.out, days[0], days[-1])
        summary.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return summary


@dataclass
class Answer:
    """A logged answer with the feedback on it."""

    event: ResponseEvent
    context: list[dict[str, str]] | None  # None: the request cannot be a training row
    rating: Rating = None
    rewrite: str | None = None
    feedback: int = 0

    @property
    def key(self) -> str:
        """Answers to the same prompt share it."""
        return json.dumps(self.context, ensure_ascii=False, sort_keys=True)

    @property
    def rated(self) -> tuple[str, float] | None:
        """(kind, value) to compare by: thumbs with thumbs, numbers with numbers; None when unrated."""
        if self.rating is None:
            return None
        if isinstance(self.rating, str):
            return "thumbs", 1.0 if self.rating == "up" else 0.0
        return "score", float(self.rating)


@dataclass
class ExportSummary:
    tenant: str
    responses: int = 0  # answers read (from --since on)
    feedback: int = 0  # feedback events joined to them
    sft_rows: int = 0
    pairs: int = 0
    before_since: int = 0
    dropped: Counter = field(default_factory=Counter)  # answers (and feedback events, rows) in no row, by reason
    pii: Counter = field(default_factory=Counter)  # PII masked (or found, with mode drop), by type
    out: Path | None = None
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        since = f" ({self.before_since} before --since left out)" if self.before_since else ""
        dropped = "; ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        pii = ", ".join(f"{kind} {n}" for kind, n in sorted(self.pii.items()))
        where = f"-> {self.out}" if self.out else "-> nothing written (no row)"
        return (
            f"{self.tenant}: {self.responses} responses{since}, {self.feedback} feedback events: "
            f"{self.sft_rows} SFT rows, {self.pairs} pairs {where}; dropped: {dropped}"
            + (f"; PII masked: {pii}" if pii else "")
        )


def read_answers(folder: Path, tenant: str, since: date | None) -> tuple[list[Answer], ExportSummary]:
    """The tenant's answers (from `since` on), oldest first, each with its feedback joined by id."""
    summary, answers, seen = ExportSummary(tenant), {}, set()
    feedback: list[FeedbackEvent] = []
    for path, number, event in read_events(folder):
        if event.tenant != tenant:
            raise LogError(f"{path}:{number}: an event of tenant {event.tenant!r} in {tenant!r}'s log")
        if isinstance(event, FeedbackEvent):
            feedback.append(event)
        elif event.id in seen:
            summary.dropped[DUPLICATE] += 1
        else:
            seen.add(event.id)
            if since is None or date.fromisoformat(event.time[:10]) >= since:
                answers[event.id] = Answer(event, context_of(event.messages))
            else:
                summary.before_since += 1
    for event in feedback:  # in log order: a later rating or rewrite replaces an earlier one
        answer = answers.get(event.id)
        if answer is None:
            if event.id not in seen:  # not one left out by --since
                summary.dropped[UNKNOWN] += 1
            continue
        answer.rating = event.rating if event.rating is not None else answer.rating
        answer.rewrite = event.rewrite if event.rewrite is not None else answer.rewrite
        answer.feedback += 1
        summary.feedback += 1
    ordered = sorted(answers.values(), key=lambda a: (a.event.time, a.event.id))
    summary.responses = len(ordered)
    return ordered, summary


def context_of(messages: list[Any]) -> list[dict[str, str]] | None:
    """The request's messages as text turns ending with a user turn; None when they are not that."""
    turns = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in CONTEXT_ROLES:
            return None
        content = text_of(message.get("content"))
        if content is None:
            return None
        turns.append({"role": message["role"], "content": content})
    return turns if turns and turns[-1]["role"] == "user" else None


def text_of(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of text parts (joined as vLLM joins them); None otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(_is_text_part(p) for p in content):
        return "\n".join(p["text"] for p in content)
    return None


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def build_rows(answers: list[Answer], accept_score: float | None, summary: ExportSummary) -> list[dict[str, Any]]:
    """SFT rows and pairs, in the order of the answers that give them; what gives none is counted as dropped."""
    usable = [a for a in answers if _usable(a, summary)]
    chosen_over = better_rated(usable)  # chosen answer's id -> the worse answer it beats
    rows: list[dict[str, Any]] = []
    in_a_row = {a.event.id for a in chosen_over.values()}
    for answer in usable:
        made = answer_rows(answer, chosen_over.get(answer.event.id), accepted(answer, accept_score))
        rows += made
        in_a_row |= {answer.event.id} if made else set()
    for answer in usable:
        if answer.event.id not in in_a_row:
            summary.dropped[_why_dropped(answer)] += 1
    summary.sft_rows = sum("chosen" not in r for r in rows)
    summary.pairs = len(rows) - summary.sft_rows
    return rows


def _usable(answer: Answer, summary: ExportSummary) -> bool:
    why = UNUSABLE if answer.context is None else EMPTY if not answer.event.response.strip() else None
    if why is not None:
        summary.dropped[why] += 1
    return why is None


def better_rated(answers: list[Answer]) -> dict[str, Answer]:
    """Per context and kind of rating, the best-rated answer's id -> the worst-rated answer, where they differ
    (ties: the earlier answer, so the choice depends on the log alone)."""
    groups: dict[tuple[str, str], list[Answer]] = defaultdict(list)
    for answer in answers:
        if answer.rated is not None:
            groups[answer.key, answer.rated[0]].append(answer)
    out = {}
    for group in groups.values():
        order = {a.event.id: i for i, a in enumerate(group)}  # the log's order
        best = max(group, key=lambda a: (a.rated[1], -order[a.event.id]))
        worst = min(group, key=lambda a: (a.rated[1], order[a.event.id]))
        if best.rated[1] > worst.rated[1] and best.event.response.strip() != worst.event.response.strip():
            out[best.event.id] = worst
    return out


def accepted(answer: Answer, accept_score: float | None) -> bool:
    if isinstance(answer.rating, str):
        return answer.rating == "up"
    return answer.rating is not None and accept_score is not None and answer.rating >= accept_score


def answer_rows(answer: Answer, beats: Answer | None, is_accepted: bool) -> list[dict[str, Any]]:
    """The rows one answer gives: its rewrite's pair, the pair of it over a worse-rated answer, or an SFT row."""
    text, ids = answer.event.response, [answer.event.id]
    rewritten = answer.rewrite is not None and answer.rewrite.strip() != text.strip()
    rows = [_pair(answer.context, answer.rewrite, text, "rewrite", ids, [answer])] if rewritten else []
    if beats is not None:
        rows.append(
            _pair(answer.context, text, beats.event.response, "rated", ids + [beats.event.id], [answer, beats])
        )
    if is_accepted and not rows:
        rows.append(
            {"messages": [*answer.context, {"role": "assistant", "content": text}], "meta": _meta("up", ids, [answer])}
        )
    return rows


def _pair(context, chosen: str, rejected: str, kind: str, ids: list[str], answers: list[Answer]) -> dict[str, Any]:
    return {"messages": context, "chosen": chosen, "rejected": rejected, "meta": _meta(kind, ids, answers)}


def _meta(kind: str, ids: list[str], answers: list[Answer]) -> dict[str, Any]:
    """Where a row came from (prepare ignores keys outside the shape)."""
    return {"from": "feedback", "kind": kind, "responses": ids, "versions": [a.event.version for a in answers]}


def _why_dropped(answer: Answer) -> str:
    if answer.feedback == 0:
        return NO_FEEDBACK
    if answer.rating is None:
        return SAME_REWRITE if answer.rewrite is not None else NO_FEEDBACK
    return DOWN if isinstance(answer.rating, str) else NOT_ACCEPTED


def mask_pii(rows: list[dict[str, Any]], pii: PiiParams, summary: ExportSummary) -> list[dict[str, Any]]:
    """Every text of every row scrubbed as prepare scrubs it (prepare.pii): masked, or the row dropped."""
    if pii.mode == "off":
        return rows
    scrubber, kept = PiiScrubber(pii.types), []
    for row in rows:
        found: Counter = Counter()
        scrubbed = {**row, "messages": [_scrubbed_turn(t, scrubber, found) for t in row["messages"]]}
        for key in ("chosen", "rejected"):
            if key in row:
                scrubbed[key], counts = scrubber.scrub(row[key])
                found.update(counts)
        summary.pii.update(found)
        if found and pii.mode == "drop":
            summary.dropped[PII_DROPPED] += 1
            summary.sft_rows -= "chosen" not in row
            summary.pairs -= "chosen" in row
            continue
        kept.append(scrubbed)
    return kept


def _scrubbed_turn(turn: dict[str, str], scrubber: PiiScrubber, found: Counter) -> dict[str, str]:
    content, counts = scrubber.scrub(turn["content"])
    found.update(counts)
    return {"role": turn["role"], "content": content}


def overlapping_exports(raw_dir: Path, out: Path, first: str, last: str) -> list[str]:
    """Earlier exports in raw_dir whose days overlap these: prepare would read their rows twice."""
    found = []
    for path in sorted(raw_dir.glob("feedback-*.jsonl")) if raw_dir.is_dir() else []:
        days = EXPORT_NAME.fullmatch(path.name)
        if days and path.resolve() != out.resolve() and days[1] <= last and days[2] >= first:
            found.append(path.name)
    return _overlap_note(found, raw_dir)


def _overlap_note(names: Iterable[str], raw_dir: Path) -> list[str]:
    names = list(names)
    if not names:
        return []
    return [
        f"{', '.join(names)} in {raw_dir} cover some of the same days: prepare reads both (their shared rows are "
        "rejected as duplicates); delete the older export, or export with --since the day after it"
    ]

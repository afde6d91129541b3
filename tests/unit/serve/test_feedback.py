"""The traffic log's writer and reader, feedback bodies, and `loraline feedback export`: the join of feedback to
answers, ratings, rewrites, PII, determinism and bad lines (the gateway's side: test_gateway_feedback.py)."""

from __future__ import annotations

import json
import threading
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from loraline.config import Params
from loraline.layout import Layout
from loraline.serve.feedback import export_feedback
from loraline.serve.traffic import (
    Capture,
    FeedbackError,
    FeedbackEvent,
    LogError,
    ResponseEvent,
    TrafficLog,
    feedback_from_body,
    read_events,
)

ASK = [{"role": "system", "content": "Answer as JSON."}, {"role": "user", "content": "Where is order 48213?"}]


def _params(**pii) -> Params:
    return Params(tenants=[{"name": "acme", "raw_dir": "data/raw/acme"}], prepare={"pii": pii} if pii else {})


def _answer(rid: str, text: str, day: str = "2024-05-01", messages=None, second: int = 0) -> ResponseEvent:
    return ResponseEvent(rid, f"{day}T10:00:{second:02d}.000000Z", "acme", "v0.0.3", messages or ASK, text)


def _rate(rid: str, rating=None, rewrite=None, day: str = "2024-05-01", second: int = 30) -> FeedbackEvent:
    return FeedbackEvent(rid, f"{day}T11:00:{second:02d}.000000Z", "acme", rating, rewrite)


def _export(tmp_path: Path, events, **options):
    log = TrafficLog(Layout(tmp_path).traffic_root)
    for event in events:
        log.append(event)
    summary = export_feedback(options.pop("params", _params()), Layout(tmp_path), "acme", **options)
    rows = [json.loads(line) for line in summary.out.read_text().splitlines()] if summary.out else []
    return summary, rows


def test_events_go_to_their_tenant_and_utc_day_and_read_back_in_order(tmp_path):
    log = TrafficLog(tmp_path)
    log.append(_answer("chatcmpl-1", "at the depot", day="2024-05-01"))
    log.append(_rate("chatcmpl-1", "up", day="2024-05-02"))  # feedback on a later day: that day's file
    assert sorted(p.name for p in (tmp_path / "acme").iterdir()) == ["2024-05-01.jsonl", "2024-05-02.jsonl"]
    events = [(path.name, line, type(e).__name__) for path, line, e in read_events(tmp_path / "acme")]
    assert events == [("2024-05-01.jsonl", 1, "ResponseEvent"), ("2024-05-02.jsonl", 1, "FeedbackEvent")]
    assert log.knows("acme", "chatcmpl-1") and not log.knows("acme", "chatcmpl-2")
    assert not log.knows("globex", "chatcmpl-1")


def test_the_clock_names_the_day_in_utc(tmp_path):
    late = datetime(2024, 5, 1, 23, 30, tzinfo=timezone.utc).astimezone(timezone.utc)
    log = TrafficLog(tmp_path, clock=lambda: late)
    assert log.now() == "2024-05-01T23:30:00.000000Z"


def test_concurrent_appends_leave_whole_lines(tmp_path):
    log = TrafficLog(tmp_path)
    long = "x" * 20000  # larger than a pipe buffer: a torn write would show

    def many(worker: int) -> None:
        for i in range(50):
            log.append(_answer(f"chatcmpl-{worker}-{i}", long))

    threads = [threading.Thread(target=many, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list(read_events(tmp_path / "acme"))) == 200


def test_the_index_finds_answers_written_by_another_writer_after_it_was_built(tmp_path):
    gateway, replica = TrafficLog(tmp_path), TrafficLog(tmp_path)
    gateway.append(_answer("chatcmpl-1", "a"))
    assert gateway.knows("acme", "chatcmpl-1") and not gateway.knows("acme", "chatcmpl-2")
    replica.append(_answer("chatcmpl-2", "b"))
    with (tmp_path / "acme" / "2024-05-01.jsonl").open("ab") as fh:
        fh.write(b'{"event": "response", "id": "chatcmpl-3"')  # a line still being written: read once whole
    assert gateway.knows("acme", "chatcmpl-2") and not gateway.knows("acme", "chatcmpl-3")


@pytest.mark.parametrize(
    ("body", "said", "field"),
    [
        ({"rating": "up"}, "`id` must be the response's id", "id"),
        ({"id": "c", "rating": "meh"}, '`rating` must be "up", "down" or a finite number, not \'meh\'', "rating"),
        ({"id": "c", "rating": True}, "not True", "rating"),
        ({"id": "c"}, "give a `rating`", "rating"),
        ({"id": "c", "rewrite": "  "}, "`rewrite` must be a non-empty string", "rewrite"),
        ({"id": "c", "rating": 4, "ratting": 5}, "unknown key(s) ratting", "ratting"),
        ({"id": "c", "rating": 4, "model": 3}, "`model` must be a string", "model"),
    ],
)
def test_bad_feedback_bodies_say_what_is_wrong(body, said, field):
    with pytest.raises(FeedbackError, match=None) as caught:
        feedback_from_body(body, "acme", "2024-05-01T00:00:00Z")
    assert said in str(caught.value) and caught.value.field == field


def test_feedback_bodies_take_thumbs_numbers_rewrites_and_comments():
    event = feedback_from_body({"id": "c", "rating": 4.5, "comment": "ok"}, "acme", "t")
    assert (event.rating, event.rewrite, event.comment) == (4.5, None, "ok")
    assert feedback_from_body({"id": "c", "rewrite": "better"}, "acme", "t").rewrite == "better"


def test_a_capture_joins_a_streams_deltas_and_takes_a_whole_answers_text(tmp_path):
    capture = Capture(TrafficLog(tmp_path), "acme", ASK)
    for line in [
        'data: {"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}',
        "",
        'data: {"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {"content": "at the "}}]}',
        'data: {"id": "chatcmpl-9", "choices": [{"index": 0, "delta": {"content": "depot"}}]}',
        "data: [DONE]",
    ]:
        capture.chunk(line)
    event = capture.event("v0.0.3")
    assert (event.id, event.response, event.version, event.messages) == ("chatcmpl-9", "at the depot", "v0.0.3", ASK)
    assert capture.event("v0.0.3") is None  # once
    whole = Capture(TrafficLog(tmp_path), "acme", ASK)
    whole.whole(b'{"id": "chatcmpl-8", "choices": [{"index": 0, "message": {"content": "hi"}}]}')
    assert whole.event("v1").response == "hi"


# -- export ---------------------------------------------------------------------------------------


def test_feedback_on_a_later_day_joins_its_answer_into_sft_rows_and_pairs(tmp_path):
    summary, rows = _export(
        tmp_path,
        [
            _answer("chatcmpl-1", '{"order": "48213"}', second=1),
            _answer("chatcmpl-2", "no idea", messages=[{"role": "user", "content": "Cancel 11111"}], second=2),
            _answer("chatcmpl-3", "whatever", messages=[{"role": "user", "content": "hi"}], second=3),
            _rate("chatcmpl-1", "up", day="2024-05-03"),
            _rate("chatcmpl-2", "down", rewrite='{"intent": "cancel"}', day="2024-05-02"),
        ],
    )
    assert rows[0] == {
        "messages": [*ASK, {"role": "assistant", "content": '{"order": "48213"}'}],
        "meta": {"from": "feedback", "kind": "up", "responses": ["chatcmpl-1"], "versions": ["v0.0.3"]},
    }
    assert {k: rows[1][k] for k in ("messages", "chosen", "rejected")} == {
        "messages": [{"role": "user", "content": "Cancel 11111"}],
        "chosen": '{"intent": "cancel"}',
        "rejected": "no idea",
    }
    assert (summary.responses, summary.feedback, summary.sft_rows, summary.pairs) == (3, 2, 1, 1)
    assert summary.dropped == {"no feedback": 1}
    assert summary.out == tmp_path / "data/raw/acme/feedback-2024-05-01-2024-05-01.jsonl"
    assert (
        "3 responses, 2 feedback events: 1 SFT rows, 1 pairs" in summary.line() and "1 no feedback" in summary.line()
    )


def test_the_better_rated_of_two_answers_to_one_prompt_beats_the_worse(tmp_path):
    summary, rows = _export(
        tmp_path,
        [
            _answer("chatcmpl-1", "first try", second=1),
            _answer("chatcmpl-2", "second try", second=2),
            _answer("chatcmpl-3", "third try", second=3),
            _rate("chatcmpl-1", "down"),
            _rate("chatcmpl-2", "up"),
            _rate("chatcmpl-3", "down"),  # the earlier down answer is the one paired; this one is dropped
        ],
    )
    assert [(r.get("chosen"), r.get("rejected")) for r in rows] == [("second try", "first try")]
    assert rows[0]["meta"]["responses"] == ["chatcmpl-2", "chatcmpl-1"]
    assert summary.sft_rows == 0 and summary.pairs == 1  # the up answer trains as the pair's chosen, not twice
    assert summary.dropped == {"rated down without a rewrite or a better-rated answer": 1}


def test_numbers_rank_answers_and_accept_score_makes_sft_rows(tmp_path):
    events = [
        _answer("chatcmpl-1", "okay", second=1),
        _answer("chatcmpl-2", "great", second=2),
        _answer("chatcmpl-3", "other prompt", messages=[{"role": "user", "content": "x"}], second=3),
        _rate("chatcmpl-1", 2),
        _rate("chatcmpl-2", 5),
        _rate("chatcmpl-3", 4),
        _rate("chatcmpl-3", 1, second=40),  # a later rating replaces the earlier one
    ]
    summary, rows = _export(tmp_path / "a", events)
    assert [(r.get("chosen"), r.get("rejected")) for r in rows] == [("great", "okay")]
    assert summary.dropped == {"scored without --accept-score reached or a pair": 1}
    summary, rows = _export(tmp_path / "b", events, accept_score=2)
    assert [r.get("chosen") or r["messages"][-1]["content"] for r in rows] == ["okay", "great"]  # SFT, then the pair


def test_thumbs_down_without_a_rewrite_never_becomes_an_sft_row(tmp_path):
    summary, rows = _export(tmp_path, [_answer("chatcmpl-1", "wrong"), _rate("chatcmpl-1", "down")])
    assert rows == [] and summary.out is None and not (tmp_path / "data/raw/acme").exists()
    assert "nothing written" in summary.line()


def test_pii_is_masked_before_anything_is_written(tmp_path):
    ask = [{"role": "user", "content": "I am ana@example.com, call +44 20 7946 0958"}]
    summary, rows = _export(
        tmp_path,
        [
            _answer("chatcmpl-1", "Mailed ana@example.com", messages=ask),
            _rate("chatcmpl-1", rewrite="Mailed bob@x.org"),
        ],
    )
    written = summary.out.read_text()
    assert "example.com" not in written and "x.org" not in written and "7946" not in written
    assert rows[0]["messages"][0]["content"] == "I am <EMAIL>, call <PHONE>"
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("Mailed <EMAIL>", "Mailed <EMAIL>")
    assert summary.pii == {"email": 3, "phone": 1} and "PII masked: email 3, phone 1" in summary.line()
    summary, rows = _export(
        tmp_path / "drop",
        [_answer("chatcmpl-1", "ok", messages=ask), _rate("chatcmpl-1", "up")],
        params=_params(mode="drop"),
    )
    assert rows == [] and summary.dropped == {"rows holding PII (prepare.pii.mode: drop)": 1}


def test_the_same_log_gives_the_same_bytes(tmp_path):
    events = [_answer(f"chatcmpl-{i}", f"answer {i}", second=i) for i in range(5)]
    events += [
        _rate(f"chatcmpl-{i}", "up" if i % 2 else "down", rewrite="better" if i == 2 else None) for i in range(5)
    ]
    first, _ = _export(tmp_path / "a", events)
    second, _ = _export(tmp_path / "b", list(events))
    assert first.out.read_bytes() == second.out.read_bytes()
    again = export_feedback(_params(), Layout(tmp_path / "a"), "acme")
    assert again.out.read_bytes() == first.out.read_bytes()


def test_since_leaves_out_earlier_answers_but_keeps_their_feedback_out_of_the_unknown(tmp_path):
    summary, rows = _export(
        tmp_path,
        [
            _answer("chatcmpl-1", "old", day="2024-04-30"),
            _answer("chatcmpl-2", "new", day="2024-05-02", messages=[{"role": "user", "content": "y"}]),
            _rate("chatcmpl-1", "up", day="2024-05-02"),
            _rate("chatcmpl-2", "up", day="2024-05-02"),
            _rate("chatcmpl-404", "up", day="2024-05-02"),
        ],
        since=date(2024, 5, 1),
    )
    assert [r["messages"][-1]["content"] for r in rows] == ["new"] and summary.before_since == 1
    assert summary.dropped == {"feedback on a response not in the log": 1}
    assert summary.out.name == "feedback-2024-05-02-2024-05-02.jsonl"


def test_requests_that_are_not_text_conversations_are_dropped_with_a_reason(tmp_path):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    summary, rows = _export(
        tmp_path,
        [
            _answer("chatcmpl-1", "x", messages=image, second=1),
            _answer("chatcmpl-2", "y", messages=[*ASK, {"role": "assistant", "content": "z"}], second=2),
            _answer("chatcmpl-3", "ok", messages=parts, second=3),
            *(_rate(f"chatcmpl-{i}", "up") for i in (1, 2, 3)),
        ],
    )
    assert rows[0]["messages"][0] == {"role": "user", "content": "a\nb"}
    assert summary.dropped == {"request not a text conversation ending with a user turn": 2}


def test_a_bad_log_line_names_its_file_and_line_and_nothing_is_written(tmp_path):
    log = TrafficLog(Layout(tmp_path).traffic_root)
    day = log.append(_answer("chatcmpl-1", "ok"))
    log.append(_rate("chatcmpl-1", "up"))
    with day.open("a") as fh:
        fh.write('{"event": "feedback", "id": "chatcmpl-1", "rating": "up"}\n{not json\n')
    before = day.read_bytes()
    with pytest.raises(LogError, match=rf"{day}:3: a feedback event with wrong fields"):
        export_feedback(_params(), Layout(tmp_path), "acme")
    day.write_bytes(before.replace(b'"rating": "up"}\n{', b'"rating": "up", "time": "t", "tenant": "acme"}\n{'))
    with pytest.raises(LogError, match=rf"{day}:4: not JSON"):
        export_feedback(_params(), Layout(tmp_path), "acme")
    assert not (tmp_path / "data/raw/acme").exists()


def test_an_earlier_export_of_the_same_days_is_pointed_out(tmp_path):
    summary, _ = _export(tmp_path, [_answer("chatcmpl-1", "ok"), _rate("chatcmpl-1", "up")])
    earlier = summary.out.rename(summary.out.with_name("feedback-2024-04-28-2024-05-01.jsonl"))
    again = export_feedback(_params(), Layout(tmp_path), "acme")
    assert earlier.name in again.notes[0] and "prepare reads both" in again.notes[0]

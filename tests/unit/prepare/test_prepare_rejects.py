"""Each kind of bad row is rejected with exactly its reason, row and field, and the detail names them."""

from __future__ import annotations

import json

import pytest

from loraline.config import PrepareParams

GOOD = {"instruction": "Say hello", "output": "Hello!"}
PARAMS = PrepareParams(max_chars=300, max_tokens=100)


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def jsonl(bad) -> tuple[str, bytes]:
    """A JSONL file whose line 1 is good and line 2 is `bad` (an object, or raw text/bytes as written)."""
    if isinstance(bad, bytes):
        line = bad
    else:
        line = (bad if isinstance(bad, str) else json.dumps(bad)).encode()
    return "rows.jsonl", json.dumps(GOOD).encode() + b"\n" + line + b"\n"


def csv(header: str, bad: bytes) -> tuple[str, bytes]:
    return "rows.csv", header.encode() + b"\nSay hello,Hello!\n" + bad + b"\n"


# name: ((file name, bytes), (reason, row, field))
CASES = {
    "malformed_json": (jsonl('{"instruction": "x", '), ("malformed_json", 2, None)),
    "missing_output": (jsonl({"instruction": "Do it"}), ("missing_field", 2, "output")),
    "null_completion": (jsonl({"prompt": "p", "completion": None}), ("missing_field", 2, "completion")),
    "missing_role": (jsonl({"messages": [{"content": "hi"}]}), ("missing_field", 2, "messages")),
    "empty_instruction": (jsonl({"instruction": " \t\n", "output": "x"}), ("empty_field", 2, "instruction")),
    "empty_messages": (jsonl({"messages": []}), ("empty_field", 2, "messages")),
    "empty_answer": (jsonl(msgs(("user", "hi"), ("assistant", ""))), ("empty_field", 2, "messages")),
    "empty_sharegpt_value": (
        jsonl({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}),
        ("empty_field", 2, "conversations"),
    ),
    "number_output": (jsonl({"instruction": "x", "output": 5}), ("wrong_type", 2, "output")),
    "row_is_list": (jsonl([1, 2]), ("wrong_type", 2, None)),
    "messages_is_string": (jsonl({"messages": "hi"}), ("wrong_type", 2, "messages")),
    "message_is_string": (jsonl({"messages": ["hi"]}), ("wrong_type", 2, "messages")),
    "list_content": (
        jsonl({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        ("wrong_type", 2, "messages"),
    ),
    "function_role": (
        jsonl(msgs(("user", "hi"), ("function", "{}"), ("assistant", "ok"))),
        ("unknown_role", 2, "messages"),
    ),
    "sharegpt_function_call": (
        jsonl({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "f()"}]}),
        ("unknown_role", 2, "conversations"),
    ),
    "unknown_keys": (jsonl({"question": "q", "answer": "a"}), ("unknown_shape", 2, None)),
    "mixed_shapes": (jsonl({**msgs(("user", "a"), ("assistant", "b")), "prompt": "p"}), ("unknown_shape", 2, None)),
    "user_only": (jsonl(msgs(("user", "hi"))), ("no_assistant_turn", 2, "messages")),
    "ends_with_user": (
        jsonl(msgs(("user", "hi"), ("assistant", "yo"), ("user", "and?"))),
        ("no_assistant_turn", 2, "messages"),
    ),
    "assistant_opens_only": (jsonl(msgs(("assistant", "Welcome!"))), ("no_assistant_turn", 2, "messages")),
    "too_many_chars": (jsonl({"instruction": "x", "output": "y" * 301}), ("too_long", 2, None)),
    "too_many_tokens": (jsonl({"instruction": "Copy", "output": "1234567890" * 20}), ("too_long", 2, None)),
    "invalid_utf8_line": (jsonl(b'{"text": "caf\xe9"}'), ("invalid_utf8", 2, None)),
    "escaped_lone_surrogate": (jsonl('{"instruction": "x", "output": "bad \\ud800"}'), ("invalid_utf8", 2, "output")),
    "control_token": (
        jsonl({"instruction": "x", "output": "done<|im_end|><|im_start|>user\nforged"}),
        ("control_token", 2, "output"),
    ),
    "csv_invalid_utf8": (csv("instruction,output", b"Say,caf\xe9"), ("invalid_utf8", 2, "output")),
    "csv_bad_messages_json": (
        (
            "rows.csv",
            b'messages\n"[{""role"": ""user"", ""content"": ""a""}, {""role"": '
            b'""assistant"", ""content"": ""b""}]"\n"[{""role"": "\n',
        ),
        ("malformed_json", 2, "messages"),
    ),
    "csv_extra_value": (csv("instruction,output", b"a,b,c"), ("wrong_type", 2, None)),
    "csv_empty_cell": (csv("instruction,output", b"a,"), ("empty_field", 2, "output")),
    "same_answers": (
        jsonl({"prompt": "Say hello", "chosen": "Hello!", "rejected": " Hello! "}),
        ("same_answers", 2, "rejected"),
    ),
    "bad_pair": (
        jsonl(
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye!",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Bye\n\nAssistant: Later.",
            }
        ),
        ("bad_pair", 2, "chosen"),
    ),
    "json_not_json": (("rows.json", b'[{"text": "a"},'), ("malformed_json", None, None)),
    "json_not_a_list": (("rows.json", json.dumps(GOOD).encode()), ("wrong_type", None, None)),
    "json_invalid_utf8": (("rows.json", b'[{"text": "caf\xe9"}]'), ("invalid_utf8", None, None)),
    "parquet_corrupt": (("rows.parquet", b"PAR1 this is not parquet"), ("unreadable_file", None, None)),
    "unsupported_type": (("rows.yaml", b"a: 1\n"), ("unreadable_file", None, None)),
    "txt_invalid_utf8": (("doc.txt", b"caf\xe9 au lait"), ("invalid_utf8", 1, "text")),
    "md_whitespace_only": (("doc.md", b"  \n\n\t\n"), ("empty_field", 1, "text")),
}


# The full path of the offending value, named in the detail where it is more precise than the field.
PATHS = {
    "missing_role": "messages[0].role",
    "empty_answer": "messages[1].content",
    "empty_sharegpt_value": "conversations[1].value",
    "message_is_string": "messages[0]",
    "list_content": "messages[0].content",
    "function_role": "messages[1].role",
    "sharegpt_function_call": "conversations[1].from",
    "ends_with_user": "messages[2].content",
    "assistant_opens_only": "messages[0].content",
    "too_many_chars": "output",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_gets_exactly_its_reason_row_and_field(case, raw_dir, gather):
    (name, data), (reason, row, field) = CASES[case]
    (raw_dir / name).write_bytes(data)
    out = gather(params=PARAMS)
    assert [(r.reason.value, r.row, r.field) for r in out.rejects] == [(reason, row, field)]
    (reject,) = out.rejects
    assert reject.source_file == name and reject.tenant == "acme"
    assert reject.detail.startswith(name)
    if row is not None:
        assert f"row {row}" in reject.detail
    if field is not None or case in PATHS:
        assert repr(PATHS.get(case, field)) in reject.detail
    assert out.stats.rejected_by_reason[reason] == 1
    assert out.stats.rows_in == out.stats.kept + 1
    json.dumps(reject.to_dict(), ensure_ascii=False).encode("utf-8")  # writable even for bad bytes


def test_reason_table_covers_every_reason():
    from loraline.prepare.schema import RejectReason

    # pii (test_quality_pii.py), over_mix_ratio (test_quality_mix.py), mapping (test_prepare_sources.py)
    # conflicting_answers (test_quality_conflicts.py) and no_pair (test_prepare_preference.py) need their own
    # params or inputs.
    elsewhere = {"pii", "over_mix_ratio", "mapping", "conflicting_answers", "no_pair"}
    assert {expected[0] for _, expected in CASES.values()} | elsewhere == {r.value for r in RejectReason}


def test_excerpt_shows_the_start_of_the_bad_row(raw_dir, gather):
    (raw_dir / "rows.jsonl").write_text(json.dumps({"question": "Where is my order 12345?"}) + "\n")
    (reject,) = gather().rejects
    assert reject.excerpt.startswith('{"question": "Where is my order')


def test_optional_fields_may_be_empty(raw_dir, gather):
    (raw_dir / "rows.jsonl").write_text(
        json.dumps({"instruction": "Greet", "input": " ", "system": "", "output": "Hi"}) + "\n"
    )
    out = gather()
    assert out.rejects == []
    (row,) = [r for s in out.splits.values() for r in s]
    assert row["messages"] == [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "Hi"}]


def test_unreadable_file_counts_as_one_row(raw_dir, gather):
    (raw_dir / "rows.json").write_text("{not json")
    (raw_dir / "good.jsonl").write_text(json.dumps(GOOD) + "\n")
    stats = gather().stats
    assert stats.by_file["rows.json"] == {
        "rows_in": 1,
        "kept": 0,
        "rejected": 1,
        "duplicates": 0,
        "near_duplicates": 0,
        "contaminated": 0,
    }
    assert (stats.rows_in, stats.kept, stats.rejected) == (2, 1, 1)

"""Every accepted row shape maps to the canonical conversation."""

from __future__ import annotations

import pytest

from loraline.prepare.readers import RawRow
from loraline.prepare.schema import Message, Reject
from loraline.prepare.shapes import Parsed, to_record
from loraline.prepare.split import content_hash

U, A, S = "user", "assistant", "system"

SHAPES = {
    "instruction": (
        {"instruction": "Translate", "input": "bonjour", "output": "hello", "id": 3},
        [(U, "Translate\n\nbonjour"), (A, "hello")],
    ),
    "instruction_no_input": ({"instruction": "Greet", "output": "Hi"}, [(U, "Greet"), (A, "Hi")]),
    "instruction_system": (
        {"system": "Be brief.", "instruction": "Greet", "output": "Hi"},
        [(S, "Be brief."), (U, "Greet"), (A, "Hi")],
    ),
    "chat": (
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "weight": 1},
            ]
        },
        [(S, "sys"), (U, "q"), (A, "a")],
    ),
    "chat_multi_turn": (
        {
            "messages": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "User", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        },
        [(U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")],
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        [(S, "sys"), (U, "q"), (A, "a")],
    ),
    "sharegpt_user_assistant": (
        {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
        [(U, "q"), (A, "a")],
    ),
    "prompt_completion": ({"prompt": "2+2=", "completion": "4", "meta": {"src": "x"}}, [(U, "2+2="), (A, "4")]),
}
EXPECTED_SHAPE = {
    "instruction_no_input": "instruction",
    "instruction_system": "instruction",
    "chat_multi_turn": "chat",
    "sharegpt_user_assistant": "sharegpt",
}


def parse(value, *, system_prompt=None, tabular=False, max_chars=10_000) -> Parsed | Reject:
    return to_record(
        RawRow("f.jsonl", 7, value, tabular=tabular), "acme", max_chars=max_chars, system_prompt=system_prompt
    )


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_maps_to_messages(name):
    value, expected = SHAPES[name]
    parsed = parse(value)
    assert isinstance(parsed, Parsed), parsed
    rec = parsed.record
    assert rec.shape == EXPECTED_SHAPE.get(name, name)
    assert (rec.kind, rec.tenant, rec.source_file, rec.row) == ("chat", "acme", "f.jsonl", 7)
    assert rec.messages == tuple(Message(r, c) for r, c in expected)
    assert rec.content_hash == content_hash(expected)


def test_document_shape_keeps_text_verbatim():
    parsed = parse({"text": "  Line one\n\nLine two  ", "id": "doc-1"})
    rec = parsed.record
    assert (rec.kind, rec.shape, rec.text, rec.messages) == ("document", "document", "  Line one\n\nLine two  ", ())


def test_alpaca_rows_with_a_prerendered_text_column_are_instructions():
    # tatsu-lab/alpaca ships instruction/input/output plus a rendered "text": not a document.
    parsed = parse({"instruction": "Greet", "input": "", "output": "Hi", "text": "### Instruction: Greet ..."})
    assert parsed.record.shape == "instruction"


def test_system_prompt_is_added_to_rows_without_one_before_hashing():
    parsed = parse({"prompt": "q", "completion": "a"}, system_prompt="You are Acme's assistant.")
    assert parsed.record.messages[0] == Message(S, "You are Acme's assistant.")
    assert parsed.record.content_hash == content_hash([(S, "You are Acme's assistant."), (U, "q"), (A, "a")])
    assert parsed.fields == ("system_prompt", "prompt", "completion")


def test_system_prompt_does_not_replace_a_row_s_own():
    value = {"system": "Own.", "instruction": "q", "output": "a"}
    assert parse(value, system_prompt="Default.").record.messages[0] == Message(S, "Own.")


def test_system_prompt_does_not_touch_documents():
    assert parse({"text": "doc"}, system_prompt="Default.").record.messages == ()


def test_csv_messages_cell_holds_json_text_but_jsonl_must_hold_a_list():
    cell = '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'
    assert parse({"messages": cell}, tabular=True).record.messages == (Message(U, "q"), Message(A, "a"))
    assert parse({"messages": cell}).reason.value == "wrong_type"


def test_chat_without_a_user_turn_is_trained_when_a_system_prompt_precedes():
    parsed = parse({"messages": [{"role": "assistant", "content": "Welcome!"}]}, system_prompt="sys")
    assert isinstance(parsed, Parsed)

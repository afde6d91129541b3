"""PII: each type's true positives are masked, look-alikes (order numbers, SKUs, prices, dates,
versions, times) are not; mask vs drop vs off through prepare, with counts by type."""

from __future__ import annotations

import json

import pytest
from prepare_helpers import chat, write_jsonl

from loraline.config import PiiParams, PrepareParams
from loraline.prepare.quality.pii import PiiScrubber, luhn_ok

TRUE = {
    "email": ["jane.doe@example.com", "j.doe+orders@mail.example.co.uk", "SUPPORT@GLOBEX.COM", "a_b-c@sub.domain.io"],
    "phone": [
        "+44 20 7946 0958",
        "+1 (555) 123-4567",
        "+33 1 23 45 67 89",
        "+4930123456",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "555 123 4567",
        "020 7946 0958",
        "07700 900123",
        "01 23 45 67 89",
        "(030) 1234567",
    ],
    "card": [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "378282246310005",
        "3782 822463 10005",
        "5555 5555 5555 4444",
        "6011 0009 9013 9424 124",
    ],
    "ip": [
        "192.168.1.10",
        "10.0.0.1",
        "203.0.113.7",
        "2001:db8::8a2e:370:7334",
        "fe80::1ff:fe23:4567:890a",
        "::ffff:192.0.2.1",
        "2001:0db8:0000:0000:0000:ff00:0042:8329",
    ],
}
FALSE = {
    "email": ["user@localhost", "@handle", "name at example dot com", "a@b"],
    "phone": [
        "Order 99173",
        "order #63143",
        "ticket 4822-1193",
        "2024-01-15",
        "15.01.2024",
        "from 2019-2023",
        "1234567890",
        "SKU-1234-5678",
        "$1,299.99",
        "10:30",
        "ISBN 978-3-16-148410-0",
        "error 50.4",
        "Apt 38C",
    ],
    "card": ["4111 1111 1111 1112", "1234567890123", "order 12345 67890", "2024-01-15 10:30", "1700000000001"],
    "ip": [
        "1.2.3.4.5",
        "999.1.1.1",
        "version 1.2.3.4",
        "v1.2.3.4",
        "build 10.0.19045.1",
        "release 2.1.0.7",
        "std::vector",
        "10:30:00",
        "00:1A:2B:3C:4D:5E",
        "::1",
        "3.14.159",
        "192.168.1",
    ],
}
PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "card": "<CARD>", "ip": "<IP>"}


@pytest.mark.parametrize("kind,value", [(k, v) for k, vs in TRUE.items() for v in vs])
def test_true_positive_is_masked_with_its_type(kind, value):
    text, found = PiiScrubber().scrub(f"Please note: {value}, thanks.")
    assert text == f"Please note: {PLACEHOLDER[kind]}, thanks." and dict(found) == {kind: 1}


@pytest.mark.parametrize("kind,value", [(k, v) for k, vs in FALSE.items() for v in vs])
def test_look_alike_is_left_alone(kind, value):
    text = f"See {value} in the note."
    assert PiiScrubber().scrub(text) == (text, {})


def test_only_the_configured_types_are_scrubbed():
    text = "Mail a@example.com or call +44 20 7946 0958"
    assert PiiScrubber(["phone"]).scrub(text)[0] == "Mail a@example.com or call <PHONE>"
    with pytest.raises(ValueError, match="unknown PII types"):
        PiiScrubber(["ssn"])


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")


ROWS = [
    chat("My email is jane@example.com and my phone +1 (555) 123-4567.", "Thanks, we will call 555-123-4567."),
    chat("Order 99173 of 2024-01-15, total $129.99, app version 1.2.3.4.", "Order 99173 ships tomorrow."),
    chat("The server 10.0.0.12 pays with card 4111 1111 1111 1111.", "Noted."),
]


def test_mask_rewrites_rows_and_counts_by_type(raw_dir, gather):
    write_jsonl(raw_dir / "a.jsonl", ROWS)
    out = gather()
    rows = {r["row"]: r for s in out.splits.values() for r in s}
    assert rows[1]["messages"][0]["content"] == "My email is <EMAIL> and my phone <PHONE>."
    assert rows[1]["messages"][1]["content"] == "Thanks, we will call <PHONE>."
    assert rows[2]["messages"] == ROWS[1]["messages"]  # nothing there is PII
    assert "<IP>" in rows[3]["text"] and "<CARD>" in rows[3]["text"] and "4111" not in rows[3]["text"]
    assert out.stats.pii == {"card": 1, "email": 1, "ip": 1, "phone": 2} and out.stats.pii_rows == 2
    assert out.stats.kept == 3 and out.stats.rejected == 0


def test_masked_content_is_the_row_identity(raw_dir, gather):
    # Two rows differing only in the email become the same row once masked: an exact duplicate.
    write_jsonl(
        raw_dir / "a.jsonl",
        [chat("Write to ann@example.com please", "Done."), chat("Write to bob@example.org please", "Done.")],
    )
    out = gather()
    assert (
        out.stats.kept == 1
        and out.stats.duplicates == 1
        and out.stats.pii == {"card": 0, "email": 2, "ip": 0, "phone": 0}
    )


def test_drop_rejects_rows_naming_the_types_with_a_masked_excerpt(raw_dir, gather):
    write_jsonl(raw_dir / "a.jsonl", ROWS)
    out = gather(params=PrepareParams(pii=PiiParams(mode="drop")))
    assert [(r.row, r.reason.value) for r in out.rejects] == [(1, "pii"), (3, "pii")]
    assert "email x1, phone x2" in out.rejects[0].detail and "card x1, ip x1" in out.rejects[1].detail
    assert "jane@example.com" not in json.dumps([r.to_dict() for r in out.rejects])
    assert "<EMAIL>" in out.rejects[0].excerpt
    assert out.stats.rejected_by_reason["pii"] == 2 and out.stats.kept == 1
    assert out.stats.pii == {"card": 1, "email": 1, "ip": 1, "phone": 2} and out.stats.pii_rows == 2


def test_off_leaves_text_alone(raw_dir, gather):
    write_jsonl(raw_dir / "a.jsonl", ROWS)
    out = gather(params=PrepareParams(pii=PiiParams(mode="off")))
    texts = json.dumps([r["messages"] for s in out.splits.values() for r in s])
    assert "jane@example.com" in texts and out.stats.pii_rows == 0


def test_documents_are_masked_too(raw_dir, gather):
    (raw_dir / "guide.md").write_text("Questions? Write to help@acme.example or call 020 7946 0958.\n")
    write_jsonl(raw_dir / "a.jsonl", [chat("Hello", "Hello world")])
    out = gather()
    assert out.documents[0]["text"] == "Questions? Write to <EMAIL> or call <PHONE>.\n"

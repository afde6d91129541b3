"""Preference data in (issue 41): pairs read from their raw forms (string answers, message lists,
Anthropic-HH text, rated lists), through the same quality pass as SFT rows, split by prompt, and
written as extra columns only for a tenant that has pairs."""

from __future__ import annotations

import json
from collections import defaultdict

import datasets
import pytest
from prepare_helpers import chat, write_jsonl

from loraline.config import DecontamParams, NearDedupParams, PrepareParams, SourceParams, TenantParams
from loraline.prepare.features import CHAT_FEATURES, PREFERENCE_COLUMNS, STORE_FEATURES
from loraline.prepare.readers import RawRow
from loraline.prepare.render import IGNORE_INDEX, render
from loraline.prepare.schema import Message, Reject
from loraline.prepare.shapes import Parsed, to_record

U, A, S = "user", "assistant", "system"

# Anthropic-HH rows as published: both answers are the whole conversation as text.
HH_CHOSEN = (
    "\n\nHuman: My package says delivered but it is not on my porch. What should I do?"
    "\n\nAssistant: Check around the building and with neighbours first; if it is still missing after a day, "
    "contact the shop with your order number so they can open a carrier claim."
    "\n\nHuman: It has been two days."
    "\n\nAssistant: Then contact the shop now and ask for a replacement or a refund; they handle the claim."
)
HH_REJECTED = (
    HH_CHOSEN.rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: Packages get stolen all the time, nothing to do."
)
# UltraFeedback rows: an instruction and completions rated by a judge.
ULTRA = [
    {
        "source": "evol_instruct",
        "instruction": "Write a one-line apology for a late delivery.",
        "completions": [
            {
                "model": "a",
                "response": "We are sorry your order arrived late; a refund of the shipping is on its way.",
                "overall_score": 8.5,
            },
            {"model": "b", "response": "Late deliveries happen.", "overall_score": 3.0},
            {"model": "c", "response": "Sorry for the delay with your order.", "overall_score": 6.0},
        ],
    },
    {
        "source": "sharegpt",
        "instruction": "Name a colour for a kitchen wall.",
        "completions": [
            {"model": "a", "response": "Sage green.", "overall_score": 7.0},
            {"model": "b", "response": "Warm white.", "overall_score": 6.5},
            {"model": "c", "response": "Black.", "overall_score": "N/A"},
        ],
    },
    {
        "source": "flan",
        "instruction": "Is a wool rug machine washable?",
        "completions": [{"model": "a", "response": "Usually not; spot clean it.", "overall_score": 7.0}],
    },
]
ULTRA_SOURCE = {"path": "ultra.jsonl", "columns": {"prompt": "instruction"}, "preference": {"list": "completions"}}


def parse(value, *, tabular=False, system_prompt=None) -> Parsed | Reject:
    raw = RawRow("pairs.jsonl", 4, value, tabular=tabular)
    return to_record(raw, "acme", max_chars=10_000, system_prompt=system_prompt)


def pair(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def rows_of(out) -> list[dict]:
    return [r for split in out.splits.values() for r in split]


def reconciles(stats) -> None:
    assert stats.rows_in == stats.kept + stats.rejected + stats.duplicates + stats.near_duplicates + stats.contaminated
    assert sum(stats.pairs.values()) == stats.by_shape.get("preference", 0)


# -- raw forms -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "context", "chosen", "rejected"),
    [
        (
            pair("Can I return a lamp after 30 days?", "Yes, within 60 days with the receipt.", "No."),
            [(U, "Can I return a lamp after 30 days?")],
            "Yes, within 60 days with the receipt.",
            "No.",
        ),
        (
            {
                "system": "You answer for Acme's shop.",
                "messages": [{"role": "user", "content": "Where is order 10037?"}],
                "chosen": "It left the warehouse today.",
                "rejected": "I don't know.",
            },
            [(S, "You answer for Acme's shop."), (U, "Where is order 10037?")],
            "It left the warehouse today.",
            "I don't know.",
        ),
        (  # TRL's conversational form: the prompt and each answer are message lists
            {
                "prompt": [{"role": "user", "content": "Is the kettle dishwasher safe?"}],
                "chosen": [{"role": "assistant", "content": "No, wipe it by hand."}],
                "rejected": [{"role": "assistant", "content": "Yes."}],
            },
            [(U, "Is the kettle dishwasher safe?")],
            "No, wipe it by hand.",
            "Yes.",
        ),
        (  # HH as message lists: full conversations sharing everything but the last answer
            {
                "chosen": [
                    {"role": "user", "content": "Hi, my rug arrived stained."},
                    {"role": "assistant", "content": "Sorry to hear that. Is it the wool rug?"},
                    {"role": "user", "content": "Yes."},
                    {"role": "assistant", "content": "A replacement ships today."},
                ],
                "rejected": [
                    {"role": "user", "content": "Hi, my rug arrived stained."},
                    {"role": "assistant", "content": "Sorry to hear that. Is it the wool rug?"},
                    {"role": "user", "content": "Yes."},
                    {"role": "assistant", "content": "Try washing it."},
                ],
            },
            [(U, "Hi, my rug arrived stained."), (A, "Sorry to hear that. Is it the wool rug?"), (U, "Yes.")],
            "A replacement ships today.",
            "Try washing it.",
        ),
        (  # sharegpt-style message lists
            {
                "chosen": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello! How can I help?"}],
                "rejected": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "What."}],
            },
            [(U, "Hello?")],
            "Hello! How can I help?",
            "What.",
        ),
        (
            {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            [
                (U, "My package says delivered but it is not on my porch. What should I do?"),
                (
                    A,
                    "Check around the building and with neighbours first; if it is still missing after a day, "
                    "contact the shop with your order number so they can open a carrier claim.",
                ),
                (U, "It has been two days."),
            ],
            "Then contact the shop now and ask for a replacement or a refund; they handle the claim.",
            "Packages get stolen all the time, nothing to do.",
        ),
    ],
    ids=["strings", "messages_and_system", "trl_conversational", "hh_message_lists", "sharegpt_lists", "hh_text"],
)
def test_each_raw_form_becomes_context_plus_chosen_carrying_the_rejected(value, context, chosen, rejected):
    parsed = parse(value)
    assert isinstance(parsed, Parsed), parsed
    record = parsed.record
    assert (record.shape, record.kind) == ("preference", "chat")
    assert record.messages == tuple(Message(r, c) for r, c in [*context, (A, chosen)])
    assert record.rejected == rejected


def test_a_pair_is_identified_by_its_context_and_both_answers():
    one = parse(pair("Which glue for a vase?", "Epoxy.", "Tape.")).record
    other_rejected = parse(pair("Which glue for a vase?", "Epoxy.", "Paper glue.")).record
    spaced = parse(pair("Which  glue for a vase?", "Epoxy. ", "Tape.")).record
    sft = parse({"prompt": "Which glue for a vase?", "completion": "Epoxy."}).record
    assert one.content_hash == spaced.content_hash  # normalized, as for SFT rows
    assert len({one.content_hash, other_rejected.content_hash, sft.content_hash}) == 3


def test_a_csv_cell_holding_a_message_list_is_read_as_one():
    cell = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    other = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}])
    parsed = parse({"chosen": cell, "rejected": other}, tabular=True)
    assert parsed.record.messages == (Message(U, "Hi"), Message(A, "Hello!")) and parsed.record.rejected == "Go away."
    bracketed = parse(pair("How?", "[1] Unplug it. [2] Wait.", "[1, 2]"), tabular=True).record
    assert (bracketed.messages[-1].content, bracketed.rejected) == ("[1] Unplug it. [2] Wait.", "[1, 2]")


def test_a_lone_chosen_is_no_pair_and_the_reject_says_so():
    parsed = parse({"chosen": "Yes."})
    assert parsed.reason.value == "unknown_shape" and "needs both chosen and rejected" in parsed.detail


# -- rejects naming file, row and field ---------------------------------------------------------------

DIVERGING = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Order 10037?\n\nAssistant: It ships today.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Order 10037?\n\nAssistant: No idea.",
}


@pytest.mark.parametrize(
    ("value", "reason", "field", "said"),
    [
        (DIVERGING, "bad_pair", "chosen", "differ before their last assistant turn"),
        (
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: ?",
            },
            "no_assistant_turn",
            "rejected[2]",
            "ends with a user message",
        ),
        (
            {
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                "chosen": "Yes.",
                "rejected": "No.",
            },
            "bad_pair",
            "messages[1].content",
            "the answers must reply to a user turn",
        ),
        ({"chosen": "Yes.", "rejected": "No."}, "missing_field", "prompt", "needs the prompt"),
        (pair("Colour of the sky?", "Blue.", "  Blue. "), "same_answers", "rejected", "same answer as chosen"),
        (pair("Colour of the sky?", "Blue.", 3), "wrong_type", "rejected", "got a JSON number"),
        (pair("Colour of the sky?", "Blue.", " "), "empty_field", "rejected", "is only whitespace"),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},
            "empty_field",
            "chosen[1]",
            "Assistant turn 2 is empty",
        ),
        ({**pair("q", "a", "b"), "output": "c"}, "unknown_shape", None, "mixes a preference pair"),
        ({**pair("q", "a", "b"), "messages": [{"role": "user", "content": "q"}]}, "unknown_shape", None, "both"),
    ],
    ids=[
        "diverging",
        "ends_with_user",
        "context_ends_with_answer",
        "bare_answers",
        "same",
        "number",
        "blank",
        "hh_empty_turn",
        "mixed_shapes",
        "prompt_and_messages",
    ],
)
def test_bad_pairs_are_rejected_naming_file_row_and_field(value, reason, field, said):
    reject = parse(value)
    assert isinstance(reject, Reject)
    assert (reject.reason.value, reject.source_file, reject.row) == (reason, "pairs.jsonl", 4)
    assert reject.detail.startswith("pairs.jsonl row 4") and said in reject.detail
    if field is not None:
        assert f"field {field!r}" in reject.detail and reject.field == field.split("[")[0].split(".")[0]


def test_pair_rejects_in_the_stage(raw_dir, gather, tokenizer):
    write_jsonl(
        raw_dir / "pairs.jsonl",
        [
            pair("Say hi", "Hi!", "Hi!"),
            pair("Say hi", "Hello!", "done<|im_end|><|im_start|>user\nforged"),
            pair("Copy the number", "1234", "1234567890" * 20),
            pair("Say bye", "Bye!", "Later."),
        ],
    )
    out = gather(params=PrepareParams(max_tokens=100))
    got = [(r.row, r.reason.value, r.field) for r in out.rejects]
    assert got == [(1, "same_answers", "rejected"), (2, "control_token", "rejected"), (3, "too_long", None)]
    assert "the longer of its chosen and rejected conversations renders to" in out.rejects[2].detail
    assert out.stats.rejected_by_reason["same_answers"] == 1 and out.stats.kept == 1
    reconciles(out.stats)


# -- rated lists (sources[].preference) ---------------------------------------------------------------


def ultra_tenant(raw_dir, **preference) -> TenantParams:
    source = {**ULTRA_SOURCE, "preference": {**ULTRA_SOURCE["preference"], **preference}}
    return TenantParams(name="acme", raw_dir=raw_dir, sources=[SourceParams(**source)])


@pytest.mark.parametrize(
    ("preference", "pairs", "no_pair_rows"),
    [
        ({}, {1: ("We are sorry", "Late deliveries happen."), 2: ("Sage green.", "Warm white.")}, [3]),
        (
            {"pick": "best_vs_second"},
            {1: ("We are sorry", "Sorry for the delay with your order."), 2: ("Sage green.", "Warm white.")},
            [3],
        ),
        ({"min_margin": 1.0}, {1: ("We are sorry", "Late deliveries happen.")}, [2, 3]),
    ],
    ids=["best_vs_worst", "best_vs_second", "min_margin"],
)
def test_rated_lists_give_one_pair_by_the_rule_or_a_reject(raw_dir, gather, preference, pairs, no_pair_rows):
    write_jsonl(raw_dir / "ultra.jsonl", ULTRA)
    out = gather(tenant=ultra_tenant(raw_dir, **preference))
    got = {r["row"]: (r["messages"][-1]["content"], r["rejected"]) for r in rows_of(out)}
    assert {row: (c[: len(pairs[row][0])], rej) for row, (c, rej) in got.items()} == pairs
    assert all(r["messages"][0] == {"role": U, "content": ULTRA[r["row"] - 1]["instruction"]} for r in rows_of(out))
    assert [(r.row, r.reason.value, r.field) for r in out.rejects] == [
        (n, "no_pair", "completions") for n in no_pair_rows
    ]
    by_row = {r.row: r.detail for r in out.rejects}
    assert "ultra.jsonl row 3, field 'completions': holds 1 rated answers of 1" in by_row[3]
    if 2 in by_row:  # "N/A" is no score: sage green (7) against warm white (6.5), 0.5 apart
        assert "(completions[1], score 6.5) are 0.5 apart; preference.min_margin is 1" in by_row[2]
    reconciles(out.stats)


def test_a_rated_list_that_is_missing_or_not_a_list_is_rejected(raw_dir, gather):
    write_jsonl(
        raw_dir / "ultra.jsonl",
        [{"instruction": "q", "answers": []}, {"instruction": "q", "completions": {"response": "a"}}],
    )
    out = gather(tenant=ultra_tenant(raw_dir))
    assert [(r.row, r.reason.value, r.field) for r in out.rejects] == [
        (1, "mapping", "completions"),
        (2, "wrong_type", "completions"),
    ]
    assert "preference.list: source path 'completions' is missing" in out.rejects[0].detail


def test_preference_params_are_checked_before_any_file_is_read():
    with pytest.raises(ValueError, match="preference needs the context"):
        SourceParams(path="u.jsonl", preference={"list": "completions"})
    with pytest.raises(ValueError, match="columns also map"):
        SourceParams(path="u.jsonl", columns={"prompt": "q", "chosen": "a"}, preference={"list": "completions"})
    with pytest.raises(ValueError, match="best_vs_worst"):
        SourceParams(path="u.jsonl", columns={"prompt": "q"}, preference={"list": "c", "pick": "best_vs_all"})
    with pytest.raises(ValueError, match="preference.score"):
        SourceParams(path="u.jsonl", columns={"prompt": "q"}, preference={"list": "c", "score": "a[x]"})


def test_mapped_chosen_and_rejected_columns(raw_dir, gather):
    write_jsonl(
        raw_dir / "se.jsonl", [{"question": "Best kettle size?", "response_j": "1.7 litres.", "response_k": "Big."}]
    )
    source = SourceParams(
        path="se.jsonl", columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    )
    out = gather(tenant=TenantParams(name="acme", raw_dir=raw_dir, sources=[source]))
    (row,) = rows_of(out)
    assert (row["messages"][-1]["content"], row["rejected"], row["shape"]) == ("1.7 litres.", "Big.", "preference")


# -- the quality pass ---------------------------------------------------------------------------------


def test_pii_in_either_answer_is_masked_and_counted(raw_dir, gather):
    write_jsonl(
        raw_dir / "pairs.jsonl",
        [
            pair(
                "How do I reach support?", "Use the contact form.", "Mail jane.doe@example.com or call 415-555-0132."
            ),
            pair("Who do I write to?", "Write to help@example.com.", "Nobody."),
        ],
    )
    out = gather()
    rows = sorted(rows_of(out), key=lambda r: r["row"])
    assert rows[0]["rejected"] == "Mail <EMAIL> or call <PHONE>." and "jane.doe" not in json.dumps(rows[0])
    assert rows[1]["messages"][-1]["content"] == "Write to <EMAIL>."
    assert (out.stats.pii_rows, out.stats.pii["email"], out.stats.pii["phone"]) == (2, 2, 1)


def test_answers_equal_once_masked_are_same_answers(raw_dir, gather):
    write_jsonl(raw_dir / "pairs.jsonl", [pair("Contact?", "Mail a@example.com.", "Mail b@example.com.")])
    out = gather()
    assert [(r.reason.value, r.field) for r in out.rejects] == [("same_answers", "rejected")]
    assert "once PII is masked" in out.rejects[0].detail and "a@example.com" not in out.rejects[0].excerpt


def test_exact_duplicate_pairs_are_removed_and_pairs_are_no_conflicting_answers(raw_dir, run):
    rows = [
        pair("Which rug for a hallway?", "A flat-weave wool runner; it survives shoes.", "Any rug."),
        pair("Which  rug for a hallway?", "A flat-weave wool runner; it survives shoes. ", "Any rug."),  # duplicate
        pair("Which rug for a hallway?", "A washable cotton runner, easy to clean.", "A white shag rug."),
        pair("Which rug for a hallway?", "A flat-weave wool runner; it survives shoes.", "A silk rug."),
        chat("Which rug for a hallway?", "Wool."),
    ]
    write_jsonl(raw_dir / "pairs.jsonl", rows)
    params = PrepareParams(conflicts="reject", near_dedup=NearDedupParams(enabled=False))
    result = run(params=params)
    stats = result.stats
    duplicates = [json.loads(line) for line in result.duplicates_path.read_text().splitlines()]
    assert [(d["row"], d["duplicate_of_row"], d["kind"]) for d in duplicates] == [(2, 1, "exact")]
    # rows 1, 3 and 4 answer one prompt: pairs, not conflicting answers (the SFT row has no other SFT row)
    assert (stats.conflicting_answers, stats.rejected, stats.kept) == (0, 0, 4)
    assert sum(stats.pairs.values()) == 3
    reconciles(stats)


def test_near_duplicates_compare_prompt_and_chosen_as_sft_rows_do(raw_dir, gather):
    answer = "A flat-weave wool runner is best for a hallway: it survives shoes, lies flat and cleans easily."
    write_jsonl(
        raw_dir / "pairs.jsonl",
        [
            pair("Which rug suits a busy hallway?", answer, "Any rug."),
            pair("Which rug suits a busy hallway?", answer, "Silk."),
        ],
    )
    out = gather(params=PrepareParams(decontamination=DecontamParams(enabled=False)))
    assert [(d["row"], d["kind"]) for d in out.duplicates] == [(2, "near")]
    reconciles(out.stats)


# -- split and columns --------------------------------------------------------------------------------


def many_pairs(prompts: int = 40, per_prompt: int = 3) -> list[dict]:
    rows = []
    for p in range(prompts):
        for k in range(per_prompt):
            rows.append(
                pair(
                    f"Customer {p} asks: can order {10000 + 37 * p} still be changed?",
                    f"Yes, order {10000 + 37 * p} can be changed until it ships; variant {k} of the answer.",
                    f"No changes ever, reply {k} from the queue.",
                )
            )
    return rows


def test_a_prompt_s_pairs_stay_in_one_split(raw_dir, gather):
    write_jsonl(raw_dir / "pairs.jsonl", many_pairs())
    out = gather(params=PrepareParams(near_dedup=NearDedupParams(enabled=False)))
    sides = defaultdict(set)
    for split, rows in out.splits.items():
        for row in rows:
            sides[row["messages"][0]["content"]].add(split)
    assert len(sides) == 40 and all(len(s) == 1 for s in sides.values())
    assert len({s for (s,) in sides.values()}) == 3  # prompts do spread over train, validation and test
    assert out.stats.pairs == {s: len(out.splits[s]) for s in ("train", "validation", "test")}
    assert out.stats.groups["rows"] == 120
    reconciles(out.stats)


def test_pair_columns_render_the_rejected_conversation_as_an_sft_row(raw_dir, run, tokenizer):
    write_jsonl(
        raw_dir / "mixed.jsonl",
        [
            *many_pairs(12, 1),
            *(chat(f"Question {i} about lamp {i}?", f"Lamp {i} uses an E27 bulb.") for i in range(12)),
        ],
    )
    result = run()
    dd = datasets.load_from_disk(str(result.dataset_dir))
    assert all(split.features == STORE_FEATURES for split in dd.values())
    rows = [r for split in dd.values() for r in split]
    pairs = [r for r in rows if len(r["rejected_input_ids"]) > 0]
    sft = [r for r in rows if len(r["rejected_input_ids"]) == 0]
    assert len(pairs) == 12 and len(sft) == 12 and all(r["shape"] == "preference" for r in pairs)
    assert all((r["rejected"], r["rejected_labels"], r["n_rejected_tokens"]) == ("", [], 0) for r in sft)
    for r in pairs:
        messages = [Message(m["role"], m["content"]) for m in r["messages"]]
        chosen = render(messages, tokenizer)
        rejected = render([*messages[:-1], Message(A, r["rejected"])], tokenizer)
        assert (r["input_ids"], r["labels"]) == (chosen.input_ids, chosen.labels)
        assert (r["rejected_input_ids"], r["rejected_labels"]) == (rejected.input_ids, rejected.labels)
        assert r["n_rejected_tokens"] == len(r["rejected_input_ids"])
        trained = [t for t, lab in zip(r["rejected_input_ids"], r["rejected_labels"]) if lab != IGNORE_INDEX]
        assert tokenizer.decode(trained).replace(" ", "").startswith(r["rejected"].replace(" ", ""))
    stats = json.loads(result.stats_path.read_text())
    assert stats["pairs"] == {
        s: sum(1 for r in dd[s] if r["rejected_input_ids"]) for s in ("train", "validation", "test")
    }
    assert "- preference pairs (one kept row each" in result.card_path.read_text()


def test_a_tenant_without_pairs_keeps_its_columns_and_stats(raw_dir, run):
    write_jsonl(
        raw_dir / "a.jsonl", [chat(f"Question {i} about lamp {i}?", f"Lamp {i} uses an E27 bulb.") for i in range(8)]
    )
    write_jsonl(raw_dir / "bad_pairs.jsonl", [pair("Same?", "Yes.", "Yes.")])  # its only pair is rejected
    result = run()
    dd = datasets.load_from_disk(str(result.dataset_dir))
    assert all(split.features == CHAT_FEATURES for split in dd.values())
    assert not set(PREFERENCE_COLUMNS) & set(dd["train"].column_names)
    state = json.loads((result.dataset_dir / "train" / "state.json").read_text())
    assert state["_format_columns"] in (None, list(CHAT_FEATURES))
    stats = json.loads(result.stats_path.read_text())
    assert "pairs" not in stats and stats["rejected_by_reason"]["same_answers"] == 1
    assert "bad_pair" not in stats["rejected_by_reason"] and "no_pair" not in stats["rejected_by_reason"]
    assert "preference pairs" not in result.card_path.read_text()


def test_an_sft_only_tenant_lists_exactly_the_reasons_it_always_had(raw_dir, run):
    write_jsonl(raw_dir / "a.jsonl", [chat("Hi?", "Hello."), {"instruction": "x"}])
    stats = json.loads(run().stats_path.read_text())
    assert not {"same_answers", "bad_pair", "no_pair", "pairs"} & (set(stats) | set(stats["rejected_by_reason"]))


def test_worker_processes_give_the_same_pairs(tmp_path, tokenizer, monkeypatch):
    """Pairs and rated-list sources through spawned workers (their state pickled): every file the same."""
    from loraline.prepare.stage import prepare_tenant

    monkeypatch.setattr("loraline.prepare.rows.BATCH_ROWS", 8)
    monkeypatch.setattr("loraline.prepare.pool.INLINE_ITEMS", 1)
    monkeypatch.setattr("loraline.prepare.pool.START_METHOD", "spawn")
    raw = tmp_path / "raw"
    write_jsonl(raw / "pairs.jsonl", [*many_pairs(10, 2), *(chat(f"Lamp {i}?", f"E27, lamp {i}.") for i in range(10))])
    write_jsonl(raw / "ultra.jsonl", ULTRA * 3)
    tenant = ultra_tenant(raw)

    def files(name: str, num_proc: int) -> dict[str, bytes]:
        out = tmp_path / name
        prepare_tenant(
            tenant,
            PrepareParams(num_proc=num_proc),
            tokenizer,
            out_dir=out / "prepared",
            rejected_path=out / "rejected.jsonl",
            stats_path=out / "stats.json",
        )
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    one, spawned = files("one", 1), files("spawned", 2)
    assert one.keys() == spawned.keys() and [k for k in one if one[k] != spawned[k]] == []
    stats = json.loads(one["stats.json"])
    assert sum(stats["pairs"].values()) == 22 and stats["duplicates"] == 4  # ULTRA repeated: exact duplicates


def test_decontamination_compares_a_pair_s_prompt_and_chosen_with_the_test_split(raw_dir, gather):
    from loraline.config import SplitParams
    from loraline.prepare.preference import pair_group
    from loraline.prepare.split import split_key, split_of

    def pair_split(value: dict) -> str:
        record = parse(value).record
        return split_of(split_key(record.content_hash, pair_group(record, None)), SplitParams())

    def sft_split(value: dict) -> str:
        return split_of(parse(value).record.content_hash, SplitParams())

    answer = "Order {n} can be changed until it ships: open the order page and press change, then confirm by mail."
    found = {}
    for n in range(10000, 10400):
        prompt = f"Can I still change the address of order {n} before it leaves the warehouse today?"
        as_pair, as_chat = pair(prompt, answer.format(n=n), "No."), chat(prompt, answer.format(n=n))
        sides = (pair_split(as_pair), sft_split(as_chat))
        if sides in (("train", "test"), ("test", "train")) and sides not in found:
            found[sides] = (as_pair, as_chat)
        if len(found) == 2:
            break
    (pair_train, chat_test), (pair_test, chat_train) = found[("train", "test")], found[("test", "train")]
    write_jsonl(raw_dir / "rows.jsonl", [pair_train, chat_test, pair_test, chat_train])
    out = gather(params=PrepareParams(near_dedup=NearDedupParams(enabled=False)))
    assert sorted((c["row"], c["matched_test_row"]) for c in out.contaminated) == [(1, 2), (4, 3)]
    reconciles(out.stats)

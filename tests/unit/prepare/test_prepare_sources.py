"""tenants.<t>.sources: the common public layouts mapped in, every format read, nothing lost."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import zstandard
from prepare_helpers import write_jsonl

from loraline.config import ConfigError, PrepareParams, SourceParams, TenantParams, parse_params
from loraline.prepare.controls import ZERO_WIDTH_SPACE
from loraline.prepare.render import IGNORE_INDEX
from loraline.prepare.schema import RejectReason

GSM = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "12 * 2 = 24\n#### 24"},
    {"question": "Sara reads 5 pages a day. How many pages in 6 days?", "answer": "5 * 6 = 30\n#### 30"},
]
SEED_TASKS = [
    {
        "id": "seed_task_0",
        "name": "breakfast_suggestion",
        "instruction": "Suggest a healthy breakfast.",
        "instances": [{"input": "", "output": "Oatmeal with berries and yoghurt."}],
        "is_classification": False,
    },
    {
        "id": "seed_task_1",
        "name": "sentiment",
        "instruction": "Classify the sentiment of the sentence.",
        "instances": [
            {"input": "I loved the movie.", "output": "positive"},
            {"input": "The food was cold.", "output": "negative"},
        ],
        "is_classification": True,
    },
]


def _tenant(raw_dir: Path, *sources: dict) -> TenantParams:
    return TenantParams(name="acme", raw_dir=raw_dir, sources=[SourceParams(**s) for s in sources])


def _rows(out) -> list[dict]:
    return sorted(
        (r for s in out.splits.values() for r in s),
        key=lambda r: (r["source_file"], r["row"], r["messages"][0]["content"]),
    )


def _turns(row: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in row["messages"]]


def _reconciles(out) -> None:
    s = out.stats
    assert s.rows_in == s.kept + s.rejected + s.duplicates + s.near_duplicates + s.contaminated
    assert sum(e["rows_in"] for e in s.sources) == s.rows_in
    for e in s.sources:
        assert e["rows_in"] == sum(e[k] for k in ("kept", "rejected", "duplicates", "near_duplicates", "contaminated"))


def test_question_answer_rows_are_unknown_shape_until_mapped(raw_dir, gather):
    write_jsonl(raw_dir / "gsm8k" / "test.jsonl", GSM)
    unmapped = gather()
    assert [r.reason for r in unmapped.rejects] == [RejectReason.UNKNOWN_SHAPE] * 3

    out = gather(
        tenant=_tenant(raw_dir, {"path": "gsm8k/*.jsonl", "columns": {"instruction": "question", "output": "answer"}})
    )
    assert out.rejects == [] and out.stats.kept == 3
    assert [_turns(r) for r in _rows(out)] == [[("user", g["question"]), ("assistant", g["answer"])] for g in GSM]
    assert out.stats.sources == [
        {
            "path": "gsm8k/*.jsonl",
            "format": None,
            "files": 1,
            "rows_in": 3,
            "kept": 3,
            "rejected": 0,
            "duplicates": 0,
            "near_duplicates": 0,
            "contaminated": 0,
        },
    ]


def test_explode_makes_one_row_per_instance_with_the_parents_fields(raw_dir, gather):
    write_jsonl(raw_dir / "seed_tasks.jsonl", SEED_TASKS)
    source = {
        "path": "seed_tasks.jsonl",
        "explode": "instances",
        "columns": {"instruction": "instruction", "input": "item.input", "output": "item.output"},
    }
    out = gather(tenant=_tenant(raw_dir, source))
    assert out.rejects == [] and out.stats.rows_in == 3 and out.stats.kept == 3
    assert sorted(_turns(r) for r in _rows(out)) == sorted(
        [
            [("user", "Suggest a healthy breakfast."), ("assistant", "Oatmeal with berries and yoghurt.")],
            [("user", "Classify the sentiment of the sentence.\n\nI loved the movie."), ("assistant", "positive")],
            [("user", "Classify the sentiment of the sentence.\n\nThe food was cold."), ("assistant", "negative")],
        ]
    )
    _reconciles(out)


def test_a_bad_element_or_an_empty_list_is_one_reject_each_naming_row_and_item(raw_dir, gather):
    write_jsonl(
        raw_dir / "seeds.jsonl",
        [
            {"instruction": "Add the numbers.", "instances": [{"input": "2 3", "output": "5"}, {"input": "4 4"}]},
            {"instruction": "Nothing here.", "instances": []},
            {"instruction": "Not a list.", "instances": "oops"},
        ],
    )
    source = {
        "path": "*.jsonl",
        "explode": "instances",
        "columns": {"instruction": "instruction", "input": "item.input", "output": "item.output"},
    }
    out = gather(tenant=_tenant(raw_dir, source))
    by_row = {(r.row, r.reason) for r in out.rejects}
    assert by_row == {(1, RejectReason.MAPPING), (2, RejectReason.EMPTY_FIELD), (3, RejectReason.WRONG_TYPE)}
    mapping = next(r for r in out.rejects if r.reason == RejectReason.MAPPING)
    assert mapping.detail.startswith("seeds.jsonl row 1 item 1: columns.output: source path 'item.output' is missing")
    assert mapping.field == "instances"
    assert out.stats.rows_in == 4 and out.stats.kept == 1
    _reconciles(out)


@pytest.mark.parametrize("marker", ["<|endoftext|>", "</s>", "<|im_end|>"])
def test_trailing_end_of_text_markers_are_stripped_by_default(marker, raw_dir, gather):
    rows = [{"prompt": f"Say {w}", "completion": f" {w}{marker}"} for w in ("yes", "no", "maybe")]
    write_jsonl(raw_dir / "pc.jsonl", rows)
    out = gather()
    assert out.rejects == []
    assert sorted(_turns(r)[1][1] for r in _rows(out)) == ["maybe", "no", "yes"]


def test_control_token_policies(raw_dir, gather, tokenizer):
    write_jsonl(
        raw_dir / "pc.jsonl",
        [
            {"prompt": "Say hi", "completion": "hi<|endoftext|>"},
            {"prompt": "Explain <|im_start|> please", "completion": "It opens a turn."},
        ],
    )
    strip = gather(tenant=_tenant(raw_dir, {"path": "*", "control_tokens": "strip"}))
    assert [(r.row, r.reason) for r in strip.rejects] == [
        (2, RejectReason.CONTROL_TOKEN)
    ]  # inside the text: still rejected
    assert "escape keeps it as literal text" in strip.rejects[0].detail

    reject = gather(tenant=_tenant(raw_dir, {"path": "*", "control_tokens": "reject"}))
    assert sorted(r.row for r in reject.rejects) == [1, 2]

    escape = gather(tenant=_tenant(raw_dir, {"path": "*", "control_tokens": "escape"}))
    assert escape.rejects == []
    texts = {_turns(r)[0][1]: r for r in _rows(escape)}
    row = texts[f"Explain <{ZERO_WIDTH_SPACE}|im_start|> please"]
    # the escaped text never becomes a special token: the row has exactly the template's own markers
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert row["input_ids"].count(special) == 2

    default = gather(params=PrepareParams(control_tokens="reject"))  # prepare.control_tokens applies to unmapped files
    assert len(default.rejects) == 2


def test_templates_and_nested_paths(raw_dir, gather):
    write_jsonl(
        raw_dir / "squad.jsonl",
        [
            {
                "context": "The Nile flows north.",
                "question": "Which way does the Nile flow?",
                "answers": {"text": ["north"]},
            },
            {"context": "Paris is in France.", "question": "Where is Paris?", "answers": {"text": []}},
            {"context": "Water boils at 100 C.", "question": "At what temperature?", "answers": {"text": [100]}},
        ],
    )
    source = {
        "path": "squad.jsonl",
        "columns": {"instruction": "{context}\n\nQuestion: {question}", "output": "answers.text[0]"},
    }
    out = gather(tenant=_tenant(raw_dir, source))
    rows = {_turns(r)[0][1]: _turns(r)[1][1] for r in _rows(out)}
    assert rows == {
        "The Nile flows north.\n\nQuestion: Which way does the Nile flow?": "north",
        "Water boils at 100 C.\n\nQuestion: At what temperature?": "100",
    }
    (bad,) = out.rejects
    assert (bad.row, bad.reason, bad.field) == (2, RejectReason.MAPPING, "answers")
    assert "'answers.text[0]' is missing (answers.text has 0 elements)" in bad.detail


def test_a_canonical_field_error_names_the_source_path(raw_dir, gather):
    write_jsonl(raw_dir / "qa.jsonl", [{"q": "Anything?", "a": "   "}])
    out = gather(tenant=_tenant(raw_dir, {"path": "qa.jsonl", "columns": {"instruction": "q", "output": "a"}}))
    (bad,) = out.rejects
    assert bad.reason == RejectReason.EMPTY_FIELD and "field 'output (from a)'" in bad.detail


def test_roles_map_source_names_and_tool_turns_are_context_only(raw_dir, gather, tokenizer):
    dialog = [
        {"speaker": "human", "text": "What is the weather in Oslo?"},
        {"speaker": "bot", "text": "Let me check."},
        {"speaker": "function_response", "text": '{"temp": 3}'},
        {"speaker": "bot", "text": "It is 3 degrees."},
    ]
    write_jsonl(raw_dir / "tools.jsonl", [{"dialog": [{"from": d["speaker"], "value": d["text"]} for d in dialog]}])
    source = {
        "path": "tools.jsonl",
        "columns": {"conversations": "dialog"},
        "roles": {"human": "user", "bot": "assistant", "function_response": "tool"},
    }
    out = gather(tenant=_tenant(raw_dir, source))
    (row,) = _rows(out)
    assert [role for role, _ in _turns(row)] == ["user", "assistant", "tool", "assistant"]
    trained = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert "temp" not in trained and "It is 3 degrees." in trained and "Let me check." in trained

    unmapped = gather(tenant=_tenant(raw_dir, {"path": "tools.jsonl", "columns": {"conversations": "dialog"}}))
    (bad,) = unmapped.rejects
    assert bad.reason == RejectReason.UNKNOWN_ROLE and "roles:" in bad.detail


def test_numbers_become_text(raw_dir, gather):
    write_jsonl(raw_dir / "math.jsonl", [{"problem": "2 + 2", "solution": 4}, {"problem": "1 / 2", "solution": 0.5}])
    out = gather(
        tenant=_tenant(raw_dir, {"path": "*.jsonl", "columns": {"prompt": "problem", "completion": "solution"}})
    )
    assert sorted(_turns(r)[1][1] for r in _rows(out)) == ["0.5", "4"]


def test_first_matching_entry_wins_and_unmatched_files_are_detected(raw_dir, gather):
    write_jsonl(raw_dir / "qa" / "a.jsonl", [{"q": "One?", "a": "1"}])
    write_jsonl(raw_dir / "qa" / "b.jsonl", [{"question": "Two?", "answer": "2"}])
    write_jsonl(raw_dir / "alpaca.jsonl", [{"instruction": "Three?", "output": "3"}])
    out = gather(
        tenant=_tenant(
            raw_dir,
            {"path": "qa/a.jsonl", "columns": {"instruction": "q", "output": "a"}},
            {"path": "**/*.jsonl", "columns": {"instruction": "question", "output": "answer"}},
        )
    )
    assert [(e["path"], e["files"], e["kept"], e["rejected"]) for e in out.stats.sources] == [
        ("qa/a.jsonl", 1, 1, 0),
        ("**/*.jsonl", 2, 1, 1),
    ]
    (bad,) = out.rejects  # alpaca.jsonl matched ** too: its row lacks 'question'
    assert bad.source_file == "alpaca.jsonl" and bad.reason == RejectReason.MAPPING

    out = gather(
        tenant=_tenant(raw_dir, {"path": "qa/*.jsonl", "columns": {"instruction": "{q}{question}", "output": "a"}})
    )
    assert [e["path"] for e in out.stats.sources] == ["qa/*.jsonl", "(detected)"]
    assert out.stats.sources[1]["kept"] == 1  # alpaca.jsonl, by shape detection
    _reconciles(out)


def _hf_rows():
    return [{"instruction": f"Say {w}", "output": w} for w in ("one", "two", "three")]


def test_hf_save_to_disk_folders_are_sources(raw_dir, gather):
    datasets.Dataset.from_list(_hf_rows()).save_to_disk(str(raw_dir / "single"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_hf_rows()[:2]),
            "test": datasets.Dataset.from_list([{"instruction": "Say four", "output": "four"}]),
        }
    ).save_to_disk(str(raw_dir / "dd"))
    out = gather()
    assert out.rejects == []
    assert sorted(out.stats.by_file) == ["dd/test", "dd/train", "single"]
    assert out.stats.by_file["single"]["rows_in"] == 3 and out.stats.kept == 4  # dd/train repeats two rows of single
    assert out.stats.duplicates == 2


def test_a_mapped_hf_folder(raw_dir, gather):
    datasets.Dataset.from_list([{"meta": {"q": "Capital of Peru?"}, "a": "Lima"}]).save_to_disk(str(raw_dir / "geo"))
    out = gather(
        tenant=_tenant(raw_dir, {"path": "geo", "format": "hf", "columns": {"instruction": "meta.q", "output": "a"}})
    )
    assert [_turns(r) for r in _rows(out)] == [[("user", "Capital of Peru?"), ("assistant", "Lima")]]


def test_compressed_tsv_and_arrow_files(raw_dir, gather):
    lines = "".join(json.dumps(r) + "\n" for r in _hf_rows()).encode()
    (raw_dir / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (raw_dir / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.replace(b"Say", b"Tell")))
    (raw_dir / "c.tsv").write_text("instruction\toutput\nSay, with a comma\tok\n", encoding="utf-8")
    (raw_dir / "d.csv.gz").write_bytes(gzip.compress(b'instruction,output\n"Quoted, cell",fine\n'))
    table = pa.Table.from_pylist([{"instruction": "Arrow file", "output": "yes"}])
    with pa.ipc.new_file(str(raw_dir / "e.arrow"), table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_stream(str(raw_dir / "f.arrow"), table.schema) as w:
        w.write_table(pa.Table.from_pylist([{"instruction": "Arrow stream", "output": "yes"}]))
    out = gather()
    assert out.rejects == []
    assert {f: c["kept"] for f, c in out.stats.by_file.items()} == {
        "a.jsonl.gz": 3,
        "b.jsonl.zst": 3,
        "c.tsv": 1,
        "d.csv.gz": 1,
        "e.arrow": 1,
        "f.arrow": 1,
    }


def test_a_truncated_gzip_keeps_its_rows_and_rejects_the_rest(raw_dir, gather):
    lines = "".join(
        json.dumps({"instruction": f"Row {i}", "output": f"answer {i}"}) + "\n" for i in range(2000)
    ).encode()
    (raw_dir / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:-200])
    out = gather(params=PrepareParams(near_dedup={"enabled": False}, decontamination={"enabled": False}))
    (bad,) = out.rejects
    assert (
        bad.reason == RejectReason.UNREADABLE_FILE
        and bad.row is None
        and "cannot be read as jsonl after row" in bad.detail
    )
    assert out.stats.kept > 1000
    _reconciles(out)


def test_json_lines_named_json_and_a_top_level_object_with_explode(raw_dir, gather):
    (raw_dir / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in _hf_rows()), encoding="utf-8")
    (raw_dir / "squad.json").write_text(json.dumps({"version": "1.1", "data": [{"q": "Why?", "a": "Because."}]}))
    out = gather(
        tenant=_tenant(
            raw_dir,
            {"path": "squad.json", "explode": "data", "columns": {"instruction": "item.q", "output": "item.a"}},
        )
    )
    assert (
        out.rejects == []
        and out.stats.by_file["lines.json"]["kept"] == 3
        and out.stats.by_file["squad.json"]["kept"] == 1
    )


@pytest.mark.parametrize(
    "source, message",
    [
        ({"path": "*", "columns": {"answer": "a", "output": "b"}}, "unknown canonical field(s) answer"),
        ({"path": "*", "columns": {"instruction": "meta..q", "output": "a"}}, "expected a key name at character 5"),
        ({"path": "*", "columns": {"instruction": "{{question}}", "output": "a"}}, "has no {placeholder}"),
        ({"path": "*", "columns": {"instruction": "q", "output": "item.a"}}, "addresses item, which needs explode"),
        ({"path": "*", "columns": {"output": "a"}}, "no single shape"),
        ({"path": "../elsewhere/*"}, "relative to the tenant's raw_dir"),
        ({"path": "*", "format": "xlsx"}, "format"),
        ({"path": "*", "roles": {"bot": "robot"}}, "roles.bot"),
    ],
)
def test_mapping_mistakes_fail_in_params_before_any_file_is_read(source, message):
    data = {"tenants": {"acme": {"raw_dir": "does/not/exist", "sources": [source]}}}
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    assert "tenants.acme.sources.0" in str(err.value) and message in str(err.value)

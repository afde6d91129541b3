"""`loraline inspect`: key statistics, shapes, and suggested sources: entries that really map the rows."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml
from prepare_helpers import write_jsonl

from loraline.cli import main
from loraline.config import SourceParams, TenantParams
from loraline.inspection import default_cleaner, inspect_path, report_text

GSM = [
    {
        "question": f"Natalia sold clips to {n} friends, then half as many more. How many in all?",
        "answer": f"{n} / 2 = {n // 2}\n{n} + {n // 2} = {n + n // 2}\n#### {n + n // 2}",
    }
    for n in range(10, 40, 2)
]
SEEDS = [
    {
        "id": "seed_task_0",
        "name": "breakfast",
        "instruction": "Is there anything I can eat for a breakfast that doesn't include eggs?",
        "instances": [{"input": "", "output": "Yes: oatmeal, yoghurt with fruit, or toast with peanut butter."}],
        "is_classification": False,
    },
    {
        "id": "seed_task_1",
        "name": "sentiment",
        "instruction": "Classify the sentiment of the review.",
        "instances": [
            {"input": "Great value, would buy again.", "output": "positive"},
            {"input": "Broke after a day.", "output": "negative"},
        ],
        "is_classification": True,
    },
    {
        "id": "seed_task_2",
        "name": "antonym",
        "instruction": "Give the antonym of the word.",
        "instances": [{"input": "hot", "output": "cold"}],
        "is_classification": False,
    },
]


def _pasted(report: str, heading: str = "Suggested entry") -> dict:
    """The suggested block exactly as printed, read back as YAML (what a user pastes)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if heading in line) + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("     ") or line.lstrip().startswith("| "):
            break
        block.append(line)
    return yaml.safe_load(textwrap.dedent("\n".join(block)))


def _gather_with(gather, raw_dir: Path, report: str):
    sources = _pasted(report)["sources"]
    return gather(tenant=TenantParams(name="acme", raw_dir=raw_dir, sources=[SourceParams(**s) for s in sources]))


def test_question_answer_file_gets_a_mapping_that_keeps_every_row(raw_dir, gather, tokenizer):
    write_jsonl(raw_dir / "gsm8k" / "test.jsonl", GSM)
    (result,) = inspect_path(raw_dir / "gsm8k" / "test.jsonl", raw_dir, clean=default_cleaner(tokenizer))
    assert (result.format, result.rows, result.shapes) == ("jsonl", len(GSM), {"rejected: unknown_shape": len(GSM)})
    assert {k: (dict(s.types), s.filled) for k, s in result.keys.items()} == {
        "question": ({"string": len(GSM)}, len(GSM)),
        "answer": ({"string": len(GSM)}, len(GSM)),
    }
    assert result.suggestion == {
        "path": "gsm8k/test.jsonl",
        "columns": {"instruction": "question", "output": "answer"},
    }
    report = report_text([result], tokenizer)
    out = _gather_with(gather, raw_dir, report)
    assert out.rejects == [] and out.stats.kept == len(GSM)
    assert "«" + GSM[0]["answer"].split("\n")[0] in report  # the trained part of a sample is marked


def test_instances_file_gets_an_explode_mapping_that_keeps_every_instance(raw_dir, gather, tokenizer):
    write_jsonl(raw_dir / "seed_tasks.jsonl", SEEDS)
    (result,) = inspect_path(raw_dir / "seed_tasks.jsonl", raw_dir)
    assert result.suggestion == {
        "path": "seed_tasks.jsonl",
        "explode": "instances",
        "columns": {"instruction": "instruction", "input": "item.input", "output": "item.output"},
    }
    assert result.keys["instances[].input"].filled == 2 and result.keys["is_classification"].types == {"boolean": 3}
    out = _gather_with(gather, raw_dir, report_text([result], tokenizer))
    assert out.rejects == [] and out.stats.rows_in == 4 and out.stats.kept == 4


def test_context_question_answers_gets_a_template(raw_dir, gather, tokenizer):
    rows = [
        {
            "context": f"Fact {i}: the sky is blue at noon.",
            "question": f"What colour is the sky ({i})?",
            "answers": {"text": ["blue"], "answer_start": [20]},
        }
        for i in range(5)
    ]
    write_jsonl(raw_dir / "squad.jsonl", rows)
    (result,) = inspect_path(raw_dir / "squad.jsonl", raw_dir)
    assert result.suggestion["columns"] == {"instruction": "{context}\n\n{question}", "output": "answers.text[0]"}
    out = _gather_with(gather, raw_dir, report_text([result], tokenizer))
    assert out.stats.kept == 5 and out.rejects == []


def test_an_often_empty_context_becomes_an_optional_input(raw_dir, gather, tokenizer):
    rows = [
        {
            "instruction": f"Name a colour ({i}).",
            "context": "" if i % 3 else f"Paint shop {i}.",
            "response": "Blue.",
            "category": "open_qa",
        }
        for i in range(6)
    ]
    write_jsonl(raw_dir / "dolly.jsonl", rows)
    (result,) = inspect_path(raw_dir / "dolly.jsonl", raw_dir)
    assert result.suggestion["columns"] == {"instruction": "instruction", "input": "context", "output": "response"}
    out = _gather_with(gather, raw_dir, report_text([result], tokenizer))
    users = sorted(r["messages"][0]["content"] for s in out.splits.values() for r in s)
    assert out.stats.kept == 6 and "Name a colour (0).\n\nPaint shop 0." in users and "Name a colour (1)." in users


def test_unknown_roles_get_a_roles_mapping(raw_dir, gather, tokenizer):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"Weather {i}?"},
                {"from": "function_response", "value": "{}"},
                {"from": "bot", "value": f"Sunny {i}."},
            ]
        }
        for i in range(3)
    ]
    write_jsonl(raw_dir / "chat.jsonl", rows)
    (result,) = inspect_path(raw_dir / "chat.jsonl", raw_dir)
    assert result.suggestion["roles"] == {"function_response": "tool", "bot": "assistant"}
    assert _gather_with(gather, raw_dir, report_text([result], tokenizer)).stats.kept == 3


def test_rows_that_already_fit_get_no_suggestion_and_unreadable_files_are_reported(raw_dir, tokenizer):
    write_jsonl(raw_dir / "ok.jsonl", [{"instruction": "Hi", "output": "Hello"}, {"text": "a document"}])
    (raw_dir / "broken.json").write_text("[{", encoding="utf-8")
    broken, ok = inspect_path(raw_dir)
    assert ok.suggestion is None and ok.shapes == {"instruction": 1, "document": 1}
    assert broken.rows == 0 and "not valid JSON" in broken.unreadable[0]
    assert "unreadable" in report_text([broken, ok], tokenizer)


def test_cli_inspect_prints_the_report(raw_dir, tmp_path, capsys, monkeypatch):
    write_jsonl(raw_dir / "qa.jsonl", GSM[:3])
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"tenants": {"acme": {"raw_dir": str(raw_dir)}}}))
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(raw_dir / "qa.jsonl"), "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "qa.jsonl  (format: jsonl, 3 rows)" in out and "instruction: question" in out and "«" in out


# -- preference data (issue 41) --------------------------------------------------------------------

HH = [
    {
        "chosen": f"\n\nHuman: Can I return lamp {i} late?\n\nAssistant: Yes, within 60 days with the receipt.",
        "rejected": f"\n\nHuman: Can I return lamp {i} late?\n\nAssistant: No returns, ever.",
    }
    for i in range(4)
]
ULTRA = [
    {
        "source": "evol_instruct",
        "instruction": f"Write a one-line apology for late order {10000 + i}.",
        "models": ["a", "b"],
        "completions": [
            {
                "model": "a",
                "response": f"We are sorry order {10000 + i} is late; shipping is refunded.",
                "overall_score": 8,
            },
            {"model": "b", "response": "Late orders happen.", "overall_score": 2.5},
        ],
    }
    for i in range(4)
]


def test_hh_rows_are_preference_pairs_and_samples_show_both_answers(raw_dir, tokenizer):
    write_jsonl(raw_dir / "hh.jsonl", HH)
    (result,) = inspect_path(raw_dir / "hh.jsonl", raw_dir)
    assert result.shapes == {"preference": 4} and result.suggestion is None and result.preference is None
    report = report_text([result], tokenizer)
    assert "4 rows are preference pairs (chosen and rejected answers)" in report
    assert (
        "«Yes, within 60 days with the receipt." in report and "rejected answer:\n     | No returns, ever." in report
    )


def test_rated_answers_get_a_preference_entry_that_makes_pairs(raw_dir, gather, tokenizer):
    write_jsonl(raw_dir / "ultra.jsonl", ULTRA)
    (result,) = inspect_path(raw_dir / "ultra.jsonl", raw_dir, clean=default_cleaner(tokenizer))
    assert result.preference == {
        "path": "ultra.jsonl",
        "columns": {"prompt": "instruction"},
        "preference": {"list": "completions", "answer": "response", "score": "overall_score"},
    }
    assert result.preference_fits == (4, 4)
    report = report_text([result], tokenizer)
    sources = _pasted(report, "Suggested preference entry")["sources"]
    out = gather(tenant=TenantParams(name="acme", raw_dir=raw_dir, sources=[SourceParams(**s) for s in sources]))
    rows = [r for split in out.splits.values() for r in split]
    assert len(rows) == 4 and {r["rejected"] for r in rows} == {"Late orders happen."}


def test_renamed_chosen_and_rejected_answers_get_a_mapping(raw_dir, gather, tokenizer):
    rows = [
        {"question": f"Best bulb for lamp {i}?", "response_j": "An E27 LED.", "response_k": "Any."} for i in range(3)
    ]
    write_jsonl(raw_dir / "se.jsonl", rows)
    (result,) = inspect_path(raw_dir / "se.jsonl", raw_dir)
    assert result.preference == {
        "path": "se.jsonl",
        "columns": {"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    }
    sources = _pasted(report_text([result], tokenizer), "Suggested preference entry")["sources"]
    out = gather(tenant=TenantParams(name="acme", raw_dir=raw_dir, sources=[SourceParams(**s) for s in sources]))
    assert out.stats.by_shape == {"preference": 3}

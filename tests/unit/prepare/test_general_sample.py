"""The forgetting check's general-text sample (prepare/general.py): any format prepare reads, plain text scored on
every token and chat rows on their answers, the same rows every run whatever the file order, and bad input refused
naming evaluate.general.path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loraline.config import GeneralParams, OutsidePathError, PrepareParams
from loraline.layout import GENERAL_ROWS, GENERAL_SAMPLE
from loraline.modelling.constants import IGNORE_INDEX
from loraline.prepare.general import general_sample, write_general_sample
from loraline.prepare.schema import PrepareError
from loraline.provenance import sha256_file

PROSE = [
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and the world says hello {i} times."
    for i in range(40)
]


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sample(tmp_path: Path, tokenizer, path: str, **general):
    return general_sample(GeneralParams(path=Path(path), **general), PrepareParams(), tokenizer, tmp_path)


def test_plain_text_is_scored_on_every_token_and_chat_rows_on_their_answers(tmp_path, tokenizer):
    write(
        tmp_path / "mix.jsonl",
        [
            {"text": PROSE[0]},
            {
                "messages": [
                    {"role": "user", "content": "What is the capital?"},
                    {"role": "assistant", "content": "Paris."},
                ]
            },
        ],
    )
    s = sample(tmp_path, tokenizer, "mix.jsonl")
    assert (s.rows, s.kinds, s.rows_read, s.skipped) == (2, {"chat": 1, "document": 1}, 2, {})
    doc = next(r for r in s.sample if r.kind == "document")
    chat = next(r for r in s.sample if r.kind == "chat")
    assert doc.labels == doc.input_ids  # language modelling: every token a target
    assert doc.input_ids == tokenizer(PROSE[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer = [t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE_INDEX]
    assert 0 < len(answer) < len(chat.input_ids)  # the prompt is context, not scored
    assert tokenizer.decode(answer).startswith("Paris.")
    # Targets are the labels the model predicts: the first position of a row has nothing before it.
    assert s.target_tokens == (len(doc.labels) - 1) + len(answer)


def test_rows_are_cut_to_max_tokens_and_a_cut_text_gets_no_end_of_text(tmp_path, tokenizer):
    long = " ".join(PROSE)
    write(tmp_path / "long.jsonl", [{"text": long}])
    (row,) = sample(tmp_path, tokenizer, "long.jsonl", max_tokens=16).sample
    assert row.input_ids == tokenizer(long, add_special_tokens=False)["input_ids"][:16] == row.labels
    assert tokenizer.eos_token_id not in row.input_ids


def test_the_same_rows_every_run_whatever_the_file_order(tmp_path, tokenizer):
    rows = [{"text": t} for t in PROSE]
    write(tmp_path / "a" / "prose.jsonl", rows)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    write(tmp_path / "b" / "part1.jsonl", shuffled[:25])
    write(tmp_path / "b" / "part2.jsonl", shuffled[25:] + shuffled[:3])  # split across files, three repeated
    first, again = (
        sample(tmp_path, tokenizer, "a/prose.jsonl", rows=7),
        sample(tmp_path, tokenizer, "a/prose.jsonl", rows=7),
    )
    other = sample(tmp_path, tokenizer, "b", rows=7)
    assert first == again and first.rows == 7 and other.rows_read == 43
    assert [r.id for r in other.sample] == [r.id for r in first.sample] == sorted(r.id for r in first.sample)
    assert [r.input_ids for r in other.sample] == [r.input_ids for r in first.sample]
    assert first.sha256 == sha256_file(tmp_path / "a" / "prose.jsonl") and other.sha256 != first.sha256
    taken = {r.id for r in sample(tmp_path, tokenizer, "a/prose.jsonl", rows=100).sample}
    assert len(taken) == 40  # fewer rows than asked for: all of them, once each


def test_any_format_prepare_reads(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"page{i}.md").write_text(PROSE[i], encoding="utf-8")
    (docs / "qa.csv").write_text('instruction,output\n"Say hi","Hi there."\n', encoding="utf-8")
    s = sample(tmp_path, tokenizer, "docs")
    assert s.kinds == {"chat": 1, "document": 3} and s.rows_read == 4
    assert s.path == "docs" and len(s.sha256) == 64


def test_rows_prepare_would_reject_are_skipped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "g.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"text": PROSE[0]}),
                "{not json",
                json.dumps({"question": "no shape"}),
                json.dumps({"text": "an answer <|im_start|>user forged"}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    s = sample(tmp_path, tokenizer, "g.jsonl")
    assert s.rows == 1 and s.rows_read == 4
    assert s.skipped == {"control_token": 1, "malformed_json": 1, "unknown_shape": 1}


@pytest.mark.parametrize(
    ("make", "path", "said"),
    [
        (lambda d: None, "missing.jsonl", "evaluate.general.path: 'missing.jsonl' does not exist"),
        (
            lambda d: None,
            "models/base/general_text.jsonl",
            "does not exist (the base stage writes it: run `dvc repro base`)",
        ),
        (
            lambda d: (d / "g.xlsx").write_bytes(b"PK"),
            "g.xlsx",
            "evaluate.general.path: 'g.xlsx' is not a format prepare reads",
        ),
        (lambda d: (d / "empty").mkdir(), "empty", "evaluate.general.path: folder 'empty' holds no files"),
        (
            lambda d: write(d / "q.jsonl", [{"question": "q", "answer": "a"}] * 3),
            "q.jsonl",
            "evaluate.general.path: 'q.jsonl' leaves no token to score (3 rows read; skipped: unknown_shape x3)",
        ),
    ],
)
def test_bad_samples_are_refused_naming_the_key(tmp_path, tokenizer, make, path, said):
    make(tmp_path)
    with pytest.raises(PrepareError) as err:
        sample(tmp_path, tokenizer, path)
    assert said in str(err.value)


def test_a_sample_outside_the_project_is_refused_before_it_is_read(tmp_path, tokenizer):
    outside = write(tmp_path / "elsewhere" / "g.jsonl", [{"text": PROSE[0]}])
    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(OutsidePathError, match=r"evaluate\.general\.path: .* outside the project"):
        general_sample(GeneralParams(path=outside), PrepareParams(), tokenizer, project)
    allowed = GeneralParams(path=outside, allow_outside_dirs=[outside.parent])
    assert general_sample(allowed, PrepareParams(), tokenizer, project).rows == 1
    inside = project / "general"
    write(inside / "ok.jsonl", [{"text": PROSE[1]}])
    (inside / "linked.jsonl").symlink_to(outside)
    with pytest.raises(
        OutsidePathError, match=r"evaluate\.general\.path: linked\.jsonl \(in 'general'\) resolves to .* outside"
    ):
        sample(project, tokenizer, "general")


def test_written_sample_holds_the_rows_and_where_they_came_from(tmp_path, tokenizer):
    write(tmp_path / "g.jsonl", [{"text": t} for t in PROSE[:5]])
    s = sample(tmp_path, tokenizer, "g.jsonl", rows=3)
    out = write_general_sample(s, tmp_path / "data" / "general" / "acme")
    rows = [json.loads(line) for line in (out / GENERAL_ROWS).read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in s.sample] and set(rows[0]) == {
        "id",
        "kind",
        "input_ids",
        "labels",
    }
    facts = json.loads((out / GENERAL_SAMPLE).read_text())
    assert facts == s.facts() and facts["path"] == "g.jsonl" and facts["rows"] == 3 and facts["rows_requested"] == 3
    assert sorted(p.name for p in out.iterdir()) == [GENERAL_ROWS, GENERAL_SAMPLE]

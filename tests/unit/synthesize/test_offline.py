"""The offline generator through the stage: determinism, grounding, provenance, variety, seed tasks."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from synth_helpers import normalized

from loraline.config import SeedTask, SynthesizeParams
from loraline.synthesize import synthesize_tenant
from loraline.synthesize.filters import grounding
from loraline.synthesize.offline import OfflineGenerator
from loraline.synthesize.passages import make_document

PROVENANCE = {
    "generator",
    "model",
    "prompt_template_sha256",
    "source",
    "document_sha256",
    "span",
    "seed",
    "seed_tasks",
    "method",
}


def run(documents: Path, out: Path, seed: int = 7, **kwargs):
    return synthesize_tenant(
        "lampwick",
        kwargs.pop("params", SynthesizeParams()),
        documents,
        out / "synthetic",
        out / "stats.json",
        seed=seed,
        **kwargs,
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_bytes_other_seed_differs(documents: Path, tmp_path: Path) -> None:
    a, b, c = (run(documents, tmp_path / name, seed=s) for name, s in (("a", 7), ("b", 7), ("c", 8)))
    assert a.rows_path.read_bytes() == b.rows_path.read_bytes()
    assert a.rows_path.read_bytes() != c.rows_path.read_bytes()


def test_rows_have_the_contract_shape_and_full_provenance(documents: Path, tmp_path: Path) -> None:
    result = run(documents, tmp_path)
    out = rows(result.rows_path)
    assert out and len({r["id"] for r in out}) == len(out)
    for row in out:
        assert set(row) == {"id", "messages", "provenance"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in row["messages"])
        prov = row["provenance"]
        assert set(prov) == PROVENANCE
        assert prov["generator"] == "offline" and prov["model"] is None and prov["seed"] == 7
        assert len(prov["prompt_template_sha256"]) == 64
        assert prov["source"] in ("faq.md", "returns_policy.md")


def test_every_answer_is_grounded_in_its_span(documents: Path, tmp_path: Path) -> None:
    for row in rows(run(documents, tmp_path).rows_path):
        prov = row["provenance"]
        text = (documents / prov["source"]).read_text(encoding="utf-8")
        start, end = prov["span"]
        span = text[start:end]
        answer = row["messages"][1]["content"]
        assert grounding(answer, span) == 1.0, (answer, span)
        if not prov["method"].startswith("list"):  # a list of keys is its words, not one substring
            assert normalized(answer) in normalized(span), (answer, span)


def test_counts_reconcile_and_stats_describe_the_run(documents: Path, tmp_path: Path) -> None:
    result = run(documents, tmp_path)
    stats = json.loads(result.stats_path.read_text())
    kept, rejected = rows(result.rows_path), rows(result.rejected_path)
    assert stats["generated"] == len(kept) + len(rejected) == stats["kept"] + stats["rejected"]
    assert stats["rejected"] == sum(stats["rejected_by_reason"].values())
    assert set(stats["documents"]) == {"faq.md", "returns_policy.md"}
    assert stats["by_generator"]["offline"]["kept"] == len(kept)
    assert sum(d["generated"] for d in stats["by_document"].values()) == stats["generated"]
    assert stats["params"]["generator"] == "offline" and len(stats["code"]["sha256"]) == 64


def test_questions_vary(documents: Path, tmp_path: Path) -> None:
    out = rows(run(documents, tmp_path).rows_path)
    per_answer = defaultdict(set)
    for r in out:
        per_answer[r["messages"][1]["content"]].add(r["messages"][0]["content"])
    assert sum(len(q) >= 2 for q in per_answer.values()) >= len(per_answer) // 2  # several phrasings per fact
    kinds = Counter(r["provenance"]["method"].split(":")[0] for r in out)
    assert {"faq", "number", "yesno", "kv", "step", "section", "meta"} <= set(kinds)
    questions = [r["messages"][0]["content"] for r in out]
    assert len(set(questions)) >= 0.9 * len(questions)
    assert any(q.startswith(("Hi,", "Hello!", "Quick question")) for q in questions)  # politeness
    assert any(q == q.lower() for q in questions)  # casual casing
    assert any(re.search(r"(^|, |: |! )within how many days can i\b", q, re.I) for q in questions)  # word order


def test_seed_tasks_lend_their_framing(documents: Path, tmp_path: Path) -> None:
    seeds = [
        SeedTask(instruction="Customer email: where is my parcel?", output="It ships tomorrow."),
        SeedTask(instruction="hey can i pay by card", output="Yes."),
    ]
    out = rows(run(documents, tmp_path, seed_tasks=seeds).rows_path)
    framed = [r for r in out if r["provenance"]["seed_tasks"] == [0]]
    lower = [r for r in out if r["provenance"]["seed_tasks"] == [1]]
    assert framed and all(r["messages"][0]["content"].startswith("Customer email: ") for r in framed)
    assert lower and all(r["messages"][0]["content"] == r["messages"][0]["content"].lower() for r in lower)
    assert any(not r["provenance"]["seed_tasks"] for r in out)


def test_max_rows_per_document_caps_generation(documents: Path, tmp_path: Path) -> None:
    result = run(documents, tmp_path, params=SynthesizeParams(max_rows_per_document=4))
    assert all(d["generated"] <= 4 for d in result.stats["by_document"].values())


@pytest.mark.parametrize("tenant", ["acme-shop", "globex-it"])
def test_sample_documents_give_dozens_of_rows(tenant: str) -> None:
    root = Path(__file__).resolve().parents[3] / "data" / "raw" / tenant
    gen = OfflineGenerator(questions_per_fact=3)
    n = 0
    for path in sorted(root.glob("*")):
        if path.suffix in (".md", ".txt"):
            n += sum(1 for _ in gen.generate(make_document(path.name, path.read_text(encoding="utf-8"), "-"), 1234))
    assert 36 <= n <= 300

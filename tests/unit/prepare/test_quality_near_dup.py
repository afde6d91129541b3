"""Near-duplicates: paraphrases are caught (first row kept), distinct rows are kept, results repeat."""

from __future__ import annotations

import json

from prepare_helpers import chat, ticket, write_jsonl

from loraline.config import DecontamParams, NearDedupParams, PrepareParams
from loraline.prepare.quality.near_dup import NearDuplicateIndex

# Decontamination off here: a paraphrase landing in the test split would otherwise remove its
# train original first (tested in test_quality_decontam.py).
NO_DECONTAM = PrepareParams(decontamination=DecontamParams(enabled=False))


def test_index_catches_a_paraphrase_and_keeps_the_first():
    index = NearDuplicateIndex(NearDedupParams())
    original = " ".join(ticket(1))
    assert index.check("a", original) is None
    match = index.check("b", " ".join(ticket(1, variant=1)))  # one word changed in ~50
    assert match is not None and match.kept_key == "a" and 0.85 <= match.jaccard < 1
    same_words = original.upper().replace(",", " ;")  # case and punctuation only
    assert index.check("c", same_words).jaccard == 1.0
    assert len(index) == 1


def test_index_keeps_distinct_rows_of_one_template():
    index = NearDuplicateIndex(NearDedupParams())
    assert all(index.check(str(i), " ".join(ticket(i))) is None for i in range(40))
    assert len(index) == 40


def test_signatures_are_seeded_and_deterministic():
    text = " ".join(ticket(3))
    a, b = NearDuplicateIndex(NearDedupParams(), seed=7), NearDuplicateIndex(NearDedupParams(), seed=7)
    assert (a.signature(text) == b.signature(text)).all()
    other = NearDuplicateIndex(NearDedupParams(), seed=8)
    assert not (a.signature(text) == other.signature(text)).all()


def test_add_false_defers_keeping():
    index = NearDuplicateIndex(NearDedupParams())
    text = " ".join(ticket(2))
    assert index.check("a", text, add=False) is None and len(index) == 0
    index.add("a")
    assert index.check("b", text).kept_key == "a"


def test_prepare_lists_near_duplicates_with_the_kept_row_and_jaccard(raw_dir, gather):
    rows = [chat(*ticket(i)) for i in range(12)]
    rows.insert(5, chat(*ticket(2, variant=1)))  # row 6: paraphrase of row 3
    rows.append(chat(*ticket(7, variant=2)))  # row 14: paraphrase of row 9
    write_jsonl(raw_dir / "a.jsonl", rows)
    out = gather(params=NO_DECONTAM)
    near = [d for d in out.duplicates if d["kind"] == "near"]
    assert [(d["row"], d["duplicate_of_row"]) for d in near] == [(6, 3), (14, 9)]
    kept_ids = {r["id"] for s in out.splits.values() for r in s}
    assert all(d["duplicate_of_id"] in kept_ids and 0.85 <= d["jaccard"] <= 1 for d in near)
    assert out.stats.near_duplicates == 2 and out.stats.kept == 12
    assert out.stats.by_file["a.jsonl"]["near_duplicates"] == 2
    json.dumps(near)  # plain JSON for duplicates.jsonl


def test_disabled_keeps_paraphrases(raw_dir, gather):
    write_jsonl(raw_dir / "a.jsonl", [chat(*ticket(1)), chat(*ticket(1, variant=1))])
    params = NO_DECONTAM.model_copy(update={"near_dedup": NearDedupParams(enabled=False)})
    out = gather(params=params)
    assert out.stats.near_duplicates == 0 and out.stats.kept == 2


def test_same_input_same_decisions(raw_dir, gather):
    rows = [chat(*ticket(i, variant=i % 2)) for i in range(10)] + [chat(*ticket(i)) for i in range(10)]
    write_jsonl(raw_dir / "a.jsonl", rows)
    first, second = gather(params=NO_DECONTAM), gather(params=NO_DECONTAM)
    assert first.duplicates == second.duplicates and len(first.duplicates) == 10


def test_rows_sharing_a_passage_with_different_answers_are_not_near_duplicates(raw_dir, gather):
    """Issue 37: a long shared passage made rows asking different questions look alike (Jaccard > 0.9)."""
    passage = " ".join(ticket(i)[0] for i in range(4))  # ~120 words shared by every row
    rows = [
        chat(f"{passage}\nQuestion {q}: which order is meant?", f"Order {10000 + q * 37}, answer number {q}.")
        for q in range(5)
    ]
    rows.append(
        chat(f"{passage}\nQuestion 0: which order is meant?", f"Order {10000}, answer number 0!")
    )  # row 6: a copy of row 1
    write_jsonl(raw_dir / "a.jsonl", rows)
    out = gather(params=NO_DECONTAM)
    assert [(d["row"], d["duplicate_of_row"]) for d in out.duplicates if d["kind"] == "near"] == [(6, 1)]
    assert out.stats.kept == 5


def test_index_compares_answers_when_given():
    index = NearDuplicateIndex(NearDedupParams())
    text = " ".join(ticket(1))
    sig, answer_a, answer_b = index.signature(text), index.signature("Paris is the capital"), index.signature("Lyon")
    assert index.check_signatures(["a"], [sig], [answer_a]) == [None]
    assert index.check_signatures(["b"], [sig], [answer_b]) == [None]  # same text, another answer: kept
    assert index.check_signatures(["c"], [sig], [answer_a])[0].kept_key == "a"
    assert index.check_signatures(["d"], [sig], [None]) == [
        None
    ]  # an answer without words differs from one with words
    assert index.check_signatures(["e"], [sig], [None])[0].kept_key == "d"
    assert len(index) == 3

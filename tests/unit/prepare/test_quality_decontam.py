"""Decontamination: a train/validation row copying a test row (a few words changed) is removed and
listed; unrelated rows and rows sharing only boilerplate stay; test rows are never removed."""

from __future__ import annotations

import random

from prepare_helpers import chat, split_for, ticket, write_jsonl

from loraline.config import DecontamParams, NearDedupParams, PrepareParams
from loraline.prepare.quality.decontam import TestIndex

NO_NEAR = PrepareParams(near_dedup=NearDedupParams(enabled=False))
VOCAB = [
    f"{a}{b}"
    for a in ("lor", "ip", "dol", "sit", "am", "con", "sec", "adi", "pis", "eli")
    for b in ("a", "e", "i", "o", "u", "an", "en", "in", "on", "un")
]


def unrelated(j: int) -> tuple[str, str]:
    rng = random.Random(j)
    return " ".join(rng.choices(VOCAB, k=20)), " ".join(rng.choices(VOCAB, k=8))


def edited(i: int, k: int) -> tuple[str, str]:
    """ticket(i) with three words changed (k picks which wording)."""
    user, answer = ticket(i)
    user = (
        user.replace("Hello", ("Hi", "Hey", "Dear team")[k % 3]).replace("crushed", "dented").replace("usual", "same")
    )
    return user, answer


def test_index_catches_an_edited_copy_and_not_unrelated_rows():
    index = TestIndex(DecontamParams())
    for i in range(5):
        index.add(f"t{i}", " ".join(ticket(i)))
    hit = index.match(" ".join(edited(3, 0)))
    assert hit is not None and hit.test_key == "t3" and 0.5 <= hit.overlap < 1
    assert index.match(" ".join(ticket(7))) is None  # same template, another customer/order/product
    assert index.match("How do I reset my password on the VPN portal after it expired last week?") is None


def test_overlap_is_against_one_test_row_not_the_union():
    index = TestIndex(DecontamParams(ngram=3))
    index.add("a", "alpha beta gamma delta")
    index.add("b", "epsilon zeta eta theta")
    # Every 3-gram of the row exists in the test set, but half in each test row: 0.5, not 1.0.
    assert index.overlap("alpha beta gamma delta epsilon zeta eta theta").overlap < 1
    assert index.overlap("alpha beta gamma delta").overlap == 1.0


def test_short_rows_are_one_ngram():
    index = TestIndex(DecontamParams())
    index.add("a", "Reset my password")
    assert index.match("reset my PASSWORD!").overlap == 1.0
    assert index.match("Reset my token") is None


def _find_leak(split: str = "test") -> tuple[int, tuple[str, str]]:
    """An i whose ticket lands in `split` and an edited copy of it that lands outside test."""
    for i in range(200):
        if split_for(*ticket(i)) != split:
            continue
        for k in range(3):
            copy = edited(i, k)
            if split_for(*copy) != "test":
                return i, copy
    raise AssertionError("no suitable rows")


def test_prepare_removes_and_lists_the_contaminated_row(raw_dir, gather):
    i, copy = _find_leak()
    others = [unrelated(j) for j in range(30)]
    write_jsonl(raw_dir / "a.jsonl", [chat(*ticket(i)), chat(*copy), *(chat(*t) for t in others)])
    out = gather(params=NO_NEAR)
    (entry,) = out.contaminated
    assert (entry["row"], entry["matched_test_row"], entry["matched_test_file"]) == (2, 1, "a.jsonl")
    assert entry["split"] in ("train", "validation") and entry["overlap"] >= 0.5 and entry["source"] == "real"
    test_ids = {r["id"] for r in out.splits["test"]}
    assert entry["matched_test_id"] in test_ids
    assert out.stats.contaminated == 1 and out.stats.kept == len(others) + 1
    assert out.stats.by_file["a.jsonl"]["contaminated"] == 1


def test_exact_copies_of_a_contaminated_row_are_contaminated_too(raw_dir, gather):
    i, copy = _find_leak()
    write_jsonl(raw_dir / "a.jsonl", [chat(*ticket(i)), chat(*copy), chat(*copy)])
    out = gather(params=NO_NEAR)
    assert [(c["row"], c["matched_test_row"]) for c in out.contaminated] == [(2, 1), (3, 1)]
    assert out.duplicates == [] and out.stats.contaminated == 2


def test_test_rows_are_never_removed(raw_dir, gather):
    rows = [ticket(i) for i in range(200) if split_for(*ticket(i)) == "test"][:2]
    near_copies = [edited(int(u.split("Customer ")[1].split()[0]), k) for u, _ in rows for k in range(3)]
    test_copies = [c for c in near_copies if split_for(*c) == "test"]
    write_jsonl(raw_dir / "a.jsonl", [chat(*r) for r in rows] + [chat(*c) for c in test_copies])
    out = gather(params=NO_NEAR)
    assert out.contaminated == [] and len(out.splits["test"]) == len(rows) + len(test_copies)


def test_disabled_keeps_the_copy(raw_dir, gather):
    i, copy = _find_leak()
    write_jsonl(raw_dir / "a.jsonl", [chat(*ticket(i)), chat(*copy)])
    out = gather(params=NO_NEAR.model_copy(update={"decontamination": DecontamParams(enabled=False)}))
    assert out.contaminated == [] and out.stats.kept == 2


def test_sharing_a_passage_with_a_test_row_is_no_copy_of_it():
    """Issue 37: a row asking another question about a test row's passage was contaminated."""
    index = TestIndex(DecontamParams())
    passage = " ".join(ticket(i)[0] for i in range(3))
    test_q, test_a = f"{passage}\nWhich order arrived first?", "Order 10000 arrived first."
    index.add("t", f"{test_q}\n{test_a}", [test_a])
    other_q, other_a = f"{passage}\nWho asked for a replacement?", "Customers 0, 1 and 2 did."
    assert index.overlap(f"{other_q}\n{other_a}").overlap >= 0.5  # the text alone: a copy
    assert index.match(f"{other_q}\n{other_a}", [other_a]) is None  # with its answer: no copy
    assert index.match(f"{test_q}\n{test_a}", [test_a]).overlap == 1.0  # the test example itself


def test_answering_a_test_conversations_first_turn_copies_it():
    index = TestIndex(DecontamParams())
    user, answer = ticket(4)
    index.add("t", f"{user}\n{answer}\nAnd now?\nNow it is fixed.", [answer, "Now it is fixed."])
    assert index.match(f"{user}\n{answer}", [answer]) is not None
    assert index.match(f"{user}\nSomething else entirely.", ["Something else entirely."]) is None

"""TestIndex.overlap's shortcut (no distinctive shared n-gram: no candidate) returns what the full
ranking returned: the same best test row and overlap for every row."""

from __future__ import annotations

import heapq
import random
from collections import Counter

from loraline.config import DecontamParams
from loraline.prepare.quality import ngrams, words
from loraline.prepare.quality.decontam import MAX_POSTING, TOP_CANDIDATES, TestIndex, _gram_key


def reference_overlap(index: TestIndex, text: str):
    """overlap() as it was: every row through the Counter and the ranking."""
    grams = {_gram_key(g) for g in ngrams(words(text), index.params.ngram)}  # the index keeps 64-bit hashes
    if not grams or not index._grams:
        return None
    shared: Counter = Counter()
    for gram in grams:
        posting = index._postings.get(gram)
        if posting is not None and len(posting) <= MAX_POSTING:
            shared.update(posting)
    ranked = heapq.nsmallest(TOP_CANDIDATES, shared.items(), key=lambda kv: (-kv[1], index._order[kv[0]]))
    ranked.sort(key=lambda kv: index._order[kv[0]])
    best = None
    for key, _ in ranked:
        score = len(grams & index._grams[key]) / len(grams)
        if best is None or score > best[1]:
            best = (key, round(score, 4))
    return best


def test_overlap_equals_the_full_ranking():
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(300)]
    boiler = "hello thank you for contacting support we will get back to you soon".split()
    tests = [" ".join(boiler + rng.choices(vocab, k=rng.randint(0, 30))) for _ in range(400)]
    index = TestIndex(DecontamParams())
    for i, text in enumerate(tests):
        index.add(f"t{i}", text)
    rows = []
    for _ in range(2000):
        roll = rng.random()
        if roll < 0.3:  # an edited copy of a test row
            t = rng.choice(tests).split()
            for _ in range(rng.randint(0, 6)):
                t[rng.randrange(len(t))] = rng.choice(vocab)
            rows.append(" ".join(t))
        elif roll < 0.4:
            rows.append(" ".join(rng.choices(vocab, k=rng.randint(0, 5))))
        else:
            rows.append(" ".join(boiler + rng.choices(vocab, k=rng.randint(0, 30))))
    got = [index.overlap(text) for text in rows]
    assert [g and (g.test_key, g.overlap) for g in got] == [reference_overlap(index, text) for text in rows]
    assert sum(g is not None for g in got) > 300 and sum(g is None for g in got) > 300
    assert TestIndex(DecontamParams()).overlap("anything at all here") is None


def test_overlap_equals_the_full_ranking_with_many_candidates():
    """Test rows built from shared phrases: a row shares n-grams with dozens of test rows, so the
    candidates are cut to those that can rank in before ranking."""
    rng = random.Random(4)
    vocab = [f"w{i}" for i in range(200)]
    phrases = [" ".join(rng.choices(vocab, k=10)) for _ in range(40)]
    tests = [" ".join(rng.sample(phrases, 3) + rng.choices(vocab, k=5)) for _ in range(500)]
    index = TestIndex(DecontamParams())
    for i, text in enumerate(tests):
        index.add(f"t{i}", text)
    rows = [
        " ".join(rng.sample(phrases, rng.randint(1, 4)) + rng.choices(vocab, k=rng.randint(0, 8))) for _ in range(500)
    ]
    rows += [t.replace("w1 ", "w2 ", 1) for t in rng.sample(tests, 100)]
    widest = max(len({k for g in ngrams(words(t), 8) for k in index._postings.get(_gram_key(g), [])}) for t in rows)
    assert widest > 4 * TOP_CANDIDATES
    got = [index.overlap(text) for text in rows]
    assert [g and (g.test_key, g.overlap) for g in got] == [reference_overlap(index, text) for text in rows]

"""The batched near-duplicate index decides exactly as the datasketch-object version it replaced:
the same signatures bit for bit, the same matches, the same Jaccard values, row by row or in batches."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from loraline.config import NearDedupParams
from loraline.prepare.quality import ngrams, words
from loraline.prepare.quality.near_dup import LSH_WEIGHTS, NearDuplicateIndex, NearMatch


class ReferenceIndex:
    """The datasketch MinHash + MinHashLSH index as it was before batching: the right answers."""

    def __init__(self, params: NearDedupParams, seed: int) -> None:
        self.params, self.seed = params, seed
        self.lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, weights=LSH_WEIGHTS)
        self.signatures: dict[str, np.ndarray] = {}
        self.order: dict[str, int] = {}

    def signature(self, text: str) -> MinHash:
        mh = MinHash(num_perm=self.params.num_perm, seed=self.seed)
        shingles = ngrams(words(text), self.params.shingle_words)
        if shingles:
            mh.update_batch([s.encode("utf-8") for s in sorted(shingles)])
        return mh

    def check(self, key: str, text: str) -> NearMatch | None:
        # One fix to the old code: it compared each candidate's Jaccard with the best one's rounded
        # value, so a tie whose value rounds down (113/128 = 0.8828125 -> 0.8828) went to whichever
        # candidate datasketch's query set yielded last, which depends on PYTHONHASHSEED. Here, as
        # documented, the earliest kept row wins a tie.
        mh = self.signature(text)
        best, best_jaccard = None, 0.0
        if not mh.is_empty():
            for candidate in self.lsh.query(mh):
                other = self.signatures[candidate]
                jaccard = float(np.count_nonzero(other == mh.hashvalues)) / len(other)
                if jaccard >= self.params.threshold and (
                    best is None
                    or jaccard > best_jaccard
                    or (jaccard == best_jaccard and self.order[candidate] < self.order[best.kept_key])
                ):
                    best, best_jaccard = NearMatch(candidate, round(jaccard, 4)), jaccard
        if best is None and not mh.is_empty() and key not in self.signatures:
            self.order[key] = len(self.order)
            self.signatures[key] = mh.hashvalues.copy()
            self.lsh.insert(key, mh, check_duplication=False)
        return best


VOCAB = [
    "order",
    "refund",
    "box",
    "crushed",
    "replacement",
    "été",
    "naïve",
    "日本",
    "x2",
    "42",
    "ok",
    "the",
    "a",
    "to",
]


def corpus(seed: int, n: int) -> list[str]:
    """Rows with many paraphrases (one or two words changed), exact copies, short and empty rows."""
    rng = random.Random(seed)
    rows: list[str] = ["", "   ...  ", "one", "two words", "Three Words Here"]
    for _ in range(n):
        roll = rng.random()
        if rows and roll < 0.3:
            t = rng.choice(rows).split(" ")
            for _ in range(rng.randint(1, 2)):
                t[rng.randrange(len(t))] = rng.choice(VOCAB)
            rows.append(" ".join(t))
        elif rows and roll < 0.35:
            rows.append(rng.choice(rows).upper())
        else:
            rows.append(" ".join(rng.choices(VOCAB, k=rng.randint(1, 40))) + f" {rng.randint(0, 10**6)}")
    return rows


@pytest.mark.parametrize("seed", [1, 7])
def test_signatures_are_datasketchs(seed):
    params = NearDedupParams()
    index, reference = NearDuplicateIndex(params, seed=seed), ReferenceIndex(params, seed)
    texts = corpus(seed, 300)
    for text, sig in zip(texts, index.signatures(texts)):
        mh = reference.signature(text)
        if mh.is_empty():
            assert sig is None, text
        else:
            assert sig is not None and sig.dtype == mh.hashvalues.dtype and (sig == mh.hashvalues).all(), text
            assert (index.signature(text) == sig).all()


@pytest.mark.parametrize("params", [NearDedupParams(), NearDedupParams(threshold=0.7, num_perm=64, shingle_words=2)])
def test_decisions_match_the_reference_row_by_row_and_in_batches(params):
    texts = corpus(3, 1500)
    keys = [f"k{i}" for i in range(len(texts))]
    reference = ReferenceIndex(params, seed=5)
    want = [reference.check(k, t) for k, t in zip(keys, texts)]
    assert sum(m is not None for m in want) > 100  # the corpus does exercise matching

    one = NearDuplicateIndex(params, seed=5)
    assert [one.check(k, t) for k, t in zip(keys, texts)] == want

    batched = NearDuplicateIndex(params, seed=5)
    got = []
    for start in range(0, len(texts), 256):
        got += batched.check_batch(keys[start : start + 256], texts[start : start + 256])
    assert got == want and len(batched) == len(one) == len(reference.signatures)


def test_datasketch_computes_other_schemes(monkeypatch):
    """A MinHash scheme the numpy path does not implement falls back to datasketch itself."""
    index = NearDuplicateIndex(NearDedupParams(), seed=2)
    texts = corpus(4, 50)
    fast = index.signatures(texts)
    monkeypatch.setattr(index, "_affine32", False)
    slow = index.signatures(texts)
    assert all((a is None and b is None) or (a == b).all() for a, b in zip(fast, slow))


def test_check_batch_needs_one_key_per_text():
    with pytest.raises(ValueError, match="2 keys for 1 texts"):
        NearDuplicateIndex(NearDedupParams()).check_batch(["a", "b"], ["text"])

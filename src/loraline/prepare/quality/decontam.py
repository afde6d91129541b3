"""Decontamination: train/validation rows that copy a held-out test row are removed.

A copy is of the whole example: prepare also indexes each test row's answer (assistant turns) apart,
and a row's overlap with a test row is the lower of its text's (user and assistant turns) and its
answer's. A row sharing only a passage with a test row (another question about it, another answer)
does not copy it, however much of its text the passage is; one asking the test question again with
the test answer does. The answer's n-grams are taken turn by turn, so that a row answering a test
conversation's first turn as it does still copies that turn (a short answer is one n-gram of all its
words, which a longer joined answer would never hold).

overlap(row, t) = |ngrams(row) & ngrams(t)| / |ngrams(row)| with word n-grams (quality.words), and a
row is contaminated when its best overlap with one single test row reaches the threshold. One test
row, not the union of all test n-grams: on templated data (the same greeting, the same instruction)
a row is always made of phrases that occur somewhere in the test set, which does not make it a copy
of any test row.

Scaling: an inverted index maps each test n-gram to the test rows holding it. Candidates for a row
are the test rows sharing one of its *distinctive* n-grams (held by at most MAX_POSTING test rows:
boilerplate n-grams shared by hundreds of test rows would make every lookup scan them all), and only
the TOP_CANDIDATES with most shared distinctive n-grams get the exact overlap computed over all
n-grams. The work per row is bounded, so the whole pass is linear in the number of rows. A row
made of boilerplate n-grams only has no candidate and is never flagged: it copies no test row in
particular.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from xxhash import xxh3_64_intdigest

from loraline.config import DecontamParams
from loraline.prepare.quality import ngrams, words

MAX_POSTING = 64
TOP_CANDIDATES = 8


@dataclass(frozen=True)
class Contamination:
    test_key: str  # the test row it overlaps most
    overlap: float  # share of the row's n-grams found in that test row


def _gram_key(gram: str) -> int:
    return xxh3_64_intdigest(gram.encode("utf-8", "surrogatepass"))


class TestIndex:
    """The held-out rows' n-grams, queried once per train/validation row."""

    __test__ = False  # not a pytest class

    def __init__(self, params: DecontamParams) -> None:
        self.params = params
        # n-grams as 64-bit hashes: a small int instead of a string per n-gram of every test row (most
        # of the index's memory); a collision would need two different 8-word n-grams of one tenant to
        # share a 64-bit hash.
        self._grams: dict[str, frozenset[int]] = {}
        self._answers: dict[str, frozenset[int]] = {}  # the answer's n-grams, for rows added with one
        self._postings: dict[int, list[str]] = {}
        self._order: dict[str, int] = {}

    def add(self, key: str, text: str, answer: Sequence[str] | None = None) -> None:
        """A test row: its text (user and assistant turns), and its `answer` (assistant turns) to be compared apart."""
        if key in self._grams:
            return
        grams = self._ngrams(text)
        self._grams[key] = grams
        self._order[key] = len(self._order)
        if answer is not None:
            self._answers[key] = self._turn_ngrams(answer)
        for gram in grams:
            self._postings.setdefault(gram, []).append(key)

    def overlap(self, text: str, answer: Sequence[str] | None = None) -> Contamination | None:
        """The best-overlapping test row (ties: the first added), whatever the threshold; None without one.
        With `answer`, the overlap is the lower of the text's and the answer's."""
        if not self._grams:
            return None
        grams = set(self._ngrams(text))
        answer_grams = self._turn_ngrams(answer) if answer is not None else None
        hits = [
            posting
            for posting in map(self._postings.get, grams)
            if posting is not None and len(posting) <= MAX_POSTING
        ]
        if not hits:  # most rows share no distinctive n-gram with any test row: nothing to rank
            return None
        shared = Counter(itertools.chain.from_iterable(hits))
        candidates = shared.items()
        if len(shared) > TOP_CANDIDATES:
            # Only test rows sharing at least as many n-grams as the TOP_CANDIDATES-th most can be
            # ranked in; dropping the others first spares the ranking's Python key function, which
            # on large test sets (hundreds of rows sharing a few n-grams each) was most of the time.
            floor = heapq.nlargest(TOP_CANDIDATES, shared.values())[-1]
            candidates = [kv for kv in candidates if kv[1] >= floor]
        # Ranked by shared distinctive n-grams, then test-row order: the same answer whatever the
        # (randomized) string hashing that orders Python sets.
        ranked = heapq.nsmallest(TOP_CANDIDATES, candidates, key=lambda kv: (-kv[1], self._order[kv[0]]))
        ranked.sort(key=lambda kv: self._order[kv[0]])
        best: Contamination | None = None
        for key, _ in ranked:
            score = _share(grams, self._grams[key])
            if answer_grams is not None:
                score = min(score, _share(answer_grams, self._answers.get(key, frozenset())))
            if best is None or score > best.overlap:
                best = Contamination(key, round(score, 4))
        return best

    def match(self, text: str, answer: Sequence[str] | None = None) -> Contamination | None:
        """The contamination when the best overlap reaches the threshold, else None."""
        found = self.overlap(text, answer)
        return found if found is not None and found.overlap >= self.params.threshold else None

    def __len__(self) -> int:
        return len(self._grams)

    def _ngrams(self, text: str) -> frozenset[int]:
        return frozenset(map(_gram_key, ngrams(words(text), self.params.ngram)))

    def _turn_ngrams(self, turns: Sequence[str]) -> frozenset[int]:
        return frozenset().union(*map(self._ngrams, turns))


def _share(grams: set[int] | frozenset[int], test_grams: frozenset[int]) -> float:
    """The share of `grams` in the test row's; text without words matches only text without words."""
    if not grams:
        return 1.0 if not test_grams else 0.0
    return len(grams & test_grams) / len(grams)

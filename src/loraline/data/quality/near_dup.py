"""Near-duplicate removal with MinHash LSH (datasketch).

Rows are fed in prepare's stable order; each is queried against the rows kept so far and then, if it
is not a near-duplicate, inserted. That is one LSH query and at most one insert per row, so the cost
grows linearly with the number of rows instead of comparing every pair. LSH only proposes
candidates; each candidate's estimated Jaccard is checked against the threshold, so the banding is
tuned for recall (false candidates cost one comparison, missed ones cost a duplicate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH

from loraline.config import NearDedupParams
from loraline.data.quality import ngrams, words

# (false-positive weight, false-negative weight) for datasketch's choice of bands x rows: at the
# default 0.85 threshold and 128 permutations this gives 11 bands of 11 rows, proposing a pair at
# Jaccard 0.85 with probability ~0.87 and at 0.9 with ~0.98 (the balanced default: 0.46 and 0.81).
LSH_WEIGHTS = (0.1, 0.9)


@dataclass(frozen=True)
class NearMatch:
    kept_key: str  # the key of the kept row this one nearly duplicates
    jaccard: float  # estimated from the MinHash signatures


class NearDuplicateIndex:
    """First-seen-wins near-duplicate filter over a stream of rows."""

    def __init__(self, params: NearDedupParams, seed: int = 1) -> None:
        self.params = params
        self._seed = seed
        template = MinHash(num_perm=params.num_perm, seed=seed)
        self._permutations, self._scheme = template.permutations, template.scheme
        self._lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, weights=LSH_WEIGHTS)
        self._signatures: dict[str, np.ndarray] = {}
        self._order: dict[str, int] = {}
        self._last: tuple[str, MinHash] | None = None

    def signature(self, text: str) -> MinHash:
        mh = MinHash(num_perm=self.params.num_perm, seed=self._seed, permutations=self._permutations, scheme=self._scheme)
        shingles = ngrams(words(text), self.params.shingle_words)
        if shingles:
            mh.update_batch([s.encode("utf-8") for s in sorted(shingles)])
        return mh

    def check(self, key: str, text: str, *, add: bool = True) -> NearMatch | None:
        """The best kept match at or above the threshold (ties: the earliest kept), else None.

        With add=True a row that is not a near-duplicate is remembered as kept; pass add=False when a
        later step may still drop the row, and call add() once it is kept.
        """
        mh = self.signature(text)
        best: NearMatch | None = None
        if not mh.is_empty():
            for candidate in self._lsh.query(mh):
                other = self._signatures[candidate]
                jaccard = float(np.count_nonzero(other == mh.hashvalues)) / len(other)
                if jaccard >= self.params.threshold and (
                    best is None or jaccard > best.jaccard or (jaccard == best.jaccard and self._order[candidate] < self._order[best.kept_key])
                ):
                    best = NearMatch(candidate, round(jaccard, 4))
        if best is None and add:
            self._insert(key, mh)
        self._last = (key, mh)
        return best

    def add(self, key: str) -> None:
        """Keep the row last passed to check(add=False)."""
        if self._last is None or self._last[0] != key:
            raise ValueError(f"add({key!r}) must follow check({key!r}, add=False)")
        self._insert(key, self._last[1])

    def _insert(self, key: str, mh: MinHash) -> None:
        if mh.is_empty() or key in self._signatures:
            return
        self._order[key] = len(self._order)
        self._signatures[key] = mh.hashvalues.copy()
        self._lsh.insert(key, mh, check_duplication=False)

    def __len__(self) -> int:
        return len(self._signatures)

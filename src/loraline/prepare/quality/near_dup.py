"""Near-duplicate removal with MinHash LSH (datasketch's MinHash family, computed in batches).

Rows are fed in prepare's stable order; each is queried against the rows kept so far and then, if it
is not a near-duplicate, inserted. That is one LSH query and at most one insert per row, so the cost
grows linearly with the number of rows instead of comparing every pair. LSH only proposes
candidates; each candidate's estimated Jaccard is checked against the threshold, so the banding is
tuned for recall (false candidates cost one comparison, missed ones cost a duplicate).

The signatures are bit for bit those of datasketch's MinHash (sha1 of each shingle, its "affine32"
permutations drawn from the seed), so decisions are the same as with datasketch objects; only the
arithmetic is done with numpy over the shingles of many rows at once instead of one MinHash object
and one numpy call per row, and the LSH tables are plain dicts keyed by the same band bytes. A test
checks the signatures against datasketch's.

A near-duplicate is a copy of the whole example, not only of its text: with the rows' answer
signatures (the assistant turns, check_signatures' `answers`), a candidate is a match only when the
answers' Jaccard also reaches the threshold. Rows that share a long passage and ask different
questions of it have near-identical text but different answers; they are different examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH
from xxhash import xxh3_64_intdigest as _band_key

from loraline.config import NearDedupParams
from loraline.prepare.quality import words

# (false-positive weight, false-negative weight) for datasketch's choice of bands x rows: at the
# default 0.85 threshold and 128 permutations this gives 11 bands of 11 rows, proposing a pair at
# Jaccard 0.85 with probability ~0.87 and at 0.9 with ~0.98 (the balanced default: 0.46 and 0.81).
LSH_WEIGHTS = (0.1, 0.9)

# Permutations x shingles are computed per chunk of about this many shingles (~1 MB of uint32 at 128
# permutations): a chunk that stays in the CPU cache is computed several times faster than one 16x
# larger, and memory stays flat whatever the batch size.
_CHUNK_SHINGLES = 2048
_EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's initial value: a signature of only these is empty
# MurmurHash3's 32-bit finalizer, which datasketch's affine32 scheme applies to each sha1 hash.
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


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
        # Another scheme (a future datasketch default) is computed by datasketch itself, row by row.
        self._affine32 = template.scheme == "affine32"
        self._template = template
        self._a, self._b = (p.reshape(-1, 1) for p in template.permutations)  # one row per permutation
        lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, weights=LSH_WEIGHTS)
        width = template.hashvalues.itemsize
        self._bands = [slice(i * lsh.r * width, (i + 1) * lsh.r * width) for i in range(lsh.b)]
        # band -> rank(s), keyed by a 64-bit hash of the band's bytes: a small int instead of a bytes
        # object per band and row (a third of the index's memory). A collision only proposes one more
        # candidate, which the Jaccard check of its signature then judges like any other.
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in self._bands]
        self._keys: list[str] = []  # kept rows in insertion order: an index here is the row's rank
        self._rank: dict[str, int] = {}
        self._kept = np.empty((1024, params.num_perm), dtype=template.hashvalues.dtype)  # signature by rank
        self._answers = np.empty_like(self._kept)  # the answer's signature by rank (only with answers)
        self._no_answer: list[bool] = []  # by rank: no answer signature (an answer without words, or none given)
        self._last: tuple[str, np.ndarray | None, tuple] | None = None

    @property
    def seed(self) -> int:
        return self._seed

    def signature(self, text: str) -> np.ndarray | None:
        """The row's MinHash signature (datasketch's hashvalues), or None for a row without words."""
        return self.signatures([text])[0]

    def signatures(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """signature() of each text, computed together."""
        shingles = [self._shingles(text) for text in texts]
        if not self._affine32:
            return [self._datasketch_signature(s) for s in shingles]
        out: list[np.ndarray | None] = [None] * len(texts)
        chunk: list[int] = []
        size = 0
        for i in [i for i, s in enumerate(shingles) if s] + [None]:  # None: flush the last chunk
            if chunk and (i is None or size + len(shingles[i]) > _CHUNK_SHINGLES):
                for row, sig in zip(chunk, self._minhash([shingles[r] for r in chunk])):
                    out[row] = None if (sig == _EMPTY).all() else sig
                chunk, size = [], 0
            if i is not None:
                chunk.append(i)
                size += len(shingles[i])
        return out

    def check(self, key: str, text: str, *, add: bool = True) -> NearMatch | None:
        """The best kept match at or above the threshold (ties: the earliest kept), else None.

        With add=True a row that is not a near-duplicate is remembered as kept; pass add=False when a
        later step may still drop the row, and call add() once it is kept.
        """
        return self._check(key, self.signature(text), add=add)

    def check_batch(self, keys: Sequence[str], texts: Sequence[str]) -> list[NearMatch | None]:
        """check(key, text) of each row in order (add=True): a row is compared with the kept rows
        before it, those earlier in this batch included; the signatures are computed together."""
        if len(keys) != len(texts):
            raise ValueError(f"check_batch: {len(keys)} keys for {len(texts)} texts")
        return [self._check(key, sig, add=True) for key, sig in zip(keys, self.signatures(texts))]

    def check_signatures(
        self,
        keys: Sequence[str],
        sigs: Sequence[np.ndarray | None],
        answers: Sequence[np.ndarray | None] | None = None,
    ) -> list[NearMatch | None]:
        """check_batch with the signatures computed elsewhere (signatures(), e.g. in another process).

        With `answers` (each row's answer signature, None for an answer without words) a row matches a
        kept row only when their answers are near-identical too; pass answers for every row or none.
        """
        if len(keys) != len(sigs) or (answers is not None and len(answers) != len(keys)):
            raise ValueError(f"check_signatures: {len(keys)} keys for {len(sigs)} signatures")
        if answers is None:
            return [self._check(key, sig, add=True) for key, sig in zip(keys, sigs)]
        return [self._check(key, sig, add=True, answer=(answer,)) for key, sig, answer in zip(keys, sigs, answers)]

    def add(self, key: str) -> None:
        """Keep the row last passed to check(add=False)."""
        if self._last is None or self._last[0] != key:
            raise ValueError(f"add({key!r}) must follow check({key!r}, add=False)")
        self._insert(key, self._last[1], self._last[2])

    def __len__(self) -> int:
        return len(self._keys)

    def _check(self, key: str, sig: np.ndarray | None, *, add: bool, answer: tuple = ()) -> NearMatch | None:
        """`answer`: () to compare the text alone, else (the answer's signature or None,)."""
        best: NearMatch | None = None
        if sig is not None:
            raw = sig.tobytes()
            candidates: set[int] = set()
            for band, table in zip(self._bands, self._tables):
                found = table.get(_band_key(raw[band]))
                if found is not None:
                    candidates.update(found) if isinstance(found, list) else candidates.add(found)
            # Ranks ascending: on equal Jaccard the earliest kept row wins. Compared unrounded: against
            # the rounded value kept in NearMatch, a tie that rounds down would go to the later row.
            best_rank, best_jaccard = -1, 0.0
            for rank in sorted(candidates):
                jaccard = float(np.count_nonzero(self._kept[rank] == sig)) / len(sig)
                if jaccard >= self.params.threshold and jaccard > best_jaccard and self._same_answer(rank, answer):
                    best_rank, best_jaccard = rank, jaccard
            if best_rank >= 0:
                best = NearMatch(self._keys[best_rank], round(best_jaccard, 4))
        if best is None and add:
            self._insert(key, sig, answer)
        self._last = (key, sig, answer)
        return best

    def _same_answer(self, rank: int, answer: tuple) -> bool:
        """Whether the kept row's answer is near-identical to `answer` (always, when no answer is given)."""
        if not answer:
            return True
        (sig,) = answer
        if sig is None or self._no_answer[rank]:
            return sig is None and self._no_answer[rank]  # two answers without words are the same
        return float(np.count_nonzero(self._answers[rank] == sig)) / len(sig) >= self.params.threshold

    def _insert(self, key: str, sig: np.ndarray | None, answer: tuple = ()) -> None:
        if sig is None or key in self._rank:
            return
        rank = len(self._keys)
        if rank == len(self._kept):
            self._kept = np.concatenate([self._kept, np.empty_like(self._kept)])
            self._answers = np.concatenate([self._answers, np.empty_like(self._answers)])
        self._kept[rank] = sig
        answer_sig = answer[0] if answer else None
        if answer_sig is not None:
            self._answers[rank] = answer_sig
        self._no_answer.append(answer_sig is None)
        self._keys.append(key)
        self._rank[key] = rank
        raw = sig.tobytes()
        for band, table in zip(self._bands, self._tables):
            band_key = _band_key(raw[band])
            found = table.get(band_key)
            if found is None:  # most buckets hold one row: an int, not a list, saves memory
                table[band_key] = rank
            elif isinstance(found, list):
                found.append(rank)
            else:
                table[band_key] = [found, rank]

    def _shingles(self, text: str) -> list[bytes]:
        # quality.ngrams as UTF-8 bytes (what datasketch hashes), without building the set: a
        # repeated shingle does not change a minimum.
        joined = " ".join(words(text))
        tokens = joined.encode("utf-8").split(b" ") if joined else []  # a word never holds a space
        n = self.params.shingle_words
        if len(tokens) < n:
            return [b" ".join(tokens)] if tokens else []
        return [b" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]

    def _minhash(self, rows: list[list[bytes]]) -> np.ndarray:
        """datasketch's affine32 signatures (len(rows) x num_perm) of non-empty shingle lists."""
        sha1 = hashlib.sha1
        # sha1_hash32 is the first 4 bytes of the digest, little-endian: every 5th uint32 of the
        # concatenated 20-byte digests.
        digests = b"".join([sha1(s).digest() for row in rows for s in row])
        hv = np.frombuffer(digests, dtype="<u4")[::5].astype(np.uint32)
        s1, m1, s2, m2, s3 = _FMIX32
        hv ^= hv >> s1
        hv *= m1
        hv ^= hv >> s2
        hv *= m2
        hv ^= hv >> s3
        permuted = self._a * hv[None, :]  # uint32 wraparound is the scheme's modulo 2**32
        permuted += self._b
        firsts = np.cumsum([0] + [len(row) for row in rows[:-1]])
        # Permutations x shingles: each row's shingles are contiguous, which reduceat runs faster on.
        return np.ascontiguousarray(np.minimum.reduceat(permuted, firsts, axis=1).T)

    def _datasketch_signature(self, shingles: list[bytes]) -> np.ndarray | None:
        mh = MinHash(
            num_perm=self.params.num_perm,
            seed=self._seed,
            permutations=self._template.permutations,
            scheme=self._template.scheme,
        )
        if shingles:
            mh.update_batch(sorted(set(shingles)))
        return None if mh.is_empty() else mh.hashvalues

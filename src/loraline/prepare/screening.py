"""Pass 2 of prepare: conflicting answers (prepare.conflicts), decontamination against the complete
test split, then near-duplicates, over the candidates in pass 1's order. What depends on the row
alone (its contamination, its MinHash signature) runs in worker processes; the near-duplicate index
is walked in order here. Once every row has been through (synthetic rows included), the exact
duplicates of a removed row follow it.
"""

from __future__ import annotations

import heapq
import json
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from loraline.prepare.collected import Collected
from loraline.prepare.pool import ordered_map
from loraline.prepare.quality import answer_text, answer_turns, row_text
from loraline.prepare.quality.decontam import TestIndex
from loraline.prepare.quality.near_dup import NearDuplicateIndex
from loraline.prepare.readers import excerpt
from loraline.prepare.rows import batches
from loraline.prepare.schema import SPLITS, Reject, RejectReason, locate
from loraline.prepare.split import context_line

# What pass 2 reads back of each candidate: not the token ids, which it leaves where they are.
PASS2_COLUMNS = (
    "id",
    "messages",
    "source_file",
    "row",
    "source",
    "provenance",
    "shape",
    "n_tokens",
    "n_answer_tokens",
)

_SCREEN: dict[str, Any] = {
    "test_index": None,
    "near": None,
    "min_chars": None,
}  # pass 2's read-only state, per process


@dataclass
class Quality:
    """The state of the steps that look across rows: the test split's n-grams and the kept rows' MinHashes."""

    test_index: TestIndex | None
    near: NearDuplicateIndex | None
    kept_at: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (source_file, row) of kept chat rows
    test_at: dict[str, tuple[str, int]] = field(default_factory=dict)  # the same for test rows
    order: dict[str, array] = field(
        default_factory=lambda: {s: array("q") for s in SPLITS}
    )  # pass-1 number of each candidate
    alive: dict[str, bytearray] = field(
        default_factory=lambda: {s: bytearray() for s in SPLITS}
    )  # not an exact duplicate
    seen: int = 0
    conflicts: str = "keep"  # prepare.conflicts
    group_min_chars: int | None = None  # prepare.group_min_chars: a passage is set aside when comparing rows
    prompts: dict[str, array] = field(
        default_factory=lambda: {s: array("q") for s in SPLITS}
    )  # split.prompt_key of each candidate
    # prompt key -> (pass-1 number, file, row) of its first candidate that is no exact duplicate; a
    # second such candidate is a different answer to the same prompt (same answer: same content hash).
    asked: dict[int, tuple[int, str, int]] = field(default_factory=dict)
    repeats: dict[int, list] = field(
        default_factory=dict
    )  # conflicting prompt key -> [rows, (file, row) of the second]
    conflicted: set[str] = field(default_factory=set)  # ids rejected as conflicting_answers
    groups: dict[str, array] = field(
        default_factory=lambda: {s: array("q") for s in SPLITS}
    )  # split.group_id of each candidate
    kept_groups: dict[str, Counter] = field(
        default_factory=lambda: {s: Counter() for s in SPLITS}
    )  # group id -> kept rows

    def group_stats(self) -> dict[str, Any]:
        """The groups of kept rows that hold two or more (a group of one is a row like any other)."""
        shared = {split: {g: n for g, n in kept.items() if n >= 2} for split, kept in self.kept_groups.items()}
        sizes = [n for groups in shared.values() for n in groups.values()]
        return {
            "groups": len(sizes),
            "rows": sum(sizes),
            "largest": max(sizes, default=0),
            "by_split": {split: len(groups) for split, groups in shared.items()},
        }

    def ask(self, key: int, seq: int, source_file: str, row: int) -> None:
        """A candidate (no exact duplicate) asking prompt `key`, in pass-1 order."""
        first = self.asked.setdefault(key, (seq, source_file, row))
        if first[0] != seq:
            self.repeats.setdefault(key, [1, (source_file, row)])[0] += 1

    def conflict(self, key: int, seq: int) -> tuple[str, int] | None:
        """The other row (file, row) when prepare.conflicts removes this candidate, else None."""
        if self.conflicts == "keep" or key not in self.repeats:
            return None
        first_seq, first_file, first_row = self.asked[key]
        if first_seq != seq:
            return first_file, first_row
        return None if self.conflicts == "first" else self.repeats[key][1]

    @property
    def conflicting_rows(self) -> int:
        return sum(n for n, _ in self.repeats.values())


def second_pass(out: Collected, q: Quality, workers: int) -> None:
    """Decontamination then near-duplicates over the candidates in pass 1's order (the splits' stores
    merged by row number), then each split keeps the rows that passed.

    Checking a row against the (now complete) test index and computing its MinHash signature depend
    on nothing else, so they run in worker processes; only the near-duplicate index, where each row
    meets the rows kept before it, is walked here, in order.
    """

    def numbered(split: str) -> Iterator[tuple[int, str, int, dict]]:
        alive, prompts = q.alive[split], q.prompts[split]
        for i, (seq, row) in enumerate(zip(q.order[split], out.splits[split].columns(PASS2_COLUMNS))):
            if not alive[i]:  # exact duplicates are already settled
                continue
            other = q.conflict(prompts[i], seq)
            if other is not None:
                out.reject(conflict_reject(out.stats.tenant, row, other, q.conflicts))
                q.conflicted.add(row["id"])
                continue
            yield seq, split, i, row

    streams = [numbered(split) for split in SPLITS]
    masks: dict[str, bytearray] = {split: bytearray(len(q.order[split])) for split in SPLITS}
    in_flight: deque[list] = deque()

    def jobs() -> Iterator[list[tuple[str, dict]]]:
        for batch in batches(heapq.merge(*streams, key=lambda item: item[0])):
            in_flight.append(batch)
            yield [(split, row) for _, split, _, row in batch]

    # Workers forked now inherit the complete test index; the near-duplicate index they get is only
    # used for its signature function (the kept rows are walked here).
    set_up_screen(q.test_index, q.near, min_chars=q.group_min_chars)
    for screened in ordered_map(
        screen_job,
        jobs(),
        workers=workers,
        initializer=set_up_screen,
        initargs=(q.test_index, _signer(q.near), True, q.group_min_chars),
    ):
        batch = in_flight.popleft()
        rows = [(split, row) for _, split, _, row in batch]
        for (_, split, i, row), kept in zip(batch, _apply_screen(out, rows, screened, q)):
            if kept:
                masks[split][i] = 1
                out.count(split, row)
                if q.groups[split][i]:
                    q.kept_groups[split][q.groups[split][i]] += 1
    for split in SPLITS:
        out.splits[split].select(masks[split])


def conflict_reject(tenant: str, row: dict, other: tuple[str, int], policy: str) -> Reject:
    where = locate(row["source_file"], row["row"])
    return Reject(
        tenant,
        row["source_file"],
        row["row"],
        None,
        RejectReason.CONFLICTING_ANSWERS,
        f"{where}: asks what {locate(*other)} asks, with a different answer (prepare.conflicts={policy})",
        excerpt(json.dumps(row["messages"], ensure_ascii=False)),
    )


def set_up_screen(
    test_index: TestIndex | None, near: NearDuplicateIndex | None, worker: bool = False, min_chars: int | None = None
) -> None:
    _SCREEN["test_index"], _SCREEN["near"], _SCREEN["min_chars"] = test_index, near, min_chars


def own_part(messages: list[dict], min_chars: int | None) -> str:
    """What must also be near-identical for a near-duplicate: the answer, and with a passage in the
    first user turn (split.context_line) the rest of the text too, so that two questions about one
    passage with the same short answer stay two examples."""
    first = next((m for m in messages if m["role"] == "user"), None)
    line = context_line(first["content"], min_chars) if first is not None else None
    if line is None:
        return answer_text(messages)
    return "\n".join(
        m["content"].replace(line, "", 1) if m is first else m["content"]
        for m in messages
        if m["role"] in ("user", "assistant")
    )


def _signer(near: NearDuplicateIndex | None) -> NearDuplicateIndex | None:
    """An empty index with the same MinHash family: what a worker needs to compute signatures."""
    return None if near is None else NearDuplicateIndex(near.params, seed=near.seed)


def screen_job(rows: list[tuple[str, dict]]) -> list[tuple[Any, Any]]:
    return _screen(rows, _SCREEN["test_index"], _SCREEN["near"])


def quality_batch(out: Collected, rows: list[tuple[str, dict]], q: Quality) -> list[bool]:
    """Decontamination (train/validation only) then near-duplicates, in row order; whether each is kept."""
    return _apply_screen(out, rows, _screen(rows, q.test_index, q.near), q)


def _screen(
    rows: list[tuple[str, dict]], test_index: TestIndex | None, near: NearDuplicateIndex | None
) -> list[tuple[Any, Any]]:
    """Per row, what depends on the row alone: its contamination (a train/validation row against the
    whole test index) or, when it is clean, the MinHash signatures of its text and of its answer."""
    texts = [row_text(row["messages"]) for _, row in rows]
    hits = [
        test_index.match(text, answer_turns(row["messages"])) if test_index is not None and split != "test" else None
        for (split, row), text in zip(rows, texts)
    ]
    clean = [i for i, hit in enumerate(hits) if hit is None]
    sigs: list = [None] * len(rows)
    if near is not None and clean:
        answers = near.signatures([own_part(rows[i][1]["messages"], _SCREEN["min_chars"]) for i in clean])
        for i, sig, answer in zip(clean, near.signatures([texts[i] for i in clean]), answers):
            sigs[i] = (sig, answer)
    return list(zip(hits, sigs))


def _apply_screen(
    out: Collected, rows: list[tuple[str, dict]], screened: list[tuple[Any, Any]], q: Quality
) -> list[bool]:
    """Record contaminated rows, then walk the near-duplicate index in row order; whether each is kept."""
    decisions = [False] * len(rows)
    survivors = []
    for i, ((split, row), (hit, sig)) in enumerate(zip(rows, screened)):
        if hit is None:
            survivors.append((i, row, sig))
            continue
        test_file, test_row = q.test_at[hit.test_key]
        out.contaminated.append(
            {
                "id": row["id"],
                "source_file": row["source_file"],
                "row": row["row"],
                "split": split,
                "source": row["source"],
                "matched_test_id": hit.test_key,
                "matched_test_file": test_file,
                "matched_test_row": test_row,
                "overlap": hit.overlap,
            }
        )
    matches = (
        q.near.check_signatures(
            [row["id"] for _, row, _ in survivors],
            [sig for _, _, (sig, _) in survivors],
            [answer for _, _, (_, answer) in survivors],
        )
        if q.near is not None
        else [None] * len(survivors)
    )
    for (i, row, _), match in zip(survivors, matches):
        if match is not None:
            kept_file, kept_row = q.kept_at[match.kept_key]
            out.duplicates.append(
                {
                    "source_file": row["source_file"],
                    "row": row["row"],
                    "duplicate_of_file": kept_file,
                    "duplicate_of_row": kept_row,
                    "content_hash": row["id"],
                    "kind": "near",
                    "duplicate_of_id": match.kept_key,
                    "jaccard": match.jaccard,
                }
            )
            continue
        q.kept_at.setdefault(row["id"], (row["source_file"], row["row"]))
        decisions[i] = True
    return decisions


def follow_removed_originals(out: Collected, conflicted: set[str] | frozenset[str] = frozenset()) -> None:
    """An exact duplicate of a row that decontamination, near-dedup or prepare.conflicts removed shares
    its fate: it becomes contaminated (same overlap), a near-duplicate of the same kept row, or a
    conflicting_answers reject (`conflicted`: those rows' ids). So every entry of duplicates.jsonl
    points at a row of the dataset."""
    contaminated = {c["id"]: c for c in out.contaminated}
    near = {d["content_hash"]: d for d in out.duplicates if d["kind"] == "near"}
    duplicates = []
    for d in out.duplicates:
        original = d["content_hash"]
        if d["kind"] == "exact" and original in conflicted:
            out.reject(
                Reject(
                    out.stats.tenant,
                    d["source_file"],
                    d["row"],
                    None,
                    RejectReason.CONFLICTING_ANSWERS,
                    f"{locate(d['source_file'], d['row'])}: repeats "
                    f"{locate(d['duplicate_of_file'], d['duplicate_of_row'])}, which "
                    "prepare.conflicts rejected (its prompt has another answer)",
                )
            )
        elif d["kind"] == "exact" and original in contaminated:
            c = contaminated[original]
            out.contaminated.append({**c, "source_file": d["source_file"], "row": d["row"]})
        elif d["kind"] == "exact" and original in near:
            n = near[original]
            duplicates.append({**n, "source_file": d["source_file"], "row": d["row"]})
        else:
            duplicates.append(d)
    out.duplicates = duplicates

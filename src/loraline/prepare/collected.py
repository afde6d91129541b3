"""What one prepare run collects before writing anything: the kept rows, the rejects, the
duplicates and contaminated rows, and the counts of the stats. Every pass adds to one `Collected`;
the stats are built from it and checked to reconcile before the outputs are written.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from loraline.prepare.quality.pii import PiiScrubber
from loraline.prepare.schema import SPLITS, PrepareStats, Reject
from loraline.prepare.stores import ArrowRows, ListRows, RejectFile, RejectList


@dataclass
class Collected:
    """Everything prepare writes, checked to reconcile before anything is written.

    Rows live in stores (`ListRows`, `ArrowRows`): lists for collect() (tests read them), Arrow files for the
    stage, so a tenant's data may be larger than memory. What stays in memory grows with the number of unique
    rows (the exact and near-duplicate indexes, the test split's n-grams), not with their size.
    """

    stats: PrepareStats
    splits: dict[str, ListRows | ArrowRows] = field(default_factory=lambda: {s: ListRows() for s in SPLITS})
    documents: ListRows | ArrowRows = field(default_factory=ListRows)
    rejects: RejectList | RejectFile = field(default_factory=RejectList)
    scrubber: PiiScrubber | None = None  # rejects quote the raw row: PII must not survive there either
    duplicates: list[dict] = field(default_factory=list)  # exact and near (kind), each naming its kept original
    contaminated: list[dict] = field(default_factory=list)
    synthetic_provenance: list[dict] = field(default_factory=list)  # of every synthetic row read, for the card
    kept_by_file: Counter = field(default_factory=Counter)
    shapes: Counter = field(default_factory=Counter)
    pairs: Counter = field(default_factory=Counter)  # kept preference pairs by split
    synthetic_kept: int = 0
    token_lengths: array = field(default_factory=lambda: array("i"))
    answer_lengths: array = field(default_factory=lambda: array("i"))
    dataset_digest: dict[str, Any] = field(
        default_factory=lambda: {name: hashlib.sha256() for name in (*SPLITS, "documents")}
    )

    @property
    def has_pairs(self) -> bool:
        """Whether any preference pair was kept: the splits then carry features.PREFERENCE_COLUMNS."""
        return any(self.pairs.values())

    def reject(self, reject: Reject) -> None:
        if self.scrubber is not None:
            reject = replace(
                reject, detail=self.scrubber.scrub(reject.detail)[0], excerpt=self.scrubber.scrub(reject.excerpt)[0]
            )
        self.rejects.append(reject)

    def keep(self, split: str, row: dict) -> None:
        """A row of the dataset (or of the documents): stored, and counted for the stats."""
        (self.documents if split == "document" else self.splits[split]).append(row)
        self.count(split, row)

    def count(self, split: str, row: dict) -> None:
        """A kept row counted for the stats (the row itself is already in its store)."""
        if split == "document":
            self.shapes["document"] += 1
        else:
            self.shapes[row["shape"]] += 1
            self.pairs[split] += row["shape"] == "preference"
            self.token_lengths.append(row["n_tokens"])
            self.answer_lengths.append(row["n_answer_tokens"])
            self.synthetic_kept += row["source"] == "synthetic"
        self.kept_by_file[row["source_file"]] += 1
        # A row's content hash, origin and (synthetic) provenance determine it, given the tokenizer.
        key = (
            f"{row.get('id') or row['content_hash']}\t{row['source_file']}\t"
            f"{row['row']}\t{row.get('provenance', '')}\n"
        )
        self.dataset_digest["documents" if split == "document" else split].update(key.encode("utf-8", "surrogatepass"))

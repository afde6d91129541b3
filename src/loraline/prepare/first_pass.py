"""Pass 1 of prepare over a tenant's files: each file read (readers.py) and mapped by its sources[]
entry (mapping.py), in batches examined row by row (rows.py, in worker processes past a few
batches), then settled in row order here: rejects and exact duplicates are final, documents are
kept, and chat rows become candidates in their split's store for pass 2 (screening.py). Test rows
are indexed for decontamination as they arrive, so pass 2 checks against the complete test split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from loraline.prepare import rows
from loraline.prepare.collected import Collected
from loraline.prepare.mapping import SourceSpec, map_rows
from loraline.prepare.pool import ordered_map
from loraline.prepare.quality import answer_turns, row_text
from loraline.prepare.readers import read_rows
from loraline.prepare.rows import RowContext, batches, settle
from loraline.prepare.schema import Reject
from loraline.prepare.screening import Quality
from loraline.prepare.split import prompt_key
from loraline.progress import progress_bar


def first_pass(
    out: Collected,
    q: Quality,
    ctx: RowContext,
    assigned: list[tuple[Path, str, SourceSpec]],
    specs: list[SourceSpec],
    rows_in: dict[str, int],
    *,
    to_arrow: bool,
    workers: int,
    progress: bool,
) -> None:
    """Every row of the assigned files through pass 1, counted into `rows_in` by file.
    `to_arrow`: the workers hand the chat candidates over as Arrow batches for the stores."""

    def jobs() -> Iterator[tuple[int | None, list]]:
        for path, rel, spec in assigned:
            raw_rows = read_rows(
                path, rel, ctx.tenant, ctx.params.csv_delimiter, spec.format, whole_object=spec.explode is not None
            )
            for batch in batches(map_rows(raw_rows, spec, ctx.tenant)):
                rows_in[rel] += len(batch)
                yield spec.index, batch

    rows.set_up_examiners(ctx, specs, to_arrow)
    bar = progress_bar(desc=f"prepare {ctx.tenant}", unit=" rows", disable=not progress)
    for examined, pii, pii_rows, arrow_batches in ordered_map(
        rows.examine_job,
        jobs(),
        workers=workers,
        initializer=rows.set_up_examiners,
        initargs=(rows.portable(ctx), specs, to_arrow, True),
    ):
        ctx.pii.update(pii)
        ctx.pii_rows[0] += pii_rows
        for split, batch in arrow_batches.items():
            out.splits[split].append_batch(batch)
        for outcome in settle(examined, ctx.dedup):
            route(out, outcome, q, stored=to_arrow)
        bar.update(len(examined))
    bar.close()


def route(out: Collected, outcome, q: Quality, stored: bool = False) -> None:
    """Pass 1's outcome of a row: rejects and duplicates are final, documents kept, chat rows become
    candidates in their split's store (in row order, numbered so that pass 2 can restore that order).
    `stored`: the chat candidates, duplicates included, are in their stores already (Arrow batches)."""
    if isinstance(outcome, Reject):
        out.reject(outcome)
    elif isinstance(outcome, dict):  # a synthetic row repeating a kept one
        out.duplicates.append({**outcome, "kind": "exact"})
    elif outcome[0] == "duplicate":
        _, entry, split, row = outcome
        out.duplicates.append({**entry, "kind": "exact"})
        if split is not None:  # a chat candidate: it stays in its store, never to be kept
            _candidate(out, q, split, row, stored, alive=False)
    elif outcome[0] == "document":
        out.keep("document", outcome[1])
    else:
        split, row = outcome
        if split == "test":  # the whole test split is indexed before any row is checked against it
            q.test_at.setdefault(row["id"], (row["source_file"], row["row"]))
            if q.test_index is not None:
                q.test_index.add(row["id"], row_text(row["messages"]), answer_turns(row["messages"]))
        _candidate(out, q, split, row, stored, alive=True)


def _candidate(out: Collected, q: Quality, split: str, row: dict, stored: bool, alive: bool) -> None:
    # Several pairs for one prompt are what preference data is: pairs never count as conflicting answers.
    asks = alive and not (row["_pair"] if "_pair" in row else row.get("rejected"))
    prompt = (row["_prompt"] if "_prompt" in row else prompt_key(row["messages"])) if asks else 0
    if asks:
        q.ask(prompt, q.seen, row["source_file"], row["row"])
    q.order[split].append(q.seen)
    q.alive[split].append(alive)
    q.prompts[split].append(prompt)
    q.groups[split].append(row.get("_group", 0))
    q.seen += 1
    if not stored:
        out.splits[split].append({k: v for k, v in row.items() if k[0] != "_"} if "_group" in row else row)

"""Rows/s of prepare's quality path on generated rows: read + shape, PII, exact dedup + split,
decontamination, near-dedup (and rendering with the repo's tokenizer, on a sample, when models/base exists).

    python bench/data_speed.py --rows 100000 --out bench-data.json

The rows are seeded and realistic in shape: support-style instruction rows (a few templates, a
vocabulary of ~4k words, names, order numbers) with ~5% paraphrased near-duplicates, ~2% exact
duplicates, ~3% rows holding PII (email, phone, card, IP) and ~2% edited copies of other rows (some
of which land in the test split: contamination). Each step runs the same objects prepare runs
(readers, shapes, PiiScrubber, Deduplicator/split_of, TestIndex, NearDuplicateIndex, render), in
prepare's order, one after the other, timed separately; total rows/s = rows / sum of the steps.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from loraline.config import PrepareParams
from loraline.data.quality import row_text
from loraline.data.quality.decontam import TestIndex
from loraline.data.quality.near_dup import NearDuplicateIndex
from loraline.data.quality.pii import PiiScrubber
from loraline.data.readers import read_rows
from loraline.data.shapes import to_record
from loraline.data.split import Deduplicator, split_of

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = [
    "Hello, my order {order} with the {a} {b} arrived {c} but {d} {e} {f}. Could you {g} it please? {h} {i} {j}.",
    "Subject: {a} {b}\n\nHi team,\n{c} {d} {e} since {f}. I {g} {h} and {i} the {j}. Order {order}.\n\nThanks,\n{name}",
    "Can you tell me how to {a} the {b} {c}? I tried {d} and {e} but {f} keeps {g}. It is {h} {i} {j}.",
]


def vocabulary(rng: random.Random, n: int = 4000) -> list[str]:
    syllables = ["ka", "lo", "mi", "nu", "po", "ri", "su", "te", "va", "we", "xo", "yu", "zi", "bra", "cle", "dro", "fin", "gal"]
    return sorted({"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(n * 2)})[:n]


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = vocabulary(rng)
    names = [f"{rng.choice(words).title()} {rng.choice(words).title()}" for _ in range(500)]
    rows: list[dict] = []
    for i in range(n):
        roll = rng.random()
        if rows and roll < 0.05:  # paraphrase: one word of an earlier row changed
            src = rng.choice(rows)
            user = src["instruction"].split(" ")
            user[rng.randrange(len(user))] = rng.choice(words)
            rows.append({"instruction": " ".join(user), "output": src["output"]})
            continue
        if rows and roll < 0.07:  # exact duplicate
            rows.append(dict(rng.choice(rows)))
            continue
        if rows and roll < 0.09:  # edited copy (a quarter of words changed): contamination when one side is test
            src = rng.choice(rows)
            user = src["instruction"].split(" ")
            for _ in range(len(user) // 8):
                user[rng.randrange(len(user))] = rng.choice(words)
            rows.append({"instruction": " ".join(user), "output": src["output"] + " " + rng.choice(words)})
            continue
        slots = {k: rng.choice(words) for k in "abcdefghij"}
        user = rng.choice(TEMPLATES).format(order=rng.randint(10000, 99999), name=rng.choice(names), **slots)
        if roll > 0.97:
            user += " " + rng.choice([
                f"Reach me at {rng.choice(words)}@example.com.", f"Call +44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}.",
                "My card is 4111 1111 1111 1111.", f"My IP is 10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.7.",
            ])
        answer = " ".join(rng.choices(words, k=rng.randint(8, 30)))
        rows.append({"instruction": user, "output": answer})
    return rows


def timed(results: dict, name: str, n: int, started: float) -> None:
    seconds = time.perf_counter() - started
    results["steps"][name] = {"rows": n, "seconds": round(seconds, 3), "rows_per_s": round(n / seconds) if seconds else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--render-sample", type=int, default=2000, help="rows rendered with the base tokenizer (0: skip)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    params = PrepareParams()
    results: dict = {"rows": args.rows, "seed": args.seed, "steps": {}}

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows, args.seed)), encoding="utf-8")

        t = time.perf_counter()
        records = []
        for item in read_rows(path, "rows.jsonl", "bench"):
            parsed = to_record(item, "bench", max_chars=params.max_chars)
            records.append(parsed.record)
        timed(results, "read+shape", len(records), t)

    t = time.perf_counter()
    scrubber, pii_rows = PiiScrubber(params.pii.types), 0
    messages = []
    for rec in records:
        found_any = False
        turns = []
        for m in rec.messages:
            text, found = scrubber.scrub(m.content)
            found_any |= bool(found)
            turns.append({"role": m.role, "content": text})
        pii_rows += found_any
        messages.append(turns)
    timed(results, "pii", len(records), t)
    results["pii_rows"] = pii_rows

    t = time.perf_counter()
    from loraline.data.split import content_hash

    dedup, kept = Deduplicator(), []
    for rec, turns in zip(records, messages):
        h = content_hash((m["role"], m["content"]) for m in turns)
        if dedup.duplicate(h, rec.source_file, rec.row) is None:
            dedup.keep(h, rec.source_file, rec.row)
            kept.append((h, split_of(h, params.split), row_text(turns)))
    timed(results, "exact-dedup+split", len(records), t)
    results["exact_duplicates"] = len(records) - len(kept)

    t = time.perf_counter()
    index = TestIndex(params.decontamination)
    for h, split, text in kept:
        if split == "test":
            index.add(h, text)
    clean = [(h, split, text) for h, split, text in kept if split == "test" or index.match(text) is None]
    timed(results, "decontamination", len(kept), t)
    results["contaminated"] = len(kept) - len(clean)

    t = time.perf_counter()
    near = NearDuplicateIndex(params.near_dedup, seed=args.seed)
    final = [row for row in clean if near.check(row[0], row[2]) is None]
    timed(results, "near-dedup", len(clean), t)
    results["near_duplicates"] = len(clean) - len(final)
    results["kept"] = len(final)

    seconds = sum(s["seconds"] for s in results["steps"].values())
    results["total"] = {"seconds": round(seconds, 3), "rows_per_s": round(args.rows / seconds)}

    base = ROOT / "models" / "base"
    if args.render_sample and (base / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from loraline.data.render import render
        from loraline.data.schema import Message

        tokenizer = AutoTokenizer.from_pretrained(str(base))
        sample = records[: args.render_sample]
        t = time.perf_counter()
        for rec in sample:
            render([Message(m.role, m.content) for m in rec.messages], tokenizer)
        timed(results, "render (sample)", len(sample), t)
    else:
        results["render"] = "skipped: no models/base (run `loraline base`) or --render-sample 0"

    for name, s in results["steps"].items():
        print(f"{name:>20}: {s['rows']:>7} rows  {s['seconds']:>8.2f} s  {s['rows_per_s']:>9,} rows/s")
    print(f"{'quality path total':>20}: {args.rows:>7} rows  {seconds:>8.2f} s  {results['total']['rows_per_s']:>9,} rows/s")
    print(json.dumps({k: v for k, v in results.items() if k != "steps"}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

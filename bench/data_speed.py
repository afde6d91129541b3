"""Rows/s and memory of prepare's per-row steps on generated rows: read + shape, PII, exact dedup +
split, decontamination, near-dedup and rendering (chat template, tokenization, label mask).

    python bench/data_speed.py --rows 1000000 --baseline --out bench-data.json

The rows are seeded and realistic in shape: support-style instruction rows (a few templates, a
vocabulary of ~4k words, names, order numbers) with ~5% paraphrased near-duplicates, ~2% exact
duplicates, ~3% rows holding PII (email, phone, card, IP) and ~2% edited copies of other rows (some
of which land in the test split: contamination). They are written to a temporary JSONL file as they
are generated. Each step runs the objects prepare runs (readers, shapes, PiiScrubber,
Deduplicator/split_of, TestIndex, NearDuplicateIndex, render_batch), in prepare's order, one after
the other, timed separately; total rows/s = rows / sum of the steps. Rendering covers every row,
with models/base's tokenizer when it exists, else one trained here like `loraline base` trains it.

--baseline also runs the per-row implementations these steps replaced (the files as of
BASELINE_REV, loaded from git), on the same rows right after each new step, checks that both give
the same results, and reports the speedup. Memory: the process's resident size after each step and
its peak so far (ru_maxrss), so the growth of the peak during a step is that step's cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

from loraline.config import BuildParams, PrepareParams
from loraline.prepare import split as split_module
from loraline.prepare.quality import row_text
from loraline.prepare.quality.decontam import TestIndex
from loraline.prepare.quality.near_dup import NearDuplicateIndex
from loraline.prepare.quality.pii import PiiScrubber
from loraline.prepare.readers import read_rows
from loraline.prepare.render import render_batch
from loraline.prepare.schema import ChatTemplateError, Message
from loraline.prepare.shapes import to_record

ROOT = Path(__file__).resolve().parents[1]
# The last commit before the batched render, near-dup, PII and decontamination paths.
BASELINE_REV = "4f40589"
BATCH = 1024  # rows per render_batch / check_batch call
TEMPLATES = [
    "Hello, my order {order} with the {a} {b} arrived {c} but {d} {e} {f}. Could you {g} it please? {h} {i} {j}.",
    "Subject: {a} {b}\n\nHi team,\n{c} {d} {e} since {f}. I {g} "
    "{h} and {i} the {j}. Order {order}.\n\nThanks,\n{name}",
    "Can you tell me how to {a} the {b} {c}? I tried {d} and {e} but {f} keeps {g}. It is {h} {i} {j}.",
]


def vocabulary(rng: random.Random, n: int = 4000) -> list[str]:
    syllables = [
        "ka",
        "lo",
        "mi",
        "nu",
        "po",
        "ri",
        "su",
        "te",
        "va",
        "we",
        "xo",
        "yu",
        "zi",
        "bra",
        "cle",
        "dro",
        "fin",
        "gal",
    ]
    return sorted({"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(n * 2)})[:n]


def make_rows(n: int, seed: int) -> Iterator[dict]:
    """The rows, one at a time; earlier rows are kept only as (instruction, output) to copy from."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    names = [f"{rng.choice(words).title()} {rng.choice(words).title()}" for _ in range(500)]
    rows: list[tuple[str, str]] = []
    for _ in range(n):
        roll = rng.random()
        if rows and roll < 0.05:  # paraphrase: one word of an earlier row changed
            instruction, output = rng.choice(rows)
            user = instruction.split(" ")
            user[rng.randrange(len(user))] = rng.choice(words)
            row = (" ".join(user), output)
        elif rows and roll < 0.07:  # exact duplicate
            row = rng.choice(rows)
        elif rows and roll < 0.09:  # edited copy (a quarter of words changed): contamination when one side is test
            instruction, output = rng.choice(rows)
            user = instruction.split(" ")
            for _ in range(len(user) // 8):
                user[rng.randrange(len(user))] = rng.choice(words)
            row = (" ".join(user), output + " " + rng.choice(words))
        else:
            slots = {k: rng.choice(words) for k in "abcdefghij"}
            user = rng.choice(TEMPLATES).format(order=rng.randint(10000, 99999), name=rng.choice(names), **slots)
            if roll > 0.97:
                user += " " + rng.choice(
                    [
                        f"Reach me at {rng.choice(words)}@example.com.",
                        f"Call +44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}.",
                        "My card is 4111 1111 1111 1111.",
                        f"My IP is 10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.7.",
                    ]
                )
            row = (user, " ".join(rng.choices(words, k=rng.randint(8, 30))))
        rows.append(row)
        yield {"instruction": row[0], "output": row[1]}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Steps:
    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    def run(self, name: str, n: int, fn: Callable[[], object], baseline: Callable[[], object] | None = None) -> object:
        """fn() timed (and baseline() right after it, when given); fn's result."""
        peak_before = peak_mib()
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        step = {
            "rows": n,
            "seconds": round(seconds, 3),
            "rows_per_s": round(n / seconds) if seconds else None,
            "rss_mib": round(rss_mib()),
            "peak_mib": round(peak_mib()),
            "peak_growth_mib": round(peak_mib() - peak_before),
        }
        if baseline is not None:
            t = time.perf_counter()
            same = baseline(out)
            base_seconds = time.perf_counter() - t
            step["baseline"] = {
                "seconds": round(base_seconds, 3),
                "rows_per_s": round(n / base_seconds),
                "same_results": same,
            }
            step["speedup"] = round(base_seconds / seconds, 2)
        self.results[name] = step
        print(f"  {name}: {step}", file=sys.stderr, flush=True)
        return out


def load_baseline(rev: str, path: str) -> types.ModuleType:
    """The module at `path` as of commit `rev`, loaded under a name of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    name = f"baseline_{rev}_{Path(path).stem}"
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def bench_tokenizer(rows: int, seed: int):
    base = ROOT / "models" / "base"
    if (base / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(base)), "models/base"
    from loraline.base.tokenizer import train_tokenizer

    sample = [f"{r['instruction']}\n{r['output']}" for r in make_rows(min(rows, 20_000), seed)]
    return train_tokenizer(sample, BuildParams().vocab_size), f"trained here on {len(sample):,} rows"


def rendered_digest(results, digest) -> tuple[int, int]:
    """(tokens, errors) of a render batch, its ids, labels and error messages folded into digest."""
    tokens = errors = 0
    for r in results:
        if isinstance(r, ChatTemplateError):
            errors += 1
            digest.update(b"E" + str(r).encode())
        else:
            tokens += r.n_tokens
            digest.update(json.dumps([r.input_ids, r.labels, r.spans]).encode())
    return tokens, errors


def table(results: dict[str, dict], rows: int, quality_seconds: float, total: float) -> str:
    """The results as a Markdown table (docs/benchmarks.md takes it as is)."""
    lines = [
        "| step | rows | seconds | rows/s | baseline rows/s | speedup | same results | RSS MiB | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, s in results.items():
        b = s.get("baseline")
        base = f"{b['rows_per_s']:,} | {s['speedup']:.2f}x | {'yes' if b['same_results'] else 'NO'}" if b else " | | "
        lines.append(
            f"| {name} | {s['rows']:,} | {s['seconds']:.2f} | {s['rows_per_s']:,} "
            f"| {base} | {s['rss_mib']:,} | {s['peak_mib']:,} |"
        )
    for name, seconds in (("quality path (all but render)", quality_seconds), ("all steps", total)):
        lines.append(f"| **{name}** | {rows:,} | {seconds:.2f} | **{round(rows / seconds):,}** | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-render", action="store_true", help="skip rendering (the slowest step)")
    ap.add_argument(
        "--baseline", action="store_true", help=f"also time the per-row paths of {BASELINE_REV} on the same rows"
    )
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    params = PrepareParams()
    steps = Steps()
    summary_extra: dict = {}
    old = {}
    if args.baseline:
        for key, path in [
            ("pii", "src/loraline/prepare/quality/pii.py"),
            ("split", "src/loraline/prepare/split.py"),
            ("decontam", "src/loraline/prepare/quality/decontam.py"),
            ("near", "src/loraline/prepare/quality/near_dup.py"),
            ("render", "src/loraline/prepare/render.py"),
        ]:
            old[key] = load_baseline(args.baseline_rev, path)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in make_rows(args.rows, args.seed):
                f.write(json.dumps(row) + "\n")

        def read() -> list:
            return [
                to_record(item, "bench", max_chars=params.max_chars).record
                for item in read_rows(path, "rows.jsonl", "bench")
            ]

        records = steps.run("read+shape", args.rows, read)

    scrubber = PiiScrubber(params.pii.types)

    def pii(scrub) -> tuple[list[list[dict]], int]:
        messages, pii_rows = [], 0
        for rec in records:
            found_any, turns = False, []
            for m in rec.messages:
                text, found = scrub(m.content)
                found_any |= bool(found)
                turns.append({"role": m.role, "content": text})
            pii_rows += found_any
            messages.append(turns)
        return messages, pii_rows

    baseline_pii = old["pii"].PiiScrubber(params.pii.types).scrub if old else None
    messages, pii_rows = steps.run(
        "pii", len(records), lambda: pii(scrubber.scrub), (lambda new: pii(baseline_pii) == new) if old else None
    )

    def exact(split) -> list[tuple[str, str, str]]:
        dedup, kept = split.Deduplicator(), []
        for rec, turns in zip(records, messages):
            h = split.content_hash((m["role"], m["content"]) for m in turns)
            if dedup.duplicate(h, rec.source_file, rec.row) is None:
                dedup.keep(h, rec.source_file, rec.row)
                kept.append((h, split.split_of(h, params.split), row_text(turns)))
        return kept

    kept = steps.run(
        "exact-dedup+split",
        len(records),
        lambda: exact(split_module),
        (lambda new: exact(old["split"]) == new) if old else None,
    )

    def decontaminate(index_class) -> list[tuple[str, str, str]]:
        index = index_class(params.decontamination)
        for h, split, text in kept:
            if split == "test":
                index.add(h, text)
        return [(h, split, text) for h, split, text in kept if split == "test" or index.match(text) is None]

    clean = steps.run(
        "decontamination",
        len(kept),
        lambda: decontaminate(TestIndex),
        (lambda new: decontaminate(old["decontam"].TestIndex) == new) if old else None,
    )

    def near_dedup() -> list:
        near, decisions = NearDuplicateIndex(params.near_dedup, seed=args.seed), []
        for start in range(0, len(clean), BATCH):
            part = clean[start : start + BATCH]
            decisions += near.check_batch([r[0] for r in part], [r[2] for r in part])
        return [d and (d.kept_key, d.jaccard) for d in decisions]

    def near_dedup_baseline(new) -> bool:
        # The old index gave a tie whose Jaccard rounds down (e.g. 113/128 = 0.8828125) to whichever
        # kept row its query set yielded last, which varies with PYTHONHASHSEED; the new one gives it
        # to the earliest kept row, as documented. Such a tie is the only difference allowed.
        near = old["near"].NearDuplicateIndex(params.near_dedup, seed=args.seed)
        ties = 0
        for (h, _, text), got in zip(clean, new):
            want = near.check(h, text)
            if want is None or got is None:
                if want is not got:
                    return False
            elif want.jaccard != got[1] or (
                want.kept_key != got[0] and near._order[got[0]] > near._order[want.kept_key]
            ):
                return False
            else:
                ties += want.kept_key != got[0]
        summary_extra["near_dedup_ties_resolved_differently"] = ties
        return True

    decisions = steps.run("near-dedup", len(clean), near_dedup, near_dedup_baseline if old else None)
    final = sum(d is None for d in decisions)
    quality_seconds = sum(s["seconds"] for s in steps.results.values())

    summary: dict = {
        "rows": args.rows,
        "seed": args.seed,
        "pii_rows": pii_rows,
        "exact_duplicates": len(records) - len(kept),
        "contaminated": len(kept) - len(clean),
        "near_duplicates": len(clean) - final,
        "kept": final,
    }
    if not args.no_render:
        tokenizer, source = bench_tokenizer(args.rows, args.seed)
        summary["tokenizer"] = source
        conversations = ([Message(m.role, m.content) for m in rec.messages] for rec in records)

        def render_all() -> tuple[int, int, str]:
            digest, tokens, errors, batch = hashlib.sha256(), 0, 0, []
            for conversation in [*conversations, None]:
                if conversation is not None:
                    batch.append(conversation)
                if batch and (conversation is None or len(batch) == BATCH):
                    t, e = rendered_digest(render_batch(batch, tokenizer), digest)
                    tokens, errors, batch = tokens + t, errors + e, []
            return tokens, errors, digest.hexdigest()

        def render_baseline(new) -> bool:
            digest, tokens, errors = hashlib.sha256(), 0, 0
            for rec in records:
                try:
                    result = old["render"].render([Message(m.role, m.content) for m in rec.messages], tokenizer)
                except ChatTemplateError as exc:
                    result = exc
                t, e = rendered_digest([result], digest)
                tokens, errors = tokens + t, errors + e
            return (tokens, errors, digest.hexdigest()) == new

        tokens, errors, _ = steps.run("render", len(records), render_all, render_baseline if old else None)
        summary.update(tokens=tokens, render_errors=errors)

    total = sum(s["seconds"] for s in steps.results.values())
    summary["quality_path"] = {"seconds": round(quality_seconds, 3), "rows_per_s": round(args.rows / quality_seconds)}
    summary["total"] = {"seconds": round(total, 3), "rows_per_s": round(args.rows / total)}
    summary.update(summary_extra)
    summary["peak_mib"] = round(peak_mib())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)

    print(table(steps.results, args.rows, quality_seconds, total))
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "steps": steps.results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

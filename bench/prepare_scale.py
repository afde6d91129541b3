"""The whole prepare stage at scale: rows/s and peak memory of `prepare_tenant` on one generated JSONL file.

    python bench/prepare_scale.py --rows 1000000              # ~1M rows
    python bench/prepare_scale.py --gigabytes 1               # rows until the file reaches 1 GB

Unlike bench/data_speed.py (each step on its own), this runs the stage as DVC does: read and map,
PII, exact and near-duplicate removal, decontamination, split, chat template and tokenization, then
the saved datasets, card and reports. The rows come from data_speed.make_rows (support-style rows
with paraphrases, duplicates, PII and edited copies) with longer answers when --gigabytes asks for
big rows. Prepare runs in a child process so that its peak RSS is its own (ru_maxrss of the child).
The tokenizer is a byte-level BPE of the default base's size (2,048), trained on a sample of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS_PER_CHUNK = 100_000


def write_rows(path: Path, rows: int | None, gigabytes: float | None, seed: int) -> int:
    """Generated rows appended chunk by chunk (bounded memory); returns how many were written."""
    from data_speed import make_rows

    limit = int(gigabytes * 1e9) if gigabytes else None
    written = 0
    chunk_seed = seed
    with open(path, "w", encoding="utf-8") as fh:
        while (rows is None or written < rows) and (limit is None or fh.tell() < limit):
            n = ROWS_PER_CHUNK if rows is None else min(ROWS_PER_CHUNK, rows - written)
            for row in make_rows(n, chunk_seed):
                fh.write(json.dumps(row) + "\n")
            written += n
            chunk_seed += 1
    return written


def child(raw_dir: Path, work: Path) -> dict:
    from loraline.base.tokenizer import train_tokenizer
    from loraline.config import PrepareParams, TenantParams
    from loraline.modelling.chat import CHAT_TEMPLATE
    from loraline.prepare.stage import prepare_tenant

    sample = []
    with open(next(raw_dir.glob("*.jsonl")), encoding="utf-8") as fh:
        for _, line in zip(range(20_000), fh):
            row = json.loads(line)
            sample.append(row["instruction"] + "\n" + row["output"])
    tokenizer = train_tokenizer(sample, vocab_size=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    started = time.perf_counter()
    result = prepare_tenant(
        TenantParams(name="bench", raw_dir=raw_dir),
        PrepareParams(seed=1234),
        tokenizer,
        out_dir=work / "prepared",
        rejected_path=work / "rejected.jsonl",
        stats_path=work / "stats.json",
    )
    seconds = time.perf_counter() - started
    s = result.stats
    return {
        "rows_in": s.rows_in,
        "kept": s.kept,
        "rejected": s.rejected,
        "duplicates": s.duplicates,
        "near_duplicates": s.near_duplicates,
        "contaminated": s.contaminated,
        "seconds": round(seconds, 1),
        # the main process: workers are forked from it, so most of their pages are its pages (and a
        # child's ru_maxrss counts the parent's pages it shared at fork, even for a `git` it execs)
        "rows_per_s": round(s.rows_in / seconds),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, help="rows to generate (default 1,000,000)")
    size.add_argument("--gigabytes", type=float, help="generate rows until the file is this large")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", help="also write the result as JSON here")
    ap.add_argument("--child", nargs=2, metavar=("RAW_DIR", "WORK"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(Path(a.child[0]), Path(a.child[1]))))
        return 0
    rows = a.rows if a.rows or a.gigabytes else 1_000_000
    with tempfile.TemporaryDirectory(prefix="prepare-scale-") as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        data = raw / "rows.jsonl"
        started = time.perf_counter()
        n = write_rows(data, rows, a.gigabytes, a.seed)
        print(
            f"generated {n:,} rows, {data.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(raw), str(Path(tmp) / "work")],
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "true"},
        )
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["file_mb"] = round(data.stat().st_size / 1e6)
    print("| rows in | file MB | kept | rejected | dup | near-dup | contaminated | seconds | rows/s | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    r = result
    print(
        f"| {r['rows_in']:,} | {r['file_mb']:,} | {r['kept']:,} | {r['rejected']:,} | {r['duplicates']:,} | "
        f"{r['near_duplicates']:,} | {r['contaminated']:,} | "
        f"{r['seconds']} | {r['rows_per_s']:,} | {r['peak_rss_mib']:,} |"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

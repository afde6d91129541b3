"""The synthesize stage for one tenant: its documents to instruction/answer rows with provenance.

Reads `data/documents/<tenant>/` (the documents stage's output and its documents.json), and writes,
the folder atomically:

    out_dir/rows.jsonl       {"id", "messages": [user, assistant], "provenance": {...}} per kept row
                             (the prepare stage reads this file: keep the shape)
    out_dir/rejected.jsonl   {"reason", "detail", "question", "answer", "provenance"} per rejected row
    stats_path               counts (generated = kept + rejected, by reason, by generator, by
                             document), document hashes, params, code fingerprint (a DVC output)

The counts are checked to reconcile before anything is written. `run` also writes the counts people
compare (reports/<tenant>/metrics/synthesize.json, a DVC metric) and the run's facts that differ from
run to run, such as an endpoint's requests and cache hits (reports/timing/synthesize@<tenant>.json).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraline.config import Params, SeedTask, SynthesizeParams
from loraline.io import atomic_dir, write_json, write_jsonl, write_timing
from loraline.layout import DOCUMENTS_MANIFEST as MANIFEST
from loraline.layout import SYNTHETIC_ROWS, Layout
from loraline.progress import progress_bar
from loraline.provenance import code_fingerprint, run_timing, sha256_bytes
from loraline.synthesize.base import Generated, Generator, SynthesizeError, make_generator
from loraline.synthesize.filters import REASONS, FilterChain
from loraline.synthesize.passages import Document, make_document

ROWS = SYNTHETIC_ROWS
REJECTED = "rejected.jsonl"


@dataclass(frozen=True)
class SynthesizeResult:
    tenant: str
    rows_path: Path
    rejected_path: Path
    stats_path: Path
    generated: int
    kept: int
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    stats: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)  # the generator's counters (requests, cache hits...)


@dataclass
class _Tally:
    """What generation produced, in generation order, and its counts."""

    rows: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    by_document: dict[str, Counter] = field(default_factory=dict)
    methods: Counter = field(default_factory=Counter)
    generated: int = 0


def run(params: Params, layout: Layout, tenant: str, *, progress: bool = False) -> SynthesizeResult:
    """The synthesize stage for one tenant: rows from data/documents/<tenant> into data/synthetic/<tenant>."""
    started = time.perf_counter()
    result = synthesize_tenant(
        tenant,
        params.synthesize,
        layout.documents_dir(tenant),
        layout.synthetic_dir(tenant),
        layout.synthesize_stats_path(tenant),
        seed=params.seed,
        seed_tasks=params.tenant_params(tenant).seed_tasks,
        cache_dir=layout.synth_cache_dir(tenant),
        progress=progress,
    )
    write_json(layout.metrics_path("synthesize", tenant), synthesize_metrics(result))
    write_timing(
        layout.timing_path("synthesize", tenant),
        run_timing(started, **({"usage": result.usage} if result.usage else {})),
    )
    return result


def synthesize_metrics(result: SynthesizeResult) -> dict[str, int]:
    """The counts worth comparing across runs (`dvc metrics diff`); the rest is in synthesize_stats.json."""
    return {"generated": result.generated, "kept": result.kept, "rejected": sum(result.rejected.values())}


def synthesize_tenant(
    tenant: str,
    params: SynthesizeParams,
    documents_dir: Path,
    out_dir: Path,
    stats_path: Path,
    *,
    seed: int,
    seed_tasks: Sequence[SeedTask] = (),
    cache_dir: Path | None = None,
    generator: Generator | None = None,
    progress: bool = False,
) -> SynthesizeResult:
    """Generate, filter and write one tenant's synthetic rows; see the module docstring."""
    gen = generator or make_generator(params, cache_dir=cache_dir)
    docs = load_documents(documents_dir)
    tally = _generate(tenant, params, gen, docs, seed, seed_tasks, progress)
    by_reason = Counter(r["reason"] for r in tally.rejected)
    if tally.generated != len(tally.rows) + sum(by_reason.values()) or any(r not in REASONS for r in by_reason):
        raise SynthesizeError(
            f"synthesize[{tenant}]: counts do not reconcile: generated {tally.generated} != "
            f"kept {len(tally.rows)} + rejected {dict(by_reason)}"
        )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / ROWS, tally.rows)
        write_jsonl(tmp / REJECTED, tally.rejected)
    stats = _stats(tenant, params, gen, docs, tally, by_reason, seed=seed, seed_tasks=seed_tasks, out_dir=out_dir)
    write_json(stats_path, stats)
    return SynthesizeResult(
        tenant=tenant,
        rows_path=out_dir / ROWS,
        rejected_path=out_dir / REJECTED,
        stats_path=Path(stats_path),
        generated=tally.generated,
        kept=len(tally.rows),
        rejected=dict(by_reason),
        stats=stats,
        usage=gen.usage(),
    )


def _generate(
    tenant: str,
    params: SynthesizeParams,
    gen: Generator,
    docs: list[Document],
    seed: int,
    seed_tasks: Sequence[SeedTask],
    progress: bool,
) -> _Tally:
    """Every document's generated rows (at most max_rows_per_document each) through the filters."""
    chain = FilterChain(params.filters)
    tally = _Tally()
    for doc in progress_bar(docs, desc=f"synthesize[{tenant}]", unit="doc", disable=not progress):
        counts = tally.by_document.setdefault(doc.source, Counter())
        for item in gen.generate(doc, seed, seed_tasks):
            if params.max_rows_per_document is not None and counts["generated"] >= params.max_rows_per_document:
                break
            tally.generated += 1
            counts["generated"] += 1
            tally.methods[item.method.split(":")[0]] += 1
            _keep_or_reject(tally, counts, chain, tenant, item, _provenance(gen, item, doc, seed), doc)
    return tally


def _keep_or_reject(
    tally: _Tally, counts: Counter, chain: FilterChain, tenant: str, item: Generated, prov: dict, doc: Document
) -> None:
    """One generated row into the tally's rows, or its rejects with the first filter's reason."""
    span_text = doc.text[item.span[0] : item.span[1]]
    verdict = (item.reject, item.detail or "") if item.reject else chain.check(item.question, item.answer, span_text)
    if verdict:
        reason, detail = verdict
        tally.rejected.append(
            {"reason": reason, "detail": detail, "question": item.question, "answer": item.answer, "provenance": prov}
        )
        return
    row_id = _row_id(tenant, item)
    chain.keep(item.question, item.answer, row_id)
    counts["kept"] += 1
    tally.rows.append(
        {
            "id": row_id,
            "messages": [
                {"role": "user", "content": item.question},
                {"role": "assistant", "content": item.answer},
            ],
            "provenance": prov,
        }
    )


def _stats(
    tenant: str,
    params: SynthesizeParams,
    gen: Generator,
    docs: list[Document],
    tally: _Tally,
    by_reason: Counter,
    *,
    seed: int,
    seed_tasks: Sequence[SeedTask],
    out_dir: Path,
) -> dict[str, Any]:
    """synthesize_stats.json: the counts, the documents' hashes, the rows' hash, params and code."""
    return {
        "tenant": tenant,
        "generator": gen.name,
        "model": gen.model,
        "prompt_template_sha256": gen.template_sha256,
        "seed": seed,
        "seed_tasks": len(seed_tasks),
        "generated": tally.generated,
        "kept": len(tally.rows),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": {r: by_reason.get(r, 0) for r in REASONS},
        "by_generator": {gen.name: {"generated": tally.generated, "kept": len(tally.rows)}},
        "by_method": dict(sorted(tally.methods.items())),
        "by_document": {
            k: {"generated": v["generated"], "kept": v["kept"]} for k, v in sorted(tally.by_document.items())
        },
        "documents": {d.source: d.sha256 for d in docs},
        "rows_sha256": sha256_bytes((out_dir / ROWS).read_bytes()),
        "params": params.model_dump(mode="json"),
        "code": code_fingerprint(__name__),
    }


def load_documents(documents_dir: Path) -> list[Document]:
    """The documents listed in documents.json, in a stable order, checked against their hashes."""
    manifest_path = Path(documents_dir) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: run `loraline documents` (or dvc repro documents) first")
    files: dict[str, str] = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    docs = []
    for rel in sorted(files):
        data = (Path(documents_dir) / rel).read_bytes()
        if sha256_bytes(data) != files[rel]:
            raise SynthesizeError(
                f"{documents_dir}/{rel} differs from its hash in {MANIFEST}: re-run the documents stage"
            )
        docs.append(make_document(rel, data.decode("utf-8"), files[rel]))
    return docs


def _provenance(gen: Generator, item: Generated, doc: Document, seed: int) -> dict[str, Any]:
    return {
        "generator": gen.name,
        "model": gen.model,
        "prompt_template_sha256": gen.template_sha256,
        "source": doc.source,
        "document_sha256": doc.sha256,
        "span": [item.span[0], item.span[1]],
        "seed": seed,
        "seed_tasks": list(item.seed_tasks),
        "method": item.method,
    }


def _row_id(tenant: str, item: Generated) -> str:
    key = f"{tenant}\0{item.source}\0{item.span[0]}\0{item.span[1]}\0{item.question}\0{item.answer}"
    return "syn-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

"""The `documents` stage: each tenant's plain documents (.txt, .md), collected for base pretraining.

A stage of its own so that the base model depends on the tenants' documents only: editing a tenant's
instruction rows re-runs this stage, whose output stays the same, and DVC then leaves the base model
(and every other tenant) alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loraline.config import Params, TenantParams
from loraline.io import atomic_dir, write_json
from loraline.layout import DOCUMENTS_MANIFEST as MANIFEST
from loraline.layout import Layout
from loraline.provenance import sha256_file

DOCUMENT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class DocumentsResult:
    tenant: str
    out_dir: Path
    files: dict[str, str]  # relative path -> sha256
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> reason


def run(params: Params, layout: Layout, tenant: str, out_dir: Path | None = None) -> DocumentsResult:
    """The documents stage for one tenant: its raw folder's documents into data/documents/<tenant>."""
    t = params.tenant_params(tenant)
    out_dir = out_dir or layout.documents_dir(tenant)
    return collect_documents(
        tenant, t.raw_dir, out_dir, allow_outside_dirs=t.allow_outside_dirs, project=params.project
    )


def collect_documents(
    tenant: str, raw_dir: Path, out_dir: Path, *, allow_outside_dirs: Sequence[Path] = (), project: Path | None = None
) -> DocumentsResult:
    """Copy the tenant's UTF-8 documents from `raw_dir` into `out_dir`, keeping relative paths.

    Files that are empty or not valid UTF-8 are left out and listed with the reason; the prepare
    stage rejects the same files row by row, so nothing is silently lost. A document that resolves
    outside `project` (raw_dir when None) and `allow_outside_dirs` (a symlink out) is refused with
    OutsidePathError before anything is written.
    """
    raw_dir = Path(raw_dir)
    reads = TenantParams(name=tenant, raw_dir=raw_dir, allow_outside_dirs=list(allow_outside_dirs))
    if project is not None:
        reads.check_raw_dir(project, read_as=raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(
            f"tenant {tenant!r}: raw_dir {raw_dir} is not a folder (params: tenants.{tenant}.raw_dir)"
        )
    documents = _document_files(raw_dir)
    reads.check_sources(documents, project)
    files: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with atomic_dir(out_dir) as tmp:
        for path, rel in documents:
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                skipped[rel] = f"invalid UTF-8 at byte {exc.start}"
                continue
            if not text.strip():
                skipped[rel] = "empty document"
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            files[rel] = sha256_file(target)
        write_json(tmp / MANIFEST, {"tenant": tenant, "files": files, "skipped": skipped})
    return DocumentsResult(tenant=tenant, out_dir=Path(out_dir), files=files, skipped=skipped)


def _document_files(raw_dir: Path) -> list[tuple[Path, str]]:
    """(path, path relative to raw_dir) of every .txt/.md file under raw_dir, hidden ones left out, sorted."""
    found = []
    for path in sorted(raw_dir.rglob("*")):
        parts = path.relative_to(raw_dir).parts
        if path.is_file() and path.suffix.lower() in DOCUMENT_SUFFIXES and not any(p.startswith(".") for p in parts):
            found.append((path, "/".join(parts)))
    return found

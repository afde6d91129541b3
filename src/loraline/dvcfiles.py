"""The project's DVC files: the root dvc.yaml (the shared stages, the registry's artifacts, the timing
metrics), one dvc.yaml per tenant rendered from pipelines/tenant.yaml, and the dvc.lock DVC writes beside
each dvc.yaml.

Why one file per tenant: DVC reads and rewrites a stage's whole dvc.lock on every stage run. With every
tenant in one lock (31 KB a tenant), a stage run at 1,000 tenants parsed 30 MB of YAML before doing
anything; with a lock per tenant it reads its own tenant's and the root's, whatever the number of tenants
(docs/benchmarks.md, "Scaling: tenants and versions").

Invariants:
- A rendered file starts with RENDERED_MARK; `sync_pipelines` writes and removes only such files, so a
  dvc.yaml a person wrote under pipelines/ is never overwritten (it is reported instead).
- Rendering is a text substitution of the validated tenant name (config.TENANT_NAME: lower-case letters,
  digits and '-'), so the same template and tenants give the same bytes.
- Lock entries keep the names one dvc.yaml with a foreach would give (`train@acme-shop`), so `read_lock`
  merges the root's and the tenants' locks into one {stage: entry} mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraline.io import atomic_write_text
from loraline.layout import PIPELINES_DIR, TENANT_TEMPLATE, tenant_dvc_file

PLACEHOLDER = "<tenant>"
RENDERED_MARK = "# Rendered by `loraline pipelines` from"


@dataclass
class PipelineSync:
    """What `sync_pipelines` changed (paths relative to the project root)."""

    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if not (self.written or self.removed):
            return "pipelines: every tenant's dvc.yaml is up to date"
        done = [
            (f"wrote {', '.join(self.written)}", self.written),
            (f"removed {', '.join(self.removed)}", self.removed),
        ]
        return "pipelines: " + "; ".join(words for words, paths in done if paths)


def sync_pipelines(root: str | Path, tenants: list[str], dry_run: bool = False) -> PipelineSync:
    """Render pipelines/tenant.yaml into every tenant's dvc.yaml that differs from it, and remove the rendered
    dvc.yaml (and its dvc.lock) of a tenant no longer in `tenants`. `dry_run`: report what would change only."""
    root = Path(root)
    template = read_template(root)
    change = PipelineSync()
    for tenant in tenants:
        path = root / tenant_dvc_file(tenant)
        text = render_tenant_pipeline(template, tenant)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if current is not None and not current.startswith(RENDERED_MARK):
            raise ValueError(f"{path}: not rendered by `loraline pipelines`; move it away to let it write {tenant}'s")
        change.written.append(tenant_dvc_file(tenant))
        if not dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
    for stale in _rendered_tenants(root) - set(tenants):
        change.removed.append(tenant_dvc_file(stale))
        if not dry_run:
            _remove_tenant_files(root, stale)
    return change


def pipeline_problems(root: str | Path, tenants: list[str]) -> list[str]:
    """Why the tenants' dvc.yaml files are not what `loraline pipelines` renders ([] when they are)."""
    try:
        change = sync_pipelines(root, tenants, dry_run=True)
    except (OSError, ValueError) as exc:
        return [str(exc)]
    problems = [f"{p} is missing or differs from {TENANT_TEMPLATE}" for p in change.written]
    problems += [f"{p} belongs to a tenant params.yaml no longer has" for p in change.removed]
    return [f"{p}: run `loraline pipelines`" for p in problems]


def render_tenant_pipeline(template: str, tenant: str) -> str:
    """`template` (pipelines/tenant.yaml's text) for `tenant`, with the mark that says where it came from."""
    mark = f"{RENDERED_MARK} {TENANT_TEMPLATE} for tenant {tenant}: edit that template, not this file.\n"
    return mark + template.replace(PLACEHOLDER, tenant)


def read_template(root: str | Path) -> str:
    path = Path(root) / TENANT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the tenants' stage template is missing (every loraline project has one)")
    return path.read_text()


def lock_paths(root: str | Path, tenants: list[str] | None = None) -> list[Path]:
    """The dvc.lock files that exist: the root's, then each tenant's (of `tenants`; None: every tenant's)."""
    root = Path(root)
    names = sorted(_tenant_dirs(root)) if tenants is None else tenants
    paths = [root / "dvc.lock", *(root / tenant_dvc_file(t, "dvc.lock") for t in names)]
    return [p for p in paths if p.is_file()]


def read_lock(root: str | Path, tenants: list[str] | None = None) -> dict[str, Any]:
    """The `stages` of the root's and the tenants' dvc.lock files as one mapping ({} when none exists).

    libyaml's loader where PyYAML has it: the files are machine-written and a few MB at most."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    stages: dict[str, Any] = {}
    for path in lock_paths(root, tenants):
        stages.update((yaml.load(path.read_text(), Loader=loader) or {}).get("stages") or {})
    return stages


def _tenant_dirs(root: Path) -> set[str]:
    folder = root / PIPELINES_DIR
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def _rendered_tenants(root: Path) -> set[str]:
    found = set()
    for tenant in _tenant_dirs(root):
        path = root / tenant_dvc_file(tenant)
        if path.is_file() and path.read_text().startswith(RENDERED_MARK):
            found.add(tenant)
    return found


def _remove_tenant_files(root: Path, tenant: str) -> None:
    for name in ("dvc.yaml", "dvc.lock"):
        (root / tenant_dvc_file(tenant, name)).unlink(missing_ok=True)
    folder = root / tenant_dvc_file(tenant).rpartition("/")[0]
    if not any(folder.iterdir()):
        folder.rmdir()

"""What serving serves: each tenant's production version from the registry, fetched and made servable once.

A version is fetched the way `dvc artifacts get --stage prod` fetches it: the adapter folder at the
commit its version tag points at (the DVC cache, else the DVC remote), beside the merge report of
the same commit, whose probe prompts and merged-model answers are the deployment check's reference.
Prepared versions live under a cache folder (`<cache>/<tenant>/<version>-<commit>/`) and are reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from loraline import records
from loraline.layout import MERGE_REPORT, Layout
from loraline.registry.base import RegistryError
from loraline.registry.canary import ADAPTER_SUFFIX


@dataclass(frozen=True)
class ProbeReference:
    """The merge stage's probes as token ids, the reference model's greedy answers to them, and where each probe
    comes from: "builtin" or "test" (a row of the tenant's test split, merge.probes)."""

    prompts: list[list[int]]
    texts: list[str]
    max_new_tokens: int
    sources: list[str]

    @classmethod
    def from_report(cls, ref: records.ProbeReference) -> ProbeReference:
        """From a merge report's probe_reference; one written before merge.probes has built-in probes only."""
        sources = [o.source for o in ref.sources] if ref.sources else ["builtin"] * len(ref.prompts)
        if not len(ref.prompts) == len(ref.texts) == len(sources):
            raise ValueError(
                f"the merge report's probe_reference is inconsistent: {len(ref.prompts)} prompts, "
                f"{len(ref.texts)} answers, {len(sources)} sources"
            )
        return cls(ref.prompts, ref.texts, ref.max_new_tokens, sources)


@dataclass(frozen=True)
class ServedVersion:
    tenant: str
    version: str
    commit: str
    adapter: Path  # the servable adapter folder (LoRA only)
    rank: int
    reference: ProbeReference | None  # None: the version's merge report predates probe references

    @property
    def served_name(self) -> str:
        """The name the engine knows this version by; clients use the tenant's name (the gateway maps it)."""
        return f"{self.tenant}@{self.version}"


@dataclass(frozen=True)
class Production:
    """A tenant's production in the registry, as serving reads it."""

    version: str
    commit: str
    assigned_at: datetime  # when it was put in production
    number: int  # its `#prod#N` assignment
    stable: tuple[str, str] | None = None  # on canary: (version, commit) it is measured against; None: served wholly


def production_versions(root: Path, tenants: list[str], canary: bool = False) -> dict[str, Production]:
    """tenant -> its adapter's production; tenants with none are left out. With `canary` (serve.canary set),
    a promotion on probation that no replica has decided yet (registry.canary) names the previous production."""
    from loraline.registry.canary import is_provisional, read_decision
    from loraline.registry.gto_registry import GtoRegistry, previous_production

    registry = GtoRegistry(root)
    out = {}
    with registry.reading():  # one read of every tag (one git for-each-ref, gto_tags) for all tenants
        for tenant in tenants:
            name = tenant + ADAPTER_SUFFIX
            history = registry.history(name)
            if not history:
                continue
            latest = history[-1]
            stable = None
            if canary and is_provisional(latest.message) and read_decision(root, name, latest.number) is None:
                before = previous_production(history)  # what a rollback would restore
                stable = (before, registry.version(name, before).commit) if before else None
            out[tenant] = Production(
                latest.version, registry.version(name, latest.version).commit, latest.created_at, latest.number, stable
            )
    return out


def prepare_version(root: Path, tenant: str, version: str, commit: str, base_dir: Path, cache: Path) -> ServedVersion:
    """The servable adapter and probe reference of `tenant` `version` (fetched at `commit`), cached."""
    from loraline.registry.lineage import fetch_output
    from loraline.serve.adapters import ServableAdapter, make_servable

    layout, here = Layout(), cache / tenant / f"{version}-{commit[:12]}"  # a re-created tag never reuses stale files
    done = here / "served.json"
    if not done.is_file():
        adapter_rel = layout.relative(layout.adapter_dir(tenant))
        report_rel = layout.relative(layout.merge_report_path(tenant))
        try:
            fetch_output(root, adapter_rel, commit, here / "trained")
            fetch_output(root, report_rel, commit, here / MERGE_REPORT)
        except Exception as exc:  # noqa: BLE001 -- DVC raises many kinds; the message says which output and where
            raise RegistryError(
                f"cannot fetch {tenant} {version} (commit {commit[:12]}): {exc}. On another machine, `dvc push` the "
                "outputs where they were built and configure the same DVC remote here"
            ) from exc
        servable: ServableAdapter = make_servable(here / "trained", base_dir, here / "servable")
        ref = records.MergeReport.read(here / MERGE_REPORT).probe_reference
        reference = ref.model_dump(exclude_unset=True) if ref else None  # as the report holds it (sorted keys)
        done.write_text(json.dumps({"rank": servable.rank, "reference": reference}, sort_keys=True), encoding="utf-8")
    facts = json.loads(done.read_text(encoding="utf-8"))
    ref = facts.get("reference")
    reference = ProbeReference.from_report(records.ProbeReference.model_validate(ref)) if ref else None
    return ServedVersion(tenant, version, commit, here / "servable", int(facts["rank"]), reference)

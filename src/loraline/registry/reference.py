"""train.preference.reference naming a registry version (`<tenant>@<version>`, e.g. acme-shop@v0.0.3): DPO that
starts from, and compares with, an adapter the registry versions, such as the tenant's production SFT adapter.

`pinned_reference` fetches that version's adapter (the DVC output at the version's commit, from the local cache or
the DVC remote) into models/reference/<tenant>/<source>-<version>-<commit> and returns the params with the
reference set to that folder, which the train stage then reads like any reference folder. It runs in the layers
above the stages (`loraline train`, the direct runner), which is what `dvc repro` and the Prefect flows call.

Why a version and not "production": a version's bytes never change, so the params (which DVC tracks) pin the
reference, and a later promotion cannot silently change what an old run trained against. `loraline registry
show <tenant>` lists the versions. The fetched folder is reused while it is complete; it is written to a
temporary folder first and renamed, so a failed fetch leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from loraline.config import Params
from loraline.layout import ADAPTER_FILES, Layout
from loraline.registry.base import RegistryError
from loraline.registry.gto_registry import GtoRegistry
from loraline.registry.lineage import fetch_output


def pinned_reference(root: str | Path, params: Params, tenant: str) -> Params:
    """`params` with `tenant`'s train.preference.reference made the folder of the version it names (fetched when
    missing); `params` itself when the reference is the base or already a folder."""
    preference = params.train_for(tenant).preference
    named = preference.reference_version
    if named is None or params.train_for(tenant).objective != "dpo":
        return params
    source, version = named
    layout = Layout(Path(root))
    artifact = f"{source}-adapter"
    try:
        commit = GtoRegistry(root).version(artifact, version).commit
    except RegistryError as exc:
        raise RegistryError(f"tenants.{tenant}.train.preference.reference {preference.reference!r}: {exc}") from None
    folder = layout.reference_dir(tenant, source, version, commit)
    if not all((folder / name).is_file() for name in ADAPTER_FILES):
        _fetch(root, layout.relative(layout.adapter_dir(source)), commit, folder)
    return _with_reference(params, tenant, layout.relative(folder))


def _fetch(root: str | Path, adapter: str, commit: str, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        try:
            fetched = fetch_output(root, adapter, commit, Path(tmp) / "adapter")
        except Exception as exc:  # noqa: BLE001 -- DVC raises many kinds; the message names the output and commit
            raise RegistryError(
                f"cannot fetch {adapter} at commit {commit[:12]}: {exc}. On another machine, `dvc push` the outputs "
                "where they were built and configure the same DVC remote here"
            ) from exc
        if folder.exists():  # an incomplete earlier fetch
            shutil.rmtree(folder)
        fetched.rename(folder)


def _with_reference(params: Params, tenant: str, folder: str) -> Params:
    """A tenant's train override replaces the whole preference section (Params.train_for merges one level), so the
    resolved one goes in whole."""
    preference = params.train_for(tenant).preference.model_dump() | {"reference": folder}
    tenants = [
        t.model_copy(update={"train": {**t.train, "preference": preference}}) if t.name == tenant else t
        for t in params.tenants
    ]
    return params.model_copy(update={"tenants": tenants})

"""For tests that build small DVC projects: write a dvc.yaml mapping the way loraline lays a project out.

A test states its stages as one dvc.yaml would (a tenant's stages as a foreach over tenant names, paths
relative to the root); `write_dvc_files` puts the shared stages (and everything else) in the root dvc.yaml
and each tenant's stages in pipelines/<tenant>/dvc.yaml (wdir ../.., a one-item foreach), as
loraline.dvcfiles renders them from pipelines/tenant.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loraline.layout import tenant_dvc_file


def write_dvc_files(root: Path, dvc_yaml: dict[str, Any] | str) -> None:
    data = yaml.safe_load(dvc_yaml) if isinstance(dvc_yaml, str) else dict(dvc_yaml)
    shared: dict[str, Any] = {}
    per_tenant: dict[str, dict[str, Any]] = {}
    for name, spec in (data.get("stages") or {}).items():
        if "foreach" not in spec:
            shared[name] = spec
            continue
        for tenant in spec["foreach"]:
            body = {"wdir": "../..", **spec["do"]}
            per_tenant.setdefault(tenant, {})[name] = {"foreach": [tenant], "do": body}
    data.pop("stages", None)
    (root / "dvc.yaml").write_text(yaml.safe_dump({**data, **({"stages": shared} if shared else {})}, sort_keys=False))
    for tenant, stages in per_tenant.items():
        path = root / tenant_dvc_file(tenant)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))

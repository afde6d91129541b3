"""Release of a tenant whose deploy.targets is [adapter]: only <tenant>-adapter is declared, registered and
promoted."""

from __future__ import annotations

import pytest
from registry_helpers import build, dvc_project

from loraline.config import ConfigError, load_params
from loraline.registry.gto_registry import GtoRegistry
from loraline.registry.lineage import check_artifacts_declared
from loraline.release import ProductionMeasure, release_tenant


@pytest.fixture
def adapter_only(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    return dvc_project(root, tmp_path / "remote", targets=["adapter"])


def _release(root, evaluate=None):
    calls = []

    def fake(root_, params, tenant, production):
        calls.append(production.version)
        return ProductionMeasure(evaluate or {"answer_loss": 1.0})

    return release_tenant(root, load_params(root / "params.yaml"), "t1", evaluate=fake), calls


def test_an_adapter_only_tenant_registers_and_promotes_its_adapter_alone(adapter_only):
    build(adapter_only, "adapter one\n")
    first, _ = _release(adapter_only)
    assert (first.version, first.registered_new, first.promoted, first.production_after) == (
        "v0.0.1",
        True,
        True,
        "v0.0.1",
    )
    registry = GtoRegistry(adapter_only)
    assert registry.artifacts() == ["t1-adapter"]
    assert registry.production("t1-adapter").version == "v0.0.1"
    lineage = registry.version("t1-adapter", "v0.0.1").lineage
    assert lineage["params"]["deploy"] == {"targets": ["adapter"]}

    build(adapter_only, "adapter two\n")
    second, calls = _release(adapter_only)
    assert (second.version, second.promoted, calls) == ("v0.0.2", True, ["v0.0.1"])
    assert GtoRegistry(adapter_only).artifacts() == ["t1-adapter"]


def test_the_onnx_artifact_is_demanded_only_of_tenants_that_build_it(adapter_only):
    check_artifacts_declared(adapter_only, load_params(adapter_only / "params.yaml"))  # no t1-onnx, none needed
    params = load_params(
        adapter_only / "params.yaml", overrides={"tenants.t1.deploy.targets": ["adapter", "merged", "onnx"]}
    )
    with pytest.raises(ConfigError, match="lacks t1-onnx"):
        check_artifacts_declared(adapter_only, params)

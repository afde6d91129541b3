"""dvc.yaml's deps cannot drift from the code: every loraline module a stage runs is listed.

A stage's code is the import closure of its entry function's module (`loraline.<stage>.run`), read
from the source (function-level imports included, since stages import heavy libraries lazily) by
`loraline.provenance.import_closure`, the same closure whose fingerprint the stage records as its code. A
module is covered when dvc.yaml lists its file or a folder above it. A module left out would let
`dvc repro` call a stage "up to date" after that module changed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from loraline.layout import STAGES, TENANT_STAGES, TENANT_TEMPLATE, Layout
from loraline.provenance import import_closure as closure

ROOT = Path(__file__).resolve().parents[2]
# The shared stages from dvc.yaml, each tenant's from the template every tenant's dvc.yaml is rendered from.
DVC_YAML = {
    **yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"],
    **yaml.safe_load((ROOT / TENANT_TEMPLATE).read_text())["stages"],
}


def stage_deps(stage: str) -> list[str]:
    spec = DVC_YAML[stage]
    return [d for d in spec.get("do", spec).get("deps", []) if isinstance(d, str)]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def entry_module(stage: str) -> str:
    return importlib.import_module(f"loraline.{stage}").run.__module__


def test_every_dvc_stage_has_a_package_named_as_it_with_a_run_entry():
    assert sorted(DVC_YAML) == sorted(STAGES)
    for stage in STAGES:
        assert entry_module(stage).startswith(f"loraline.{stage}"), stage


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_every_module_the_stage_runs(stage):
    deps = stage_deps(stage)
    missing = sorted(p.relative_to(ROOT).as_posix() for p in closure(entry_module(stage)) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs modules its deps do not list: {', '.join(missing)}"


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_list_no_library_code_the_stage_does_not_run(stage):
    """The other direction: a listed module the stage never imports re-runs it for nothing."""
    runs = closure(entry_module(stage))
    listed = [d for d in stage_deps(stage) if d.startswith("src/")]
    idle = [d for d in listed if not any(covered(p, [d]) for p in runs)]
    assert not idle, f"dvc.yaml stage {stage!r} lists code it does not run: {', '.join(idle)}"


def test_the_closure_finds_lazy_imports_and_fails_on_a_missing_dep():
    # merge imports the 4-bit loader inside a function; the closure must still see it, and a deps list
    # without the shared modelling modules must be reported.
    files = {p.relative_to(ROOT).as_posix() for p in closure("loraline.merge.stage")}
    assert "src/loraline/modelling/parity.py" in files and "src/loraline/config.py" in files
    assert "src/loraline/modelling/device.py" in files  # imported at module level, used by the lazy 4-bit path
    deps = [d for d in stage_deps("merge") if not d.startswith("src/loraline/modelling")]
    assert any(not covered(p, deps) for p in closure("loraline.merge.stage"))


TENANT = "<tenant>"  # how the tenants' stage template spells the tenant
LAYOUT = Layout()


def stage_section(stage: str, section: str) -> list[str]:
    spec = DVC_YAML[stage]
    return [e if isinstance(e, str) else next(iter(e)) for e in spec.get("do", spec).get(section, [])]


@pytest.mark.parametrize("stage", [s for s in TENANT_STAGES if s != "documents"])
def test_each_stage_declares_only_its_small_metrics_file_as_a_metric(stage):
    """`dvc metrics show` stays readable: one small file per tenant and stage; the detailed reports are outs."""
    assert stage_section(stage, "metrics") == [LAYOUT.relative(LAYOUT.metrics_path(stage, TENANT))]


def test_the_gate_depends_on_exactly_the_files_it_reads():
    data = [d for d in stage_deps("gate") if not d.startswith("src/")]
    reads = [
        LAYOUT.evaluation_results_path(TENANT),
        LAYOUT.metrics_path("merge", TENANT),
        LAYOUT.metrics_path("export", TENANT),
    ]
    assert sorted(data) == sorted(LAYOUT.relative(p) for p in reads)
    assert stage_section("gate", "outs") == [LAYOUT.relative(LAYOUT.gate_path(TENANT))]


def test_merge_depends_on_the_prepared_dataset_and_the_seed_its_probes_are_drawn_with():
    """merge.probes draws prompts from the tenant's test split, ranked under the top-level seed: new test rows or
    another seed must re-run merge, or the deployment check would replay probes of an older draw."""
    assert LAYOUT.relative(LAYOUT.prepared_dir(TENANT)) in stage_deps("merge")
    assert {"merge", "seed"} <= set(stage_section("merge", "params"))


def test_timing_is_a_top_level_metric_and_no_stage_output():
    """Run facts differ between identical runs: as a stage output they would change dvc.lock."""
    timing = LAYOUT.relative(LAYOUT.timing_dir)
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text())["metrics"] == [timing]
    for stage in STAGES:
        for section in ("outs", "metrics", "plots"):
            assert not any(p == timing or p.startswith(timing + "/") for p in stage_section(stage, section)), stage

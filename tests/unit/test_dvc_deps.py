"""dvc.yaml's deps cannot drift from the code: every loraline module a stage runs is listed.

A stage's code is the import closure of its entry function's module (`loraline.<stage>.run`), read
from the source (function-level imports included, since stages import heavy libraries lazily). A
module is covered when dvc.yaml lists its file or a folder above it. A module left out would let
`dvc repro` call a stage "up to date" after that module changed.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from loraline.layout import STAGES

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every loraline module `path` imports, with the packages an import of it initialises."""
    package = ".".join(path.relative_to(SRC).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import x` runs pkg, and x too when x is a submodule
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "loraline" or name.startswith("loraline."):
                parts = name.split(".")
                out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in out if module_file(m) is not None}


def closure(module: str) -> set[Path]:
    parts = module.split(".")
    todo = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)))
    return {module_file(m) for m in seen}


def stage_deps(stage: str) -> list[str]:
    spec = DVC_YAML[stage]
    return [d for d in spec.get("do", spec).get("deps", []) if isinstance(d, str)]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def entry_module(stage: str) -> str:
    return importlib.import_module(f"loraline.{stage}").run.__module__


def test_every_dvc_stage_has_a_package_named_as_it_with_a_run_entry():
    assert tuple(DVC_YAML) == STAGES
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

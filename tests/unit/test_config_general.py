"""evaluate.general (the forgetting check's sample) and gate.max_forgetting in params.yaml: defaults, bad values
naming the key, and a sample path outside the project refused unless allowed, as raw folders are."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraline.config import ConfigError, OutsidePathError, load_params, parse_params
from loraline.layout import GENERAL_TEXT, Layout

REPO = Path(__file__).resolve().parents[2]


def minimal(**extra) -> dict:
    return {"tenants": {"acme": {"raw_dir": "data/raw/acme"}}, **extra}


def test_defaults_point_at_the_base_stages_held_out_text_and_turn_the_rule_on(monkeypatch):
    monkeypatch.chdir(REPO)
    params = load_params(REPO / "params.yaml")
    general = params.evaluate.general
    assert (
        general.path.as_posix() == Layout().relative(Layout().base_dir / GENERAL_TEXT) == f"models/base/{GENERAL_TEXT}"
    )
    assert (general.rows, general.max_tokens, general.allow_outside_dirs) == (128, 256, [])
    assert params.gate.max_forgetting == pytest.approx(0.10)
    assert parse_params(minimal()).evaluate.general == general  # params.yaml repeats the code's defaults


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(evaluate={"general": {"rows": 0}}), ["evaluate.general.rows", "greater than or equal to 1", "got 0"]),
        (minimal(evaluate={"general": {"max_tokens": 4}}), ["evaluate.general.max_tokens", "got 4"]),
        (
            minimal(evaluate={"general": {"path": ""}}),
            ["evaluate.general.path", "must name a file or folder of general text"],
        ),
        (minimal(evaluate={"general": {"paths": "x"}}), ["evaluate.general.paths: unknown key", "path, rows"]),
        (minimal(evaluate={"general": None}), ["evaluate.general"]),
        (minimal(gate={"max_forgetting": -0.1}), ["gate.max_forgetting", "greater than or equal to 0", "got -0.1"]),
        (minimal(gate={"max_forgetting": "ten percent"}), ["gate.max_forgetting", "got 'ten percent'"]),
        (
            {"tenants": {"acme": {"raw_dir": "x", "gate": {"max_forgetting": -1}}}},
            ["tenants.acme.gate.max_forgetting"],
        ),
    ],
)
def test_bad_values_name_the_key(data, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    for fragment in expected:
        assert fragment in str(err.value)


def project_with(tmp_path: Path, general: dict) -> Path:
    """params.yaml in tmp_path/project with `general` as evaluate.general ({outside}: tmp_path/outside)."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "wiki.jsonl").write_text('{"text": "general prose"}\n')
    general = {
        k: (v.format(outside=outside) if isinstance(v, str) else [p.format(outside=outside) for p in v])
        for k, v in general.items()
    }
    (project / "params.yaml").write_text(
        yaml.safe_dump({"evaluate": {"general": general}, "tenants": {"acme": {"raw_dir": "data"}}})
    )
    return project


@pytest.mark.parametrize("path", ["../outside/wiki.jsonl", "{outside}/wiki.jsonl", "data/linked/wiki.jsonl"])
def test_a_sample_outside_the_project_is_refused_naming_the_key(tmp_path, path):
    project = project_with(tmp_path, {"path": path})
    (project / "data" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(OutsidePathError) as err:
        load_params(project / "params.yaml")
    target = (tmp_path / "outside" / "wiki.jsonl").resolve()
    assert (
        f"evaluate.general.path: {path.format(outside=tmp_path / 'outside')!r} resolves to {target}, outside the "
        f"project ({project.resolve()})"
    ) in str(err.value)
    assert f"evaluate.general.allow_outside_dirs (e.g. allow_outside_dirs: [{target.parent}])" in str(err.value)


@pytest.mark.parametrize("path", ["../outside/wiki.jsonl", "{outside}/wiki.jsonl"])
def test_an_allowed_outside_sample_loads(tmp_path, path):
    project = project_with(tmp_path, {"path": path, "allow_outside_dirs": ["{outside}"]})
    general = load_params(project / "params.yaml").evaluate.general
    assert general.resolved(project).resolve() == (tmp_path / "outside" / "wiki.jsonl").resolve()


def test_allowed_outside_dirs_must_be_absolute(tmp_path):
    project = project_with(tmp_path, {"path": "../outside/wiki.jsonl", "allow_outside_dirs": ["../outside"]})
    with pytest.raises(
        ConfigError, match=r"evaluate\.general\.allow_outside_dirs: .*'\.\./outside' must be an absolute"
    ):
        load_params(project / "params.yaml")


def test_a_sample_set_outside_from_the_command_line_is_refused(tmp_path):
    project = project_with(tmp_path, {"path": "data/general.jsonl"})
    with pytest.raises(OutsidePathError, match=r"evaluate\.general\.path: '/etc/hostname'"):
        load_params(project / "params.yaml", overrides={"evaluate.general.path": "/etc/hostname"})

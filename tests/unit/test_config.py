"""params.yaml validation: unknown keys and bad values fail naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraline.config import ConfigError, OutsidePathError, Params, load_params, parse_params, set_dotted

REPO = Path(__file__).resolve().parents[2]


def minimal(**extra) -> dict:
    return {"tenants": {"acme": {"raw_dir": "data/raw/acme"}}, **extra}


def test_repository_params_are_valid(monkeypatch):
    monkeypatch.chdir(REPO)  # raw_dir paths are relative to the project root, where DVC runs stages
    params = load_params(REPO / "params.yaml")
    assert params.tenant_names == ["acme-shop", "globex-it"]
    assert params.base.model is None and params.base.trust_remote_code is False
    for name in params.tenant_names:
        assert params.tenant_params(name).raw_dir.is_dir(), f"raw_dir of {name} must exist in the repository"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(train={"lora_rr": 8}), ["train.lora_rr: unknown key", "lora_r", "lora_alpha"]),
        (minimal(base={"build": {"hidden": 8}}), ["base.build.hidden: unknown key", "hidden_size"]),
        (minimal(extra_section={}), ["extra_section: unknown key", "prepare", "tenants"]),
        (minimal(train={"quantization": "int3"}), ["train.quantization", "'nf4'", "'fp4'", "'none'", "int3"]),
        (minimal(train={"optimizer": "sgd"}), ["train.optimizer", "paged_adamw_8bit"]),
        (minimal(merge={"device": "gpu"}), ["merge.device", "'auto'", "'cpu'", "'cuda'", "gpu"]),
        (minimal(export={"device": "cuda:1"}), ["export.device", "'auto'", "cuda:1"]),
        (minimal(evaluate={"device": None}), ["evaluate.device", "'auto'"]),
        (minimal(train={"lora_r": 0}), ["train.lora_r", "greater than or equal to 1", "got 0"]),
        (minimal(train={"batch_size": 0}), ["train.batch_size", "whole number of packed rows >= 1, or auto", "got 0"]),
        (minimal(train={"batch_size": "big"}), ["train.batch_size", "or auto", "got 'big'"]),
        (minimal(train={"batch_size": True}), ["train.batch_size", "or auto", "got True"]),
        (minimal(prepare={"split": {"validation": 0.5, "test": 0.5}}), ["prepare.split", "must leave rows for train"]),
        (minimal(base={"build": {"hidden_size": 100, "num_heads": 3}}), ["divisible by num_heads"]),
        ({"tenants": {}}, ["tenants", "at least 1"]),
        ({}, ["tenants", "Field required"]),
        ({"tenants": {"Bad Name": {"raw_dir": "x"}}}, ["tenant name 'Bad Name'"]),
        ({"tenants": {"acme_shop": {"raw_dir": "x"}}}, ["tenant name 'acme_shop'", "[a-z0-9-]", "acme-shop"]),
        ({"tenants": {"acme-": {"raw_dir": "x"}}}, ["tenant name 'acme-'", "not first or last"]),
        ({"tenants": {"acme": {"raw_dir": "x", "colour": 1}}}, ["tenants.acme.colour: unknown key", "raw_dir"]),
        ({"tenants": {"acme": {"raw_dir": "x", "train": {"lora_r": -1}}}}, ["tenants.acme.train.lora_r", "got -1"]),
        (
            {"tenants": {"acme": {"raw_dir": "x", "gate": {"nope": 1}}}},
            ["tenants.acme.gate.nope: unknown key", "primary_metric"],
        ),
        ({"tenants": [{"name": "a", "raw_dir": "x"}, {"name": "a", "raw_dir": "y"}]}, ["unique", "a"]),
        (minimal(seed="abc"), ["seed", "integer"]),
    ],
)
def test_invalid_params_name_the_key(data, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    for fragment in expected:
        assert fragment in str(err.value)


def test_tenant_overrides_merge_over_defaults():
    params = parse_params(
        {
            "seed": 7,
            "train": {"lora_r": 16, "learning_rate": 0.001},
            "gate": {"min_gain_over_base": 0.1},
            "tenants": {
                "a": {"raw_dir": "x", "train": {"lora_r": 4}, "gate": {"min_gain_over_base": 0.3}},
                "b": {"raw_dir": "y"},
            },
        }
    )
    a, b = params.train_for("a"), params.train_for("b")
    assert (a.lora_r, a.learning_rate, a.seed) == (4, 0.001, 7)
    assert (b.lora_r, b.learning_rate, b.seed) == (16, 0.001, 7)
    assert params.gate_for("a").min_gain_over_base == 0.3
    assert params.gate_for("b").min_gain_over_base == 0.1


def test_list_form_of_tenants_is_accepted():
    params = parse_params({"tenants": [{"name": "a", "raw_dir": "x"}, {"name": "b", "raw_dir": "y"}]})
    assert params.tenant_names == ["a", "b"]


def test_unknown_tenant_lists_known_ones():
    params = parse_params(minimal())
    with pytest.raises(ConfigError, match="unknown tenant 'zzz'.*acme"):
        params.tenant_params("zzz")


def test_relative_raw_dirs_resolve_against_root(tmp_path):
    params = parse_params(minimal(), root=tmp_path)
    assert params.tenant_params("acme").raw_dir == tmp_path / "data/raw/acme"


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("tenants: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_overrides_apply_dotted_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    params = load_params(path, overrides={"base.build.max_steps": 5, "tenants.acme.train": {"lora_r": 2}})
    assert params.base.build.max_steps == 5
    assert params.train_for("acme").lora_r == 2


def test_set_dotted_does_not_mutate_input():
    data = {"a": {"b": 1}, "l": [1, 2]}
    out = set_dotted(set_dotted(data, "a.c", 2), "l.1", 9)
    assert data == {"a": {"b": 1}, "l": [1, 2]}
    assert out == {"a": {"b": 1, "c": 2}, "l": [1, 9]}


def test_params_are_frozen():
    params = parse_params(minimal())
    with pytest.raises(Exception):
        params.seed = 3  # type: ignore[misc]
    assert isinstance(params, Params)


def test_a_tenant_cannot_be_named_like_the_timing_reports_folder(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("acme-shop:", "timing:", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="'timing' is reserved"):
        load_params(path)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize(
    ("key", "yaml_key"),
    [
        ("gate.min_gain_over_base", "gate: {min_gain_over_base: %s}"),
        ("train.learning_rate", "train: {learning_rate: %s}"),
        (
            "tenants.acme.gate.max_regression_vs_prod",
            "tenants: {acme: {raw_dir: raw, gate: {max_regression_vs_prod: %s}}}",
        ),
        ("tenants.acme.train.lora_dropout", "tenants: {acme: {raw_dir: raw, train: {lora_dropout: %s}}}"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, key, yaml_key, value):
    """YAML's .nan fails every comparison (a gate would fail with "gain < nan") and .inf switches a check off."""
    text = yaml_key % value
    if not text.startswith("tenants"):
        text += "\ntenants: {acme: {raw_dir: raw}}"
    path = tmp_path / "params.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    shown = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}[value]
    assert f"{key}: must be a finite number, got {shown}" in str(err.value)


def test_every_params_section_refuses_non_finite_numbers():
    """The refusal lives in the shared model config: every section reached from Params must inherit it."""
    seen: set[type] = set()

    def walk(model: type) -> None:
        if model in seen:
            return
        seen.add(model)
        assert model.model_config.get("allow_inf_nan") is False, f"{model.__name__} accepts nan/inf"
        for field in model.model_fields.values():
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
                for inner in (arg, *getattr(arg, "__args__", ())):
                    if isinstance(inner, type) and hasattr(inner, "model_fields"):
                        walk(inner)

    walk(Params)
    assert len(seen) > 15  # every section, sub-section, source and seed task


def test_committed_params_load_with_finite_numbers_only(monkeypatch):
    monkeypatch.chdir(REPO)
    params = load_params(REPO / "params.yaml")
    assert params.gate.min_gain_over_base == 0.05 and params.gate_for("acme-shop").min_gain_over_base == 0.4


def outside_setup(tmp_path: Path, raw_dir: str, **tenant) -> Path:
    """params.yaml in tmp_path/project naming `raw_dir` ({outside}: tmp_path/outside, a real folder)."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "data" / "raw").mkdir(parents=True)
    outside.mkdir()
    entry = {"raw_dir": raw_dir.format(outside=outside), **tenant}
    (project / "params.yaml").write_text(yaml.safe_dump({"tenants": {"acme": entry}}))
    return project


@pytest.mark.parametrize("raw_dir", ["../outside", "{outside}", "data/raw/linked"])
def test_a_raw_dir_outside_the_project_is_refused_naming_the_key(tmp_path, raw_dir):
    project = outside_setup(tmp_path, raw_dir)
    (project / "data" / "raw" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(OutsidePathError) as err:
        load_params(project / "params.yaml")
    outside = (tmp_path / "outside").resolve()
    assert (
        f"tenants.acme.raw_dir: {raw_dir.format(outside=tmp_path / 'outside')!r} resolves to {outside}, "
        f"outside the project ({project.resolve()})"
    ) in str(err.value)
    assert f"tenants.acme.allow_outside_dirs (e.g. allow_outside_dirs: [{outside}])" in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI reports it as a configuration error


def test_a_raw_dir_set_outside_from_the_command_line_is_refused(tmp_path):
    project = outside_setup(tmp_path, "data/raw/acme")
    with pytest.raises(OutsidePathError, match=r"tenants\.acme\.raw_dir: '/'"):
        load_params(project / "params.yaml", overrides={"tenants.acme.raw_dir": "/"})


@pytest.mark.parametrize("raw_dir", ["../outside", "{outside}", "{outside}/acme"])
def test_an_allowed_outside_raw_dir_loads(tmp_path, raw_dir):
    outside = tmp_path / "outside"
    project = outside_setup(tmp_path, raw_dir, allow_outside_dirs=[str(outside)])
    params = load_params(project / "params.yaml")
    assert params.tenant_params("acme").allow_outside_dirs == [outside]


def test_allowed_outside_dirs_must_be_absolute(tmp_path):
    project = outside_setup(tmp_path, "data/raw/acme", allow_outside_dirs=["../outside"])
    with pytest.raises(
        ConfigError, match=r"tenants\.acme\.allow_outside_dirs: .*'\.\./outside' must be an absolute folder path"
    ):
        load_params(project / "params.yaml")


def test_params_built_in_code_are_not_bound_to_a_project():
    assert parse_params({"tenants": {"acme": {"raw_dir": "/data/acme"}}}).tenant_params("acme").raw_dir == Path(
        "/data/acme"
    )
    with pytest.raises(OutsidePathError, match=r"tenants\.acme\.raw_dir: '/data/acme'"):
        parse_params({"tenants": {"acme": {"raw_dir": "/data/acme"}}}, project=Path("/work"))

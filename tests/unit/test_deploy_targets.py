"""deploy.targets: what a tenant is built and registered as. An [adapter] tenant writes no full-size file:
merge writes only its report (the probes' reference answers, from base + adapter), export only a report,
evaluate measures the adapter on the base, and the gate asks no parity of targets not built. On the tiny
built base and nf4 adapter of test_merge (seconds on 2 CPU cores). The registry side:
registry/test_release_targets.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_merge import Trained, trained  # noqa: F401 -- the module's tiny base + adapter fixture

from loraline.config import ConfigError, DeployParams, EvaluateParams, MergeParams, Params, TenantParams, parse_params
from loraline.gate.decision import EXPORT_PARITY_KEY, MERGE_PARITY_KEY, decide
from loraline.layout import GENERAL_TEXT, MERGE_REPORT, NOT_BUILT, PREPARED_DATASET, Layout
from loraline.merge import merge_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- config -------------------------------------------------------------------------------------------


def _params(**tenant) -> Params:
    return parse_params({"tenants": {"acme": {"raw_dir": "data/raw/acme", **tenant}}})


def test_every_target_by_default_and_a_tenant_may_replace_them():
    assert _params().deploy_for("acme").targets == ["adapter", "merged", "onnx"]
    assert _params(deploy={"targets": ["adapter"]}).deploy_for("acme").targets == ["adapter"]
    both = parse_params(
        {
            "deploy": {"targets": ["adapter", "merged"]},
            "tenants": {"a": {"raw_dir": "x"}, "b": {"raw_dir": "y", "deploy": {"targets": ["adapter"]}}},
        }
    )
    assert (both.deploy_for("a").targets, both.deploy_for("b").targets) == (["adapter", "merged"], ["adapter"])


@pytest.mark.parametrize(
    ("targets", "says"),
    [
        (["adaptr"], r"tenants\.acme\.deploy\.targets\.0: .*'adapter', 'merged' or 'onnx' \(got 'adaptr'\)"),
        ([], r"tenants\.acme\.deploy\.targets: .*at least adapter"),
        (["merged"], r"tenants\.acme\.deploy\.targets: .*must include adapter: serving"),
        (["adapter", "onnx"], r"tenants\.acme\.deploy\.targets: .*onnx needs merged"),
        (["adapter", "adapter"], r"tenants\.acme\.deploy\.targets: .*twice"),
    ],
)
def test_bad_targets_name_the_key(targets, says):
    with pytest.raises(ConfigError, match=says):
        _params(deploy={"targets": targets})


def test_adapters_only_a_merged_folder_describes_need_merged():
    with pytest.raises(ConfigError, match=r"tenants\.acme\.deploy\.targets: train\.method qalora needs merged"):
        _params(deploy={"targets": ["adapter"]}, train={"method": "qalora", "quantization": "none"})


# --- gate ---------------------------------------------------------------------------------------------


GOOD = ({"answer_loss": 1.0, "general_loss": 3.0}, {"answer_loss": 2.0, "general_loss": 3.0}, None)


def test_the_gate_asks_no_parity_of_targets_not_built():
    from loraline.config import GateParams

    adapter_only = decide(GateParams(), *GOOD, parity=None, targets=["adapter"])
    assert adapter_only.passed
    assert [adapter_only.rule(r).reason for r in ("merge_parity", "export_parity")] == [NOT_BUILT, NOT_BUILT]
    merged = decide(GateParams(), *GOOD, parity={MERGE_PARITY_KEY: 0.0}, targets=["adapter", "merged"])
    assert merged.passed and merged.rule("export_parity").reason == NOT_BUILT
    missing = decide(GateParams(), *GOOD, parity={EXPORT_PARITY_KEY: 0.0}, targets=["adapter", "merged"])
    assert missing.failed == ["merge_parity"], "a target that is built still needs its evidence"


# --- stages -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_merge(trained: Trained):  # noqa: F811
    return merge_adapter(out_dir=trained.root / "full-merge", tolerance=1e-4, max_new_tokens=12, **trained.kwargs())


def test_merge_without_merged_writes_the_reference_answers_alone(trained: Trained, full_merge, tmp_path):  # noqa: F811
    result = merge_adapter(
        out_dir=tmp_path / "merged", tolerance=1e-4, max_new_tokens=12, merged=False, **trained.kwargs()
    )
    assert sorted(p.name for p in result.out_dir.iterdir()) == [MERGE_REPORT]
    report = json.loads(result.report_path.read_text())
    assert report["merged"] == NOT_BUILT and report["passed"] is True and report["dtype"] == "float32"
    ref, full = report["probe_reference"], full_merge.report.probe_reference
    assert ref["prompts"] == full.prompts and ref["model"] == "base + adapter, unmerged"
    # base + adapter at float32 answers as the merged model does: the deployment check's reference is the same
    assert ref["greedy"] == full.greedy and any(t.strip() for t in ref["texts"])


def _adapter_only_project(trained: Trained, root: Path) -> tuple[Params, Layout]:  # noqa: F811
    from loraline.modelling.loading import load_base_tokenizer
    from loraline.prepare.general import general_sample, write_general_sample

    layout = Layout(root)
    shutil.copytree(trained.adapter_dir, layout.adapter_dir("toy"))
    shutil.copytree(trained.root / "prepared" / PREPARED_DATASET, layout.prepared_dataset_dir("toy"))
    layout.base_dir.mkdir(parents=True)
    shutil.copy(trained.base_dir / GENERAL_TEXT, layout.base_dir / GENERAL_TEXT)  # evaluate.general's default path
    params = Params(
        base=trained.base_params,
        merge=MergeParams(max_new_tokens=8, device="cpu"),
        evaluate=EvaluateParams(max_new_tokens=8, max_examples=6, device="cpu"),
        tenants=[
            TenantParams(
                name="toy",
                raw_dir=trained.root / "raw" / "toy",
                deploy=DeployParams(targets=["adapter"]),
                gate={"min_gain_over_base": -1.0},
            )
        ],  # the gate's parity rules are the point here
    )
    tok = load_base_tokenizer(trained.base_dir, trained.base_params)
    write_general_sample(
        general_sample(params.evaluate.general, params.prepare, tok, root), layout.general_sample_dir("toy")
    )
    return params, layout


def test_an_adapter_only_tenant_passes_its_gate_with_no_merged_or_onnx_output(trained: Trained, tmp_path):  # noqa: F811
    from loraline import evaluate, export, gate, merge
    from loraline.summary import collect_summary

    params, layout = _adapter_only_project(trained, tmp_path)
    merge.run(params, layout, "toy", base_dir=trained.base_dir)
    export.run(params, layout, "toy")
    result = evaluate.run(params, layout, "toy", base_dir=trained.base_dir)
    decision = gate.run(params, layout, "toy")

    written = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "models").rglob("*") if p.is_file())
    assert not [p for p in written if p.endswith((".safetensors", ".onnx")) and not p.startswith("models/adapters/")]
    assert [p for p in written if p.startswith(("models/merged/", "models/onnx/"))] == [
        "models/merged/toy/merge_report.json",
        "models/onnx/toy/export_report.json",
    ]
    assert json.loads(layout.metrics_path("merge", "toy").read_text()) == {"passed": True, "merged": NOT_BUILT}
    assert json.loads(layout.metrics_path("export", "toy").read_text()) == {"passed": True, "onnx": NOT_BUILT}
    assert json.loads(layout.merge_report_path("toy").read_text())["probe_reference"]["greedy"]
    assert result.metrics["models"]["candidate"]["answer_loss"] != result.metrics["models"]["base"]["answer_loss"]
    assert decision.passed, decision.failed
    assert decision.rule("merge_parity").reason == decision.rule("export_parity").reason == NOT_BUILT
    paths = collect_summary(params, layout).tenants[0].paths
    assert (paths["merged"], paths["onnx"]) == (NOT_BUILT, NOT_BUILT) and paths["adapter"].endswith("adapters/toy")


def test_the_adapter_on_the_base_scores_as_the_merged_model(trained: Trained, full_merge):  # noqa: F811
    from loraline.evaluate.stage import evaluate_model

    common = dict(
        dataset_dir=trained.root / "prepared" / PREPARED_DATASET,
        base_dir=trained.base_dir,
        base_params=trained.base_params,
        max_new_tokens=8,
        max_examples=6,
        device="cpu",
    )
    adapter = evaluate_model(model_dir=trained.adapter_dir, **common)
    merged = evaluate_model(model_dir=full_merge.out_dir, **common)
    assert set(adapter) == set(merged)
    for name, value in merged.items():
        assert adapter[name] == pytest.approx(value, abs=1e-4), name


def test_the_base_and_its_adapter_share_one_load_and_score_as_each_loaded_alone(
    trained: Trained, tmp_path, monkeypatch
):  # noqa: F811
    """evaluate loads the base once for base + candidate adapter (at 8B a load outweighs the scoring); the
    base, scored with the adapter disabled, and the candidate give the numbers each gives loaded on its own,
    the general-text sample's general_loss included."""
    import loraline.evaluate.stage as evaluate_stage

    params, layout = _adapter_only_project(trained, tmp_path)
    loads, real = [], evaluate_stage.loaded_model

    def counting(path, device, **kwargs):
        loads.append((str(path), "adapter" in kwargs))
        return real(path, device, **kwargs)

    monkeypatch.setattr(evaluate_stage, "loaded_model", counting)
    models = evaluate_stage.run(params, layout, "toy", base_dir=trained.base_dir).metrics["models"]
    assert len(loads) == 1 and loads[0][1] is False
    monkeypatch.setattr(evaluate_stage, "loaded_model", real)
    common = dict(
        dataset_dir=layout.prepared_dataset_dir("toy"),
        base_dir=trained.base_dir,
        base_params=trained.base_params,
        max_new_tokens=8,
        max_examples=6,
        device="cpu",
        general_dir=layout.general_sample_dir("toy"),
    )
    alone = {
        "base": evaluate_stage.evaluate_model(model_dir=trained.base_dir, **common),
        "candidate": evaluate_stage.evaluate_model(model_dir=layout.adapter_dir("toy"), **common),
    }
    for name in ("base", "candidate"):
        assert models[name] == pytest.approx(alone[name], abs=1e-6), name
    assert models["candidate"] != models["base"] and models["base"]["general_loss"] > 0


def test_export_of_an_adapter_only_tenant_imports_neither_torch_nor_onnx(tmp_path):
    """At 8B every stage is a process of its own; one that only writes "not built" should not pay for imports."""
    import subprocess
    import sys

    (tmp_path / "data" / "raw" / "acme").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(
        "tenants:\n  acme:\n    raw_dir: data/raw/acme\n    deploy:\n      targets: [adapter]\n", encoding="utf-8"
    )
    script = (
        "import sys\n"
        "from loraline.config import load_params\n"
        "from loraline.layout import Layout\n"
        "from loraline import export\n"
        "export.run(load_params('params.yaml'), Layout(), 'acme')\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
    report = json.loads((tmp_path / "models" / "onnx" / "acme" / "export_report.json").read_text())
    assert report["onnx"] == NOT_BUILT and report["passed"] is True

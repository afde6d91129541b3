"""Issue 38: an adapter that aces its task while the model forgets everything else is refused by the gate.

A tiny built base that pretrained on some standard-library docstrings (the default base's recipe, small), its
general_text.jsonl (docstrings it never saw) as the forgetting check's sample, and two adapters on the toy
tickets, evaluated through the evaluate stage's own path (adapter on the base, one shared load):

* normal: 40 steps at 2e-3. Answer loss 4.01 -> 2.72, general_loss +3.5% (measured on 2 CPU cores).
* over-fitted: 300 steps at 3e-2 (15x), batch 2, no dropout or warmup: about seven passes over the train split.
  It still beats the base on the task (answer loss 4.01 -> 3.22, a 20% gain, over the default gate's 5%), but
  its general_loss rose 32%: refused by max_forgetting (default 0.10) alone, while the normal one passes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import make_raw, tiny_build, tiny_train  # noqa: E402

from loraline.config import BaseParams, GateParams, GeneralParams, PrepareParams, TenantParams  # noqa: E402
from loraline.evaluate.stage import REPORT, evaluate_model, evaluate_tenant  # noqa: E402
from loraline.gate.decision import decide, to_json  # noqa: E402
from loraline.layout import GENERAL_TEXT  # noqa: E402

ADAPTER_ONLY = ["adapter"]  # deploy.targets: the candidate is the adapter on the base, as served
RECIPES = {
    "normal": dict(quantization="nf4", max_steps=40, grad_accum=1, eval_every=40, save_every=40, learning_rate=2e-3),
    "overfit": dict(
        quantization="nf4",
        max_steps=300,
        batch_size=2,
        grad_accum=1,
        eval_every=300,
        save_every=300,
        learning_rate=3e-2,
        lora_dropout=0.0,
        warmup_ratio=0.0,
    ),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import loraline.train.stage as stage
    from loraline.base.stage import build_base
    from loraline.modelling.loading import load_base_tokenizer
    from loraline.prepare.general import general_sample, write_general_sample
    from loraline.prepare.stage import prepare_tenant

    root = tmp_path_factory.mktemp("forgetting")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = make_raw(root / "raw" / "toy", n=120)
        # Enough docstrings and steps that the base models prose a little: a base that knows nothing has nothing
        # to forget.
        base_params = BaseParams(build=tiny_build(stdlib_docstrings=True, max_stdlib_chars=60000, max_steps=400))
        base = build_base(base_params, seed=5, raw_dirs=[raw], out_dir=root / "models" / "base")
        tok = load_base_tokenizer(base.out_dir, base_params)
        # The toy tickets share one template: decontamination would drop most training rows.
        prepared = prepare_tenant(
            TenantParams(name="toy", raw_dir=raw),
            PrepareParams(decontamination={"enabled": False}),
            tok,
            out_dir=root / "prepared",
            rejected_path=root / "rejected.jsonl",
            stats_path=root / "stats.json",
        )
        general = general_sample(GeneralParams(), PrepareParams(), tok, root)  # the default path, in this project
        write_general_sample(general, root / "general")
        for name, recipe in RECIPES.items():
            with mock.patch.object(stage, "pick_device", return_value=torch.device("cpu")):
                stage.train_adapter(
                    tiny_train(**recipe),
                    base_dir=base.out_dir,
                    base_params=base_params,
                    dataset_dir=prepared.dataset_dir,
                    out_dir=root / f"adapter-{name}",
                    checkpoint_dir=root / f"ckpt-{name}",
                )
    finally:
        torch.set_num_threads(previous)
    return dict(
        root=root,
        base_params=base_params,
        base_dir=base.out_dir,
        dataset_dir=prepared.dataset_dir,
        general_dir=root / "general",
        record=base.record,
    )


def _evaluate(world, name: str):
    return evaluate_tenant(
        tenant="toy",
        dataset_dir=world["dataset_dir"],
        base_dir=world["base_dir"],
        base_params=world["base_params"],
        candidate_dir=world["root"] / f"adapter-{name}",
        production_dir=None,
        out_dir=world["root"] / f"eval-{name}",
        max_new_tokens=8,
        device="cpu",
        general_dir=world["general_dir"],
    )


# CPU results depend on the thread count: one thread keeps them repeatable (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_overfitted_adapter_is_refused_for_forgetting_and_the_normal_one_passes(world):
    normal, overfit = _evaluate(world, "normal"), _evaluate(world, "overfit")
    base = normal.model_metrics("base")
    assert overfit.model_metrics("base") == base  # the same base, rows and sample
    n, o = normal.model_metrics("candidate"), overfit.model_metrics("candidate")
    rise = {
        name: (m["general_loss"] - base["general_loss"]) / base["general_loss"]
        for name, m in (("normal", n), ("overfit", o))
    }
    print(
        f"general_loss base {base['general_loss']:.4f} normal {n['general_loss']:.4f} ({rise['normal']:+.1%}) "
        f"overfit {o['general_loss']:.4f} ({rise['overfit']:+.1%}); answer_loss base {base['answer_loss']:.3f} "
        f"normal {n['answer_loss']:.3f} overfit {o['answer_loss']:.3f}"
    )
    assert rise["normal"] < 0.07 and rise["overfit"] > 0.2  # measured +3.5% and +32%: far from the 0.10 either way

    gate = GateParams()  # the defaults: answer_loss down 5% over the base, general_loss up at most 10%
    passed = decide(gate, n, base, None, targets=ADAPTER_ONLY)
    refused = decide(gate, o, base, None, targets=ADAPTER_ONLY)
    assert passed.passed, to_json(passed)
    assert refused.failed == ["max_forgetting"], to_json(refused)  # it still beats the base on its task
    assert refused.rule("beats_base").passed
    reason = refused.rule("max_forgetting").reason
    assert reason.startswith(
        f"general_loss on general text: candidate {o['general_loss']:.6g} vs base {base['general_loss']:.6g}"
    )
    assert f"relative rise {rise['overfit']:.4g} > (the adapter forgot" in reason and reason.endswith(" 0.1")
    assert not decide(gate.model_copy(update={"max_forgetting": None}), o, base, None, targets=ADAPTER_ONLY).failed


def test_the_evidence_is_traceable_to_its_sample(world):
    result = _evaluate(world, "normal")
    general = result.metrics["general"]
    sample = json.loads((world["general_dir"] / "sample.json").read_text())
    assert general == {"measured": True, **sample}
    assert general["path"] == f"models/base/{GENERAL_TEXT}" and general["rows"] == 128 == general["rows_requested"]
    assert general["kinds"] == {"document": 128} and general["target_tokens"] > 5000 and general["skipped"] == {}
    assert world["record"].general_text.rows == 1024  # what the base stage wrote, after what it pretrained on
    report = (result.out_dir / REPORT).read_text()
    assert "## Forgetting: general text" in report and f"Sample `models/base/{GENERAL_TEXT}`" in report
    assert json.loads(result.metrics_path.read_text())["general"] == general


def test_production_measured_at_release_compares_with_the_candidate(world):
    """The registry measures production with evaluate_model: on the same sample its general_loss is the stage's
    number for the same model, so max_forgetting and the reports compare like with like."""
    staged = _evaluate(world, "overfit").model_metrics("candidate")
    alone = evaluate_model(
        model_dir=world["root"] / "adapter-overfit",
        dataset_dir=world["dataset_dir"],
        base_dir=world["base_dir"],
        base_params=world["base_params"],
        max_new_tokens=8,
        device="cpu",
        general_dir=world["general_dir"],
    )
    assert alone["general_loss"] == pytest.approx(staged["general_loss"], rel=1e-6)

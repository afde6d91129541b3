"""Issue 4: a deliberately bad adapter fails the gate with a reason that names the rule.

Two bad adapters on the tiny built base (seconds on 2 CPU cores):

* NaN weights: a trained adapter with one lora_B tensor set to NaN. The merge stage already refuses it
  (the merged-vs-unmerged logit difference is NaN, which is not <= the tolerance), so it never reaches
  evaluation or production; if it did reach the gate, its non-finite metrics fail ``beats_base``.
* Shuffled answers: the same tickets with the answers permuted across rows, trained the same way.
  It learns the JSON format but not the routing, so on the original tenant's test split it must be
  clearly worse than the properly trained adapter and fail a gate the good adapter passes. Its answer
  loss falls almost as far (the format is most answer tokens): the gate decides on field accuracy.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import make_raw, tiny_build, tiny_train, triage_rows  # noqa: E402

from loraline.config import BaseParams, GateParams, PrepareParams, TenantParams  # noqa: E402
from loraline.evaluate.stage import evaluate_tenant  # noqa: E402
from loraline.gate.decision import decide, to_json  # noqa: E402
from loraline.merge import MergeError, merge_adapter  # noqa: E402

PARITY = {"merge_max_logit_diff": 0.0, "export_max_logit_diff": 0.0}
PROBES = [[{"role": "user", "content": "ping"}]]
# Enough tickets for about 18 held-out rows: with 9, one row moved the shuffled adapter's field
# accuracy by 0.056 and a chance score could land on either side of the gate's 0.4.
TOY_ROWS = 120
# The default gate's bar on answer loss (params.yaml gate.min_gain_over_base).
REALISTIC_GAIN = 0.05


def _make_shuffled_raw(root: Path, n: int) -> Path:
    rows = triage_rows(n)
    answers = [r["messages"][1]["content"] for r in rows]
    rng = random.Random(0)
    while True:  # a derangement-ish shuffle: most rows get another row's answer
        perm = answers[:]
        rng.shuffle(perm)
        if sum(a != b for a, b in zip(perm, answers)) >= 0.7 * n:
            break
    for r, a in zip(rows, perm):
        r["messages"][1]["content"] = a
    root.mkdir(parents=True, exist_ok=True)
    (root / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import loraline.train.stage as stage
    from loraline.base.stage import build_base
    from loraline.modelling.loading import load_base_tokenizer
    from loraline.prepare.stage import prepare_tenant

    root = tmp_path_factory.mktemp("badgate")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = make_raw(root / "raw" / "toy", n=TOY_ROWS)
        shuffled_raw = _make_shuffled_raw(root / "raw" / "shuffled", n=TOY_ROWS)
        base_params = BaseParams(build=tiny_build())
        base = build_base(base_params, seed=5, raw_dirs=[raw], out_dir=root / "base")
        tok = load_base_tokenizer(base.out_dir, base_params)
        datasets = {}
        for name, folder in (("good", raw), ("shuffled", shuffled_raw)):
            datasets[name] = prepare_tenant(
                # The toy tickets share one template: decontamination would drop most training rows.
                TenantParams(name="toy", raw_dir=folder),
                PrepareParams(decontamination={"enabled": False}),
                tok,
                out_dir=root / f"prepared-{name}",
                rejected_path=root / f"rejected-{name}.jsonl",
                stats_path=root / f"stats-{name}.json",
            ).dataset_dir
        # The sample tenants' recipe (params.yaml): the tied embeddings train too, which is what lets a
        # small base learn which words decide the label.
        params = tiny_train(
            quantization="nf4",
            max_steps=150,
            grad_accum=1,
            eval_every=150,
            save_every=150,
            learning_rate=1e-2,
            modules_to_save=["embed_tokens"],
        )
        for name in ("good", "shuffled"):
            with mock.patch.object(stage, "pick_device", return_value=torch.device("cpu")):
                stage.train_adapter(
                    params,
                    base_dir=base.out_dir,
                    base_params=base_params,
                    dataset_dir=datasets[name],
                    out_dir=root / f"adapter-{name}",
                    checkpoint_dir=root / f"ckpt-{name}",
                )
            merge_adapter(
                base_dir=base.out_dir,
                base_params=base_params,
                adapter_dir=root / f"adapter-{name}",
                out_dir=root / f"merged-{name}",
                tolerance=1e-3,
                probes=PROBES,
                max_new_tokens=1,
                quantized_reference=False,
                check_reload=False,
                device="cpu",
            )
    finally:
        torch.set_num_threads(previous)
    return dict(root=root, base_params=base_params, base_dir=base.out_dir, dataset_dir=datasets["good"])


def _evaluate(world, candidate: Path, out: str):
    """Base vs `candidate` on the ORIGINAL tenant's test split (answer loss is teacher-forced)."""
    return evaluate_tenant(
        tenant="toy",
        dataset_dir=world["dataset_dir"],
        base_dir=world["base_dir"],
        base_params=world["base_params"],
        candidate_dir=candidate,
        production_dir=None,
        out_dir=world["root"] / out,
        max_new_tokens=24,
        max_examples=None,
        device="cpu",
    )


# CPU results depend on the thread count: one thread keeps them repeatable (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_nan_adapter_is_refused_before_production(world):
    from safetensors.torch import load_file, save_file

    good, bad = world["root"] / "adapter-good", world["root"] / "adapter-nan"
    shutil.copytree(good, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sorted(weights) if "lora_B" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, bad / "adapter_model.safetensors", metadata={"format": "pt"})

    out = world["root"] / "merged-nan"
    try:
        merge_adapter(
            base_dir=world["base_dir"],
            base_params=world["base_params"],
            adapter_dir=bad,
            out_dir=out,
            tolerance=1e-3,
            probes=PROBES,
            max_new_tokens=1,
            quantized_reference=False,
            check_reload=False,
        )
    except MergeError as e:
        # The merge stage refuses it: the logit difference is NaN, which does not pass the tolerance.
        message = str(e)
        print("NaN adapter refused at merge:", message)
        assert "max abs logit diff nan > tolerance" in message
        assert not out.exists(), "nothing may be written for a refused merge"
        return
    # Had the merge let it through, the gate must fail it on the primary metric.
    result = _evaluate(world, out, "eval-nan")
    decision = decide(
        GateParams(), result.model_metrics("candidate"), result.model_metrics("base"), None, parity=PARITY
    )
    print("NaN adapter gate:", json.dumps(to_json(decision)))
    assert not decision.passed and "beats_base" in decision.failed
    reason = decision.rule("beats_base").reason
    assert "answer_loss" in reason and ("nan" in reason.lower() or "None" in reason or "finite" in reason)


def test_shuffled_answers_adapter_fails_the_gate(world):
    """The sample tenants' gate (params.yaml): JSON field accuracy at least 0.4 over the base, and the
    answer loss down by half. Measured (120 tickets, 20 test rows, 150 steps): field accuracy base 0,
    good 0.825, shuffled 0.05 (chance for a 5-way and a 3-way field is 0.27); answer loss base 3.93,
    good 0.025, shuffled 0.12, so a loss-only gate would have promoted the shuffled adapter too.
    (With 60 tickets, 9 test rows, the shuffled adapter scored 0.33 or 0.44 depending on float
    summation order alone.)"""
    good = _evaluate(world, world["root"] / "merged-good", "eval-good")
    shuffled = _evaluate(world, world["root"] / "merged-shuffled", "eval-shuffled")
    base = good.model_metrics("base")
    assert shuffled.model_metrics("base") == base  # same base, same rows
    g, s = good.model_metrics("candidate"), shuffled.model_metrics("candidate")
    print(f"answer_loss base {base['answer_loss']:.4f} good {g['answer_loss']:.4f} shuffled {s['answer_loss']:.4f}")
    print(
        f"json_field_accuracy base {base['json_field_accuracy']:.3f} good {g['json_field_accuracy']:.3f} "
        f"shuffled {s['json_field_accuracy']:.3f}"
    )
    assert g["json_field_accuracy"] >= s["json_field_accuracy"] + 0.3  # it learnt the routing, the other did not

    # The task metric is the point here: forgetting is gated on its own (test_forgetting_gate.py).
    loss_only = GateParams(primary_metric="answer_loss", min_gain_over_base=REALISTIC_GAIN, max_forgetting=None)
    assert decide(loss_only, s, base, None, parity=PARITY).passed  # why the task metric decides

    gate = GateParams(
        primary_metric="json_field_accuracy",
        min_gain_over_base=0.4,
        secondary_metric="answer_loss",
        min_secondary_gain=0.5,
        max_forgetting=None,
    )
    good_decision = decide(gate, g, base, None, parity=PARITY)
    bad_decision = decide(gate, s, base, None, parity=PARITY)
    print("good:", good_decision.rule("beats_base").reason)
    print("shuffled:", bad_decision.rule("beats_base").reason)
    assert good_decision.passed, to_json(good_decision)
    assert not bad_decision.passed
    assert bad_decision.failed == ["beats_base"]
    reason = bad_decision.rule("beats_base").reason
    assert reason.startswith("json_field_accuracy") and "< 0.4" in reason
    assert to_json(bad_decision)["rules"][0]["name"] == "beats_base"

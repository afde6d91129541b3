"""The promotion gate as a pure function: each rule's edges, missing evidence, and the JSON form."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraline.config import GateParams
from loraline.gate.decision import RULES, GateDecision, decide, relative_gain, to_json

GATE = GateParams(
    primary_metric="answer_loss",
    min_gain_over_base=0.05,
    max_regression_vs_prod=0.02,
    max_merge_logit_diff=1e-3,
    max_export_logit_diff=1e-3,
)
PARITY = {"merge_max_logit_diff": 1e-4, "export_max_logit_diff": 2e-4}
BASE = {"answer_loss": 2.0, "exact_match": 0.2, "general_loss": 3.0}
GOOD = {"answer_loss": 1.5, "exact_match": 0.5, "general_loss": 3.1}


def _decide(candidate=GOOD, base=BASE, production=None, parity=PARITY, gate=GATE, **kw) -> GateDecision:
    return decide(gate, candidate, base, production, parity, **kw)


def test_all_pass() -> None:
    d = _decide(production={"answer_loss": 1.5, "exact_match": 0.5})
    assert d.passed and d.failed == []
    assert [r.name for r in d.rules] == list(RULES)
    assert d.rule("beats_base").value == pytest.approx(0.25)


def test_no_production_passes_that_rule() -> None:
    r = _decide().rule("no_regression_vs_prod")
    assert r.passed and r.reason == "no production version" and r.value is None


@pytest.mark.parametrize(
    ("cand_loss", "passed"),
    [(1.9, True), (1.8999, True), (1.9001, False), (2.0, False), (2.5, False), (0.0, True)],
)
def test_beats_base_lower_is_better_and_ties(cand_loss: float, passed: bool) -> None:
    # (2.0 - 1.9) / 2.0 is 0.04999999999999993 in floats; a tie must still pass
    assert _decide(candidate={"answer_loss": cand_loss}).rule("beats_base").passed is passed


@pytest.mark.parametrize(("cand", "passed"), [(0.21, True), (0.2099, False), (0.25, True), (0.2, False), (0.1, False)])
def test_beats_base_higher_is_better(cand: float, passed: bool) -> None:
    gate = GATE.model_copy(update={"primary_metric": "exact_match"})
    r = _decide(candidate={"exact_match": cand}, gate=gate).rule("beats_base")
    assert r.passed is passed
    assert "higher is better" in r.reason


def test_beats_base_with_zero_base_uses_absolute_difference() -> None:
    gate = GATE.model_copy(update={"primary_metric": "exact_match"})
    tiny = _decide(candidate={"exact_match": 0.01}, base={"exact_match": 0.0}, gate=gate).rule("beats_base")
    assert not tiny.passed and tiny.value == pytest.approx(0.01) and "absolute" in tiny.reason
    assert _decide(candidate={"exact_match": 0.05}, base={"exact_match": 0.0}, gate=gate).rule("beats_base").passed
    zero_loss = _decide(candidate={"answer_loss": 0.0}, base={"answer_loss": 0.0}).rule("beats_base")
    assert not zero_loss.passed and zero_loss.value == 0.0


def test_negative_min_gain_tolerates_a_slightly_worse_candidate() -> None:
    gate = GATE.model_copy(update={"min_gain_over_base": -0.1})
    assert _decide(candidate={"answer_loss": 2.1}, gate=gate).rule("beats_base").passed


def test_custom_lower_is_better_set() -> None:
    gate = GATE.model_copy(update={"primary_metric": "latency_ms"})
    cand, base = {"latency_ms": 80.0}, {"latency_ms": 100.0}
    assert not _decide(candidate=cand, base=base, gate=gate).rule("beats_base").passed
    assert _decide(candidate=cand, base=base, gate=gate, lower_is_better={"latency_ms"}).rule("beats_base").passed


@pytest.mark.parametrize(
    ("candidate", "base", "where"),
    [
        ({"exact_match": 0.5}, BASE, "candidate"),
        (GOOD, {"exact_match": 0.1}, "base"),
        ({"exact_match": 0.5}, {"exact_match": 0.1}, "candidate and base"),
    ],
)
def test_unknown_or_missing_primary_metric(candidate, base, where: str) -> None:
    d = _decide(candidate=candidate, base=base)
    r = d.rule("beats_base")
    assert not d.passed and not r.passed and r.value is None
    assert "'answer_loss'" in r.reason and f"missing from the {where}" in r.reason
    assert "available: " in r.reason and "exact_match" in r.reason


def test_primary_metric_typo_lists_available() -> None:
    gate = GATE.model_copy(update={"primary_metric": "answer_los"})
    r = _decide(gate=gate).rule("beats_base")
    assert not r.passed and "'answer_los'" in r.reason and "answer_loss, exact_match" in r.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "1.5", True])
@pytest.mark.parametrize("side", ["candidate", "base"])
def test_non_finite_or_non_numeric_primary_fails(bad, side: str) -> None:
    cand = {"answer_loss": bad} if side == "candidate" else GOOD
    base = {"answer_loss": bad} if side == "base" else BASE
    r = _decide(candidate=cand, base=base).rule("beats_base")
    assert not r.passed and r.value is None
    assert f"{side} 'answer_loss'" in r.reason


@pytest.mark.parametrize(
    ("prod_loss", "passed"),
    [
        (1.5, True),
        (1.6, True),  # candidate better than production
        (1.5 / 1.02, True),  # regression exactly 2%
        (1.5 / 1.0201, False),
        (1.4706, True),  # (1.5 - 1.4706) / 1.4706 = 0.01999 just under
        (1.47, False),  # 0.0204 just over
        (1.0, False),
    ],
)
def test_regression_vs_production_lower_is_better(prod_loss: float, passed: bool) -> None:
    r = _decide(production={"answer_loss": prod_loss}).rule("no_regression_vs_prod")
    assert r.passed is passed
    if not passed:
        assert "answer_loss" in r.reason and "regressed" in r.reason


@pytest.mark.parametrize(
    ("prod_em", "passed"), [(0.5, True), (0.51, True), (0.5105, False), (0.6, False), (0.4, True)]
)
def test_regression_vs_production_higher_is_better(prod_em: float, passed: bool) -> None:
    # candidate exact_match 0.5: 0.51 -> relative regression 0.0196 (under 2%), 0.5105 -> 0.0206 (over)
    prod = {"answer_loss": 1.5, "exact_match": prod_em}
    r = _decide(production=prod).rule("no_regression_vs_prod")
    assert r.passed is passed
    assert r.values["exact_match"] == pytest.approx((prod_em - 0.5) / prod_em)


def test_regression_reports_every_offending_metric_and_the_worst() -> None:
    prod = {"answer_loss": 1.0, "exact_match": 0.9}
    r = _decide(production=prod).rule("no_regression_vs_prod")
    assert not r.passed
    assert "answer_loss" in r.reason and "exact_match" in r.reason
    assert r.value == pytest.approx(0.5) and r.values["exact_match"] == pytest.approx(0.4 / 0.9)


def test_regression_compares_only_common_metrics() -> None:
    prod = {"answer_loss": 1.5, "rouge_l": 0.9}
    r = _decide(candidate={"answer_loss": 1.5, "token_f1": 0.1}, production=prod).rule("no_regression_vs_prod")
    assert r.passed and set(r.values) == {"answer_loss"}
    assert "not compared (production only): rouge_l" in r.reason


def test_regression_with_no_common_metric_fails() -> None:
    r = _decide(production={"rouge_l": 0.9}).rule("no_regression_vs_prod")
    assert not r.passed and "no metric in common" in r.reason


@pytest.mark.parametrize("side", ["candidate", "production"])
def test_regression_nan_metric_fails_naming_it(side: str) -> None:
    cand = {**GOOD, "token_f1": math.nan if side == "candidate" else 0.5}
    prod = {**GOOD, "token_f1": math.nan if side == "production" else 0.5}
    r = _decide(candidate=cand, production=prod).rule("no_regression_vs_prod")
    assert not r.passed and f"{side} 'token_f1' is not finite" in r.reason
    assert r.values["token_f1"] is None


def test_regression_with_zero_production_value() -> None:
    prod = {"answer_loss": 1.5, "exact_match": 0.0}
    assert (
        _decide(candidate={"answer_loss": 1.5, "exact_match": 0.0}, production=prod)
        .rule("no_regression_vs_prod")
        .passed
    )
    prod = {"answer_loss": 0.0}
    r = _decide(candidate={"answer_loss": 0.01}, production=prod).rule("no_regression_vs_prod")
    assert r.passed and r.value == pytest.approx(0.01)  # absolute when production is 0
    r = _decide(candidate={"answer_loss": 0.03}, production=prod).rule("no_regression_vs_prod")
    assert not r.passed


@pytest.mark.parametrize(
    ("parity", "merge", "export"),
    [
        (PARITY, True, True),
        ({"merge_max_logit_diff": 1e-3, "export_max_logit_diff": 1e-3}, True, True),  # ties pass
        ({"merge_max_logit_diff": 1.1e-3, "export_max_logit_diff": 0.0}, False, True),
        ({"merge_max_logit_diff": 0.0, "export_max_logit_diff": 0.5}, True, False),
        ({"merge_max_logit_diff": 1e-4}, True, False),
        ({"export_max_logit_diff": 1e-4}, False, True),
        ({}, False, False),
        (None, False, False),
        ({"merge_max_logit_diff": math.nan, "export_max_logit_diff": math.inf}, False, False),
    ],
)
def test_parity_rules(parity, merge: bool, export: bool) -> None:
    d = _decide(parity=parity)
    assert d.rule("merge_parity").passed is merge
    assert d.rule("export_parity").passed is export
    assert d.passed is (merge and export)


def test_missing_parity_reason() -> None:
    r = _decide(parity=None).rule("export_parity")
    assert r.value is None and "export_max_logit_diff is missing" in r.reason


def test_parity_threshold_comes_from_gate() -> None:
    gate = GATE.model_copy(update={"max_merge_logit_diff": 0.5, "max_export_logit_diff": 0.5})
    assert _decide(parity={"merge_max_logit_diff": 0.4, "export_max_logit_diff": 0.5}, gate=gate).passed


def test_inputs_are_not_modified() -> None:
    cand, base, prod, parity = dict(GOOD), dict(BASE), {"answer_loss": 9.0}, dict(PARITY)
    _decide(candidate=cand, base=base, production=prod, parity=parity)
    assert (cand, base, prod, parity) == (GOOD, BASE, {"answer_loss": 9.0}, PARITY)


def test_to_json_shape_and_order() -> None:
    d = _decide(candidate={"answer_loss": math.nan, "general_loss": 3.0}, parity=None)
    out = to_json(d)
    assert list(out) == ["passed", "failed", "rules"]
    assert out["passed"] is False
    assert out["failed"] == ["beats_base", "merge_parity", "export_parity"]
    assert [r["name"] for r in out["rules"]] == list(RULES)
    for r in out["rules"]:
        assert list(r) == ["name", "passed", "value", "threshold", "reason", "values"]
    assert out["rules"][0]["values"] == {"candidate": None, "base": 2.0}
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out


def test_relative_gain() -> None:
    assert relative_gain(1.5, 2.0, lower_is_better=True) == pytest.approx(0.25)
    assert relative_gain(0.3, 0.2, lower_is_better=False) == pytest.approx(0.5)
    assert relative_gain(0.3, 0.0, lower_is_better=False) == pytest.approx(0.3)
    assert relative_gain(-1.0, -2.0, lower_is_better=False) == pytest.approx(0.5)  # |base| keeps the sign sane


finite = st.floats(-1e6, 1e6, allow_nan=False)
anyfloat = st.floats(allow_nan=True, allow_infinity=True)
metric_names = st.sampled_from(["answer_loss", "perplexity", "exact_match", "token_f1", "rouge_l", "general_loss"])
metrics = st.dictionaries(metric_names, anyfloat | finite, max_size=5)
gates = st.builds(
    GateParams,
    primary_metric=metric_names,
    min_gain_over_base=st.floats(-1, 1),
    max_regression_vs_prod=st.floats(0, 1),
    max_merge_logit_diff=st.floats(1e-6, 1),
    max_export_logit_diff=st.floats(1e-6, 1),
    max_forgetting=st.none() | st.floats(0, 1),
)
parities = st.none() | st.dictionaries(st.sampled_from(["merge_max_logit_diff", "export_max_logit_diff"]), anyfloat)


@given(gates, metrics, metrics, st.none() | metrics, parities)
def test_decision_is_the_conjunction_of_its_rules(gate, candidate, base, production, parity) -> None:
    d = decide(gate, candidate, base, production, parity)
    assert d.passed == all(r.passed for r in d.rules)
    assert [r.name for r in d.rules] == list(RULES)
    assert d.failed == [r.name for r in d.rules if not r.passed]
    assert all(r.reason for r in d.rules)
    json.dumps(to_json(d), allow_nan=False)
    assert decide(gate, candidate, base, production, parity) == d  # deterministic
    if parity is None or any(k not in parity for k in ("merge_max_logit_diff", "export_max_logit_diff")):
        assert not d.passed  # never passes on missing parity evidence
    if gate.primary_metric not in candidate or gate.primary_metric not in base:
        assert not d.passed
    if gate.max_forgetting is not None and ("general_loss" not in candidate or "general_loss" not in base):
        assert not d.passed  # nor on forgetting that was not measured


@given(finite, finite, st.floats(0.0, 10.0), st.floats(-1, 1))
def test_a_better_candidate_never_flips_beats_base_to_fail(base_value, cand_value, improvement, min_gain) -> None:
    gate = GATE.model_copy(update={"min_gain_over_base": min_gain})
    worse = decide(gate, {"answer_loss": cand_value}, {"answer_loss": base_value}, None, PARITY)
    better = decide(gate, {"answer_loss": cand_value - improvement}, {"answer_loss": base_value}, None, PARITY)
    if worse.rule("beats_base").passed:
        assert better.rule("beats_base").passed


# --- the stage: reads the metrics files, writes the verdict ----------------------------------------


def test_the_stage_reads_parity_from_the_small_merge_and_export_metrics_files(tmp_path):
    from loraline.config import parse_params
    from loraline.gate.stage import run
    from loraline.layout import Layout

    layout, params = Layout(tmp_path), parse_params({"tenants": {"t1": {"raw_dir": "raw"}}})
    layout.evaluation_results_path("t1").parent.mkdir(parents=True)
    layout.evaluation_results_path("t1").write_text(
        json.dumps(
            {
                "models": {
                    "base": {"answer_loss": 2.0, "general_loss": 3.0},
                    "candidate": {"answer_loss": 1.0, "general_loss": 3.0},
                }
            }
        )
    )
    layout.metrics_path("merge", "t1").parent.mkdir()
    layout.metrics_path("merge", "t1").write_text(
        json.dumps({"passed": True, "max_abs_logit_diff": 1e-6, "greedy_agreement": 1.0})
    )

    decision = run(params, layout, "t1")  # export parity missing: the gate must not pass on missing evidence
    assert decision.failed == ["export_parity"] and decision.rule("merge_parity").value == 1e-6
    assert json.loads(layout.metrics_path("gate", "t1").read_text()) == {"passed": False, "failed": "export_parity"}
    assert json.loads(layout.gate_path("t1").read_text())["rules"][4]["reason"].startswith(
        "export_max_logit_diff is missing"
    )

    layout.metrics_path("export", "t1").write_text(json.dumps({"passed": True, "max_abs_logit_diff": 2e-6}))
    assert run(params, layout, "t1").passed
    assert json.loads(layout.metrics_path("gate", "t1").read_text()) == {"passed": True, "failed": ""}


def test_secondary_rule_off_by_default_passes_with_reason() -> None:
    r = _decide().rule("beats_base_secondary")
    assert r.passed and r.reason == "no secondary metric" and r.value is None


def test_task_metric_decides_and_answer_loss_must_still_fall() -> None:
    gate = GATE.model_copy(
        update={
            "primary_metric": "json_field_accuracy",
            "min_gain_over_base": 0.5,
            "secondary_metric": "answer_loss",
            "min_secondary_gain": 0.05,
        }
    )
    base = {"json_field_accuracy": 0.0, "answer_loss": 4.0, "general_loss": 3.0}
    # Format learnt, content guessed: the loss falls a lot, the task metric does not reach the bar.
    guessing = _decide(
        candidate={"json_field_accuracy": 0.25, "answer_loss": 0.5, "general_loss": 3.0}, base=base, gate=gate
    )
    assert guessing.failed == ["beats_base"]
    assert guessing.rule("beats_base").reason.startswith("json_field_accuracy (higher is better)")
    # A task metric gained while the loss got worse (e.g. a collapsed distribution) fails the second rule.
    overconfident = _decide(
        candidate={"json_field_accuracy": 0.9, "answer_loss": 4.1, "general_loss": 3.0}, base=base, gate=gate
    )
    assert overconfident.failed == ["beats_base_secondary"]
    assert overconfident.rule("beats_base_secondary").reason.startswith("answer_loss (lower is better)")
    assert _decide(
        candidate={"json_field_accuracy": 0.9, "answer_loss": 0.4, "general_loss": 3.0}, base=base, gate=gate
    ).passed
    missing = _decide(candidate={"json_field_accuracy": 0.9}, base=base, gate=gate).rule("beats_base_secondary")
    assert not missing.passed and "secondary metric 'answer_loss' is missing from the candidate" in missing.reason


def test_long_context_perplexity_is_a_lower_is_better_primary_metric() -> None:
    """A LongLoRA tenant gates on held-out perplexity at the extended context (evaluate's metrics.json
    holds the candidate's, and the rope-scaled base's under "base")."""
    gate = GATE.model_copy(update={"primary_metric": "long_context_perplexity", "min_gain_over_base": 0.5})
    base, good, poor = ({"answer_loss": 2.0, "long_context_perplexity": p} for p in (699.6, 111.0, 420.0))
    assert _decide(candidate={**good, "answer_loss": 1.5}, base=base, gate=gate).rule("beats_base").passed
    worse = _decide(candidate={**poor, "answer_loss": 1.5}, base=base, gate=gate).rule("beats_base")
    assert not worse.passed and "lower is better" in worse.reason
    missing = _decide(candidate={**good, "long_context_perplexity": None}, base=base, gate=gate).rule("beats_base")
    assert not missing.passed and "long_context_perplexity" in missing.reason


# --- max_forgetting: general_loss (text that is not the tenant's) against the base's -------------------


@pytest.mark.parametrize(
    ("cand_general", "passed"), [(3.3, True), (3.2999, True), (3.3001, False), (4.0, False), (3.0, True), (2.5, True)]
)
def test_max_forgetting_bounds_the_relative_rise_over_the_base(cand_general: float, passed: bool) -> None:
    r = _decide(candidate={**GOOD, "general_loss": cand_general}).rule("max_forgetting")  # base 3.0, threshold 0.10
    assert r.passed is passed
    assert r.value == pytest.approx((cand_general - 3.0) / 3.0) and r.threshold == pytest.approx(0.10)
    assert r.values == {"candidate": cand_general, "base": 3.0}


def test_a_forgetting_candidate_is_refused_with_the_numbers() -> None:
    d = _decide(candidate={**GOOD, "general_loss": 3.6})
    assert not d.passed and d.failed == ["max_forgetting"]
    reason = d.rule("max_forgetting").reason
    assert reason.startswith("general_loss on general text: candidate 3.6 vs base 3, relative rise 0.2 >")
    assert reason.endswith("0.1") and "forgot" in reason


def test_max_forgetting_null_disables_the_rule_and_says_so() -> None:
    gate = GATE.model_copy(update={"max_forgetting": None})
    r = _decide(candidate={**GOOD, "general_loss": 30.0}, gate=gate).rule("max_forgetting")
    assert r.passed and r.value is None and r.threshold is None
    assert r.reason.startswith("disabled (gate.max_forgetting is null)")
    assert _decide(candidate={"answer_loss": 1.5}, base={"answer_loss": 2.0}, gate=gate).passed  # nothing to measure


@pytest.mark.parametrize(
    ("candidate", "base", "said"),
    [
        ({"answer_loss": 1.5}, BASE, "candidate general_loss is missing"),
        (GOOD, {"answer_loss": 2.0}, "base general_loss is missing"),
        ({"answer_loss": 1.5, "general_loss": math.nan}, BASE, "candidate general_loss is not finite (nan)"),
        ({"answer_loss": 1.5, "general_loss": None}, BASE, "candidate general_loss is not a number (None)"),
    ],
)
def test_forgetting_not_measured_fails_saying_why(candidate, base, said: str) -> None:
    d = _decide(candidate=candidate, base=base)
    r = d.rule("max_forgetting")
    assert not d.passed and not r.passed and r.value is None
    assert r.reason.startswith(said) and "forgetting was not measured on general text (evaluate.general)" in r.reason


def test_general_loss_is_left_out_of_the_comparison_with_production() -> None:
    """Both within the forgetting bound against the base: a candidate forgetting 8% is not refused because
    production forgot 1% (max_regression_vs_prod 0.02 would be), nor is general_loss a metric in common."""
    production = {"answer_loss": 1.5, "exact_match": 0.5, "general_loss": 3.03}
    d = _decide(candidate={**GOOD, "general_loss": 3.24}, production=production)
    assert d.passed, to_json(d)
    assert set(d.rule("no_regression_vs_prod").values) == {"answer_loss", "exact_match"}
    only = _decide(candidate={"general_loss": 3.0, "answer_loss": 1.5}, production={"general_loss": 3.0})
    assert only.rule("no_regression_vs_prod").reason.startswith("no metric in common with production")


def test_tenant_gate_override_of_max_forgetting() -> None:
    from loraline.config import parse_params

    params = parse_params(
        {
            "gate": {"max_forgetting": 0.05},
            "tenants": {"t1": {"raw_dir": "raw"}, "t2": {"raw_dir": "raw", "gate": {"max_forgetting": None}}},
        }
    )
    assert params.gate_for("t1").max_forgetting == pytest.approx(0.05)
    assert params.gate_for("t2").max_forgetting is None
    assert GateParams().max_forgetting == pytest.approx(0.10)


def test_a_preference_tenant_decides_on_preference_accuracy() -> None:
    """A DPO tenant's gate (gate.primary_metric: preference_accuracy): higher is better, as evaluate's preference
    metrics all are; an evaluation without pairs cannot pass it, and the reason says which metric was missing."""
    gate = GATE.model_copy(update={"primary_metric": "preference_accuracy", "min_gain_over_base": 0.2})
    base = {**BASE, "preference_accuracy": 0.5, "reward_margin": 0.0}
    learned = {**GOOD, "preference_accuracy": 0.8, "reward_margin": 1.5}
    assert _decide(candidate=learned, base=base, gate=gate).passed
    barely = {**GOOD, "preference_accuracy": 0.55, "reward_margin": 0.1}
    rule = _decide(candidate=barely, base=base, gate=gate).rules[0]
    assert rule.name == "beats_base" and not rule.passed
    without_pairs = _decide(candidate=GOOD, base=BASE, gate=gate).rules[0]
    assert not without_pairs.passed and "preference_accuracy" in without_pairs.reason

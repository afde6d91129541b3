"""The promotion gate as a pure function of metrics: `decide` -> `GateDecision`, `to_json` for gate.json.

Six rules, always evaluated and reported in this order (the decision passes only when all pass):

``beats_base``
    The candidate improves on the base model on ``gate.primary_metric`` by at least
    ``gate.min_gain_over_base``, as a *relative* gain:
    ``(base - candidate) / |base|`` for lower-is-better metrics (losses, perplexity) and
    ``(candidate - base) / |base|`` for higher-is-better ones (exact_match, token_f1, ...).
    When ``|base| < EPS`` a ratio is meaningless (a 0.01 exact match over a base of 0 would be an
    infinite gain), so the denominator becomes 1 and the gain is the absolute difference.
    A gain equal to the threshold passes (``>=``, with a 1e-9 relative float tolerance so that
    ``(2.0 - 1.9) / 2.0`` counts as 0.05).
``beats_base_secondary``
    The same test on ``gate.secondary_metric`` with ``gate.min_secondary_gain``, so that a task
    metric (exact match, JSON field accuracy) can decide while the answer loss must still fall.
    Passes with reason "no secondary metric" when ``secondary_metric`` is null.
``no_regression_vs_prod``
    For every metric present in both the candidate and the current production version, the relative
    regression (the negative of the gain above, candidate vs production) is at most
    ``gate.max_regression_vs_prod`` (``<=``, same tolerance). Passes with reason
    "no production version" when ``production`` is None. Metrics only production reports are listed
    in the reason as not compared; no metric in common fails (no evidence). ``general_loss`` is not
    compared here but by ``max_forgetting``: what an adapter may forget is bounded against the base,
    by its own threshold, so two versions that each forget within it are not refused for the gap.
``merge_parity`` / ``export_parity``
    ``parity["merge_max_logit_diff"] <= gate.max_merge_logit_diff`` and
    ``parity["export_max_logit_diff"] <= gate.max_export_logit_diff``. A number absent from
    ``parity`` (or ``parity`` None) **fails** with reason "missing": the gate must never pass on
    missing evidence, so a pipeline that skipped the parity check cannot promote. A target that
    deploy.targets does not build (``merged`` for merge parity, ``onnx`` for export parity) has no
    parity to measure: its rule passes with reason "not built (deploy.targets)", whatever ``parity`` holds.
``max_forgetting``
    The candidate's ``general_loss`` (its loss on general text that is not the tenant's, evaluate.general)
    rose over the base's by at most ``gate.max_forgetting``, relatively: ``(candidate - base) / |base|``
    ``<=`` the threshold (same tolerance; a fall is negative and passes). Passes with reason "disabled
    (gate.max_forgetting is null)" when the threshold is null. A general_loss missing or non-finite on
    either side fails, naming it: an evaluation that did not measure forgetting cannot promote.

``judge_win_rate``
    ``judge["win_rate"] >= gate.min_judge_win_rate``: the LLM judge's win rate (evaluate.judge) of the
    candidate against the model its ``judge`` block names (``against``: the base at the gate stage,
    the production version at release, where loraline.release judges again). Passes with reason
    "no judge rule" when the threshold is null; fails without a ``judge`` block or without a valid verdict.

``judge_win_rate`` is also a metric of metrics.json's models (the candidate's rate, and 0.5 for the
model judged against: itself in both orders), so it may be the primary or secondary metric, compared
with the base as every metric: higher is better, a relative gain of (rate - 0.5) / 0.5.

A missing, non-numeric or non-finite (NaN, ±inf) metric fails the rule that needs it, and the
reason names the metric. Metrics not in ``lower_is_better`` are treated as higher-is-better.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from loraline.config import GateParams
from loraline.layout import DEPLOY_TARGETS, NOT_BUILT

__all__ = [
    "DEFAULT_LOWER_IS_BETTER",
    "EPS",
    "EXPORT_PARITY_KEY",
    "FORGETTING_METRIC",
    "MERGE_PARITY_KEY",
    "RULES",
    "GateDecision",
    "RuleResult",
    "decide",
    "relative_gain",
    "to_json",
]

DEFAULT_LOWER_IS_BETTER: frozenset[str] = frozenset(
    {
        "answer_loss",
        "loss",
        "eval_loss",
        "nll",
        "perplexity",
        "answer_perplexity",
        "ppl",
        "long_context_perplexity",
        "general_loss",
    }
)
EPS = 1e-12
REL_TOL = 1e-9
MERGE_PARITY_KEY = "merge_max_logit_diff"
EXPORT_PARITY_KEY = "export_max_logit_diff"
FORGETTING_METRIC = "general_loss"
RULES = (
    "beats_base",
    "beats_base_secondary",
    "no_regression_vs_prod",
    "merge_parity",
    "export_parity",
    "max_forgetting",
    "judge_win_rate",
)


@dataclass(frozen=True)
class RuleResult:
    """One rule's outcome. `value` is the number compared with `threshold` (None when it could not
    be computed); `values` holds the inputs or per-metric numbers behind it."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    reason: str
    values: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    rules: list[RuleResult]

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.rules if not r.passed]

    def rule(self, name: str) -> RuleResult:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)


def _number(metrics: Mapping[str, Any] | None, name: str) -> tuple[float | None, str | None]:
    """(value, None) for a finite number, else (None, why)."""
    if metrics is None or name not in metrics:
        return None, "missing"
    v = metrics[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None, f"not a number ({v!r})"
    v = float(v)
    if not math.isfinite(v):
        return None, f"not finite ({v})"
    return v, None


def _at_least(value: float, threshold: float) -> bool:
    return value >= threshold or math.isclose(value, threshold, rel_tol=REL_TOL, abs_tol=EPS)


def _at_most(value: float, threshold: float) -> bool:
    return value <= threshold or math.isclose(value, threshold, rel_tol=REL_TOL, abs_tol=EPS)


def relative_gain(candidate: float, reference: float, lower_is_better: bool) -> float:
    """Relative improvement of `candidate` over `reference` (positive: better); absolute when |reference| < EPS."""
    diff = reference - candidate if lower_is_better else candidate - reference
    denom = abs(reference) if abs(reference) >= EPS else 1.0
    return diff / denom


def _direction(lower: bool) -> str:
    return "lower is better" if lower else "higher is better"


def _beats_base(
    name: str,
    metric: str | None,
    threshold: float,
    candidate: Mapping[str, Any],
    base: Mapping[str, Any],
    lower_set: Set[str],
) -> RuleResult:
    role = "primary" if name == "beats_base" else "secondary"
    if metric is None:
        return RuleResult(name, True, None, threshold, f"no {role} metric")
    if metric not in candidate or metric not in base:
        where = " and ".join(w for w, m in (("candidate", candidate), ("base", base)) if metric not in m)
        available = sorted(set(candidate) | set(base))
        return RuleResult(
            name,
            False,
            None,
            threshold,
            f"{role} metric {metric!r} is missing from the {where} "
            f"metrics; available: {', '.join(available) or 'none'}",
        )
    cand, cwhy = _number(candidate, metric)
    ref, bwhy = _number(base, metric)
    values = {"candidate": cand, "base": ref}
    if cand is None or ref is None:
        bad = "; ".join(f"{w} {metric!r} is {why}" for w, why in (("candidate", cwhy), ("base", bwhy)) if why)
        return RuleResult(name, False, None, threshold, bad, values)
    lower = metric in lower_set
    gain = relative_gain(cand, ref, lower)
    ok = _at_least(gain, threshold)
    kind = "relative" if abs(ref) >= EPS else "absolute (base is 0)"
    reason = (
        f"{metric} ({_direction(lower)}): candidate {cand:.6g} vs base {ref:.6g}, {kind} gain {gain:.4g} "
        f"{'>=' if ok else '<'} {threshold:.4g}"
    )
    return RuleResult(name, ok, gain, threshold, reason, values)


def _no_regression(
    gate: GateParams, candidate: Mapping[str, Any], production: Mapping[str, Any] | None, lower_set: Set[str]
) -> RuleResult:
    name, threshold = "no_regression_vs_prod", gate.max_regression_vs_prod
    if production is None:
        return RuleResult(name, True, None, threshold, "no production version")
    common = sorted((set(candidate) & set(production)) - {FORGETTING_METRIC})  # max_forgetting's, against the base
    prod_only = sorted(set(production) - set(candidate))
    note = f"; not compared (production only): {', '.join(prod_only)}" if prod_only else ""
    if not common:
        return RuleResult(name, False, None, threshold, f"no metric in common with production{note}")
    values: dict[str, float | None] = {}
    problems: list[str] = []
    worst: float | None = None
    for metric in common:
        cand, cwhy = _number(candidate, metric)
        prod, pwhy = _number(production, metric)
        if cand is None or prod is None:
            values[metric] = None
            problems.extend(
                f"{w} {metric!r} is {why}" for w, why in (("candidate", cwhy), ("production", pwhy)) if why
            )
            continue
        regression = -relative_gain(cand, prod, metric in lower_set)
        values[metric] = regression
        worst = regression if worst is None else max(worst, regression)
        if not _at_most(regression, threshold):
            problems.append(
                f"{metric} ({_direction(metric in lower_set)}) regressed {regression:.4g} > {threshold:.4g} "
                f"(candidate {cand:.6g} vs production {prod:.6g})"
            )
    if problems:
        return RuleResult(name, False, worst, threshold, "; ".join(problems) + note, values)
    return RuleResult(
        name,
        True,
        worst,
        threshold,
        f"worst relative regression {worst:.4g} <= {threshold:.4g} over {len(common)} metric(s){note}",
        values,
    )


def _parity(name: str, key: str, threshold: float, parity: Mapping[str, Any] | None, built: bool) -> RuleResult:
    if not built:
        return RuleResult(name, True, None, threshold, NOT_BUILT)
    value, why = _number(parity, key)
    if value is None:
        return RuleResult(
            name, False, None, threshold, f"{key} is {why}: parity was not measured, so the gate cannot pass"
        )
    ok = _at_most(value, threshold)
    return RuleResult(name, ok, value, threshold, f"{key} {value:.4g} {'<=' if ok else '>'} {threshold:.4g}")


def _forgetting(threshold: float | None, candidate: Mapping[str, Any], base: Mapping[str, Any]) -> RuleResult:
    name, metric = "max_forgetting", FORGETTING_METRIC
    if threshold is None:
        return RuleResult(name, True, None, None, "disabled (gate.max_forgetting is null): forgetting not checked")
    cand, cwhy = _number(candidate, metric)
    ref, bwhy = _number(base, metric)
    values = {"candidate": cand, "base": ref}
    if cand is None or ref is None:
        bad = "; ".join(f"{w} {metric} is {why}" for w, why in (("candidate", cwhy), ("base", bwhy)) if why)
        return RuleResult(
            name,
            False,
            None,
            threshold,
            f"{bad}: forgetting was not measured on general text (evaluate.general), so the gate cannot pass",
            values,
        )
    rise = -relative_gain(cand, ref, lower_is_better=True)
    ok = _at_most(rise, threshold)
    verdict = "<=" if ok else "> (the adapter forgot too much of text that is not the tenant's)"
    reason = (
        f"{metric} on general text: candidate {cand:.6g} vs base "
        f"{ref:.6g}, relative rise {rise:.4g} {verdict} {threshold:.4g}"
    )
    return RuleResult(name, ok, rise, threshold, reason, values)


def _judge_win_rate(threshold: float | None, judge: Mapping[str, Any] | None) -> RuleResult:
    name = "judge_win_rate"
    if threshold is None:
        return RuleResult(name, True, None, None, "no judge rule (gate.min_judge_win_rate is null)")
    if judge is None:
        return RuleResult(
            name, False, None, threshold, "no judge verdicts: gate.min_judge_win_rate needs evaluate.judge"
        )
    counts = {k: judge.get(k) for k in ("wins", "losses", "ties", "invalid")}
    values = {k: float(v) for k, v in counts.items() if isinstance(v, (int, float))}
    identity = ", ".join(f"{k} {str(v)[:12]}" for k, v in (judge.get("against_model") or {}).items())
    against = f"{judge.get('against')}" + (f" ({identity})" if identity else "")
    tally = (
        f"{counts['wins']} wins, {counts['losses']} losses, {counts['ties']} ties, {counts['invalid']} invalid "
        f"of {judge.get('comparisons')} verdicts"
    )
    rate, why = _number(judge, "win_rate")
    if rate is None:
        why = "missing: no valid verdict" if judge.get("win_rate") is None else why
        return RuleResult(name, False, None, threshold, f"judge win rate against {against} is {why} ({tally})", values)
    ok = _at_least(rate, threshold)
    values["win_rate"] = rate
    return RuleResult(
        name,
        ok,
        rate,
        threshold,
        f"judge win rate against {against} {rate:.4g} {'>=' if ok else '<'} {threshold:.4g} ({tally})",
        values,
    )


def decide(
    gate: GateParams,
    candidate: Mapping[str, float],
    base: Mapping[str, float],
    production: Mapping[str, float] | None,
    parity: Mapping[str, float] | None = None,
    lower_is_better: Set[str] = DEFAULT_LOWER_IS_BETTER,
    targets: Collection[str] = DEPLOY_TARGETS,
    judge: Mapping[str, Any] | None = None,
) -> GateDecision:
    """Apply the six rules (see the module docstring); pure: no I/O, inputs are not modified.
    `targets`: the tenant's deploy.targets; the parity of a target not built is not required.
    `judge`: the LLM judge's block (metrics.json's `judge`, or the release's against production)."""
    rules = [
        _beats_base("beats_base", gate.primary_metric, gate.min_gain_over_base, candidate, base, lower_is_better),
        _beats_base(
            "beats_base_secondary", gate.secondary_metric, gate.min_secondary_gain, candidate, base, lower_is_better
        ),
        _no_regression(gate, candidate, production, lower_is_better),
        _parity("merge_parity", MERGE_PARITY_KEY, gate.max_merge_logit_diff, parity, "merged" in targets),
        _parity("export_parity", EXPORT_PARITY_KEY, gate.max_export_logit_diff, parity, "onnx" in targets),
        _forgetting(gate.max_forgetting, candidate, base),
        _judge_win_rate(gate.min_judge_win_rate, judge),
    ]
    return GateDecision(passed=all(r.passed for r in rules), rules=rules)


def _json_number(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


def to_json(decision: GateDecision) -> dict[str, Any]:
    """gate.json content: fixed key order, plain numbers (non-finite become null), JSON-safe."""
    return {
        "passed": decision.passed,
        "failed": decision.failed,
        "rules": [
            {
                "name": r.name,
                "passed": r.passed,
                "value": _json_number(r.value),
                "threshold": _json_number(r.threshold),
                "reason": r.reason,
                "values": {k: _json_number(v) for k, v in r.values.items()},
            }
            for r in decision.rules
        ],
    }

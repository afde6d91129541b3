"""The `evaluate` stage: base, candidate (merged) and production models on a tenant's test split.

Per model:
  answer_loss / answer_perplexity   teacher-forced cross-entropy over the answer tokens
                                    (labels != -100 of the stored input_ids/labels), micro-averaged
  exact_match, token_f1, rouge_l    from greedy generations (metrics.aggregate), with json_valid and
  (+ json_valid, json_field_accuracy)  json_field_accuracy when the references are JSON objects

  general_loss                      the same cross-entropy on the general-text sample (evaluate.general: not the
                                    tenant's data, read and tokenized by the prepare stage into data/general/<tenant>,
                                    prepare/general.py says how): plain text on every token, chat rows on their
                                    answers. Its rise over the base's is what the adapter forgot (gate.max_forgetting).
                                    Scored in the same model load as the test split, batched the same way.

Prompt = the conversation up to the last assistant turn, rendered with the base's chat template and
add_generation_prompt; reference = that assistant turn's content. Generation is greedy and stops at
eos (<|im_end|> for loraline's models). All models use the base tokenizer (see generate.py).

The candidate is the merged model (models/merged/<tenant>), or, when deploy.targets has no merged, the
adapter itself on the base, unmerged through peft (models/adapters/<tenant>), as serving runs it: either
folder kind is accepted wherever a model is evaluated (candidate, production, `evaluate_model`).

Where: `device` (evaluate.device: auto, cpu or cuda, as base.build.device): every model is loaded, scored
and generates there, batch_size rows at once with the KV cache (left-padded); bfloat16 on CUDA, float32 on
the CPU. metrics.json and the timing file record the device; metrics.json's batch_rows the rows per batch
each model ran with (evaluate.batch_size: auto sizes them to the card, evaluate/batching.py).

out_dir (replaced atomically):
    metrics.json       {"tenant", "device", "test_rows", "answer_tokens", "expects_json", "max_new_tokens",
                        "general": {"measured", the sample's path, sha256, rows, kinds, target_tokens, ...},
                        "models": {"base": {...}, "candidate": {...}[, "production": {...}]}}
                       flat numeric metrics per model (non-finite values are written as null)
    report.md          metrics table (models side by side + candidate-vs-base delta), the forgetting check's
                       sample and general_loss, example generations
    generations.jsonl  one row per test row: id, prompt (last user turn), reference,
                       predictions {model: text}, exact_match {model: bool}
    judgements.jsonl   only with evaluate.judge: each judged row's two verdicts and replies; metrics.json
                       then has a `judge` block and the candidate's judge_win_rate (evaluate/judge.py)
    long_context.json  only for a candidate whose config extends the base's context (train.long_context):
                       perplexity by length and passkey retrieval for base, base with the rope scaling
                       alone, candidate, and the candidate's full-attention reference when it was trained
                       (train.long_context.reference) (evaluate/long_context.py)

`run` also writes the headline metrics per model (reports/<tenant>/metrics/evaluate.json, a DVC
metric) and the run's timing (reports/timing/evaluate@<tenant>.json).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraline import io
from loraline.config import BaseParams, JudgeParams, Params
from loraline.evaluate import long_context, lowbit
from loraline.evaluate.batching import rows_for, scored_in_batches
from loraline.evaluate.generate import AnswerLoss, answer_loss, encode_prompt, generate_greedy, loaded_model
from loraline.evaluate.judge import EVEN, JUDGEMENTS, Judged, Opponent, judge_pairs, pairings
from loraline.evaluate.judge import METRIC as JUDGE_METRIC
from loraline.evaluate.judge import render as render_judged
from loraline.evaluate.metrics import aggregate, exact_match, expects_json, per_field_accuracy
from loraline.evaluate.preference import METRICS as PREFERENCE_METRICS
from loraline.evaluate.preference import PairLogps, PairSet, load_pairs, pair_logps, preference_scores
from loraline.evaluate.preference import render as render_preference
from loraline.evaluate.report import render_report
from loraline.layout import ADAPTER_CONFIG, BASE_RECORD, GENERAL_ROWS, GENERAL_SAMPLE, QLORA_REFERENCE, Layout
from loraline.modelling.conversation import split_conversation
from loraline.modelling.device import compute_dtype, device_facts, resolve_device
from loraline.modelling.endpoint import EndpointError
from loraline.modelling.loading import (
    base_load_kwargs,
    load_base_tokenizer,
    resolve_base_model_path,
    tokenizer_mismatch,
)
from loraline.modelling.long_context import FULL_ATTENTION_REFERENCE, extended_context
from loraline.provenance import hash_tree, phase, run_timing, sha256_file

METRICS = "metrics.json"
REPORT = "report.md"
GENERATIONS = "generations.jsonl"
LONG_CONTEXT = "long_context.json"  # LongLoRA candidates only (evaluate.long_context)
SEED = 0
# The metrics people compare across runs (reports/<tenant>/metrics/evaluate.json), in reading order;
# the rest stays in metrics.json. loraline.summary shows the same ones.
HEADLINE_METRICS = (
    "answer_loss",
    "exact_match",
    "token_f1",
    "rouge_l",
    "json_valid",
    "json_field_accuracy",
    "long_context_perplexity",
    "general_loss",
    JUDGE_METRIC,
    "preference_accuracy",  # a test split with preference pairs (evaluate/preference.py)
    "reward_margin",
)
GENERAL_METRIC = "general_loss"


class EvaluateError(ValueError):
    """The inputs cannot be evaluated (no test rows, a missing model folder, ...)."""


@dataclass(frozen=True)
class EvaluateResult:
    out_dir: Path
    metrics: dict[str, Any]  # the content of metrics.json
    judge_usage: dict[str, int] = field(
        default_factory=dict
    )  # evaluate.judge's requests and cache hits (not an output)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS

    @property
    def report_path(self) -> Path:
        return self.out_dir / REPORT

    @property
    def generations_path(self) -> Path:
        return self.out_dir / GENERATIONS

    def model_metrics(self, name: str) -> dict[str, float] | None:
        return self.metrics["models"].get(name)


@dataclass(frozen=True)
class _Scored:
    """One model's evaluation: its flat metrics, greedy predictions, the answer tokens scored, and how
    many test rows went through it at once (evaluate.batch_size, resolved)."""

    scores: dict[str, float | None]
    predictions: list[str]
    answer_tokens: int
    batch_rows: int
    pairs: PairLogps | None = None  # the test split's preference pairs, when it has some


@dataclass(frozen=True)
class _TestSet:
    ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]
    prompts: list[list[int]]
    questions: list[str]
    references: list[str]
    pairs: PairSet | None = None  # its preference pairs (evaluate/preference.py), None without any


@dataclass(frozen=True)
class _GeneralSet:
    """The general-text sample (data/general/<tenant>): token rows, and sample.json's facts about where they came
    from."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    facts: dict[str, Any]


@dataclass
class _Evaluation:
    """One evaluate_tenant run as its extra evaluations see it: the models, what they are scored on and how,
    and (once scored) each model's scores and predictions, which the extras add to."""

    models: dict[str, tuple[str, dict[str, Any]]]
    tok: Any
    test: _TestSet
    refs_json: bool
    max_new_tokens: int
    batch_size: int | str
    device: Any
    progress: bool
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    predictions: dict[str, list[str]] = field(default_factory=dict)
    pair_logps: dict[str, PairLogps] = field(default_factory=dict)


class _Extra:
    """An extra evaluation beside the models' metrics, which a candidate's variant (QA-LoRA's comparison with its
    QLoRA reference, LongLoRA's long-context report) or evaluate.judge asks for. The core calls every hook of each one
    it picked (`_extras`), in order."""

    def check(self) -> None:
        """Before any model is scored: a mismatch is an error, not a late surprise."""

    def measure(self, ev: _Evaluation) -> None:
        """After the models are scored; may add to their scores and predictions."""

    def metrics(self) -> dict[str, Any]:
        """metrics.json's fields of its own."""
        return {}

    def report(self) -> str:
        """report.md's section of its own (after the models' tables)."""
        return ""

    def write(self, folder: Path) -> None:
        """Files of its own into the evaluation folder."""


def run(
    params: Params, layout: Layout, tenant: str, *, base_dir: Path | None = None, progress: bool = False
) -> EvaluateResult:
    """The evaluate stage for one tenant: base and candidate on its test split into
    reports/<tenant>/evaluation, its full results (metrics.json) also at reports/<tenant>/eval_metrics.json
    (Layout.evaluation_results_path), the headline metrics (DVC's) at reports/<tenant>/metrics/evaluate.json,
    the run's timing at reports/timing/evaluate@<tenant>.json."""
    started = time.perf_counter()
    ev = params.evaluate
    full_attention_reference = layout.adapter_dir(tenant) / FULL_ATTENTION_REFERENCE  # train.long_context.reference
    qlora_reference = layout.adapter_dir(tenant) / QLORA_REFERENCE  # train.qalora.reference
    # deploy.targets decides what the candidate is: the merged folder, or (no merged) the adapter on the base
    candidate = layout.merged_dir(tenant) if params.deploy_for(tenant).builds("merged") else layout.adapter_dir(tenant)
    result = evaluate_tenant(
        tenant=tenant,
        dataset_dir=layout.prepared_dataset_dir(tenant),
        base_dir=base_dir or layout.base_dir,
        base_params=params.base,
        candidate_dir=candidate,
        production_dir=None,
        out_dir=layout.evaluation_dir(tenant),
        max_new_tokens=ev.max_new_tokens,
        max_examples=ev.max_examples,
        examples_in_report=ev.examples_in_report,
        batch_size=ev.batch_size,
        progress=progress,
        full_attention_reference=full_attention_reference if full_attention_reference.is_dir() else None,
        qlora_reference=qlora_reference if qlora_reference.is_dir() else None,
        device=ev.device,
        general_dir=layout.general_sample_dir(tenant),
        judge=ev.judge,
        judge_cache_dir=layout.judge_cache_dir(tenant),
    )
    io.copy_file(result.metrics_path, layout.evaluation_results_path(tenant))
    io.write_json(layout.metrics_path("evaluate", tenant), evaluate_metrics(result.metrics))
    where = {k: result.metrics[k] for k in ("device", "device_name") if k in result.metrics}
    judged = (
        {"judge": result.judge_usage} if result.judge_usage else {}
    )  # requests sent and cache hits vary run to run
    io.write_timing(layout.timing_path("evaluate", tenant), run_timing(started, **where, **judged))
    return result


def evaluate_tenant(
    *,
    tenant: str,
    dataset_dir: Path,
    base_dir: Path,
    base_params: BaseParams,
    candidate_dir: Path,
    production_dir: Path | None,
    out_dir: Path,
    max_new_tokens: int = 64,
    max_examples: int | None = None,
    examples_in_report: int = 3,
    batch_size: int | str = "auto",
    progress: bool = False,
    full_attention_reference: Path | None = None,
    qlora_reference: Path | None = None,
    device: str = "auto",
    general_dir: Path | None = None,
    judge: JudgeParams | None = None,
    judge_cache_dir: Path | None = None,
) -> EvaluateResult:
    """Evaluate base, candidate and (when `production_dir` exists) production on the test split.
    `full_attention_reference`: a LongLoRA candidate's full-attention reference (an adapter folder, see
    train.long_context.reference), set beside it in the long-context report.
    `qlora_reference`: a QA-LoRA candidate's QLoRA reference (an adapter folder, see train.qalora.reference):
    the candidate against it merged in float and rounded after training (evaluate/lowbit.py).
    `device`: auto, cpu or cuda (evaluate.device).
    `general_dir`: the prepare stage's general-text sample (data/general/<tenant>), scored as general_loss for
    every model; None: not measured, which metrics.json and the report say (and the gate's max_forgetting fails).
    `judge`: evaluate.judge, the candidate judged against production when there is one, else the base;
    its requests cached in `judge_cache_dir` (evaluate/judge.py)."""
    dataset_dir, base_dir, candidate_dir, out_dir = map(Path, (dataset_dir, base_dir, candidate_dir, out_dir))
    _check_settings(max_new_tokens, max_examples, batch_size)
    where = resolve_device(device, "evaluate.device")
    candidate = _model_spec(candidate_dir, base_dir, "run the merge stage first")
    extras = _extras(candidate_dir, dataset_dir, base_dir, production_dir, full_attention_reference, qlora_reference)
    extras += [_Judge(judge, judge_cache_dir, base_dir, production_dir)] if judge is not None else []
    for extra in extras:
        extra.check()
    with phase("tokenizer and test split"):
        tok = load_base_tokenizer(base_dir, base_params)
        test = _load_test(dataset_dir, tok, max_examples)
        general = load_general(Path(general_dir)) if general_dir is not None else None
    models = {"base": (resolve_base_model_path(base_dir), base_load_kwargs(base_dir)), "candidate": candidate}
    if production_dir is not None and _is_model(Path(production_dir)):
        models["production"] = _model_spec(Path(production_dir), base_dir, "")
    refs_json = expects_json(test.references)
    ev = _Evaluation(models, tok, test, refs_json, max_new_tokens, batch_size, where, progress)
    batch_rows, answer_tokens = _score_all(ev, general, tenant)
    for extra in extras:
        with phase(type(extra).__name__.strip("_").lower()):
            extra.measure(ev)
    result = _metrics(tenant, ev, general, batch_rows, answer_tokens, extras)
    rows = _generation_rows(test, ev.predictions)
    report = _report(tenant, ev, result, rows, examples_in_report) + "".join(extra.report() for extra in extras)
    _write(out_dir, extras, rows, report, result)
    usage = next((extra.usage for extra in extras if isinstance(extra, _Judge)), {})
    return EvaluateResult(out_dir, result, usage)


def _metrics(
    tenant: str,
    ev: _Evaluation,
    general: _GeneralSet | None,
    batch_rows: dict[str, int],
    answer_tokens: int,
    extras: list[_Extra],
) -> dict[str, Any]:
    """metrics.json (less field_accuracy, which the report adds)."""
    result = {
        "tenant": tenant,
        **device_facts(ev.device),
        "test_rows": len(ev.test.ids),
        "answer_tokens": answer_tokens,
        "expects_json": ev.refs_json,
        "max_new_tokens": ev.max_new_tokens,
        "batch_rows": batch_rows,
        "general": general_facts(general),
        "models": ev.scores,
    }
    for extra in extras:
        result |= extra.metrics()
    return result


def _extras(
    candidate_dir: Path,
    dataset_dir: Path,
    base_dir: Path,
    production_dir: Path | None,
    full_attention_reference: Path | None,
    qlora_reference: Path | None,
) -> list[_Extra]:
    """The extra evaluations the candidate's variant asks for: QA-LoRA's comparison with its QLoRA reference when
    that was trained; the long-context report (which measures only a candidate that extends the context)."""
    extras: list[_Extra] = []
    if qlora_reference is not None:
        extras.append(_LowBit(candidate_dir, Path(qlora_reference)))
    extras.append(_LongContext(dataset_dir, full_attention_reference))
    extras.append(_Preference())
    return extras


def _write(
    out_dir: Path, extras: list[_Extra], rows: list[dict[str, Any]], report: str, result: dict[str, Any]
) -> None:
    with io.atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        for extra in extras:
            extra.write(tmp)
        io.write_jsonl(tmp / GENERATIONS, rows)
        io.atomic_write_text(tmp / REPORT, report)
        io.write_json(tmp / METRICS, result)


def _check_settings(max_new_tokens: int, max_examples: int | None, batch_size: int | str) -> None:
    if max_new_tokens < 1:
        raise EvaluateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_examples is not None and max_examples < 1:
        raise EvaluateError(f"max_examples must be >= 1 or None, got {max_examples}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise EvaluateError(f"batch_size must be >= 1 or auto, got {batch_size!r}")


def _score_all(ev: _Evaluation, general: _GeneralSet | None, tenant: str) -> tuple[dict[str, int], int]:
    """Every model scored into ev.scores and ev.predictions; (rows per batch of each, answer tokens scored)."""
    batch_rows: dict[str, int] = {}
    answer_tokens = 0
    settings = (ev.refs_json, ev.max_new_tokens, ev.batch_size, ev.device, ev.progress)
    for name, (scored, seconds) in _score_models(ev.models, ev.tok, ev.test, general, *settings).items():
        ev.scores[name], ev.predictions[name], answer_tokens = scored.scores, scored.predictions, scored.answer_tokens
        if scored.pairs is not None:
            ev.pair_logps[name] = scored.pairs
        batch_rows[name] = scored.batch_rows
        if ev.progress:
            print(f"evaluate {tenant}/{name}: {seconds:.1f}s {ev.scores[name]}", file=sys.stderr)
    return batch_rows, answer_tokens


def _report(tenant: str, ev: _Evaluation, result: dict[str, Any], rows: list[dict[str, Any]], examples: int) -> str:
    """report.md's models part; with JSON references, their per-field accuracy joins `result` (beside the
    models' metrics, not in them: the gate compares every model metric with production, and single fields over
    ~100 rows are too noisy for that)."""
    fields: dict[str, dict[str, float]] = {}
    if ev.refs_json:
        fields = {name: per_field_accuracy(preds, ev.test.references) for name, preds in ev.predictions.items()}
        result["field_accuracy"] = fields
    return render_report(
        tenant=tenant,
        test_rows=len(ev.test.ids),
        expects_json=ev.refs_json,
        max_new_tokens=ev.max_new_tokens,
        models=ev.scores,
        examples=rows[: max(examples, 0)],
        fields=fields,
        general=result["general"],
    )


class _LowBit(_Extra):
    """A QA-LoRA candidate against its QLoRA reference (train.qalora.reference), merged in float and rounded after
    training (evaluate/lowbit.py): metrics.json's qalora_comparison and a report section."""

    def __init__(self, candidate_dir: Path, reference: Path) -> None:
        self.candidate_dir, self.reference = candidate_dir, reference
        self.comparison: dict[str, Any] | None = None

    def check(self) -> None:
        try:
            self.quantization = lowbit.candidate_quantization(self.candidate_dir)
        except lowbit.LowBitComparisonError as e:
            raise EvaluateError(str(e)) from e

    def measure(self, ev: _Evaluation) -> None:
        self.comparison = _low_bit_comparison(ev, self.reference, self.quantization)

    def metrics(self) -> dict[str, Any]:
        return {"qalora_comparison": self.comparison}

    def report(self) -> str:
        return "\n".join(lowbit.render(self.comparison)) + "\n"


class _LongContext(_Extra):
    """For a candidate whose config extends the base's context (LongLoRA): long_context.json, and the gate's
    long-context metric in the models' scores (none for other candidates)."""

    def __init__(self, dataset_dir: Path, full_attention_reference: Path | None) -> None:
        self.dataset_dir, self.full_attention_reference = dataset_dir, full_attention_reference
        self.report_: dict[str, Any] | None = None

    def measure(self, ev: _Evaluation) -> None:
        self.report_ = _long_context_report(ev, self.dataset_dir, self.full_attention_reference)
        if self.report_ is None:
            return
        # The gate may decide on it (gate.primary_metric: long_context_perplexity). The base it is
        # compared with is the base with the rope scaling alone: what extending costs nothing to get.
        at = str(self.report_["extended_context"])
        stand_in = {"base": "base_rope_scaled", "candidate": "candidate", "production": "production"}
        for name in ev.scores:
            run_ = self.report_["models"].get(stand_in[name])
            if run_ is not None:
                ev.scores[name] |= _finite({long_context.GATE_METRIC: run_["perplexity"][at]["perplexity"]})

    def write(self, folder: Path) -> None:
        if self.report_ is not None:
            io.write_json(folder / LONG_CONTEXT, self.report_)


class _Preference(_Extra):
    """For a test split with preference pairs: each model's preference accuracy and its reward (the change of the
    pairs' log-probabilities from the base) in its scores, so the gate may decide on them
    (gate.primary_metric: preference_accuracy), and a report section (nothing without pairs)."""

    def __init__(self) -> None:
        self.pairs = 0
        self.scores_: dict[str, dict[str, Any]] = {}

    def measure(self, ev: _Evaluation) -> None:
        if ev.test.pairs is None:
            return
        self.pairs = len(ev.test.pairs)
        base = ev.pair_logps["base"]
        for name, own in ev.pair_logps.items():
            ev.scores[name] |= _finite(preference_scores(own, base))
            self.scores_[name] = ev.scores[name]

    def metrics(self) -> dict[str, Any]:
        return {"preference": {"pairs": self.pairs, "metrics": list(PREFERENCE_METRICS)}} if self.pairs else {}

    def report(self) -> str:
        return render_preference(self.pairs, self.scores_) if self.pairs else ""


class _Judge(_Extra):
    """evaluate.judge: the candidate's answers judged against production's, else the base's (evaluate/judge.py);
    its win rate in the candidate's scores, the verdicts in judgements.jsonl."""

    def __init__(self, judge: JudgeParams, cache_dir: Path | None, base_dir: Path, production_dir: Path | None):
        self.judge, self.cache_dir, self.base_dir, self.production_dir = judge, cache_dir, base_dir, production_dir
        self.judged: Judged | None = None
        self.usage: dict[str, int] = {}

    def measure(self, ev: _Evaluation) -> None:
        self.judged = _judged(self.judge, self.cache_dir, ev.test, ev.predictions, self.base_dir, self.production_dir)
        self.usage = self.judged.usage
        against = self.judged.block["against"]
        ev.scores["candidate"][JUDGE_METRIC], ev.scores[against][JUDGE_METRIC] = self.judged.win_rate, EVEN

    def metrics(self) -> dict[str, Any]:
        return {"judge": self.judged.block}

    def report(self) -> str:
        return "\n".join(render_judged(self.judged.block)) + "\n"

    def write(self, folder: Path) -> None:
        io.write_jsonl(folder / JUDGEMENTS, self.judged.rows)


def _judged(
    judge: JudgeParams,
    cache_dir: Path | None,
    test: _TestSet,
    predictions: dict[str, list[str]],
    base_dir: Path,
    production_dir: Path | None,
) -> Judged:
    """The candidate's answers judged against production's when production was evaluated, else the base's."""
    if "production" in predictions:
        against = Opponent("production", {"sha256": hash_tree(Path(production_dir))})
    else:
        against = Opponent("base", {"base_record_sha256": sha256_file(base_dir / BASE_RECORD)})
    pairs = pairings(_generation_rows(test, predictions), against.role, judge.max_rows)
    try:
        return judge_pairs(judge, pairs, against, cache_dir)
    except EndpointError as e:
        raise EvaluateError(f"evaluate.judge: {e}") from None


def _long_context_report(
    ev: _Evaluation, dataset_dir: Path, full_attention_reference: Path | None = None
) -> dict[str, Any] | None:
    """For a candidate whose config extends the base's context (LongLoRA): perplexity by length and
    passkey retrieval for the base, the base with the candidate's rope scaling alone, the candidate,
    its full-attention reference when there is one, and production when it has the same context."""
    candidate_config = _config_json(ev.models["candidate"][0])
    span = extended_context(candidate_config)
    if span is None:
        return None
    lengths = long_context.lengths_between(*span)
    held_out, stream = _held_out_stream(dataset_dir, ev.test, ev.tok)
    report: dict[str, Any] = {
        "original_context": span[0],
        "extended_context": span[1],
        "lengths": lengths,
        "held_out": held_out,
        "held_out_tokens": len(stream),
        "rope_parameters": candidate_config["rope_parameters"],
        "models": {},
    }
    for name, (path, kwargs) in _long_context_runs(
        ev.models, candidate_config, span, full_attention_reference
    ).items():
        torch.manual_seed(SEED)
        with loaded_model(path, ev.device, **kwargs) as model:
            report["models"][name] = {
                "perplexity": long_context.perplexity_by_length(model, stream, lengths),
                "passkey": long_context.passkey_retrieval(model, ev.tok, lengths),
            }
    if "full_attention_reference" in report["models"]:  # the paper's claim: S2-Attn close to full attention
        at = str(span[1])
        s2, full = (
            report["models"][n]["perplexity"][at]["perplexity"] for n in ("candidate", "full_attention_reference")
        )
        report["s2_attn_against_full_attention"] = {"at": span[1], "perplexity_ratio": s2 / full if full else None}
    return report


def _config_json(folder: str) -> dict[str, Any]:
    import json

    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def _long_context_runs(
    models: dict[str, tuple[str, dict[str, Any]]],
    candidate_config: dict[str, Any],
    span: tuple[int, int],
    full_attention_reference: Path | None,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """The models the long-context report measures: (path, loading kwargs) by name."""
    from transformers import AutoConfig

    base_path, base_kwargs = models["base"]
    scaled = AutoConfig.from_pretrained(base_path, **base_kwargs)
    for key in ("rope_parameters", "max_position_embeddings"):
        setattr(scaled, key, candidate_config[key])
    runs = {
        "base": (base_path, base_kwargs),
        "base_rope_scaled": (base_path, {**base_kwargs, "config": scaled}),
        "candidate": models["candidate"],
    }
    if full_attention_reference is not None:  # the reference's adapter on the same rope-scaled base, unmerged
        runs["full_attention_reference"] = (
            base_path,
            {**base_kwargs, "config": scaled, "adapter": Path(full_attention_reference)},
        )
    production = models.get("production")
    if production is not None and extended_context(_config_json(production[0])) == span:
        runs["production"] = production  # a production model of the same context compares
    return runs


def _held_out_stream(dataset_dir: Path, test: _TestSet, tok: Any) -> tuple[str, list[int]]:
    """(what it is, the tokens) the long-context perplexity runs over: the held-out documents
    (prepare.document_rows), end to end, or else the test rows."""
    import datasets

    dd = datasets.load_from_disk(str(dataset_dir))
    if "test_documents" in dd and len(dd["test_documents"]):
        return "test_documents", long_context.held_out_stream(dd["test_documents"]["input_ids"], None)
    return "test rows", long_context.held_out_stream(test.input_ids, tok.eos_token_id)


def _low_bit_comparison(ev: _Evaluation, reference: Path, quantization: tuple[int, int]) -> dict[str, Any]:
    """QA-LoRA's candidate against its QLoRA reference, merged in float and rounded after training;
    the reference's predictions join generations.jsonl under the comparison's names."""
    if not (reference / "adapter_config.json").is_file():
        raise EvaluateError(
            f"{reference} is not a trained adapter (no adapter_config.json): run the train stage "
            "(train.qalora.reference)"
        )
    bits, group_size = quantization
    base_path, base_kwargs = ev.models["base"]
    device, rows = ev.device, len(ev.test.ids)
    scores = {lowbit.QALORA: ev.scores["candidate"]}  # the same dict: what later extras add to it shows here too
    args = (ev.tok, ev.test, None, ev.refs_json, ev.max_new_tokens, ev.batch_size)
    reference_kwargs = {**base_kwargs, "adapter": reference}
    float_merge = _score(base_path, reference_kwargs, *args, device, _progress(lowbit.FLOAT_MERGE, rows, ev.progress))
    scores[lowbit.FLOAT_MERGE], ev.predictions[lowbit.FLOAT_MERGE] = float_merge.scores, float_merge.predictions
    rounding = lowbit.rounded_after_training(
        base_path, base_kwargs, reference, bits, group_size, device, compute_dtype(device)
    )
    with rounding as (model, float_bytes, lowbit_bytes):
        rounded = _score_loaded(model, *args, _progress(lowbit.ROUNDED_AFTER, rows, ev.progress))
        scores[lowbit.ROUNDED_AFTER], ev.predictions[lowbit.ROUNDED_AFTER] = rounded.scores, rounded.predictions
    return lowbit.comparison(
        bits=bits,
        group_size=group_size,
        scores=scores,
        float_bytes=float_bytes,
        lowbit_bytes=lowbit_bytes,
        reference=reference,
    )


def evaluate_model(
    *,
    model_dir: Path,
    dataset_dir: Path,
    base_dir: Path,
    base_params: BaseParams,
    max_new_tokens: int = 64,
    max_examples: int | None = None,
    batch_size: int | str = "auto",
    device: str = "auto",
    general_dir: Path | None = None,
) -> dict[str, float | None]:
    """One model's metrics, computed as evaluate_tenant computes each of its models (so the numbers compare:
    on the same `device` setting and general-text sample too).

    The registry uses it to measure the current production model at promotion time, when production
    may have changed since the evaluate stage ran."""
    return evaluate_model_answers(
        model_dir=model_dir,
        dataset_dir=dataset_dir,
        base_dir=base_dir,
        base_params=base_params,
        max_new_tokens=max_new_tokens,
        max_examples=max_examples,
        batch_size=batch_size,
        device=device,
        general_dir=general_dir,
    ).scores


@dataclass(frozen=True)
class ModelAnswers:
    """One model's metrics and its greedy answer to each test row, in test order (`ids`)."""

    scores: dict[str, float | None]
    ids: list[str]
    predictions: list[str]


def evaluate_model_answers(
    *,
    model_dir: Path,
    dataset_dir: Path,
    base_dir: Path,
    base_params: BaseParams,
    max_new_tokens: int = 64,
    max_examples: int | None = None,
    batch_size: int | str = "auto",
    device: str = "auto",
    general_dir: Path | None = None,
) -> ModelAnswers:
    """evaluate_model with the answers it scored, which the release judges the candidate's against (evaluate.judge)."""
    path, kwargs = _model_spec(Path(model_dir), Path(base_dir), "")
    where = resolve_device(device, "evaluate.device")
    tok = load_base_tokenizer(Path(base_dir), base_params)
    test = _load_test(Path(dataset_dir), tok, max_examples)
    general = load_general(Path(general_dir)) if general_dir is not None else None
    scored = _score(
        path, kwargs, tok, test, general, expects_json(test.references), max_new_tokens, batch_size, where, None
    )
    return ModelAnswers(scored.scores, test.ids, scored.predictions)


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / ADAPTER_CONFIG).is_file()


def _model_spec(folder: Path, base_dir: Path, hint: str) -> tuple[str, dict[str, Any]]:
    """(path, loading kwargs) of a model folder: a merged model as it is, an adapter folder (deploy.targets
    without merged) on the base, unmerged through peft."""
    if (folder / ADAPTER_CONFIG).is_file():
        return resolve_base_model_path(base_dir), {**base_load_kwargs(base_dir), "adapter": folder}
    if (folder / "config.json").is_file():
        return str(folder), {}
    raise EvaluateError(
        f"{folder} is not a model folder (no config.json), nor an adapter (no {ADAPTER_CONFIG})"
        + (f": {hint}" if hint else "")
    )


def _score_models(
    models: dict[str, tuple[str, dict[str, Any]]],
    tok: Any,
    test: _TestSet,
    general: _GeneralSet | None,
    refs_json: bool,
    max_new_tokens: int,
    batch_size: int | str,
    device: Any,
    progress: bool,
) -> dict[str, tuple[_Scored, float]]:
    """Each model's (metrics, predictions, answer tokens) and seconds, in `models`' order. The base and
    the adapters on it (deploy.targets without merged) share one load of the base: at 8B a load costs
    more than the scoring. peft runs the base layers alone while its adapters are disabled, so the base
    scores as it does loaded on its own."""
    base_path, base_kwargs = models["base"]
    on_base = [
        name
        for name, (path, kwargs) in models.items()
        if name != "base"
        and "adapter" in kwargs
        and path == base_path
        and {k: v for k, v in kwargs.items() if k != "adapter"} == base_kwargs
    ]
    args = (tok, test, general, refs_json, max_new_tokens, batch_size)
    out: dict[str, tuple[_Scored, float]] = {}
    if on_base:
        from peft import PeftModel

        with contextlib.ExitStack() as loaded:
            with phase("load base and adapters"):
                model = loaded.enter_context(loaded_model(base_path, device, **base_kwargs))
                first = str(models[on_base[0]][1]["adapter"])
                shared = PeftModel.from_pretrained(model, first, adapter_name=on_base[0])
                for name in on_base[1:]:
                    shared.load_adapter(str(models[name][1]["adapter"]), adapter_name=name)
            shared.eval()
            for name in ["base", *on_base]:
                started = time.perf_counter()
                with shared.disable_adapter() if name == "base" else contextlib.nullcontext():
                    if name != "base":
                        shared.set_adapter(name)
                    out[name] = (
                        _score_loaded(shared, *args, _progress(name, len(test.ids), progress)),
                        time.perf_counter() - started,
                    )
    for name, (path, kwargs) in models.items():
        if name not in out:
            started = time.perf_counter()
            out[name] = (
                _score(path, kwargs, *args, device, _progress(name, len(test.ids), progress)),
                time.perf_counter() - started,
            )
    return {name: out[name] for name in models}


def _score(
    path: str,
    kwargs: dict[str, Any],
    tok: Any,
    test: _TestSet,
    general: _GeneralSet | None,
    refs_json: bool,
    max_new_tokens: int,
    batch_size: int | str,
    device: Any,
    on_batch: Any,
) -> _Scored:
    """The model at `path` scored on `test` (and `general`)."""
    torch.manual_seed(SEED)
    with loaded_model(path, device, **kwargs) as model:
        return _score_loaded(model, tok, test, general, refs_json, max_new_tokens, batch_size, on_batch)


def _score_loaded(
    model: Any,
    tok: Any,
    test: _TestSet,
    general: _GeneralSet | None,
    refs_json: bool,
    max_new_tokens: int,
    batch_size: int | str,
    on_batch: Any,
) -> _Scored:
    longest = max(max(map(len, test.input_ids)), max(map(len, test.prompts)) + max_new_tokens)
    rows = rows_for(batch_size, model, longest, len(test.ids))

    def score(rows: int) -> tuple[Any, list[str], PairLogps | None]:
        torch.manual_seed(SEED)
        loss = answer_loss(model, test.input_ids, test.labels, tok.pad_token_id, rows)
        pairs = pair_logps(model, test.pairs, tok.pad_token_id, rows) if test.pairs is not None else None
        return loss, generate_greedy(model, tok, test.prompts, max_new_tokens, rows, on_batch=on_batch), pairs

    (loss, predictions, pairs), rows = scored_in_batches(batch_size, rows, score, "evaluate")
    scores = {"answer_loss": loss.loss, "answer_perplexity": loss.perplexity} | aggregate(
        predictions, test.references, refs_json
    )
    if general is not None:
        scores[GENERAL_METRIC] = general_loss(model, tok, general, batch_size).loss
    return _Scored(_finite(scores), predictions, loss.tokens, rows, pairs)


def general_loss(model: Any, tok: Any, general: _GeneralSet, batch_size: int | str) -> AnswerLoss:
    """Mean cross-entropy per target token of the loaded `model` on the general-text sample, batched as the
    test split is (evaluate.batch_size; rows sized to the sample's own longest row on CUDA)."""
    rows = rows_for(batch_size, model, max(map(len, general.input_ids)), len(general.input_ids))

    def score(rows: int) -> AnswerLoss:
        return answer_loss(model, general.input_ids, general.labels, tok.pad_token_id, rows)

    loss, _ = scored_in_batches(batch_size, rows, score, "evaluate (general text)")
    return loss


def load_general(general_dir: Path) -> _GeneralSet:
    """The prepare stage's general-text sample (rows.jsonl, sample.json in `general_dir`)."""
    rows_path, facts_path = general_dir / GENERAL_ROWS, general_dir / GENERAL_SAMPLE
    if not (rows_path.is_file() and facts_path.is_file()):
        raise EvaluateError(
            f"{general_dir} holds no general-text sample ({GENERAL_ROWS}, {GENERAL_SAMPLE}): run the "
            "prepare stage for this tenant, which writes it from evaluate.general"
        )
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise EvaluateError(f"{rows_path} holds no rows: run the prepare stage again")
    return _GeneralSet(
        [r["input_ids"] for r in rows], [r["labels"] for r in rows], json.loads(facts_path.read_text(encoding="utf-8"))
    )


def general_facts(general: _GeneralSet | None) -> dict[str, Any]:
    """metrics.json's `general`: where the sample came from and how big it is, or that it was not measured."""
    if general is None:
        return {
            "measured": False,
            "reason": "no general-text sample was given (general_dir): general_loss not measured",
        }
    return {"measured": True, **general.facts}


def _load_test(dataset_dir: Path, tok: Any, max_examples: int | None) -> _TestSet:
    import datasets

    if not dataset_dir.is_dir():
        raise EvaluateError(f"dataset {dataset_dir} does not exist: run the prepare stage for this tenant first")
    mismatch = tokenizer_mismatch(dataset_dir, tok)
    if mismatch:
        raise EvaluateError(mismatch)
    dd = datasets.load_from_disk(str(dataset_dir))
    if "test" not in dd or len(dd["test"]) == 0:
        raise EvaluateError(f"dataset {dataset_dir} has no test rows: raise prepare.split.test or add data")
    ds = dd["test"]
    pairs = load_pairs(ds)  # every pair: scoring one costs two forward passes, not a generation
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    cols = ds.select_columns(["id", "messages", "input_ids", "labels"]).to_dict()
    contexts, refs = zip(*(split_conversation(m) for m in cols["messages"]), strict=True)
    # A preference row's messages end with its chosen answer: the reference its generations are compared with.
    return _TestSet(
        ids=list(cols["id"]),
        input_ids=cols["input_ids"],
        labels=cols["labels"],
        prompts=[encode_prompt(tok, c) for c in contexts],
        questions=[next((m["content"] for m in reversed(c) if m["role"] == "user"), "") for c in contexts],
        references=list(refs),
        pairs=pairs,
    )


def _generation_rows(test: _TestSet, predictions: dict[str, list[str]]) -> list[dict[str, Any]]:
    return [
        {
            "id": rid,
            "prompt": question,
            "reference": ref,
            "predictions": {name: preds[i] for name, preds in predictions.items()},
            "exact_match": {name: exact_match(preds[i], ref) for name, preds in predictions.items()},
        }
        for i, (rid, question, ref) in enumerate(zip(test.ids, test.questions, test.references, strict=True))
    ]


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    """NaN / inf are not JSON: written as null (the gate treats a missing number as a failure)."""
    return {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in values.items()}


def _progress(name: str, total: int, enabled: bool):
    if not enabled:
        return None
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        print(f"  {name}: generated {done[0]}/{total}", file=sys.stderr)

    return step


def evaluate_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The headline metrics of each evaluated model (`dvc metrics diff`: base vs candidate across runs);
    a metric the task does not have (json_* for plain-text answers) or a null one is left out."""

    def headline(scores: dict[str, Any], *extra: str) -> dict[str, float]:
        return {k: scores[k] for k in (*HEADLINE_METRICS, *extra) if scores.get(k) is not None}

    out: dict[str, Any] = {model: headline(scores) for model, scores in metrics["models"].items()}
    if "qalora_comparison" in metrics:  # train.qalora.reference: QA-LoRA against its QLoRA reference, across runs too
        out["qalora_comparison"] = {
            name: headline(scores, "weight_bytes") for name, scores in metrics["qalora_comparison"]["models"].items()
        }
    return out

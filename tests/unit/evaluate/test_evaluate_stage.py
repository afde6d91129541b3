"""The evaluate stage on a tiny built base, a tiny nf4 adapter and its merge (seconds on 2 CPU cores)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import make_raw, tiny_build, tiny_train  # noqa: E402

from loraline.config import BaseParams, PrepareParams, TenantParams  # noqa: E402
from loraline.evaluate.stage import (  # noqa: E402
    GENERATIONS,
    METRICS,
    REPORT,
    EvaluateError,
    evaluate_metrics,
    evaluate_model,
    evaluate_tenant,
)
from loraline.modelling.conversation import split_conversation  # noqa: E402

TASK_METRICS = ("exact_match", "token_f1", "rouge_l", "json_valid", "json_field_accuracy")


@dataclass(frozen=True)
class Setup:
    base_params: BaseParams
    base_dir: Path
    dataset_dir: Path
    candidate_dir: Path
    root: Path

    def kwargs(self, **overrides) -> dict:
        kw = dict(
            tenant="toy",
            dataset_dir=self.dataset_dir,
            base_dir=self.base_dir,
            base_params=self.base_params,
            candidate_dir=self.candidate_dir,
            production_dir=None,
            max_new_tokens=16,
            device="cpu",
        )
        return kw | overrides


# CPU results depend on the thread count: one thread keeps them repeatable (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    import loraline.train.stage as stage
    from loraline.base.stage import build_base
    from loraline.merge import merge_adapter
    from loraline.modelling.loading import load_base_tokenizer
    from loraline.prepare.stage import prepare_tenant

    root = tmp_path_factory.mktemp("evaluate")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = make_raw(root / "raw" / "toy", n=60)
        base_params = BaseParams(build=tiny_build())
        base = build_base(base_params, seed=5, raw_dirs=[raw], out_dir=root / "base")
        tok = load_base_tokenizer(base.out_dir, base_params)
        prepared = prepare_tenant(
            TenantParams(name="toy", raw_dir=raw),
            PrepareParams(),
            tok,
            out_dir=root / "prepared",
            rejected_path=root / "rejected.jsonl",
            stats_path=root / "stats.json",
        )
        params = tiny_train(
            quantization="nf4", max_steps=12, grad_accum=1, eval_every=12, save_every=12, learning_rate=1e-2
        )
        with mock.patch.object(stage, "pick_device", return_value=torch.device("cpu")):
            stage.train_adapter(
                params,
                base_dir=base.out_dir,
                base_params=base_params,
                dataset_dir=prepared.dataset_dir,
                out_dir=root / "adapter",
                checkpoint_dir=root / "ckpt",
            )
        merge_adapter(
            base_dir=base.out_dir,
            base_params=base_params,
            adapter_dir=root / "adapter",
            out_dir=root / "merged",
            tolerance=1e-3,
            probes=[[{"role": "user", "content": "ping"}]],
            max_new_tokens=1,
            quantized_reference=False,
            check_reload=False,
            device="cpu",
        )
    finally:
        torch.set_num_threads(previous)
    return Setup(base_params, base.out_dir, prepared.dataset_dir, root / "merged", root)


@pytest.fixture(scope="module")
def test_rows(setup: Setup) -> int:
    import datasets

    return len(datasets.load_from_disk(str(setup.dataset_dir))["test"])


@pytest.fixture(scope="module")
def full(setup: Setup):
    """Base, candidate and production (the base folder itself, a plain HF model dir) on every test row."""
    return evaluate_tenant(out_dir=setup.root / "eval-full", **setup.kwargs(production_dir=setup.base_dir))


def test_evaluate_model_matches_the_stage(setup: Setup, full):
    """The registry measures production alone at promotion; its numbers must equal the stage's."""
    alone = evaluate_model(
        model_dir=setup.candidate_dir,
        dataset_dir=setup.dataset_dir,
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        max_new_tokens=16,
        device="cpu",
    )
    assert alone == full.metrics["models"]["candidate"]
    with pytest.raises(EvaluateError, match="not a model folder"):
        evaluate_model(
            model_dir=setup.root / "nope",
            dataset_dir=setup.dataset_dir,
            base_dir=setup.base_dir,
            base_params=setup.base_params,
        )


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_files_and_metrics(full, test_rows: int):
    for name in (METRICS, REPORT, GENERATIONS):
        assert (full.out_dir / name).is_file(), name
    assert not [p for p in full.out_dir.parent.iterdir() if p.name.startswith(".eval-full")], "no temporary left"
    metrics = json.loads(full.metrics_path.read_text())
    assert metrics == json.loads(json.dumps(full.metrics))
    assert metrics["tenant"] == "toy" and metrics["test_rows"] == test_rows >= 2
    assert metrics["device"] == "cpu" and "device_name" not in metrics  # evaluate.device, as it was run
    assert metrics["expects_json"] is True  # the toy triage answers are JSON objects
    assert metrics["answer_tokens"] > 0
    assert set(metrics["models"]) == {"base", "candidate", "production"}
    for name, m in metrics["models"].items():
        assert set(m) == {"answer_loss", "answer_perplexity", *TASK_METRICS}, name
        for key, value in m.items():
            assert isinstance(value, float) and math.isfinite(value), (name, key, value)
        assert m["answer_perplexity"] == pytest.approx(math.exp(m["answer_loss"]))
        for key in TASK_METRICS:
            assert 0.0 <= m[key] <= 1.0


def test_candidate_learned_the_task(full):
    models = full.metrics["models"]
    assert models["candidate"]["answer_loss"] < models["base"]["answer_loss"]
    # production is the base folder: same weights, same numbers (deterministic, greedy).
    assert models["production"] == models["base"]


def test_generations(full, setup: Setup, test_rows: int):
    import datasets

    rows = _read_jsonl(full.generations_path)
    assert len(rows) == test_rows
    test = datasets.load_from_disk(str(setup.dataset_dir))["test"]
    assert [r["id"] for r in rows] == test["id"]
    for row, messages in zip(rows, test["messages"]):
        assert row["reference"] == split_conversation(messages)[1]
        assert set(row["predictions"]) == set(row["exact_match"]) == {"base", "candidate", "production"}
        assert all(isinstance(v, bool) for v in row["exact_match"].values())
        assert all(p == p.strip() and "<|im_end|>" not in p for p in row["predictions"].values())
    em = sum(r["exact_match"]["candidate"] for r in rows) / len(rows)
    assert em == pytest.approx(full.metrics["models"]["candidate"]["exact_match"])
    assert any(r["predictions"]["candidate"] for r in rows), "all-empty generations would make the metrics vacuous"


def test_report(full):
    text = full.report_path.read_text(encoding="utf-8")
    assert "# Evaluation: toy" in text
    assert "| metric | base | candidate | production | Δ candidate − base |" in text
    for key in ("answer_loss", "answer_perplexity", *TASK_METRICS):
        assert f"| {key}" in text, key
    m = full.metrics["models"]
    delta = m["candidate"]["answer_loss"] - m["base"]["answer_loss"]
    assert f"{delta:+.4f}" in text and delta < 0
    assert text.count("### ") == 3  # examples_in_report default
    rows = _read_jsonl(full.generations_path)
    assert "| reference |" in text and "| candidate |" in text and "| base |" in text
    assert rows[0]["id"][:12] in text


def test_max_examples_and_no_production(setup: Setup, full, tmp_path):
    missing = tmp_path / "no-production-yet"
    small = evaluate_tenant(
        out_dir=tmp_path / "eval",
        max_examples=2,
        examples_in_report=1,
        **setup.kwargs(production_dir=missing, max_new_tokens=4),
    )
    assert small.metrics["test_rows"] == 2
    assert set(small.metrics["models"]) == {"base", "candidate"}
    rows = _read_jsonl(small.generations_path)
    assert len(rows) == 2 and set(rows[0]["predictions"]) == {"base", "candidate"}
    report = small.report_path.read_text(encoding="utf-8")
    assert "production" not in report and report.count("### ") == 1
    # The answer loss of the first two rows is a prefix of the full run's (teacher-forced, same rows).
    full_rows = _read_jsonl(full.generations_path)
    assert [r["id"] for r in rows] == [r["id"] for r in full_rows[:2]]
    # Re-running replaces the folder.
    (small.out_dir / "stale.txt").write_text("x")
    again = evaluate_tenant(out_dir=tmp_path / "eval", max_examples=2, **setup.kwargs(max_new_tokens=4))
    assert not (again.out_dir / "stale.txt").exists()
    assert again.metrics == small.metrics  # deterministic


@pytest.mark.cuda
def test_evaluate_on_cuda(setup: Setup, full, tmp_path):
    """evaluate.device cuda: every model scored and generating on the GPU (bfloat16), recorded in metrics.json;
    the numbers are the CPU's within bfloat16's error, and the registry's evaluate_model measures the same there."""
    result = evaluate_tenant(out_dir=tmp_path / "eval", **setup.kwargs(production_dir=setup.base_dir, device="cuda"))
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["device"] == "cuda" and metrics["device_name"]
    assert (
        metrics["test_rows"] == full.metrics["test_rows"] and metrics["answer_tokens"] == full.metrics["answer_tokens"]
    )
    assert set(metrics["models"]) == {"base", "candidate", "production"}
    for name, scores in metrics["models"].items():
        assert set(scores) == set(full.metrics["models"][name]), name
        assert scores["answer_loss"] == pytest.approx(full.metrics["models"][name]["answer_loss"], rel=0.05), name
    assert metrics["models"]["candidate"]["answer_loss"] < metrics["models"]["base"]["answer_loss"]
    assert len(_read_jsonl(result.generations_path)) == metrics["test_rows"]
    # evaluate.batch_size auto: a tiny model on a GPU takes the whole split in one batch
    assert metrics["batch_rows"] == dict.fromkeys(metrics["models"], metrics["test_rows"])
    alone = evaluate_model(
        model_dir=setup.candidate_dir,
        dataset_dir=setup.dataset_dir,
        base_dir=setup.base_dir,
        base_params=setup.base_params,
        max_new_tokens=16,
        device="cuda",
    )
    assert alone == pytest.approx(metrics["models"]["candidate"], rel=1e-5)


def test_bad_inputs(setup: Setup, tmp_path):
    with pytest.raises(EvaluateError, match="merge"):
        evaluate_tenant(out_dir=tmp_path / "x", **setup.kwargs(candidate_dir=tmp_path / "nothing"))
    with pytest.raises(EvaluateError, match="prepare"):
        evaluate_tenant(out_dir=tmp_path / "x", **setup.kwargs(dataset_dir=tmp_path / "nothing"))
    with pytest.raises(EvaluateError, match="max_new_tokens"):
        evaluate_tenant(out_dir=tmp_path / "x", **setup.kwargs(max_new_tokens=0))
    with pytest.raises(EvaluateError, match="batch_size must be >= 1 or auto, got 0"):
        evaluate_tenant(out_dir=tmp_path / "x", batch_size=0, **setup.kwargs())
    from loraline.layout import TOKENIZER_STAMP

    other = tmp_path / "dataset"
    shutil.copytree(setup.dataset_dir, other)
    (other / TOKENIZER_STAMP).write_text(json.dumps({"tokenizer_hash": "0" * 64, "tokenizer": "elsewhere"}))
    with pytest.raises(EvaluateError, match=r"tokenized with another tokenizer \(elsewhere, 000000000000\)"):
        evaluate_tenant(out_dir=tmp_path / "x", **setup.kwargs(dataset_dir=other))
    assert not (tmp_path / "x").exists()


def test_cuda_without_a_gpu_names_the_key_and_writes_nothing(setup: Setup, tmp_path, monkeypatch):
    from loraline.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^evaluate\.device is cuda but torch sees no CUDA device"):
        evaluate_tenant(out_dir=tmp_path / "x", **setup.kwargs(device="cuda"))
    with pytest.raises(ConfigError, match=r"^evaluate\.device is cuda"):
        evaluate_model(
            model_dir=setup.candidate_dir,
            dataset_dir=setup.dataset_dir,
            base_dir=setup.base_dir,
            base_params=setup.base_params,
            device="cuda",
        )
    assert not (tmp_path / "x").exists()


def test_the_stage_batch_size_changes_no_answer(setup: Setup, full, tmp_path):
    """evaluate.batch_size is speed only: one row at a time gives the default batch's answers and losses."""
    one = evaluate_tenant(out_dir=tmp_path / "eval", batch_size=1, **setup.kwargs(production_dir=setup.base_dir))
    assert one.metrics["batch_rows"] == dict.fromkeys(one.metrics["models"], 1)
    assert full.metrics["batch_rows"] == {name: min(32, full.metrics["test_rows"]) for name in full.metrics["models"]}
    assert [r["predictions"] for r in _read_jsonl(one.generations_path)] == [
        r["predictions"] for r in _read_jsonl(full.generations_path)
    ]
    for name, scores in full.metrics["models"].items():
        for metric, value in scores.items():
            assert one.metrics["models"][name][metric] == pytest.approx(value, rel=1e-5), (name, metric)


def test_batching_changes_nothing(setup: Setup):
    """Left-padded batched generation and right-padded batched loss equal their one-row-at-a-time values;
    the eval prompt is exactly the stored row's prefix before its answer (same rendering as prepare)."""
    import datasets

    from loraline.evaluate.generate import answer_loss, encode_prompt, generate_greedy, loaded_model
    from loraline.modelling.loading import load_base_tokenizer

    tok = load_base_tokenizer(setup.base_dir, setup.base_params)
    test = datasets.load_from_disk(str(setup.dataset_dir))["test"].select(range(4))
    prompts = [encode_prompt(tok, split_conversation(m)[0]) for m in test["messages"]]
    for p, ids, labels in zip(prompts, test["input_ids"], test["labels"]):
        assert ids[: len(p)] == p
        assert all(lab == -100 for lab in labels[: len(p)]) and labels[len(p)] != -100
    with loaded_model(setup.candidate_dir, torch.device("cpu")) as model:
        batched = generate_greedy(model, tok, prompts, 8, batch_size=4)
        single = generate_greedy(model, tok, prompts, 8, batch_size=1)
        loss4 = answer_loss(model, test["input_ids"], test["labels"], tok.pad_token_id, batch_size=4)
        loss1 = answer_loss(model, test["input_ids"], test["labels"], tok.pad_token_id, batch_size=1)
    assert batched == single
    assert loss4.tokens == loss1.tokens == sum(sum(lab != -100 for lab in row[1:]) for row in test["labels"])
    assert loss4.loss == pytest.approx(loss1.loss, rel=1e-5)


def _nan_adapter(setup: Setup, dest: Path) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(setup.root / "adapter", dest)
    weights = load_file(str(dest / "adapter_model.safetensors"))
    for name in weights:
        if "lora_B" in name:
            weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(dest / "adapter_model.safetensors"))
    return dest


def test_a_nan_adapter_never_passes_merge_or_gate(setup: Setup, tmp_path):
    """A deliberately broken adapter (NaN LoRA weights): the merge stage refuses it, and even a
    model that slipped through fails the gate on the rule that names the bad metric."""
    from loraline.config import GateParams
    from loraline.gate.decision import decide
    from loraline.merge import MergeError, merge_adapter

    bad = _nan_adapter(setup, tmp_path / "nan-adapter")
    with pytest.raises(MergeError):
        merge_adapter(
            base_dir=setup.base_dir,
            base_params=setup.base_params,
            adapter_dir=bad,
            out_dir=tmp_path / "merged",
            tolerance=1e-3,
            probes=[[{"role": "user", "content": "ping"}]],
            max_new_tokens=1,
            quantized_reference=False,
            check_reload=False,
            device="cpu",
        )
    assert not (tmp_path / "merged").exists()

    # Evaluate a NaN-weighted model anyway (as if it came from elsewhere): the gate must fail it.
    from transformers import AutoModelForCausalLM

    broken = AutoModelForCausalLM.from_pretrained(str(setup.candidate_dir))
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "broken")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(setup.candidate_dir)).save_pretrained(tmp_path / "broken")
    result = evaluate_tenant(
        out_dir=tmp_path / "eval", **setup.kwargs(candidate_dir=tmp_path / "broken", max_examples=3)
    )
    models = result.metrics["models"]
    decision = decide(
        GateParams(primary_metric="answer_loss"),
        models["candidate"],
        models["base"],
        None,
        {"merge_max_logit_diff": 0.0, "export_max_logit_diff": 0.0},
    )
    assert not decision.passed
    assert "beats_base" in decision.failed
    assert "answer_loss" in decision.rule("beats_base").reason


def test_accuracy_per_field_is_reported_and_matches_the_generations(full):
    from loraline.evaluate.metrics import per_field_accuracy

    rows = _read_jsonl(full.generations_path)
    fields = json.loads(full.metrics_path.read_text())["field_accuracy"]
    assert set(fields) == {"base", "candidate", "production"}
    for name, per_field in fields.items():
        keys = list(json.loads(rows[0]["reference"]))
        assert list(per_field)[: len(keys)] == keys or set(keys) <= set(per_field)
        assert per_field == per_field_accuracy([r["predictions"][name] for r in rows], [r["reference"] for r in rows])
        # The mean over fields equals json_field_accuracy when every reference has the same keys.
        if all(list(json.loads(r["reference"])) == keys for r in rows):
            mean = sum(per_field.values()) / len(per_field)
            assert mean == pytest.approx(full.metrics["models"][name]["json_field_accuracy"])
    report = full.report_path.read_text()
    assert "## Accuracy per JSON field" in report and f"| `{next(iter(fields['candidate']))}` |" in report


def _with_pairs(setup: Setup, dest: Path, *, swap: bool = False) -> tuple[Path, int]:
    """setup's dataset with preference columns: every test row a pair of its answer and the same answer naming
    another team (`swap`: the wrong one chosen, the right one rejected); the other splits' rows SFT rows (empty
    columns)."""
    import datasets

    from loraline.modelling.loading import load_base_tokenizer
    from loraline.prepare.render import render_batch
    from loraline.prepare.schema import Message

    tok = load_base_tokenizer(setup.base_dir, setup.base_params)
    dd = datasets.load_from_disk(str(setup.dataset_dir))
    teams = sorted({json.loads(split_conversation(m)[1])["team"] for m in dd["test"]["messages"]})
    out = {}
    for split, ds in dd.items():
        if split != "test":
            empty = {"rejected": [""] * len(ds), "rejected_input_ids": [[]] * len(ds)}
            empty |= {"rejected_labels": [[]] * len(ds), "n_rejected_tokens": [0] * len(ds)}
            out[split] = ds.from_dict(ds.to_dict() | empty)
            continue
        right, wrong = [], []
        for messages in ds["messages"]:
            answer = json.loads(messages[-1]["content"])
            answer["team"] = teams[(teams.index(answer["team"]) + 1) % len(teams)]
            context = [Message(m["role"], m["content"]) for m in messages[:-1]]
            right.append((messages, [*context, Message("assistant", messages[-1]["content"])]))
            other = [*messages[:-1], {"role": "assistant", "content": json.dumps(answer)}]
            wrong.append((other, [*context, Message("assistant", json.dumps(answer))]))
        chosen, rejected = (wrong, right) if swap else (right, wrong)
        c, r = render_batch([x[1] for x in chosen], tok), render_batch([x[1] for x in rejected], tok)
        columns = {"messages": [x[0] for x in chosen], "input_ids": [x.input_ids for x in c]}
        columns |= {"labels": [x.labels for x in c], "n_tokens": [x.n_tokens for x in c]}
        columns |= {"rejected": [x[1][-1].content for x in rejected], "rejected_input_ids": [x.input_ids for x in r]}
        columns |= {"rejected_labels": [x.labels for x in r], "n_rejected_tokens": [x.n_tokens for x in r]}
        out[split] = ds.from_dict(ds.to_dict() | columns)
    datasets.DatasetDict(out).save_to_disk(str(dest))
    for path in setup.dataset_dir.iterdir():  # the tokenizer stamp and the card beside the splits
        if path.is_file() and not (dest / path.name).exists():
            shutil.copy(path, dest / path.name)
    return dest, len(dd["test"])


def _logps(model_dir: Path, test) -> Any:
    from loraline.evaluate.generate import answer_logps, loaded_model
    from loraline.evaluate.preference import PairLogps

    with loaded_model(model_dir, torch.device("cpu")) as model:  # one row at a time: no padding at all
        return PairLogps(
            answer_logps(model, test["input_ids"], test["labels"], 0, 1),
            answer_logps(model, test["rejected_input_ids"], test["rejected_labels"], 0, 1),
        )


def test_preference_pairs_are_scored_for_every_model(setup: Setup, tmp_path):
    import datasets

    from loraline.evaluate.preference import preference_scores

    dataset, pairs = _with_pairs(setup, tmp_path / "pairs")
    swapped, _ = _with_pairs(setup, tmp_path / "swapped", swap=True)
    kwargs = setup.kwargs(production_dir=setup.base_dir, max_new_tokens=2)
    result = evaluate_tenant(out_dir=tmp_path / "eval", **kwargs | {"dataset_dir": dataset})
    flipped = evaluate_tenant(out_dir=tmp_path / "eval-swapped", **kwargs | {"dataset_dir": swapped})
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["preference"]["pairs"] == pairs >= 2
    models, other = metrics["models"], flipped.metrics["models"]
    assert models["base"]["reward_margin"] == models["base"]["reward_accuracy"] == 0.0
    assert models["production"] == models["base"]  # the base folder: the same numbers
    # The numbers are the answers' log-probabilities, recomputed here one row at a time, without padding.
    test = datasets.load_from_disk(str(dataset))["test"]
    base = _logps(setup.base_dir, test)
    for name, folder in (("base", setup.base_dir), ("candidate", setup.candidate_dir)):
        expected = preference_scores(_logps(folder, test), base)
        for key, value in expected.items():
            assert models[name][key] == pytest.approx(value, abs=1e-4), (name, key)
        # Swapping chosen and rejected mirrors every number (no pair is a tie: the answers differ).
        assert other[name]["preference_accuracy"] == pytest.approx(1 - models[name]["preference_accuracy"])
        assert other[name]["logp_margin"] == pytest.approx(-models[name]["logp_margin"], abs=1e-4)
        assert other[name]["reward_margin"] == pytest.approx(-models[name]["reward_margin"], abs=1e-4)
    assert models["candidate"]["reward_margin"] != 0.0  # the adapter moved the answers' probabilities
    report = result.report_path.read_text(encoding="utf-8")
    assert "## Preference pairs" in report and f"{pairs} pairs" in report
    headline = evaluate_metrics(metrics)
    assert "preference_accuracy" in headline["candidate"] and "reward_margin" in headline["candidate"]


def test_a_test_split_without_pairs_has_no_preference_metrics(full):
    assert "preference" not in full.metrics
    assert not any("preference_accuracy" in m for m in full.metrics["models"].values())

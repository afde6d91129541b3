"""DPO and ORPO (train.objective): losses equal to TRL's on the same tiny model and batch, packing vs
padding, learning on a toy pair set, exact resume, determinism and the errors a user can hit."""

from __future__ import annotations

import copy
import math
import shutil
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from train_helpers import THREADS, adapter_tensors, tiny_train

from loraline.config import TrainParams
from loraline.records import TrainRecord
from loraline.train import train_adapter
from loraline.train.data import to_example
from loraline.train.errors import TrainError
from loraline.train.loop import Run, train_step
from loraline.train.packing import PlannedStep
from loraline.train.preference import DpoObjective, OrpoObjective, Pair, reference_logps
from loraline.train.speed import fused_head, use_varlen_attention

CPU = torch.device("cpu")
VOCAB = 64
IGNORE = -100


# ------------------------------------------------------------------------------------------ tiny model


def _tiny_policy(seed: int = 0):
    """A random tiny Llama with LoRA whose B is non-zero (an adapter that moved), in fp32, no dropout."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def _perturb(model, seed: int = 1) -> None:
    """Move the (default) adapter as a few training steps would: the policy now differs from its start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".default." in name and "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _raw_pairs(n: int = 5, seed: int = 3, context: tuple[int, int] = (2, 6)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(3, VOCAB, (k,), generator=g).tolist()

    return [{"prompt_ids": ids(*context), "chosen_ids": ids(1, 4), "rejected_ids": ids(1, 5)} for _ in range(n)]


def _pair(raw: dict, row: int) -> Pair:
    """The prepared dataset's convention: input_ids = context + answer, labels -100 outside the answer."""
    context = raw["prompt_ids"]

    def example(answer: list[int]):
        return to_example(context + answer, [IGNORE] * len(context) + answer)

    return Pair(example(raw["chosen_ids"]), example(raw["rejected_ids"]), row)


def _run(model, pairs: list[Pair], objective, *, packing: bool, fused: bool, **params) -> Run:
    train = tiny_train(packing=packing, lora_dropout=0.0, max_grad_norm=1e9, **params)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    head = fused_head(model) if fused else None
    assert (head is not None) == fused
    return Run(model, trainable, None, None, train, CPU, 0, pairs, [], [], head, objective=objective)


def _ours(run: Run, pairs: list[Pair]) -> float:
    objective = run.objective
    batch = run.collate([list(range(len(pairs)))] if run.params.packing else [[i] for i in range(len(pairs))], pairs)
    with torch.no_grad():
        return objective.step_loss(objective.terms(run, batch), objective.divisors(pairs)).item()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t1")


def _strings():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["t5 t6"], "chosen": ["t7"], "rejected": ["t8"]})


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(abs(a), abs(b))


# ------------------------------------------------------------------------------------ (a) TRL parity


@pytest.mark.parametrize(("packing", "fused"), [(True, True), (False, False), (True, False)])
def test_dpo_loss_equals_trls(tmp_path, packing, fused):
    """TRL's DPOTrainer on a PEFT model keeps the starting adapter as its reference ("ref"); so does ours
    (reference log-probs by the starting policy). Both then score the moved policy on the same pairs."""
    from trl import DPOConfig, DPOTrainer

    beta, raw = 0.3, _raw_pairs()
    start = _tiny_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=str(tmp_path), beta=beta, report_to="none", use_cpu=True)
        trainer = DPOTrainer(copy.deepcopy(start), args=args, train_dataset=_strings(), processing_class=_tokenizer())
    _perturb(trainer.model)
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(raw)).item()
    their_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    pairs = [_pair(r, i) for i, r in enumerate(raw)]
    model = copy.deepcopy(start).eval()
    run = _run(model, pairs, DpoObjective(beta), packing=packing, fused=fused)
    run.objective.start(run)  # the reference: the starting policy
    _perturb(model)
    ours = _ours(run, run.train)
    assert _close(ours, theirs), (ours, theirs)
    assert ours > 0.05 and abs(ours - math.log(2)) > 1e-3  # the policy moved: not the trivial log 2
    batch = run.collate([list(range(len(pairs)))] if packing else [[i] for i in range(len(pairs))], run.train)
    with torch.no_grad():
        sums = {k: v.item() for k, v in run.objective.terms(run, batch).items()}
    metrics = run.objective.metrics(sums, run.objective.divisors(run.train))
    assert _close(metrics["chosen_reward"], their_metrics["rewards/chosen"])
    assert _close(metrics["reward_margin"], their_metrics["rewards/margins"])
    assert metrics["reward_accuracy"] == pytest.approx(their_metrics["rewards/accuracies"], abs=1e-6)  # TRL: fp32


def _orpo_batch(raw: list[dict]) -> dict[str, torch.Tensor]:
    """TRL's ORPO batch layout (tokenize_row's keys): prompt + answer ids, labels -100 on the prompt, padded."""
    out = {}
    for side in ("chosen", "rejected"):
        seqs = [r["prompt_ids"] + r[f"{side}_ids"] for r in raw]
        width = max(map(len, seqs))
        ids = torch.zeros((len(raw), width), dtype=torch.long)
        mask = torch.zeros((len(raw), width), dtype=torch.long)
        labels = torch.full((len(raw), width), IGNORE)
        for i, (r, s) in enumerate(zip(raw, seqs)):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
            labels[i, len(r["prompt_ids"]) : len(s)] = torch.tensor(r[f"{side}_ids"])
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return out


def _trl_orpo(tmp_path, start, orpo_lambda: float, raw: list[dict]) -> tuple[float, dict]:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ORPOConfig(output_dir=str(tmp_path), beta=orpo_lambda, report_to="none", use_cpu=True, max_length=64)
        trainer = ORPOTrainer(copy.deepcopy(start), args=args, train_dataset=_strings(), processing_class=_tokenizer())
    trainer.model.eval()
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, _orpo_batch(raw), train_eval="eval")
    return loss.item(), metrics


@pytest.mark.parametrize(("packing", "fused"), [(True, True), (False, False)])
def test_orpo_loss_equals_trls(tmp_path, packing, fused):
    """TRL's ORPO cross-entropy also scores the prompt tokens; with a one-token context there are none to
    score (the first token is never a target), so the whole loss must match. With longer contexts the
    odds-ratio term (TRL's log_odds_ratio metric), the rewards and their accuracy must."""
    orpo_lambda, start = 0.25, _tiny_policy(seed=4)
    for context, whole in (((1, 1), True), ((2, 6), False)):
        raw = _raw_pairs(n=6, seed=7, context=context)
        theirs, their_metrics = _trl_orpo(tmp_path, start, orpo_lambda, raw)
        pairs = [_pair(r, i) for i, r in enumerate(raw)]
        run = _run(copy.deepcopy(start).eval(), pairs, OrpoObjective(orpo_lambda), packing=packing, fused=fused)
        batch = run.collate([list(range(len(pairs)))] if packing else [[i] for i in range(len(pairs))], pairs)
        with torch.no_grad():
            sums = {k: v.item() for k, v in run.objective.terms(run, batch).items()}
        metrics = run.objective.metrics(sums, run.objective.divisors(pairs))
        if whole:
            assert _close(metrics["loss"], theirs), (metrics["loss"], theirs)
            assert _close(metrics["nll"], their_metrics["eval_nll_loss"])
        assert _close(metrics["log_odds_ratio"], their_metrics["eval_log_odds_ratio"])
        assert _close(metrics["chosen_reward"], their_metrics["eval_rewards/chosen"])
        assert _close(metrics["reward_margin"], their_metrics["eval_rewards/margins"])
        assert metrics["reward_accuracy"] == pytest.approx(their_metrics["eval_rewards/accuracies"], abs=1e-6)


# ------------------------------------------------------------------------------- (c) packing vs padding


@pytest.mark.parametrize("objective", [DpoObjective(0.5), OrpoObjective(0.2)], ids=["dpo", "orpo"])
def test_packing_and_padding_give_the_same_loss_and_gradients(objective):
    """One optimizer step over the same pairs: one packed micro-batch (varlen, one row) == three padded
    micro-batches of grad_accum; the divisors (pairs, chosen answer tokens) count the whole step."""
    raw = _raw_pairs(n=6, seed=11)
    start = _tiny_policy(seed=2)
    pairs = [_pair(r, i) for i, r in enumerate(raw)]
    if isinstance(objective, DpoObjective):  # one reference for both layouts, so only the layout differs
        table = reference_logps(_run(copy.deepcopy(start), pairs, objective, packing=False, fused=False), pairs)
        pairs = [Pair(p.chosen, p.rejected, p.row, tuple(ref)) for p, ref in zip(pairs, table.tolist())]
    layouts = ((True, [[[0, 1, 2], [3, 4, 5]]]), (False, [[[0], [1]], [[2], [3]], [[4], [5]]]))
    results = []
    for packing, micro_batches in layouts:
        model = copy.deepcopy(start)
        if packing:
            assert use_varlen_attention(model)
        _perturb(model)
        model.train()
        run = _run(model, pairs, objective, packing=packing, fused=packing)
        run.optimizer = torch.optim.SGD(list(run.trainable.values()), lr=1.0)
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda _: 1.0)
        result = train_step(run, PlannedStep(0, 0, micro_batches))
        results.append((result, {n: p.detach().clone() for n, p in run.trainable.items()}))
    (a, weights_a), (b, weights_b) = results
    assert a[0] == pytest.approx(b[0], rel=1e-5) and a[2] == b[2]
    assert a.metrics["reward_accuracy"] == b.metrics["reward_accuracy"]
    assert max((weights_a[n] - weights_b[n]).abs().max().item() for n in weights_a) < 1e-5


# ----------------------------------------------------------------------- the stage on a toy pair set


def _pair_dataset(sft_dir: Path, out: Path, *, pairs: bool = True) -> Path:
    """The prepared SFT dataset with the contract's pair columns: each row's rejected answer is another row's
    (a wrong team/priority), rendered like the chosen one (context + answer, -100 outside the answer)."""
    import datasets

    dd = datasets.load_from_disk(str(sft_dir))

    def add(split):
        ids, labels = split["input_ids"], split["labels"]
        answers = [[t for t in lab if t != IGNORE] for lab in labels]
        contexts = [i[: next(k for k, t in enumerate(lab) if t != IGNORE)] for i, lab in zip(ids, labels)]
        tails = [i[len(c) + len(a) :] for i, c, a in zip(ids, contexts, answers)]  # end-of-turn tokens after it
        r_ids, r_labels = [], []
        for k in range(len(ids)):
            wrong = next(
                (answers[(k + j) % len(ids)] for j in range(1, len(ids)) if answers[(k + j) % len(ids)] != answers[k]),
                None,
            )
            if not pairs or wrong is None:
                r_ids.append([]), r_labels.append([])
                continue
            r_ids.append(contexts[k] + wrong + tails[k])
            r_labels.append([IGNORE] * len(contexts[k]) + wrong + [IGNORE] * len(tails[k]))
        return (
            split.add_column("rejected", ["x" if r else "" for r in r_ids])
            .add_column("rejected_input_ids", r_ids)
            .add_column("rejected_labels", r_labels)
            .add_column("n_rejected_tokens", [len(r) for r in r_ids])
        )

    datasets.DatasetDict({name: add(split) for name, split in dd.items()}).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def pair_data(setup, tmp_path_factory) -> Path:
    return _pair_dataset(setup.dataset_dir, tmp_path_factory.mktemp("pairs") / "prepared")


def _dpo(**overrides) -> TrainParams:
    fields = dict(objective="dpo", preference={"beta": 0.5}, max_steps=12, learning_rate=2e-2, eval_every=3)
    return tiny_train(**(fields | overrides))


@pytest.fixture(scope="module")
def dpo_reference_run(setup, pair_data, tmp_path_factory):
    """One uninterrupted DPO run with checkpoints every 3 steps (12 steps; 6 and 9 kept)."""
    root = tmp_path_factory.mktemp("dpo")
    kwargs = setup.kwargs() | {"dataset_dir": pair_data}
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # a module fixture starts before the autouse one that pins the threads
    try:
        with mock.patch("loraline.train.stage.pick_device", return_value=CPU):
            result = train_adapter(_dpo(), out_dir=root / "out", checkpoint_dir=root / "ckpt", **kwargs)
    finally:
        torch.set_num_threads(previous)
    return result, root / "ckpt"


def test_dpo_steps_raise_reward_accuracy_and_lower_the_loss(dpo_reference_run):
    result, _ = dpo_reference_run
    pref = result.record.preference
    assert pref.objective == "dpo" and pref.beta == 0.5 and pref.reference == "base"
    assert pref.pairs["train"] > 20 and pref.sft_rows_left_out == {"train": 0, "validation": 0}
    # step 0: policy == reference, so every reward is 0 and no pair is ranked right; the loss is log 2
    assert pref.base_val.reward_accuracy == 0.0 and pref.base_val.loss == pytest.approx(math.log(2), abs=1e-6)
    # a tiny base on a toy task learns slowly: 12 steps move 3 of the 4 validation pairs the right way
    assert pref.final_val.reward_accuracy >= 0.75 and pref.train.reward_accuracy > 0.6
    assert pref.final_val.loss < math.log(2) - 0.04 and pref.final_val.reward_margin > 0
    assert result.record.loss.final_val == pref.final_val.loss  # early stopping and the curves key on it
    history_keys = result.val_curve.read_text().splitlines()[0]
    assert history_keys == "step,val_loss"


def test_dpo_resume_from_a_checkpoint_is_exact_and_reuses_the_reference(dpo_reference_run, setup, pair_data, tmp_path):
    result, ckpt = dpo_reference_run
    saved = sorted(ckpt.iterdir())[-1]
    assert (saved / "objective.safetensors").is_file()
    copy_dir = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy_dir)
    shutil.rmtree(copy_dir / saved.name)  # resume from step 6, before an evaluation and the end
    kwargs = setup.kwargs() | {"dataset_dir": pair_data}
    with (
        mock.patch("loraline.train.stage.pick_device", return_value=CPU),
        mock.patch("loraline.train.preference.reference_logps", side_effect=AssertionError("recomputed")),
    ):
        resumed = train_adapter(_dpo(), out_dir=tmp_path / "out", checkpoint_dir=copy_dir, **kwargs)
    assert resumed.timing["resumed_from_step"] == 6
    assert resumed.adapter_weights.read_bytes() == result.adapter_weights.read_bytes()
    assert resumed.record_path.read_bytes() == result.record_path.read_bytes()


def test_dpo_runs_are_deterministic(dpo_reference_run, setup, pair_data, tmp_path):
    result, _ = dpo_reference_run
    with mock.patch("loraline.train.stage.pick_device", return_value=CPU):
        again = train_adapter(_dpo(), out_dir=tmp_path / "out", **setup.kwargs() | {"dataset_dir": pair_data})
    assert adapter_tensors(again.out_dir).keys() == adapter_tensors(result.out_dir).keys()
    assert again.adapter_weights.read_bytes() == result.adapter_weights.read_bytes()
    assert TrainRecord.read(again.record_path).preference == result.record.preference


def test_dpo_from_a_reference_adapter_starts_as_it(dpo_reference_run, setup, pair_data, tmp_path):
    """reference: <adapter folder>: the policy starts from it, so step 0 is again log 2 with the adapter's
    own log-probs as the reference; an adapter of another LoRA shape is refused."""
    result, _ = dpo_reference_run
    kwargs = setup.kwargs() | {"dataset_dir": pair_data}
    params = _dpo(max_steps=2, preference={"reference": str(result.out_dir)})
    with mock.patch("loraline.train.stage.pick_device", return_value=CPU):
        second = train_adapter(params, out_dir=tmp_path / "out", **kwargs)
        pref = second.record.preference
        assert pref.reference == str(result.out_dir) and pref.base_val.loss == pytest.approx(math.log(2), abs=1e-6)
        first, then = adapter_tensors(result.out_dir), adapter_tensors(second.out_dir)
        b = [k for k in first if "lora_B" in k]
        moved = sum((then[k] - first[k]).norm() ** 2 for k in b) ** 0.5
        assert moved < 0.5 * sum(first[k].norm() ** 2 for k in b) ** 0.5  # two steps from the adapter, not from B = 0
        with pytest.raises(TrainError, match=r"another LoRA shape than this run: r 8 \(train: 4\)"):
            train_adapter(params.model_copy(update={"lora_r": 4}), out_dir=tmp_path / "o2", **kwargs)


def test_orpo_trains_through_the_stage(setup, pair_data, tmp_path):
    params = tiny_train(objective="orpo", preference={"orpo_lambda": 0.5}, max_steps=4, eval_every=2, packing=False)
    with mock.patch("loraline.train.stage.pick_device", return_value=CPU):
        result = train_adapter(params, out_dir=tmp_path / "out", **setup.kwargs() | {"dataset_dir": pair_data})
    pref = result.record.preference
    assert pref.objective == "orpo" and pref.orpo_lambda == 0.5 and pref.beta is None and pref.reference is None
    assert pref.final_val.nll < pref.base_val.nll
    assert pref.final_val.loss == pytest.approx(pref.final_val.nll - 0.5 * pref.final_val.log_odds_ratio)


# ------------------------------------------------------------------------------------------- (f) errors


def test_dpo_on_a_dataset_without_pairs_names_it(setup, tmp_path):
    lacking = r"\(0 pairs in \d+ train rows: no rejected_input_ids, rejected_labels column"
    with pytest.raises(
        TrainError, match=r"train.objective dpo trains on preference pairs, but dataset .*none " + lacking
    ):
        train_adapter(_dpo(), out_dir=tmp_path / "out", **setup.kwargs())
    empty = _pair_dataset(setup.dataset_dir, tmp_path / "empty", pairs=False)
    with pytest.raises(TrainError, match=r"train.objective orpo .* has 0 pairs in its \d+ train rows"):
        train_adapter(
            tiny_train(objective="orpo"), out_dir=tmp_path / "out", **setup.kwargs() | {"dataset_dir": empty}
        )


def test_a_missing_reference_adapter_is_named(setup, pair_data, tmp_path):
    params = _dpo(preference={"reference": str(tmp_path / "nope")})
    with pytest.raises(TrainError, match=r"train.preference.reference '.*nope': no such adapter folder"):
        train_adapter(params, out_dir=tmp_path / "out", **setup.kwargs() | {"dataset_dir": pair_data})
    params = _dpo(preference={"reference": str(tmp_path / "out")})
    with pytest.raises(TrainError, match=r"is the folder this run writes its adapter to; copy the reference"):
        train_adapter(params, out_dir=tmp_path / "out", **setup.kwargs() | {"dataset_dir": pair_data})
    (tmp_path / "half").mkdir()
    params = _dpo(preference={"reference": str(tmp_path / "half")})
    with pytest.raises(TrainError, match=r"is not an adapter folder: it lacks adapter_config.json"):
        train_adapter(params, out_dir=tmp_path / "out", **setup.kwargs() | {"dataset_dir": pair_data})


def test_params_refuse_what_cannot_work_and_keep_sft_dumps_unchanged():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="objective orpo has no reference model"):
        TrainParams(objective="orpo", preference={"reference": "models/adapters/acme-shop"})
    with pytest.raises(ValidationError, match="beta"):
        TrainParams(objective="dpo", preference={"beta": 0})
    with pytest.raises(ValidationError, match="objective"):
        TrainParams(objective="kto")
    dump = TrainParams().model_dump(mode="json")
    assert "objective" not in dump and "preference" not in dump  # SFT records and fingerprints keep their bytes
    dpo = TrainParams(objective="dpo").model_dump(mode="json")
    assert dpo["objective"] == "dpo" and TrainParams.model_validate(dpo).objective == "dpo"


def test_two_processes_train_dpo_as_one_does(setup, pair_data, tmp_path, cpu_ranks):
    """Data parallel (gloo on CPU): each rank takes whole pairs, the step divides by all ranks' pairs, and
    both ranks score the same reference; so two ranks of 2 rows train what one process of 4 does."""
    from train_helpers import train_losses

    kwargs = setup.kwargs() | {"dataset_dir": pair_data}
    one = train_adapter(_dpo(lora_dropout=0.0, max_steps=6), out_dir=tmp_path / "one", **kwargs)
    two = train_adapter(
        _dpo(lora_dropout=0.0, max_steps=6, batch_size=2, devices=2), out_dir=tmp_path / "two", **kwargs
    )
    assert two.record.devices == 2 and two.record.tokens_seen == one.record.tokens_seen
    a, b = train_losses(one.train_curve), train_losses(two.train_curve)
    assert all(abs(x - y) <= 1.5e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)  # 6 digits in the csv
    pa, pb = one.record.preference, two.record.preference
    assert abs(pa.final_val.loss - pb.final_val.loss) < 1e-5
    assert pa.final_val.reward_accuracy == pb.final_val.reward_accuracy
    ta, tb = adapter_tensors(one.out_dir), adapter_tensors(two.out_dir)
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5

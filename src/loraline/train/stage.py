"""The train stage for one tenant: prepared dataset + base model -> LoRA adapter and its record.

    out_dir/adapter_config.json        peft's standard adapter (stock PeftModel.from_pretrained loads it)
    out_dir/adapter_model.safetensors
    out_dir/train_record.json          params, hashes, seed, code fingerprint, versions, tokens, losses, the
                                       micro-batch it trained with (`batch`: train.batch_size auto resolved, see
                                       train.autobatch)
    out_dir/train_loss.csv             step,train_loss,lr: every optimizer step (for dvc plots)
    out_dir/val_loss.csv               step,val_loss: every evaluation, step 0 = the base model

Order of work: every check that can fail on bad input (base folder, dataset, splits, sequence
length, module names, packing isolation) runs before the first optimizer step. out_dir is written
atomically at the end; checkpoints (optional) make a killed run resumable, with the same out_dir.
What differs between identical runs (time, tokens/s, peak memory, the step a run resumed from) is
in TrainResult.timing, which `run` writes to reports/timing/train@<tenant>.json, outside out_dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraline import io
from loraline.config import BaseParams, Params, TrainParams
from loraline.layout import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    BASE_RECORD,
    QLORA_REFERENCE,
    TRAIN_RECORD,
    Layout,
)
from loraline.modelling.device import compute_dtype, pick_device
from loraline.modelling.loading import base_model_hash, base_record, load_base_tokenizer, tokenizer_mismatch
from loraline.modelling.long_context import FULL_ATTENTION_REFERENCE
from loraline.modelling.variants import Variants
from loraline.provenance import code_fingerprint, hash_tree, library_versions, phase, run_timing, sha256_file
from loraline.records import (
    BaseRecord,
    BaseRef,
    Loss,
    Speed,
    Steps,
    TokensSeen,
    TrainData,
    TrainPreference,
    TrainRecord,
)
from loraline.train import autobatch, checkpoint, remote
from loraline.train.distributed import World, barrier, gather, launch, process_group, world_from_env
from loraline.train.errors import TrainError
from loraline.train.loop import Progress, Run, train_loop
from loraline.train.model import (
    attach_lora,
    check_module_names,
    check_reference_adapter,
    load_base_model,
    sort_config_sets,
    start_from_adapter,
    trainable_parameters,
    training_variants,
    with_long_context_trainables,
)
from loraline.train.objective import Objective, objective_for
from loraline.train.optim import make_optimizer, make_scheduler, warmup_steps
from loraline.train.packing import check_packing_isolation, pack_rows, plan_steps
from loraline.train.record import (
    TRAIN_CURVE,
    VAL_CURVE,
    device_name,
    final_train_loss,
    peak_memory,
    preference_summary,
    write_curves,
)
from loraline.train.sharded import sharding_facts
from loraline.train.speed import fused_head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    adapter_config: Path
    adapter_weights: Path
    record_path: Path
    train_curve: Path
    val_curve: Path
    record: TrainRecord
    timing: dict[str, Any] = field(default_factory=dict)  # tokens_per_s, peak_memory, resumed_from_step, ...

    @classmethod
    def of(cls, out_dir: Path, record: TrainRecord, timing: dict[str, Any]) -> TrainResult:
        """The result for an adapter folder written by the stage (its files have fixed names)."""
        return cls(
            out_dir,
            out_dir / ADAPTER_CONFIG,
            out_dir / ADAPTER_WEIGHTS,
            out_dir / TRAIN_RECORD,
            out_dir / TRAIN_CURVE,
            out_dir / VAL_CURVE,
            record,
            timing,
        )


@dataclass(frozen=True)
class _Inputs:
    """What a run trains from, read and hashed before anything loads."""

    base_record: BaseRecord
    splits: Any  # the objective's units per split (data.Splits; preference.PairSplits)
    data_hash: str
    base_hash: str
    fingerprint: str
    objective: Objective


@dataclass
class _Session:
    """The model ready to train and what trains it (params: with the variants' trainables and the batch resolved)."""

    params: TrainParams
    model: torch.nn.Module
    variants: Variants
    pad_id: int
    trainable: dict[str, torch.nn.Parameter]
    optimizer: Any
    fused: Any
    objective: Objective
    batch: Any = None
    plan: list = field(default_factory=list)
    scheduler: Any = None


def run(
    params: Params,
    layout: Layout,
    tenant: str,
    *,
    base_dir: Path | None = None,
    checkpoints: bool = True,
    progress: bool = False,
) -> TrainResult:
    """The train stage for one tenant: its adapter into models/adapters/<tenant>, the numbers worth
    comparing across runs into reports/<tenant>/metrics/train.json, the loss curves into
    reports/<tenant>/train/ and the run's timing into reports/timing/train@<tenant>.json."""
    started = time.perf_counter()
    train = _in_project(params.train_for(tenant), layout)
    target = remote.Target(layout.root, tenant) if checkpoints and train.checkpoint_remote else None
    inputs = {
        "base_dir": base_dir or layout.base_dir,
        "base_params": params.base,
        "dataset_dir": layout.prepared_dataset_dir(tenant),
        "progress": progress,
    }
    result = train_adapter(
        train,
        out_dir=layout.adapter_dir(tenant),
        checkpoint_dir=layout.checkpoint_dir(tenant) if checkpoints else None,
        checkpoint_remote=target,
        **inputs,
    )
    metrics = train_metrics(result.record)
    # the references train the same steps: the batch the adapter resolved (train.batch_size auto), not a new probe
    train = train.model_copy(update={"batch_size": result.record.batch.rows})
    if train.long_context is not None and train.long_context.reference:
        reference = train_full_attention_reference(train, adapter_dir=result.out_dir, **inputs)
        metrics["full_attention_reference_val_loss"] = reference.record.loss.final_val
    if train.method == "qalora" and train.qalora.reference:
        reference = train_qlora_reference(train, adapter_dir=result.out_dir, **inputs)
        metrics["qlora_reference_val_loss"] = reference.record.loss.final_val
    io.write_json(layout.metrics_path("train", tenant), metrics)
    # The curves also live beside the adapter; DVC plots need them outside the adapter folder.
    plots = layout.train_plots_dir(tenant)
    for curve in (result.train_curve, result.val_curve):
        io.copy_file(curve, plots / curve.name)
    timing = {k: v for k, v in result.timing.items() if k != "wall_s"}  # run_timing times the whole stage
    io.write_timing(layout.timing_path("train", tenant), run_timing(started, **timing))
    # Checkpoints exist to resume a run that was stopped; once the adapter is written they repeat it
    # (with the optimizer's state, about 3x its size: 480 MB at 8B), per tenant, so they go; on the shared
    # remote too, every run's of this tenant: the one this adapter finished and any older one's.
    shutil.rmtree(layout.checkpoint_dir(tenant), ignore_errors=True)
    store = remote.open_store(target)
    if store is not None:
        store.remove_all()
    return result


def train_adapter(
    params: TrainParams,
    *,
    base_dir: Path,
    base_params: BaseParams,
    dataset_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    checkpoint_remote: remote.Target | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train one LoRA adapter into `out_dir` (replaced atomically). `params.seed` must be set
    (Params.train_for fills in the top-level seed). With `checkpoint_dir`, checkpoints are written
    every params.save_every steps and a matching checkpoint found there is resumed from. With
    `checkpoint_remote` too (a project with a default DVC remote), each is also pushed there, and a run that
    finds none of its own locally resumes from the remote's newest (train.remote).

    With `params.devices` > 1 this launches that many data-parallel processes (torchrun; one per
    GPU, or gloo processes on CPU) and returns what rank 0 wrote; see train.distributed."""
    base_dir, dataset_dir, out_dir = Path(base_dir), Path(dataset_dir), Path(out_dir)
    if params.seed is None:
        raise TrainError(
            "train.seed is unset; set it, or build the params with Params.train_for(tenant) (top-level seed)"
        )
    reference = params.preference.reference_adapter if params.objective == "dpo" else None
    if reference is not None and reference.resolve() == out_dir.resolve():
        raise TrainError(
            f"train.preference.reference {str(reference)!r} is the folder this run writes its adapter to; copy the "
            "reference adapter aside (or name its registry copy) so that it stays what the run compares with"
        )
    world = world_from_env()
    autobatch.check_auto_allowed(params.batch_size, params.devices, params.sharding, pick_device())
    if params.devices > 1 and not world.distributed:
        return _launch(
            params, base_dir, base_params, dataset_dir, out_dir, checkpoint_dir, checkpoint_remote, progress
        )
    if world.distributed and world.size != params.devices:
        raise TrainError(
            f"train.devices is {params.devices} but {world.size} processes were launched; they must match"
        )
    with process_group(world, use_cuda=pick_device().type == "cuda", single=params.sharding == "fsdp"):
        return _train(
            params, world, base_dir, base_params, dataset_dir, out_dir, checkpoint_dir, checkpoint_remote, progress
        )


def _launch(
    params: TrainParams,
    base_dir: Path,
    base_params: BaseParams,
    dataset_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path | None,
    checkpoint_remote: remote.Target | None,
    progress: bool,
) -> TrainResult:
    use_cuda = pick_device().type == "cuda"
    if use_cuda and torch.cuda.device_count() < params.devices:
        raise TrainError(
            f"train.devices is {params.devices} but only {torch.cuda.device_count()} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    _read_base(base_dir)  # a missing base fails here, once, not in every rank
    spec = {
        "train": params.model_dump(mode="json"),
        "base": base_params.model_dump(mode="json"),
        "base_dir": str(base_dir),
        "dataset_dir": str(dataset_dir),
        "out_dir": str(out_dir),
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
        "checkpoint_remote": checkpoint_remote.to_dict() if checkpoint_remote is not None else None,
        "progress": progress,
    }
    result = launch(spec, params.devices, use_cuda)
    return TrainResult.of(out_dir, TrainRecord.read(out_dir / TRAIN_RECORD), result["timing"])


def _train(
    params: TrainParams,
    world: World,
    base_dir: Path,
    base_params: BaseParams,
    dataset_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path | None,
    checkpoint_remote: remote.Target | None,
    progress: bool,
) -> TrainResult:
    started = time.perf_counter()
    with phase("read dataset"):
        inputs = _read_inputs(params, base_dir, dataset_dir)
    device = pick_device()
    with _deterministic(device, params.num_threads):
        _seed_everything(params.seed)
        with phase("load base"):
            session = _session(params, base_params, base_dir, inputs, dataset_dir, device, world, progress)
        # rank 0 alone talks to the remote: it fetches a checkpoint for all ranks and pushes what it saves
        store = remote.open_store(checkpoint_remote) if world.main and checkpoint_dir is not None else None
        ckpt = (
            _find_checkpoint(checkpoint_dir, inputs.fingerprint, world, store) if checkpoint_dir is not None else None
        )
        pusher = remote.Pusher(store, inputs.fingerprint) if store is not None else None
        with phase("batch size"):
            _plan(session, ckpt, inputs, device, world)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with phase("steps"):
            state, best, resumed, train_wall, tokens = _run_loop(
                session, ckpt, device, checkpoint_dir, inputs, world, progress, pusher
            )
        if session.params.early_stopping_patience is not None and best is not None:
            with torch.no_grad():  # ship the best-validation adapter, not the one that stopped improving
                for name, p in session.trainable.items():
                    p.copy_(best[name])

    record = _record(session, inputs, state, best, base_dir, dataset_dir, device, world)
    timing = {
        "tokens_per_s": round(tokens / max(train_wall, 1e-9), 1),  # this process's steps
        "peak_memory": _peak_memory(device, world),
        "resumed_from_step": resumed,
        "device": record.device,
        "batch": {"rows": session.batch.rows, "how": session.batch.how, "note": session.batch.note},
    }
    if world.main:
        with io.atomic_dir(out_dir) as tmp, phase("save adapter"):
            tmp.chmod(0o755)
            sort_config_sets(session.model)
            session.model.save_pretrained(tmp)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's blank model card; train_record.json is ours
            write_curves(tmp, state.history)
            record.files = {f: sha256_file(tmp / f) for f in ADAPTER_FILES}
            record.write(tmp / TRAIN_RECORD)
    barrier(world)
    timing["wall_s"] = round(time.perf_counter() - started, 2)
    return TrainResult.of(out_dir, record, timing)


def _read_inputs(params: TrainParams, base_dir: Path, dataset_dir: Path) -> _Inputs:
    base_record = _read_base(base_dir)
    objective = objective_for(params)
    splits = objective.load(dataset_dir, params)
    data_hash = hash_tree(dataset_dir)
    base_hash = base_model_hash(base_record)
    reference = params.preference.reference_adapter if params.objective == "dpo" else None
    reference_hash = check_reference_adapter(reference, base_hash) if reference is not None else None
    fingerprint = _fingerprint(params, data_hash, base_hash, reference_hash)
    return _Inputs(base_record, splits, data_hash, base_hash, fingerprint, objective)


def _in_project(params: TrainParams, layout: Layout) -> TrainParams:
    """train.preference.reference, a folder relative to the project, made a path from here."""
    if params.preference.reference_version is not None:
        raise TrainError(
            f"train.preference.reference {params.preference.reference!r} names a registry version: `loraline train` "
            "(which `dvc repro` and the flows run) fetches it into models/reference/ first; a direct call of the "
            "train stage needs registry.reference.pinned_reference applied to its params"
        )
    folder = params.preference.reference_adapter
    if folder is None or folder.is_absolute():
        return params
    return params.model_copy(update={"preference": params.preference.in_project(layout.root)})


def _session(
    params: TrainParams,
    base_params: BaseParams,
    base_dir: Path,
    inputs: _Inputs,
    dataset_dir: Path,
    device: torch.device,
    world: World,
    progress: bool,
) -> _Session:
    """The base loaded as the adapter's variants load it, checked, with LoRA on it and the optimizer."""
    variants = training_variants(params, base_dir)
    pad_id, model = _load_base(
        params, base_params, base_dir, inputs.base_record, device, world, progress, dataset_dir, variants
    )
    params = with_long_context_trainables(params, model, variants)
    check_module_names(params, model)
    if params.packing:
        check_packing_isolation(model, device, model.get_input_embeddings().num_embeddings)
    _seed_everything(params.seed)  # LoRA's initial weights depend on the seed alone, not on loading
    model = attach_lora(params, model, variants)
    if params.objective == "dpo" and params.preference.reference_adapter is not None:
        start_from_adapter(model, params.preference.reference_adapter, params)  # the policy starts as it
    if world.distributed:
        torch.manual_seed(params.seed + world.rank)  # dropout: one stream per rank, not N copies of one
    trainable = trainable_parameters(model)
    optimizer = make_optimizer(params, trainable, device)
    fused = fused_head(model) if params.fused_cross_entropy else None
    if params.fused_cross_entropy and fused is None:
        log.warning("train.fused_cross_entropy: this model's head is not a plain linear layer; computing full logits")
    return _Session(params, model, variants, pad_id, trainable, optimizer, fused, inputs.objective)


def _plan(
    session: _Session, ckpt: checkpoint.Checkpoint | None, inputs: _Inputs, device: torch.device, world: World
) -> None:
    """The micro-batch (train.batch_size auto: resolved here, with the model loaded; a resumed run keeps its
    recorded batch), the plan of global micro-batches (each rank takes its share of every one: distributed.shard)
    and the scheduler over it."""
    s = session
    s.batch = autobatch.resolve(
        s.params.batch_size,
        device,
        resumed=ckpt.state.get("batch") if ckpt is not None else None,
        probe=lambda: _probe_batch(
            s.params, s.model, s.trainable, device, s.pad_id, inputs.splits.train, s.fused, s.objective
        ),
    )
    s.params = s.params.model_copy(update={"batch_size": s.batch.rows})
    global_batch = s.params.model_copy(update={"batch_size": s.params.batch_size * world.size})
    s.plan = plan_steps([e.n_tokens for e in inputs.splits.train], global_batch, s.params.seed)
    s.scheduler = make_scheduler(s.params, s.optimizer, len(s.plan))


def _run_loop(
    s: _Session,
    ckpt: checkpoint.Checkpoint | None,
    device: torch.device,
    checkpoint_dir: Path | None,
    inputs: _Inputs,
    world: World,
    progress: bool,
    pusher: remote.Pusher | None = None,
) -> tuple[Progress, Any, int | None, float, int]:
    """The training loop from the start or from `ckpt`: (progress, best weights, step resumed from, seconds
    in the loop, tokens this process trained on). With `pusher`, each checkpoint is also pushed to the
    remote, off this thread; the loop returns once the last push is done (or failed)."""
    state, best, start_step = _resume(s, ckpt, checkpoint_dir, world)
    splits = inputs.splits
    run = Run(
        s.model,
        s.trainable,
        s.optimizer,
        s.scheduler,
        s.params,
        device,
        s.pad_id,
        splits.train,
        splits.validation,
        s.plan,
        s.fused,
        world,
        lockstep=s.params.sharding == "fsdp",
        objective=s.objective,
    )
    wall, tokens_before = time.perf_counter(), state.tokens_seen
    saver = _checkpoint_saver(s, checkpoint_dir, inputs, world, pusher) if checkpoint_dir is not None else None
    try:
        state, best = train_loop(
            run, state, start_step=start_step, best=best, save_checkpoint=saver, show_progress=progress and world.main
        )
    finally:
        if pusher is not None:
            pusher.wait()
    resumed = start_step if ckpt is not None else None
    return state, best, resumed, time.perf_counter() - wall, state.tokens_seen - tokens_before


def _resume(
    s: _Session, ckpt: checkpoint.Checkpoint | None, checkpoint_dir: Path | None, world: World
) -> tuple[Progress, Any, int]:
    """(progress, best weights, first step) of a fresh run, or of the run `ckpt` stopped (its weights, optimizer
    and scheduler state loaded)."""
    if ckpt is None:
        return Progress(), None, 0
    if ckpt.step >= len(s.plan) or ckpt.state["data_position"] != _position(s.plan, ckpt.step):
        raise RuntimeError(f"checkpoint {ckpt.path} does not fit this run's data plan; delete {checkpoint_dir}")
    best = checkpoint.load(ckpt, trainable=s.trainable, optimizer=s.optimizer, scheduler=s.scheduler, rank=world.rank)
    s.objective.load_state(checkpoint.objective_state(ckpt))  # DPO: the reference log-probs of the run's start
    log.info("resuming from checkpoint %s (step %d of %d)", ckpt.path, ckpt.step, len(s.plan))
    return Progress.from_dict(ckpt.state["progress"]), best, ckpt.step


def _checkpoint_saver(
    s: _Session, checkpoint_dir: Path, inputs: _Inputs, world: World, pusher: remote.Pusher | None = None
):
    """What the loop calls every train.save_every steps: the run's state saved by rank 0 (and pushed to the
    remote, with a pusher: remote.Pusher)."""

    def save_checkpoint(step: int, prog: Progress, best_now: dict[str, torch.Tensor] | None) -> None:
        rng = gather(checkpoint.capture_rng_state(), world)  # every rank's dropout stream
        if world.main:  # the weights and optimizer state are the same on every rank
            saved = checkpoint.save(
                checkpoint_dir,
                step=step,
                fingerprint=inputs.fingerprint,
                trainable=s.trainable,
                best=best_now,
                optimizer=s.optimizer,
                scheduler=s.scheduler,
                progress=prog.to_dict(),
                position=_position(s.plan, step),
                rng=rng,
                batch=s.batch.to_dict(),
                objective=s.objective.state(),
            )
            if pusher is not None:
                pusher.submit(saved)
        barrier(world)

    return save_checkpoint


def _record(
    s: _Session,
    inputs: _Inputs,
    state: Progress,
    best: Any,
    base_dir: Path,
    dataset_dir: Path,
    device: torch.device,
    world: World,
) -> TrainRecord:
    """train_record.json (less its `files`): what trained, on what, how, and what came out; the variants'
    fields (qalora, long_context) say what they did to the base, for the merge to do it again."""
    params, plan = s.params, s.plan
    steps_done = state.history[-1]["step"] if state.history else 0
    shipped_best = params.early_stopping_patience is not None and best is not None
    return TrainRecord(
        # as asked (`batch`: what ran); not where checkpoints go (TrainParams.NOT_RECORDED)
        params={**params.model_dump(mode="json", exclude=TrainParams.NOT_RECORDED), "batch_size": s.batch.requested},
        batch=s.batch.to_dict(),
        seed=params.seed,
        fingerprint=inputs.fingerprint,
        data=TrainData(
            dataset_dir=str(dataset_dir),
            sha256=inputs.data_hash,
            train_examples=len(inputs.splits.train),
            validation_examples=len(inputs.splits.validation),
        ),
        base=BaseRef(
            dir=str(base_dir),
            source=inputs.base_record.source,
            model_ref=inputs.base_record.model_ref,
            sha256=inputs.base_hash,
        ),
        device=device_name(device),
        devices=world.size,
        sharding=sharding_facts(s.model) if params.sharding == "fsdp" else None,
        compute_dtype=str(compute_dtype(device)).removeprefix("torch."),
        optimizer=type(s.optimizer).__name__,
        speed=Speed(  # which speed options took effect (each falls back where it does not apply)
            attention=getattr(s.model.config, "_attn_implementation", None),
            fused_cross_entropy=s.fused is not None,
            checkpointed_layers=_checkpointed_layers(s.model),
        ),
        steps=Steps(
            planned=len(plan),
            done=steps_done,
            warmup=warmup_steps(params, len(plan)),
            epochs_started=plan[steps_done - 1].epoch + 1 if steps_done else 0,
        ),
        stopped_early=state.stopped_early,
        tokens_seen=TokensSeen(useful=state.tokens_seen, answer=state.answer_tokens_seen),
        loss=Loss(
            final_train=final_train_loss(state.history),
            final_val=state.best_val_loss if shipped_best else _last_val(state.history),  # of the shipped adapter
            base_val=state.base_val_loss,
            best_val=state.best_val_loss,
            best_step=state.best_step,
        ),
        **_preference_record(s, inputs, state, best),
        **s.variants.record(s.model),
        code=code_fingerprint(__name__),
        library_versions=library_versions(),
    )


def _preference_record(s: _Session, inputs: _Inputs, state: Progress, best: Any) -> dict[str, TrainPreference]:
    """{"preference": ...} for a dpo/orpo run (its pairs and reward metrics), nothing for sft."""
    params = s.params
    if params.objective == "sft":
        return {}
    shipped = state.best_step if params.early_stopping_patience is not None and best is not None else None
    summary = preference_summary(state.history, s.objective.metric_names, shipped)
    dpo = params.objective == "dpo"
    return {
        "preference": TrainPreference(
            objective=params.objective,
            beta=params.preference.beta if dpo else None,
            orpo_lambda=None if dpo else params.preference.orpo_lambda,
            reference=params.preference.reference if dpo else None,
            pairs={"train": len(inputs.splits.train), "validation": len(inputs.splits.validation)},
            sft_rows_left_out=inputs.splits.sft_rows,
            **summary,
        )
    }


def _probe_batch(
    params: TrainParams,
    model: torch.nn.Module,
    trainable: dict[str, torch.nn.Parameter],
    device: torch.device,
    pad_id: int,
    examples: list,
    fused: Any,
    objective: Objective,
) -> autobatch.BatchChoice:
    """train.batch_size auto on CUDA: probe steps on the dataset's fullest packed rows, through the loop's own
    loss (same attention layout, fused head and checkpointing as training), leaving no trace (autobatch.untouched)."""
    lengths = [e.n_tokens for e in examples]
    order = list(range(len(examples)))
    rows = pack_rows(lengths, order, params.max_seq_len) if params.packing else [[i] for i in order]
    rows.sort(key=lambda row: -sum(lengths[i] for i in row))
    units = objective.probe_units(examples)
    probe = Run(model, trainable, None, None, params, device, pad_id, units, [], [], fused, objective=objective)

    def step(n: int) -> torch.Tensor:
        for p in trainable.values():
            p.grad = None
        batch = probe.collate(rows[:n], units)
        return objective.step_loss(
            objective.terms(probe, batch), objective.divisors([units[i] for r in rows[:n] for i in r])
        )

    # optimizer state still to come (AdamW: two fp32 moments per trainable weight; 8-bit ones need less)
    optimizer_bytes = 8 * sum(p.numel() for p in trainable.values())
    with autobatch.untouched(model, trainable):
        choice = autobatch.probe_choice(
            autobatch.cuda_measure(step, device),
            device=device,
            optimizer_bytes=optimizer_bytes,
            cap=min(autobatch.MAX_ROWS, len(rows)),
        )
    log.info("train.batch_size %s", choice.note)
    return choice


def _find_checkpoint(
    checkpoint_dir: Path, fingerprint: str, world: World, store: remote.Store | None = None
) -> checkpoint.Checkpoint | None:
    """Rank 0 looks first (it removes other runs' checkpoints, here and on the remote, and fetches this run's
    newest from the remote when it is newer than any here: another machine got further); the others look once
    it is done."""
    found = checkpoint.find_resumable(checkpoint_dir, fingerprint) if world.main else None
    if store is not None:
        store.remove_other_runs(fingerprint)
        if store.fetch_newest(fingerprint, checkpoint_dir, newer_than=found.step if found else -1) is not None:
            found = checkpoint.find_resumable(checkpoint_dir, fingerprint)
    barrier(world)
    return found if world.main else checkpoint.find_resumable(checkpoint_dir, fingerprint)


def _peak_memory(device: torch.device, world: World) -> dict[str, Any]:
    """This process's peak; with several ranks, the highest of them (each rank holds a full model)."""
    peaks = gather(peak_memory(device), world)
    top = max(peaks, key=lambda p: p["bytes"])
    return {**top, "ranks": world.size} if world.distributed else top


def _read_base(base_dir: Path) -> BaseRecord:
    if not base_dir.is_dir():
        raise TrainError(f"base model folder {base_dir} does not exist: run the base stage first (loraline base)")
    try:
        return base_record(base_dir)
    except FileNotFoundError as exc:
        raise TrainError(
            f"base model folder {base_dir} has no base_record.json: it was not written by the base stage ({exc})"
        ) from None


def _load_base(
    params: TrainParams,
    base_params: BaseParams,
    base_dir: Path,
    record: BaseRecord,
    device: torch.device,
    world: World,
    progress: bool,
    dataset_dir: Path,
    variants: Variants,
):
    """(pad id, model), once the dataset's ids are known to be this tokenizer's; a base that cannot be found
    (e.g. a hub id not in the local cache) names itself."""
    try:
        tokenizer = load_base_tokenizer(base_dir, base_params)
        mismatch = tokenizer_mismatch(dataset_dir, tokenizer)
        if mismatch:
            raise TrainError(mismatch)
        return tokenizer.pad_token_id, load_base_model(
            params,
            base_dir,
            device,
            world_size=world.size,
            progress=progress and world.main,
            variants=variants,
        )
    except OSError as exc:
        raise TrainError(
            f"cannot load the base model {record.model_ref!r} recorded in {base_dir / BASE_RECORD} (base.model): {exc}"
        ) from exc


def _fingerprint(params: TrainParams, data_hash: str, base_hash: str, reference_hash: str | None = None) -> str:
    payload = {
        "params": params.model_dump(mode="json", exclude=TrainParams.NOT_RECORDED),  # a run resumes either way
        "data": data_hash,
        "base": base_hash,
        "format": checkpoint.FORMAT,
    }
    if reference_hash is not None:  # DPO from an adapter: a changed adapter is another run
        payload["reference"] = reference_hash
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device; lora_dropout draws from it


@contextlib.contextmanager
def _deterministic(device: torch.device, threads: int | None) -> Iterator[None]:
    """Deterministic kernels on CPU (identical adapters for identical inputs); restored afterwards.
    Not forced on CUDA: bitsandbytes kernels and cuBLAS would need workspace settings and may refuse.
    CPU sums depend on how work is split over threads, so a fixed thread count (train.num_threads)
    is what makes adapter hashes repeat across machines with different core counts."""
    previous, previous_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        if threads:
            torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(previous_threads)


def _position(plan: list, step: int) -> dict[str, int]:
    """Data position of the step after `step` completed ones: the epoch and the step within it."""
    return {"epoch": plan[step].epoch, "step_in_epoch": plan[step].index_in_epoch}


def _checkpointed_layers(model: torch.nn.Module) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)


def _last_val(history: list[dict[str, Any]]) -> float | None:
    vals = [r["val_loss"] for r in history if r["val_loss"] is not None and r["step"] > 0]
    return vals[-1] if vals else None


def train_full_attention_reference(
    params: TrainParams,
    *,
    base_dir: Path,
    base_params: BaseParams,
    dataset_dir: Path,
    adapter_dir: Path,
    progress: bool = False,
) -> TrainResult:
    """LongLoRA's reference (train.long_context.reference): the same adapter trained with full attention
    instead of S2-Attn, on the same data, steps and seed, into <adapter_dir>/full_attention_reference,
    for the evaluation to set beside the S2-Attn adapter (the paper's claim: close to full attention)."""
    lc = params.long_context
    if lc is None or not lc.s2_attn:
        raise TrainError("a full-attention reference is trained only for an S2-Attn long-context adapter")
    reference = params.model_copy(
        update={"long_context": lc.model_copy(update={"s2_attn": False, "reference": False})}
    )
    return train_adapter(
        reference,
        base_dir=base_dir,
        base_params=base_params,
        dataset_dir=dataset_dir,
        out_dir=Path(adapter_dir) / FULL_ATTENTION_REFERENCE,
        progress=progress,
    )


def train_qlora_reference(
    params: TrainParams,
    *,
    base_dir: Path,
    base_params: BaseParams,
    dataset_dir: Path,
    adapter_dir: Path,
    progress: bool = False,
) -> TrainResult:
    """QA-LoRA's reference (train.qalora.reference): the same adapter trained as the pipeline's lora method
    (QLoRA with the default quantization) on the same data, steps and seed, into
    <adapter_dir>/qlora_reference, for the evaluation to compare QA-LoRA with QLoRA merged in float
    and rounded after training."""
    if params.method != "qalora":
        raise TrainError("a QLoRA reference is trained only for a QA-LoRA adapter (train.method qalora)")
    reference = params.model_copy(
        update={"method": "lora", "qalora": params.qalora.model_copy(update={"reference": False})}
    )
    return train_adapter(
        reference,
        base_dir=base_dir,
        base_params=base_params,
        dataset_dir=dataset_dir,
        out_dir=Path(adapter_dir) / QLORA_REFERENCE,
        progress=progress,
    )


def train_metrics(record: TrainRecord) -> dict[str, Any]:
    """The numbers of a training run worth comparing across runs (`dvc metrics diff`)."""
    loss = record.loss
    base, val = loss.base_val, loss.final_val
    gain = (base - val) / base if base and val is not None else None
    return {
        "val_loss_base": base,
        "val_loss": val,
        "val_loss_gain": None if gain is None else round(gain, 6),
        "train_loss": loss.final_train,
        "steps": record.steps.done,
        "tokens_seen": record.tokens_seen.useful,
        **_preference_metrics(record),
    }


def _preference_metrics(record: TrainRecord) -> dict[str, Any]:
    """A dpo/orpo run's reward accuracy and margin (validation pairs; the base's at step 0), beside the loss."""
    pref = record.preference
    if pref is None:
        return {}
    val, base, train = pref.final_val, pref.base_val, pref.train
    return {
        "objective": pref.objective,
        "reward_accuracy": val.reward_accuracy if val else None,
        "reward_accuracy_base": base.reward_accuracy if base else None,
        "reward_margin": val.reward_margin if val else None,
        "train_reward_accuracy": train.reward_accuracy if train else None,
    }

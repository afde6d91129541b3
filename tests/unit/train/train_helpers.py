"""Helpers for the train-stage tests (a uniquely named module: conftest.py names clash across folders)."""

from __future__ import annotations

import json
from pathlib import Path

from loraline.config import BuildParams, TrainParams

TEAMS = {"printer": "hardware", "vpn": "network", "password": "identity", "mailbox": "email", "database": "database"}
PRIORITIES = {"down": "P1", "slow": "P2", "question": "P4"}
PEOPLE = ("Ana", "Bo", "Chen", "Dita", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea")


def tiny_build(**overrides) -> BuildParams:
    fields = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=256,
        seq_len=64,
        batch_size=4,
        max_steps=150,
        warmup_steps=5,
        learning_rate=3e-3,
        num_threads=1,
        stdlib_docstrings=False,
        max_stdlib_chars=0,
        exercises=60,
        copy_drill_steps=0,
    )
    fields.update(overrides)
    return BuildParams(**fields)


def tiny_train(**overrides) -> TrainParams:
    """Small, fast settings: fp32 LoRA, a few steps, frequent evals and checkpoints."""
    fields = dict(
        quantization="none",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        optimizer="adamw_torch",
        learning_rate=5e-3,
        warmup_ratio=0.1,
        max_steps=12,
        batch_size=4,
        grad_accum=2,
        max_seq_len=256,
        eval_every=4,
        save_every=3,
        seed=11,
    )
    fields.update(overrides)
    return TrainParams(**fields)


def triage_rows(n: int) -> list[dict]:
    """A learnable toy task: the ticket's keywords decide the answer, which is formulaic JSON."""
    rows = []
    topics, moods = list(TEAMS), list(PRIORITIES)
    for i in range(n):
        topic, mood, who = topics[i % len(topics)], moods[(i // len(topics)) % len(moods)], PEOPLE[i % len(PEOPLE)]
        user = f"Ticket {1000 + i} from {who}: the {topic} is {mood}. Please route it."
        answer = json.dumps({"team": TEAMS[topic], "priority": PRIORITIES[mood]})
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return rows


def build_tiny_base(root: Path, seed: int = 5, rows: int = 60):
    """The tiny base the stage tests share, built from `rows` triage rows on one torch thread (so it
    repeats bit for bit); the thread count is restored after. Returns build_base's result."""
    import torch

    from loraline.base.stage import build_base
    from loraline.config import BaseParams

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_base(
            BaseParams(build=tiny_build()), seed=seed, raw_dirs=[make_raw(root / "raw", n=rows)], out_dir=root / "base"
        )
    finally:
        torch.set_num_threads(previous)


def make_raw(root: Path, n: int = 150) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in triage_rows(n)), encoding="utf-8")
    (root / "routing.md").write_text(
        "# Routing\n\nPrinters go to hardware, VPN to network, passwords to identity, mailboxes to email.\n",
        encoding="utf-8",
    )
    return root


THREADS = 1


def adapter_tensors(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(out_dir) / "adapter_model.safetensors")


def train_losses(path: Path) -> list[float]:
    """The per-step training losses a run wrote to its train_loss.csv."""
    import csv

    with open(path, newline="") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh)]


def write_general_sample(params, layout, base_dir: Path, tenant: str) -> None:
    """What the prepare stage leaves for evaluate's forgetting check (data/general/<tenant>), from the built
    base's held-out general_text.jsonl copied to the project's models/base (evaluate.general's default path)."""
    import shutil

    from loraline.layout import GENERAL_TEXT
    from loraline.modelling.loading import load_base_tokenizer
    from loraline.prepare.general import general_sample
    from loraline.prepare.general import write_general_sample as write

    layout.base_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(base_dir) / GENERAL_TEXT, layout.base_dir / GENERAL_TEXT)
    tok = load_base_tokenizer(Path(base_dir), params.base)
    write(general_sample(params.evaluate.general, params.prepare, tok, layout.root), layout.general_sample_dir(tenant))

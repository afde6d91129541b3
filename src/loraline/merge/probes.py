"""The merge stage's probe set: the built-in conversations (parity.DEFAULT_PROBES) and up to merge.probes
prompts drawn from the tenant's own test split, so that the deployment check asks what the tenant asks.

The draw ranks the test rows by sha256 of "<seed>:<tenant>:<row id>" (a row's id is its content hash) and
takes the first `count` whose prompt fits. A row's rank depends on nothing but itself: the same probes on
every run, machine and environment, and adding or removing other rows leaves them drawn unless a new row
ranks before them. A prompt is the conversation before the row's last assistant turn, rendered with the
base's chat template as evaluate renders it. One longer than `max_prompt_tokens` is skipped, not cut (a cut
conversation is not one the tenant sends), and the next in rank order is taken; the report lists the
skipped rows.

Where they run: on CUDA all together, in batches of parity.CUDA_PROBE_BATCH; on the CPU the built-in ones one
at a time, as they always ran there (the same numbers in the reports), and the drawn ones CPU_DRAWN_BATCH at
a time, left-padded: on 2 cores 8 of the sample tenant's prompts in one batch took half the time or less that
they took one at a time (the merged model and the unmerged adapter alike).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraline.modelling.conversation import split_conversation
from loraline.modelling.parity import ProbeOutputs, encode_probe, probe_batch_size, prompt_logits, run_probes

BUILTIN = "builtin"
TEST = "test"
CPU_DRAWN_BATCH = 16


@dataclass(frozen=True)
class Probe:
    """One prompt of the probe set, as token ids ready for the assistant's turn, and where it comes from."""

    source: str  # BUILTIN or TEST
    id: str  # BUILTIN: its index in the built-in list; TEST: the test row's id
    prompt: list[int]

    def origin(self) -> dict[str, str]:
        return {"source": self.source, "id": self.id}


@dataclass(frozen=True)
class TenantDraw:
    """What to draw from a tenant's test split: merge.probes rows of the prepared dataset, ranked under the seed."""

    dataset_dir: Path
    tenant: str
    seed: int
    count: int
    max_prompt_tokens: int


@dataclass(frozen=True)
class ProbeSet:
    probes: list[Probe]
    draw: TenantDraw | None = None
    test_rows: int = 0  # rows in the test split (0 without a draw)
    skipped_long: list[str] = field(default_factory=list)  # ids of ranked rows passed over as too long

    @property
    def prompts(self) -> list[list[int]]:
        return [p.prompt for p in self.probes]

    def count(self, source: str) -> int:
        return sum(p.source == source for p in self.probes)

    def batches(self, device: torch.device) -> list[tuple[list[list[int]], int]]:
        """The prompts in the order of `probes`, as (prompts, batch size) groups for `device` (module docstring);
        the built-in probes come first in every set."""
        if device.type == "cuda":
            return [(self.prompts, probe_batch_size(device))]
        groups = [
            ([p.prompt for p in self.probes if p.source == source], size)
            for source, size in ((BUILTIN, 1), (TEST, CPU_DRAWN_BATCH))
        ]
        return [(prompts, size) for prompts, size in groups if prompts]

    def facts(self) -> dict[str, Any]:
        """The probe set as the merge report records it (probes: ...)."""
        out: dict[str, Any] = {
            "count": len(self.probes),
            BUILTIN: self.count(BUILTIN),
            "tenant": self.count(TEST),
            "prompt_tokens": [len(p.prompt) for p in self.probes],
        }
        if self.draw is not None:
            out["tenant_draw"] = {
                "split": TEST,
                "requested": self.draw.count,
                "test_rows": self.test_rows,
                "seed": self.draw.seed,
                "order": "sha256 of '<seed>:<tenant>:<row id>', ascending",
                "max_prompt_tokens": self.draw.max_prompt_tokens,
                "skipped_long": self.skipped_long,
            }
        return out


def probe_set(
    tok: Any, builtin: list[list[dict[str, str]]], draw: TenantDraw | None, error: type[Exception] = ValueError
) -> ProbeSet:
    """The built-in conversations encoded with `tok`, then the probes `draw` takes from the tenant's test split
    (none when `draw` is None or asks for 0)."""
    probes = [Probe(BUILTIN, str(i), encode_probe(tok, conv, error)) for i, conv in enumerate(builtin)]
    if draw is None or draw.count == 0:
        return ProbeSet(probes)
    test = _test_split(draw.dataset_dir, error)
    skipped: list[str] = []
    for index in ranked_rows(list(test["id"]), draw.seed, draw.tenant):
        if len(probes) - len(builtin) == draw.count:
            break
        row = test[index]
        row_id = row["id"]
        try:
            context, _ = split_conversation(row["messages"])
        except ValueError as exc:
            raise error(f"{draw.dataset_dir} test row {row_id}: {exc}") from exc
        prompt = encode_probe(tok, context, error)
        if len(prompt) > draw.max_prompt_tokens:
            skipped.append(row_id)
            continue
        probes.append(Probe(TEST, row_id, prompt))
    return ProbeSet(probes, draw, len(test), skipped)


def run_probe_set(model: Any, tok: Any, probes: ProbeSet, max_new_tokens: int, logits: bool = True) -> ProbeOutputs:
    """parity.run_probes on every probe of the set, batched as ProbeSet.batches says for the model's device
    (`logits` False: the generations alone)."""
    batches = probes.batches(model.device)
    parts = [run_probes(model, tok, prompts, max_new_tokens, size, logits) for prompts, size in batches]
    return ProbeOutputs(
        [x for p in parts for x in p.logits], [x for p in parts for x in p.greedy], [x for p in parts for x in p.texts]
    )


def probe_set_logits(model: Any, probes: ProbeSet, pad_token_id: int | None) -> list[torch.Tensor]:
    """parity.prompt_logits on every probe of the set, in the same batches as run_probe_set."""
    return [
        x for prompts, size in probes.batches(model.device) for x in prompt_logits(model, prompts, pad_token_id, size)
    ]


def ranked_rows(ids: list[str], seed: int, tenant: str) -> list[int]:
    """Row indices in draw order: by sha256 of "<seed>:<tenant>:<id>" (ties, i.e. repeated ids, by position)."""

    def key(index: int) -> tuple[str, int]:
        return hashlib.sha256(f"{seed}:{tenant}:{ids[index]}".encode()).hexdigest(), index

    return sorted(range(len(ids)), key=key)


def _test_split(dataset_dir: Path, error: type[Exception]) -> Any:
    import datasets

    if not Path(dataset_dir).is_dir():
        raise error(
            f"merge.probes draws from the prepared dataset, but {dataset_dir} does not exist: run the prepare "
            "stage for this tenant first, or set merge.probes: 0"
        )
    dd = datasets.load_from_disk(str(dataset_dir))
    if "test" not in dd:
        raise error(f"{dataset_dir} has no test split for merge.probes to draw from (splits: {', '.join(dd)})")
    return dd["test"].select_columns(["id", "messages"])

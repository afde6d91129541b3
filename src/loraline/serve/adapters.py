"""An adapter vLLM can serve: trained embeddings (peft's modules_to_save) re-expressed as LoRA, exactly.

vLLM loads LoRA matrices only; it refuses an adapter that carries whole trained modules
(`modules_to_save`), which is how the sample tenants train their embeddings. A trained copy E' of a
(vocab x hidden) embedding differs from the base's E by D = E' - E, whose rank is at most
min(vocab, hidden). Its SVD, D = U S V^T, kept to the singular values that are not zero in float32,
is a LoRA pair of that rank that reproduces D to float rounding: on `embed_tokens` (the lookup) and on
`lm_head` when a head copy was trained too (peft's `ensure_weight_tying` on a tied base saves both;
on a tied base the head's delta is measured against the one shared matrix).

vLLM serves one LoRA rank for all modules of an adapter, so the adapter's other LoRA pairs are
zero-padded to that rank, with their scaling folded into B (alpha = r: scaling 1). The result is the
same function as the trained adapter; `check_same_function` measures it with peft on the base.

This only suits small vocabularies and hidden sizes (the built base: rank <= 256). For a real base,
train without `modules_to_save` (LoRA only), which vLLM loads as it is.

A QA-LoRA adapter (train.method: qalora) is re-expressed the same way: its A matrix, which reads the
input averaged over groups, becomes the plain (rank x input) matrix of the same linear map. On the
shared base it adds the trained update to the float weights, not to the low-bit ones it was trained
and gated on, so its answers may differ from the merged low-bit model's: the deployment check
(serve.deployment) measures exactly that on the merge stage's probes and refuses a version that differs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraline import io
from loraline.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAIN_RECORD
from loraline.records import TrainRecord

PREFIX = "base_model.model."
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the LoRA ranks vLLM accepts (max_lora_rank)


class ServeAdapterError(ValueError):
    """An adapter that cannot be turned into LoRA-only matrices; the message says which module and why."""


@dataclass(frozen=True)
class ServableAdapter:
    path: Path
    converted: bool  # False: the adapter was LoRA-only already and is served as it is
    rank: int  # the LoRA rank vLLM needs (--max-lora-rank at least this)
    modules: list[str]  # the modules whose trained copies became LoRA pairs


def _refuse_long_context(adapter_dir: Path) -> None:
    """A LongLoRA adapter (train.long_context) was trained on the base with its rope rescaled, and
    trains every norm: one shared vLLM base cannot change its rope per tenant, so it cannot be one
    adapter among others there."""
    record_path = adapter_dir / TRAIN_RECORD
    if not record_path.is_file():
        return
    long_context = TrainRecord.read(record_path).long_context
    if long_context:
        raise ServeAdapterError(
            f"{adapter_dir}: a long-context adapter (train.long_context, {long_context.original_context} -> "
            f"{long_context.target_len} tokens) needs the base's rope scaled, which a shared vLLM base cannot do per "
            "tenant; serve its merged model (models/merged/<tenant>) with a vLLM server of its own"
        )


def unpool_qalora(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A QA-LoRA adapter as plain LoRA, exactly: its A matrix reads the input averaged over groups of G
    channels and peft scales that by the number of groups n, so A_plain[:, j] = A[:, j // G] * n / G
    (an (r x in) matrix that is the same linear map). On the shared float base it computes the adapter's
    update on the unquantized weights; the deployment check measures what that changes in the answers."""
    group = int(config["qalora_group_size"])
    out = dict(tensors)
    for key, a in tensors.items():
        if ".lora_A." in key:
            groups = a.shape[1]
            out[key] = (a.float().repeat_interleave(group, dim=1) * (groups / group)).to(a.dtype)
    return {**config, "use_qalora": False}, out


def make_servable(adapter_dir: Path, base_dir: Path, out_dir: Path) -> ServableAdapter:
    """Write into `out_dir` (atomically) an adapter vLLM loads with the same function as `adapter_dir`."""
    adapter_dir, base_dir, out_dir = Path(adapter_dir), Path(base_dir), Path(out_dir)
    config: dict[str, Any] = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    _refuse_long_context(adapter_dir)
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    pooled = bool(config.get("use_qalora"))
    if pooled:
        config, tensors = unpool_qalora(config, tensors)
    saved = [k for k in tensors if ".lora_" not in k]  # whole trained modules (modules_to_save)
    if not saved:
        if pooled:
            write_adapter(out_dir, config, tensors)
        else:
            with io.atomic_dir(out_dir) as tmp:
                for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    shutil.copyfile(adapter_dir / name, tmp / name)
        return ServableAdapter(out_dir, pooled, serving_rank(int(config["r"])), [])
    pairs, rank = _saved_module_deltas(adapter_dir, base_dir, config, tensors, saved)
    r = serving_rank(max(rank, int(config["r"])))
    write_adapter(out_dir, _servable_config(config, r, pairs), _servable_tensors(config, tensors, pairs, r))
    return ServableAdapter(out_dir, True, r, sorted(pairs))


def _saved_module_deltas(
    adapter_dir: Path, base_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], saved: list[str]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Each trained whole module (the embedding, the head) as its change from the base, factored:
    (module -> (U S, V^T), the rank that keeps every change)."""
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ServeAdapterError(
            f"{adapter_dir}: DoRA and per-module rank/alpha patterns cannot be re-expressed for vLLM"
        )
    by_module: dict[str, str] = {}
    for key in saved:
        module = key.removeprefix(PREFIX).removesuffix(".weight")
        if not (module.endswith("embed_tokens") or module == "lm_head"):
            raise ServeAdapterError(f"{adapter_dir}: trained module {module} is neither the embedding nor the head")
        by_module[module] = key
    # A tied base stores one matrix (the embedding); a trained head copy is measured against it.
    names = _keys(base_dir)
    embed_name = next((n for n in sorted(names) if n.endswith("embed_tokens.weight")), None)
    reference = {
        m: ("lm_head.weight" if "lm_head.weight" in names else embed_name) if m == "lm_head" else f"{m}.weight"
        for m in by_module
    }
    if any(name is None or name not in names for name in reference.values()):
        raise ServeAdapterError(f"base model {base_dir} lacks the tensors the trained modules replace: {reference}")
    base = _base_tensors(base_dir, sorted(set(reference.values())))  # type: ignore[arg-type]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (U S, V^T) of its delta
    rank = 1
    for module, key in by_module.items():
        us, vh, keep = _factor(tensors[key].float() - base[reference[module]], module)  # type: ignore[index]
        pairs[module] = (us, vh)
        rank = max(rank, keep)
    return pairs, rank


def _servable_tensors(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    r: int,
) -> dict[str, torch.Tensor]:
    """The LoRA pairs at rank `r` with their scaling folded into B, plus one pair per trained whole module."""
    out: dict[str, torch.Tensor] = {}
    old_scaling = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    for key, t in tensors.items():
        if ".lora_A." in key:
            out[key] = _pad_rows(t.float(), r)
        elif ".lora_B." in key:
            out[key] = _pad_cols(t.float() * old_scaling, r)
    for module, (us, vh) in pairs.items():
        if module == "lm_head":  # Linear(hidden -> vocab): W + B @ A, B (vocab x r), A (r x hidden)
            out[f"{PREFIX}lm_head.lora_A.weight"] = _pad_rows(vh, r)
            out[f"{PREFIX}lm_head.lora_B.weight"] = _pad_cols(us, r)
        else:  # peft Embedding: E + (B @ A)^T, A (r x vocab), B (hidden x r)
            out[f"{PREFIX}{module}.lora_embedding_A"] = _pad_rows(us.T.contiguous(), r)
            out[f"{PREFIX}{module}.lora_embedding_B"] = _pad_cols(vh.T.contiguous(), r)
    return out


def _servable_config(config: dict[str, Any], r: int, pairs: dict[str, Any]) -> dict[str, Any]:
    """The adapter config of _servable_tensors: rank `r`, scaling 1 (alpha = r), the trained modules as targets."""
    targets = config["target_modules"]
    targets = sorted({*(targets if isinstance(targets, list) else [targets]), *[m.split(".")[-1] for m in pairs]})
    return {
        **config,
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "target_modules": targets,
        "modules_to_save": None,
        "ensure_weight_tying": False,
    }


def write_adapter(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A peft adapter folder (its config and safetensors weights), written atomically."""
    with io.atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp / ADAPTER_WEIGHTS))
        io.write_json(tmp / ADAPTER_CONFIG, config)


def _keys(base_dir: Path) -> set[str]:
    names: set[str] = set()
    for shard in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            names |= set(fh.keys())
    return names


def _base_tensors(base_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            for name in set(names) & set(fh.keys()):
                found[name] = fh.get_tensor(name).float()
    return found


def _factor(delta: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(U S, V^T) of `delta` kept to its numerical rank: delta ~= (U S) @ V^T."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = max(1, int((s > s[0] * 1e-7).sum().item())) if s.numel() and s[0] > 0 else 1
    if keep > VLLM_RANKS[-1]:
        raise ServeAdapterError(
            f"{what}: the trained copy differs from the base's with rank {keep}, more than vLLM's largest LoRA "
            f"rank {VLLM_RANKS[-1]}; train this tenant without modules_to_save to serve it through vLLM"
        )
    return (u[:, :keep] * s[:keep]).float(), vh[:keep].float(), keep


def serving_rank(needed: int) -> int:
    """The smallest LoRA rank vLLM accepts that holds `needed` (callers check it is not above the largest)."""
    return next(r for r in VLLM_RANKS if r >= needed)


def _pad_rows(t: torch.Tensor, r: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(r - t.shape[0], t.shape[1])]) if t.shape[0] < r else t


def _pad_cols(t: torch.Tensor, r: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], r - t.shape[1])], dim=1) if t.shape[1] < r else t


@torch.no_grad()
def check_same_function(base_dir: Path, original: Path, servable: Path, input_ids: list[int]) -> float:
    """Max |logit difference| between the base with `original` and with `servable` (peft, fp32, CPU)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([input_ids])
    logits = []
    for adapter in (original, servable):
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        logits.append(model(input_ids=ids).logits)
    return float((logits[0] - logits[1]).abs().max())

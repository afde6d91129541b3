"""Sharded base weights (train.sharding: fsdp): each of N ranks keeps 1/N of every decoder layer.

For bases whose (4-bit) weights do not fit one GPU. The base is never whole on one device: the
model is laid out on the meta device, then each decoder layer in turn is read from the checkpoint
(its tensors only), quantized on this rank's device and handed to FSDP2 (`fully_shard`), which
keeps this rank's shard and frees the rest. Peak memory while loading: the shards so far plus one
layer in 16 bits.

What FSDP manages is the frozen base weights of the decoder layers, nothing else. LoRA is attached
after sharding, so its small matrices and their optimizer state stay whole on every rank and their
gradients are summed by distributed.sum_grads, as in the data-parallel path: FSDP all-gathers a
layer's weights before its forward (again before its backward or its recomputation) and never has
a gradient to reduce. Embeddings, the final norm and the head stay whole on every rank. Because
every all-gather is a collective, the ranks run the same number of forward passes (loop.lockstep).

4-bit weights keep bitsandbytes' packed codes and constants; which dtype holds the codes, and why
their bytes must never pass through float arithmetic, is in _packed_storage. The first layer is
gathered back once at load and compared bit for bit with what was sharded: a mismatch stops the
stage instead of training on silently wrong weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from loraline.config import TrainParams
from loraline.modelling.loading import base_load_kwargs, base_record, resolve_base_model_path
from loraline.train.errors import TrainError

log = logging.getLogger(__name__)

# name -> tensor on the given device; the checkpoint's tensors by default (bench/ passes random ones).
TensorSource = Callable[[str, torch.device], torch.Tensor]


def checkpoint_tensors(folder: Path) -> tuple[set[str], TensorSource]:
    """The tensor names of a safetensors checkpoint folder and a reader for one tensor at a time."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = {
            name: folder / file for name, file in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()
        }
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            where = dict.fromkeys(f.keys(), folder / "model.safetensors")
    else:
        raise TrainError(
            f"train.sharding fsdp: {folder} has no model.safetensors(.index.json); "
            "sharded loading reads safetensors only"
        )

    def read(name: str, device: torch.device) -> torch.Tensor:
        with safe_open(where[name], framework="pt", device=str(device)) as f:
            return f.get_tensor(name)

    return set(where), read


def model_folder(base_dir: Path) -> Path:
    """The folder holding the base's weights: the built one, a recorded local folder, or the hub cache."""
    ref = Path(resolve_base_model_path(base_dir))
    if ref.is_dir():
        return ref
    from huggingface_hub import snapshot_download

    record = base_record(base_dir)
    return Path(snapshot_download(record.model_ref, revision=record.revision, local_files_only=True))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the largest ModuleList of checkpointable layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lists = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and m and all(isinstance(x, GradientCheckpointingLayer) for x in m)
    ]
    if not lists:
        raise TrainError(f"train.sharding fsdp: found no stack of decoder layers in {type(model).__name__}")
    return max(lists, key=len)


def load_sharded_base(
    params: TrainParams,
    base_dir: Path,
    device: torch.device,
    world_size: int,
    *,
    tensors: tuple[set[str], TensorSource] | None = None,
    progress: bool = False,
) -> nn.Module:
    """The base causal LM with every decoder layer's frozen weights sharded over the `world_size` ranks.

    Every rank calls this (the sharding is collective). `tensors` replaces the checkpoint's tensors
    (names, reader), for benchmarks with random weights of a shape no disk holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraline.modelling.device import compute_dtype

    dtype = compute_dtype(device)
    kwargs = base_load_kwargs(base_dir)
    config = AutoConfig.from_pretrained(resolve_base_model_path(base_dir), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=kwargs.get("trust_remote_code", False)
        )
    expected, tied = _expected_names(model)
    mesh = init_device_mesh(device.type, (world_size,))
    if params.quantization != "none":
        _quantize_layout(model, params, dtype, _packed_storage(mesh, device, dtype))
    names, read = tensors or checkpoint_tensors(model_folder(base_dir))
    missing = sorted(expected - names)
    if missing:
        raise TrainError(
            f"train.sharding fsdp: the checkpoint of {base_dir} lacks {len(missing)} tensor(s) the model needs, "
            f"e.g. {', '.join(missing[:3])}; sharded loading needs a checkpoint whose names match the model's "
            "(set train.sharding: none to load it through transformers)"
        )
    layers = decoder_layers(model)
    prefix = {m: name for name, m in model.named_modules()}
    from loraline.progress import progress_bar

    for i, layer in enumerate(progress_bar(layers, desc="load and shard", unit="layer", disable=not progress)):
        _materialize(layer, prefix[layer] + ".", read, device, dtype, tied)
        described = _four_bit_settings(layer)
        before = {name: p.detach().clone() for name, p in layer.named_parameters()} if i == 0 else None
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        for module, settings in described:  # the sharded parameter keeps what peft reads off a 4-bit weight
            for key, value in settings.items():
                setattr(module.weight, key, value)
        if before is not None:
            _check_gather_is_exact(layer, before)
    _materialize(model, "", read, device, dtype, tied)  # the rest: embeddings, final norm, head (whole)
    _rebuild_meta_buffers(model, device)
    model.tie_weights()
    if params.quantization != "none":
        # what transformers' 4-bit loading marks, and peft reads to wrap Linear4bit in its 4-bit LoRA layer
        model.is_quantized, model.quantization_method, model.is_loaded_in_4bit = True, "bitsandbytes", True
        _keep_quant_state_on_gathered_weights(model)
    return model


def _packed_storage(mesh, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype that holds the packed 4-bit codes: uint8 (bitsandbytes' own) where this torch's
    FSDP2 shards a frozen integer parameter. Older FSDP2 (torch 2.11) makes every sharded parameter
    require grad, which an integer cannot; there a float container is used whose dtype differs from
    the layer's other weights, so FSDP gathers the layer's mixed dtypes as raw bytes. (A container
    in the compute dtype is gathered as that dtype, and on CUDA that rewrote a packed byte that
    formed a NaN: measured on torch 2.11, as bitsandbytes issue 1945 reports.)"""
    from torch.distributed.fsdp import fully_shard

    probe = nn.Module()
    probe.packed = nn.Parameter(torch.zeros(2 * mesh.size(), 1, dtype=torch.uint8, device=device), requires_grad=False)
    try:
        fully_shard(probe, mesh=mesh)
    except RuntimeError as exc:
        container = torch.float32 if dtype != torch.float32 else torch.float16
        log.info("train.sharding fsdp: packed 4-bit codes held as %s (%s)", container, exc)
        return container
    return torch.uint8


def _check_gather_is_exact(layer: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Gather the first sharded layer back and compare it bit for bit with what was sharded: packed
    4-bit codes in a float container must survive FSDP's copies unchanged (bitsandbytes issue 1945
    reports NaN-patterned codes rewritten), or every matmul of the layer is silently wrong."""
    layer.unshard()
    try:
        for name, p in layer.named_parameters():
            got, want = p.detach(), before[name]
            if got.shape != want.shape or not torch.equal(
                got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
            ):
                raise TrainError(
                    f"train.sharding fsdp: FSDP does not give back the weights it sharded ({name}); this torch "
                    f"({torch.__version__}) cannot shard this base exactly: set train.sharding: none"
                )
    finally:
        layer.reshard()


def _quantize_layout(model: nn.Module, params: TrainParams, dtype: torch.dtype, storage: torch.dtype) -> None:
    """Swap the decoder layers' nn.Linear for bitsandbytes Linear4bit (still on meta)."""
    import bitsandbytes as bnb

    for layer in decoder_layers(model):
        for name, module in list(layer.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        compute_dtype=dtype,
                        compress_statistics=params.double_quant,
                        quant_type=params.quantization,
                        quant_storage=storage,
                        device="meta",
                    )
                    setattr(module, child_name, q)


def _four_bit_settings(layer: nn.Module) -> list[tuple[nn.Module, dict]]:
    import bitsandbytes as bnb

    keys = ("quant_type", "compress_statistics", "blocksize", "quant_storage")
    return [(m, {k: getattr(m.weight, k) for k in keys}) for m in layer.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _expected_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """(names the checkpoint must hold, names of parameters tied to another: tie_weights sets them)."""
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    return set(model.state_dict(keep_vars=True)) - tied, tied


def _materialize(
    root: nn.Module, prefix: str, read: TensorSource, device: torch.device, dtype: torch.dtype, tied: set[str]
) -> None:
    """Load every meta parameter and persistent buffer under `root` from the checkpoint, frozen;
    4-bit layers are quantized on `device` as their weight arrives."""
    import bitsandbytes as bnb

    for mod_name, module in root.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            full = f"{prefix}{mod_name}.{pname}" if mod_name else f"{prefix}{pname}"
            if full in tied:
                continue
            value = read(full, device)
            if isinstance(module, bnb.nn.Linear4bit) and pname == "weight":
                weight = bnb.nn.Params4bit(
                    value.to(dtype),
                    requires_grad=False,
                    quant_type=module.weight.quant_type,
                    compress_statistics=module.weight.compress_statistics,
                    quant_storage=module.weight.quant_storage,
                    module=module,
                )
                module.weight = weight.to(device)  # quantizes; the constants land on module.quant_state
            else:
                setattr(
                    module,
                    pname,
                    nn.Parameter(
                        value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype),
                        requires_grad=False,
                    ),
                )
        persistent = set(module.state_dict(keep_vars=True)) if module._buffers else set()
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_meta and bname in persistent:
                full = f"{prefix}{mod_name}.{bname}" if mod_name else f"{prefix}{bname}"
                module._buffers[bname] = read(full, device).to(device)


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers no checkpoint holds (rotary inverse frequencies) are computed in the module's
    constructor: build that module again on the device."""
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise TrainError(
                f"train.sharding fsdp: {name} ({type(module).__name__}) "
                "has buffers that cannot be rebuilt off the meta device"
            )
        with torch.device(device):
            fresh = type(module)(config=config)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fresh)


def _keep_quant_state_on_gathered_weights(model: nn.Module) -> None:
    """FSDP hands a 4-bit layer a plain tensor (the gathered bytes) where its Params4bit was; give
    that tensor the module's quantization constants before the layer runs (bitsandbytes would
    otherwise re-wrap it on every call, replacing the parameter FSDP manages)."""
    import bitsandbytes as bnb

    def attach(module: nn.Module, _args) -> None:
        if getattr(module.weight, "quant_state", None) is None:
            module.weight.quant_state = module.quant_state

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.register_forward_pre_hook(attach)


def sharding_facts(model: nn.Module) -> dict[str, int]:
    """Sharded layers, and the bytes of their frozen weights this rank holds against the whole
    (FSDP pads a shard to equal sizes); `whole_bytes` is what every rank holds in full (embeddings,
    final norm, head)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    held = total = whole = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        if isinstance(p, DTensor):
            local = p.to_local()
            held += local.numel() * local.element_size()
            total += p.numel() * p.element_size()
        else:
            whole += p.numel() * p.element_size()
    layers = sum(isinstance(m, FSDPModule) for m in model.modules())
    return {"sharded_layers": layers, "layer_bytes_held": held, "layer_bytes": total, "whole_bytes": whole}

"""Adapter variants: what QA-LoRA and LongLoRA change about the plain LoRA path, as objects the stages call.

Modelled on peft's tuners/lora/variants.py: the core (train, merge) runs the plain LoRA path and calls every
hook of the adapter's variant unconditionally; the plain `AdapterVariant` answers each hook with the plain
step (its own dtype, no config change, peft's loader, nothing after the merge, no extra record fields).

    QALoraVariant       train.method qalora: the base quantized group-wise from float32 weights, peft's
                        QA-LoRA layers on it; merged, the codes and scales go beside the float weights
    LongContextVariant  train.long_context: the base's rope scaled to a longer context (a config override
                        that every later load applies), embeddings and norms trained, S2-Attn in training

Invariants:
- The variants compose, as the params allow (a QA-LoRA adapter may also extend the context): `Variants` holds
  every variant that applies, in a fixed order (QA-LoRA, then long context), and calls each one's hook; no two
  variants change the same thing (the dtype and the adapter's loader are QA-LoRA's, the config is long context's).
- A variant is picked once per stage: from the train params (`for_training`) or, after training, from what the
  adapter's train_record.json says it was trained as (`from_record`), never from the stage's own settings.
- The record fields each variant owns are always present in the train record (None when it does not apply), so
  records of plain adapters keep their `qalora` and `long_context` keys.

The evaluate stage's side of the variants (QA-LoRA's comparison with its QLoRA reference, the long-context report)
is its `_Extra` evaluations (evaluate/stage.py): they are picked from what the candidate's folders hold (a
reference trained, a config that extends the context), as the evaluation of a merged model has no train params to read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraline.config import LongContextParams, TrainParams
from loraline.layout import QALORA_QUANTIZED, QALORA_TORCHAO
from loraline.provenance import sha256_file
from loraline.records import TrainRecord

# The train record's fields that belong to a variant (None for an adapter it does not apply to).
RECORD_FIELDS = ("qalora", "long_context")


class AdapterVariant:
    """Plain LoRA: every hook is the plain path's own step."""

    # --- loading the base -------------------------------------------------------------------------

    def load_dtype(self, dtype: Any) -> Any:
        """The dtype the base is loaded in (before any quantization of the variant's own)."""
        return dtype

    def base_quantization(self, quantization: str) -> str:
        """How bitsandbytes loads the base (train.quantization)."""
        return quantization

    def config_overrides(self) -> dict[str, Any]:
        """Changes to the base config, set before the weights load."""
        return {}

    def prepare_base(self, model: Any, compute_dtype: Any) -> None:
        """Training: the loaded base changed in place before LoRA goes on it. ValueError: it cannot be."""

    def use_attention(self, model: Any) -> bool:
        """Training: install the variant's own attention; True when it did (the plain choices then do not apply)."""
        return False

    def trainables(self, model: Any) -> list[str]:
        """Training: modules_to_save entries the variant trains beside LoRA, as `model` names them."""
        return []

    def lora_options(self, model: Any, targets: Any) -> dict[str, Any]:
        """Training: LoraConfig arguments the variant sets (target_modules among them)."""
        return {}

    def registered(self, config: Any) -> None:
        """Training: the LoraConfig built, before peft puts the layers on the base."""

    def record(self, model: Any) -> dict[str, Any]:
        """The train record's fields that say what the variant did (RECORD_FIELDS)."""
        return {}

    # --- merging --------------------------------------------------------------------------------

    def attach(self, base: Any, adapter_dir: Path) -> Any:
        """The trained adapter on `base`, for inference and the merge."""
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)

    def merge(self, model: Any, dtype: Any) -> Any:
        """The adapter merged into its base: the standalone model, in `dtype`."""
        return model.merge_and_unload()

    def merge_report(self, dtype: str) -> dict[str, Any]:
        """The merge report's fields about the variant's merge."""
        return {}

    def write_merged(self, folder: Path, check: MergedCheck) -> None:
        """Files the variant writes beside the merged model (in `folder`, before the report). ValueError: the
        written files do not load to the merged model (nothing is then written)."""

    def quantized_reference(self) -> dict[str, Any] | None:
        """The merge report's vs_4bit when the variant decides it (None: the 4-bit reference is measured)."""
        return None


class MergedCheck:
    """What a variant needs from the merge stage to check the files it writes: the tokenizer saved into a folder,
    and a loaded model's probe outputs against the unmerged adapter's (merge.probes; parity.compare)."""

    def __init__(
        self,
        save_tokenizer: Callable[[Path], None],
        vs_unmerged: Callable[[Any], dict[str, Any]],
        tolerance: float,
    ) -> None:
        self.save_tokenizer, self.vs_unmerged, self.tolerance = save_tokenizer, vs_unmerged, tolerance


class Variants(AdapterVariant):
    """The variants of one adapter (none: plain LoRA), each hook called on every one of them in order."""

    def __init__(self, variants: list[AdapterVariant]) -> None:
        self.variants = variants

    @classmethod
    def for_training(cls, params: TrainParams, base_config: Callable[[], Any]) -> Variants:
        """The variants train.method and train.long_context ask for; `base_config` is read only for long context.
        ConfigError: the base cannot be extended as train.long_context asks."""
        from loraline.modelling.long_context import rope_overrides

        found: list[AdapterVariant] = []
        if params.method == "qalora":
            found.append(QALoraVariant(params.qalora.bits, params.qalora.group_size))
        if params.long_context is not None:
            lc = params.long_context
            found.append(LongContextVariant(rope_overrides(base_config(), lc), lc))
        return cls(found)

    @classmethod
    def from_record(cls, record: TrainRecord | None) -> Variants:
        """The variants a trained adapter's train_record.json names (none without a record)."""
        found: list[AdapterVariant] = []
        if record is not None and record.qalora is not None:
            found.append(QALoraVariant(record.qalora.bits, record.qalora.group_size))
        if record is not None and record.config_overrides:
            found.append(LongContextVariant(record.config_overrides, None))
        return cls(found)

    def load_dtype(self, dtype: Any) -> Any:
        for v in self.variants:
            dtype = v.load_dtype(dtype)
        return dtype

    def base_quantization(self, quantization: str) -> str:
        for v in self.variants:
            quantization = v.base_quantization(quantization)
        return quantization

    def config_overrides(self) -> dict[str, Any]:
        return {k: val for v in self.variants for k, val in v.config_overrides().items()}

    def prepare_base(self, model: Any, compute_dtype: Any) -> None:
        for v in self.variants:
            v.prepare_base(model, compute_dtype)

    def use_attention(self, model: Any) -> bool:
        return any(v.use_attention(model) for v in self.variants)

    def trainables(self, model: Any) -> list[str]:
        return [name for v in self.variants for name in v.trainables(model)]

    def lora_options(self, model: Any, targets: Any) -> dict[str, Any]:
        return {k: val for v in self.variants for k, val in v.lora_options(model, targets).items()}

    def registered(self, config: Any) -> None:
        for v in self.variants:
            v.registered(config)

    def record(self, model: Any) -> dict[str, Any]:
        fields: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
        for v in self.variants:
            fields |= v.record(model)
        return fields

    def attach(self, base: Any, adapter_dir: Path) -> Any:
        own = [v for v in self.variants if type(v).attach is not AdapterVariant.attach]
        return (own[0] if own else AdapterVariant()).attach(base, adapter_dir)

    def merge(self, model: Any, dtype: Any) -> Any:
        own = [v for v in self.variants if type(v).merge is not AdapterVariant.merge]
        return (own[0] if own else AdapterVariant()).merge(model, dtype)

    def merge_report(self, dtype: str) -> dict[str, Any]:
        return {k: val for v in self.variants for k, val in v.merge_report(dtype).items()}

    def write_merged(self, folder: Path, check: MergedCheck) -> None:
        for v in self.variants:
            v.write_merged(folder, check)

    def quantized_reference(self) -> dict[str, Any] | None:
        return next((r for v in self.variants if (r := v.quantized_reference()) is not None), None)


class QALoraVariant(AdapterVariant):
    """QA-LoRA (train.method qalora): the base's linear layers quantized group-wise from float32 weights (so CPU
    and CUDA runs, and the merge, get the same codes), peft's pooled QA-LoRA layers on them; merged, the adapter
    folds into the zero points and the low-bit layers are written beside the dequantized float weights."""

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits, self.group_size = bits, group_size
        self.layers: int | None = None  # layers folded by the merge
        self.lowbit: dict[str, Any] | None = None  # the merged low-bit layers, on the CPU
        self.torchao: dict[str, Any] | None = None  # the torchao checkpoint's facts, once written

    def load_dtype(self, dtype: Any) -> Any:
        import torch

        return torch.float32

    def base_quantization(self, quantization: str) -> str:
        return "none"  # quantized group-wise by prepare_base, not by bitsandbytes

    def prepare_base(self, model: Any, compute_dtype: Any) -> None:
        from loraline.modelling.qalora import GroupQuantizedLinear, quantize_linears

        try:
            quantize_linears(model, bits=self.bits, group_size=self.group_size)
        except ValueError as exc:
            raise ValueError(f"train.qalora: {exc}") from None
        for module in model.modules():  # the rest in the compute dtype; scales and zero points stay float32
            if not isinstance(module, GroupQuantizedLinear):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(compute_dtype)

    def lora_options(self, model: Any, targets: Any) -> dict[str, Any]:
        from loraline.modelling.qalora import GroupQuantizedLinear

        # peft's "all-linear" knows nn.Linear only: name the quantized layers the targets cover
        names = [n for n, m in model.named_modules() if isinstance(m, GroupQuantizedLinear)]
        if targets != "all-linear":
            names = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        return {"target_modules": sorted(names), "use_qalora": True}

    def registered(self, config: Any) -> None:
        from loraline.modelling.qalora import register_with

        register_with(config)

    def record(self, model: Any) -> dict[str, Any]:
        from loraline.modelling.qalora import GroupQuantizedLinear, QALoraGroupLinear

        return {
            "qalora": {
                "bits": self.bits,
                "group_size": self.group_size,
                "quantizer": "round-to-nearest, asymmetric, per (row, group of input channels), from float32 weights",
                "quantized_layers": sum(isinstance(m, GroupQuantizedLinear) for m in model.modules()),
                "adapted_layers": sum(isinstance(m, QALoraGroupLinear) for m in model.modules()),
            }
        }

    def attach(self, base: Any, adapter_dir: Path) -> Any:
        """The base as training saw it (group-quantized), and peft's QA-LoRA layers on it."""
        from loraline.modelling.qalora import load_qalora_adapter

        return load_qalora_adapter(base, adapter_dir, bits=self.bits, group_size=self.group_size)

    def merge(self, model: Any, dtype: Any) -> Any:
        """Folded into the zero points; its codes, scales and folded zero points kept (on the CPU) for export."""
        import dataclasses

        import torch

        from loraline.modelling.qalora import dequantize_linears, merge_qalora, quantized_layers

        self.layers = merge_qalora(model)
        merged = model.merge_and_unload()
        self.lowbit = {
            name: dataclasses.replace(q, codes=q.codes.cpu(), scales=q.scales.cpu(), zeros=q.zeros.cpu())
            for name, q in quantized_layers(merged).items()
        }
        dequantize_linears(merged, torch.float32)
        return merged.to(dtype)

    def merge_report(self, dtype: str) -> dict[str, Any]:
        facts: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size}
        if self.layers is not None:
            facts["layers"] = self.layers
        if self.torchao is not None:
            facts["torchao"] = self.torchao
        return {
            "qalora": {
                **facts,
                "merged": "the group-quantized base with the adapter folded into its zero points (same codes and "
                f"scales), stored dequantized at {dtype}; "
                "merged_vs_unmerged compares it with the adapter on that base",
                "lowbit_file": QALORA_QUANTIZED,
            }
        }

    def write_merged(self, folder: Path, check: MergedCheck) -> None:
        """The low-bit layers (qalora_quantized.safetensors), and the same model as a checkpoint transformers loads
        through torchao (<merged>/torchao), loaded back by that loader (on the CPU, where a user without a GPU
        loads it too) and checked: its weights against the codes, its probes against the unmerged adapter."""
        import gc

        from loraline.modelling.qalora import save_quantized_layers
        from loraline.modelling.qalora_torchao import load_torchao_checkpoint, max_weight_diff, save_torchao_checkpoint

        save_quantized_layers(self.lowbit, folder / QALORA_QUANTIZED)
        torchao = folder / QALORA_TORCHAO
        facts = save_torchao_checkpoint(folder, self.lowbit, torchao)
        check.save_tokenizer(torchao)
        model = load_torchao_checkpoint(torchao)
        facts["max_abs_weight_diff"] = max_weight_diff(model, self.lowbit)
        facts["vs_unmerged"] = check.vs_unmerged(model)
        facts["files"] = {f.name: sha256_file(f) for f in sorted(torchao.iterdir()) if f.is_file()}
        close = facts["vs_unmerged"]["max_abs_logit_diff"] <= check.tolerance
        facts["passed"] = facts["max_abs_weight_diff"] == 0.0 and close
        self.torchao = facts
        del model
        gc.collect()
        if not facts["passed"]:
            raise ValueError(
                f"the torchao checkpoint ({QALORA_TORCHAO}/) does not load to the merged low-bit model: "
                f"{facts}; nothing written"
            )

    def quantized_reference(self) -> dict[str, Any] | None:
        # the unmerged reference already ran on the quantized base it trained on
        return {"skipped": "QA-LoRA: merged_vs_unmerged is against the group-quantized base itself"}


class LongContextVariant(AdapterVariant):
    """LongLoRA (train.long_context): the base's rope scaled to the target length (a config override the train
    record carries, so that every later load of the base applies it), embeddings and norms trained beside LoRA,
    and S2-Attn in training (shifted sparse attention; in eval mode it attends in full)."""

    def __init__(self, overrides: dict[str, Any], settings: LongContextParams | None) -> None:
        self.overrides = overrides
        self.settings = settings  # train.long_context (in training; None once read back from a record)

    def config_overrides(self) -> dict[str, Any]:
        return dict(self.overrides)

    def use_attention(self, model: Any) -> bool:
        if not self.settings.s2_attn:
            return False
        from loraline.modelling.s2attn import use_s2_attention

        use_s2_attention(model, self.settings.group_size)
        return True

    def trainables(self, model: Any) -> list[str]:
        from loraline.modelling.long_context import trainable_module_names

        return trainable_module_names(model, self.settings.trainable)

    def record(self, model: Any) -> dict[str, Any]:
        """What train.long_context changed; merge applies config_overrides to the base before the adapter."""
        lc = self.settings
        return {
            "long_context": {
                "target_len": lc.target_len,
                "original_context": self.overrides["rope_parameters"]["original_max_position_embeddings"],
                "rope_scaling": lc.rope_scaling,
                "s2_attn": lc.s2_attn,
                "group_size": lc.group_size if lc.s2_attn else None,
                "trainable": list(lc.trainable),
                "config_overrides": self.overrides,
            }
        }

"""Typed, validated parameters: params.yaml is the only configuration.

Every section is a pydantic model that forbids unknown keys, so a typo fails loudly with the key's
dotted path and the keys that are allowed there, instead of being silently ignored.
`tenants` maps each tenant's name to its settings (a mapping rather than a list so that DVC names
stages `prepare@<tenant>` and tracks `tenants.<tenant>` as that tenant's params alone); a list of
entries with a `name` key is accepted too. Tenants may override the `train` and `gate` sections;
`Params.train_for` / `Params.gate_for` merge and re-validate.
Numbers must be finite (YAML's .nan and .inf are refused). Raw data stays inside the project (the folder
of params.yaml) unless tenants.<t>.allow_outside_dirs names the outside folder: load_params refuses an
outside raw_dir, and the documents and prepare stages refuse a raw file that is a symlink out
(TenantParams.check_raw_dir / check_sources); the forgetting check's sample, evaluate.general.path, likewise
unless evaluate.general.allow_outside_dirs holds it (GeneralParams.check_inside). base.model and
synthesize.model may name a model folder anywhere: a model is not data that lands in a split, and an 8B
model usually lives outside the project.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from loraline.layout import DEPLOY_TARGETS, GENERAL_TEXT, TIMING_DIR

DEFAULT_PARAMS_PATH = Path("params.yaml")
# DVC artifact names (<tenant>-adapter, <tenant>-onnx in dvc.yaml) allow only [a-z0-9-/].
TENANT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
TENANT_NAME_MAX = 63


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the key and the fix."""


class OutsidePathError(ConfigError):
    """Data the pipeline would read resolves outside the project, and params.yaml does not allow its folder
    (tenants.<t>.allow_outside_dirs); the message names the key or file, where it resolves, and the opt-in."""


class _Section(BaseModel):
    # allow_inf_nan=False: YAML's .nan fails every comparison (a gate threshold of .nan fails every gate) and
    # .inf silently switches a check off; "no limit" is spelled null where a field offers it.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


# Where a stage runs its models: auto is CUDA when torch sees a GPU, else the CPU; cuda without a GPU is an
# error naming the key (loraline.modelling.device.resolve_device), never a silent fall back to hours on the CPU.
Device = Literal["auto", "cpu", "cuda"]


class BuildParams(_Section):
    """Shape and pretraining budget of the small base model that loraline builds offline."""

    vocab_size: int = Field(2048, ge=512, le=65536, description="BPE vocabulary size, special tokens included")
    hidden_size: int = Field(256, ge=16, description="Model width")
    intermediate_size: int = Field(768, ge=16, description="MLP width")
    num_layers: int = Field(4, ge=1, le=64)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1, description="Grouped-query attention: key/value heads")
    max_position_embeddings: int = Field(1024, ge=64)
    tie_word_embeddings: bool = True
    seq_len: int = Field(256, ge=16, description="Pretraining sequence length (tokens)")
    batch_size: int = Field(16, ge=1, description="Pretraining sequences per step")
    max_steps: int = Field(
        400, ge=1, description="Pretraining optimizer steps: the budget (deterministic, unlike a time limit)"
    )
    learning_rate: float = Field(5e-4, gt=0, lt=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    num_threads: int | None = Field(
        2,
        ge=1,
        description="torch CPU threads; fixed so that file hashes repeat across machines (null: torch's default)",
    )
    stdlib_docstrings: bool = Field(True, description="Add the Python standard library's docstrings to the corpus")
    max_stdlib_chars: int = Field(150_000, ge=0, description="Cap on stdlib docstring text in the corpus")
    exercises: int = Field(
        8000,
        ge=0,
        description="Generic chat-formatted exercises (copying, key-value to JSON, labelling) in the corpus",
    )
    copy_drill_steps: int = Field(
        200,
        ge=0,
        description="First pretraining steps on copy drills only (digit strings repeated from the prompt): they form "
        "the copying circuit that extraction needs, which a small model does not form from the mixed corpus within "
        "a short budget (docs/default-model.md)",
    )
    device: Device = Field("auto", description="Where to pretrain; auto: CUDA when present")
    on_cuda: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of this section that change when the base is built on CUDA, e.g. a larger shape for the "
        "same budget in steps: {hidden_size: 512, intermediate_size: 1536, num_layers: 8, num_heads: 8}",
    )

    def for_device(self, device: str) -> BuildParams:
        """These params as used on `device`: `on_cuda` applied on CUDA, validated like the section."""
        if device != "cuda" or not self.on_cuda:
            return self
        return BuildParams(**{**self.model_dump(exclude={"on_cuda"}), **self.on_cuda})

    @model_validator(mode="after")
    def _on_cuda_keys(self) -> BuildParams:
        unknown = sorted(set(self.on_cuda) - (set(type(self).model_fields) - {"on_cuda", "device"}))
        if unknown:
            allowed = ", ".join(sorted(set(type(self).model_fields) - {"on_cuda", "device"}))
            raise ValueError(f"on_cuda: unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
        if self.on_cuda:
            self.for_device("cuda")  # the CUDA shape must be valid too, and fail now rather than on the GPU
        return self

    @model_validator(mode="after")
    def _heads_divide(self) -> BuildParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(
                f"seq_len ({self.seq_len}) exceeds max_position_embeddings ({self.max_position_embeddings})"
            )
        return self


class BaseParams(_Section):
    """Which base model every tenant's adapter sits on."""

    model: str | None = Field(
        None, description="Hugging Face model id or local path; null builds loraline's own small model offline"
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a model id")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model; off unless you trust it")
    chat_template: str | None = Field(
        None, description="Jinja chat template to use when the model's tokenizer has none"
    )
    build: BuildParams = BuildParams()


class SplitParams(_Section):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    salt: str = Field("loraline", description="Changes every row's split bucket; keep it fixed to keep splits stable")

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitParams:
        if self.validation + self.test >= 1:
            raise ValueError(f"validation + test ({self.validation + self.test}) must leave rows for train (< 1)")
        return self


class NearDedupParams(_Section):
    """Near-duplicate removal: MinHash LSH over word shingles of the user and assistant turns.

    3-word shingles are short enough that a paraphrase changing a few words keeps most shingles, and
    long enough that rows sharing only common phrasing do not look alike; at Jaccard >= 0.85 two rows
    differ by about one changed word in twenty (templated rows with different names, order numbers or
    products stay apart). 128 permutations estimate Jaccard within about +-0.03 at that level.
    """

    enabled: bool = True
    threshold: float = Field(
        0.85, gt=0, le=1, description="Estimated Jaccard at or above which a later row is a near-duplicate"
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: more is more precise and slower")
    shingle_words: int = Field(3, ge=1, le=10, description="Words per shingle")


class PiiParams(_Section):
    """PII scrubbing of every row's text: mask (typed placeholders such as <EMAIL>), drop the row, or off."""

    mode: Literal["mask", "drop", "off"] = "mask"
    types: list[Literal["email", "phone", "card", "ip"]] = Field(
        default_factory=lambda: ["email", "phone", "card", "ip"],
        min_length=1,
        description="Which kinds of PII to look for",
    )


class DecontamParams(_Section):
    """Removes train/validation rows that copy a held-out test row (word n-gram overlap).

    overlap(row) = max over test rows t of |ngrams(row) & ngrams(t)| / |ngrams(row)|: the share of the
    row's 8-grams found in one single test row. 8 words is long enough that shared boilerplate phrasing
    rarely spans a whole n-gram, and 0.5 catches a copy with a word changed every ~10 words.
    """

    enabled: bool = True
    ngram: int = Field(8, ge=2, le=32, description="Words per n-gram")
    threshold: float = Field(
        0.5, gt=0, le=1, description="Overlap at or above which a train/validation row is removed"
    )


CANONICAL_FIELDS = (
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "messages",
    "conversations",
    "text",
    "chosen",
    "rejected",
)
# The canonical fields a mapped row must end up with: one shape's required fields, and none of another's.
SOURCE_SHAPES = {
    "instruction": ({"instruction", "output"}, {"instruction", "input", "output", "system"}),
    "prompt_completion": ({"prompt", "completion"}, {"prompt", "completion", "system"}),
    "chat": ({"messages"}, {"messages"}),
    "sharegpt": ({"conversations"}, {"conversations"}),
    "document": ({"text"}, {"text"}),
    "preference": ({"chosen", "rejected"}, {"prompt", "messages", "system", "chosen", "rejected"}),
}
ControlTokenPolicy = Literal["reject", "strip", "escape"]


class PairPickParams(_Section):
    """tenants.<t>.sources[].preference: one preference pair from a list of rated answers (UltraFeedback's
    completions), the context coming from the entry's columns (prompt or messages)."""

    list: str = Field(min_length=1, description="The field path of the list of rated answers (completions)")
    answer: str = Field("response", min_length=1, description="Path of an answer's text inside a list element")
    score: str = Field(
        "overall_score", min_length=1, description="Path of an answer's score (a number) inside a list element"
    )
    pick: Literal["best_vs_worst", "best_vs_second"] = Field(
        "best_vs_worst",
        description="The highest-scored answer is chosen; rejected is the lowest-scored one (best_vs_worst) or "
        "the best scored below the chosen (best_vs_second); ties go to the earlier element",
    )
    min_margin: float = Field(
        0.0,
        ge=0,
        description="Least score difference between chosen and rejected (the chosen must score higher in any "
        "case); a row without such a pair is rejected as no_pair",
    )

    @model_validator(mode="after")
    def _paths_parse(self) -> PairPickParams:
        from loraline.fieldpath import PathSyntaxError, parse_path

        for name in ("list", "answer", "score"):
            try:
                parse_path(getattr(self, name))
            except PathSyntaxError as exc:
                raise ValueError(f"preference.{name}: {exc}") from None
        return self


class SourceParams(_Section):
    """How to read some of a tenant's raw files: which files, their format, and which of their fields
    become loraline's canonical ones (docs/data.md, "Bring your own data")."""

    path: str = Field(
        min_length=1, description="Glob under the tenant's raw_dir (** spans folders); the first matching entry wins"
    )
    format: Literal["jsonl", "json", "csv", "tsv", "parquet", "arrow", "hf", "txt", "md"] | None = Field(
        None,
        description="Default: from the file name (.gz and .zst are read transparently); hf: a save_to_disk folder",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="canonical field -> a field path (meta.answer, instances[0].output) "
        "or a template ('{context} {question}'); empty: shape detection",
    )
    explode: str | None = Field(
        None, description="A list field: each element becomes one row, addressed as item (item.output)"
    )
    group: str | None = Field(
        None,
        description="A field path or template naming what rows share (context, meta.doc_id, item.passage): rows with "
        "the same value go whole to one split; default: prepare.group_min_chars finds a shared passage",
    )
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=dict, description="Source role name -> role; tool turns are context, never trained on"
    )
    control_tokens: ControlTokenPolicy | None = Field(
        None, description="Overrides prepare.control_tokens for these files"
    )
    preference: PairPickParams | None = Field(
        None,
        description="Rows holding a list of rated answers: the pair they give (chosen and rejected; columns map "
        "the prompt or messages)",
    )

    @field_validator("path")
    @classmethod
    def _relative_glob(cls, v: str) -> str:
        if v.startswith("/") or ".." in Path(v).parts:
            raise ValueError(f"{v!r} must be a glob relative to the tenant's raw_dir (no leading / and no ..)")
        return v

    @model_validator(mode="after")
    def _mapping_parses(self) -> SourceParams:
        from loraline.fieldpath import PathSyntaxError, parse_path, parse_source

        unknown = sorted(set(self.columns) - set(CANONICAL_FIELDS))
        if unknown:
            raise ValueError(
                f"columns: unknown canonical field(s) {', '.join(unknown)}; allowed: {', '.join(CANONICAL_FIELDS)}"
            )
        try:
            if self.explode is not None and parse_path(self.explode).root == "item":
                raise ValueError(f"explode: {self.explode!r} names the element itself; give the parent's list field")
            named = [*self.columns.items(), *([("group", self.group)] if self.group is not None else [])]
            for name, text in named:
                label = name if name == "group" else f"columns.{name}"
                for path in _paths_of(parse_source(text)):
                    if path.root == "item" and self.explode is None:
                        raise ValueError(f"{label}: {text!r} addresses item, which needs explode (the list field)")
        except PathSyntaxError as exc:
            raise ValueError(str(exc)) from None
        if self.preference is not None:
            self._check_preference()
        if self.columns:
            keys = set(self.columns) | ({"chosen", "rejected"} if self.preference is not None else set())
            fits = [shape for shape, (need, allowed) in SOURCE_SHAPES.items() if need <= keys and keys <= allowed]
            if not fits:
                shapes = "; ".join(
                    f"{s}: {' + '.join(sorted(n))} (optional: {', '.join(sorted(a - n)) or 'none'})"
                    for s, (n, a) in SOURCE_SHAPES.items()
                )
                raise ValueError(f"columns map {', '.join(sorted(keys))}, which is no single shape; one of: {shapes}")
        if self.format in ("txt", "md") and (self.columns or self.explode or self.group):
            raise ValueError(
                f"format {self.format!r} is a whole document; columns, explode and group apply to structured rows"
            )
        return self

    def _check_preference(self) -> None:
        picked = sorted({"chosen", "rejected"} & set(self.columns))
        if picked:
            raise ValueError(f"preference picks chosen and rejected from the rated list; columns also map {picked}")
        if not {"prompt", "messages"} & set(self.columns):
            raise ValueError(
                "preference needs the context the answers reply to: map columns.prompt (or columns.messages)"
            )


def _paths_of(source: Any) -> tuple:
    return source.paths if hasattr(source, "paths") else (source,)


class PrepareParams(_Section):
    """Raw files to a clean, deduplicated, split, chat-templated dataset."""

    max_chars: int = Field(20_000, ge=1, description="Rows with more characters are rejected as too_long")
    max_tokens: int = Field(1024, ge=8, description="Rendered rows with more tokens are rejected as too_long")
    document_rows: int | None = Field(
        None,
        ge=16,
        description="Also cut every document into language-modelling rows of at most this many tokens "
        "(train_documents / validation_documents / test_documents, split per document); train.long_context sets it "
        "to target_len",
    )
    system_prompt: str | None = Field(None, description="System message added to rows that carry none")
    split: SplitParams = SplitParams()
    csv_delimiter: str = Field(",", min_length=1, max_length=1)
    control_tokens: ControlTokenPolicy = Field(
        "strip",
        description="Text holding the tokenizer's control tokens: strip end-of-text markers at the ends of fields "
        "(others still reject), escape all of them as literal text, or reject the row; tenants.<t>.sources[] override",
    )
    near_dedup: NearDedupParams = NearDedupParams()
    group_min_chars: int | None = Field(
        200,
        ge=1,
        description="Rows whose first user turn holds a line of at least this many characters besides other text (a "
        "passage and a question) are grouped by that line: a group goes whole to one split; "
        "tenants.<t>.sources[].group names the group instead; null: no automatic groups",
    )
    conflicts: Literal["keep", "first", "reject"] = Field(
        "keep",
        description="Rows with the same prompt (normalized system, user and tool turns) and different answers "
        "(counted as conflicting_answers): keep all of them, keep the first in file and row order and reject the "
        "others, or reject all of them (reason conflicting_answers, the detail naming the other row)",
    )
    pii: PiiParams = PiiParams()
    decontamination: DecontamParams = DecontamParams()
    synthetic_ratio: float = Field(
        0.5, ge=0, description="Most synthetic train rows per real train row (tenants.<t>.synthetic_ratio overrides)"
    )
    seed: int | None = Field(
        None, description="Seeds MinHash and the choice of synthetic rows; defaults to the top-level seed"
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Processes for the per-row work (shape, PII, chat template, tokens) once a tenant has more than "
        "~8k rows; the result is the same for any number (null: the CPUs available, at most 8)",
    )


class LongContextParams(_Section):
    """LongLoRA (train.long_context): fine-tune the base for a longer context than it was trained on."""

    target_len: int = Field(
        ge=128, description="The context (tokens) to extend to; must be above the base's own context"
    )
    rope_scaling: Literal["linear", "dynamic", "yarn"] = Field(
        "linear", description="RoPE scaling written into the model config (position interpolation for linear)"
    )
    s2_attn: bool = Field(
        True, description="Train with shifted sparse attention; inference always uses full attention"
    )
    group_ratio: float = Field(0.25, gt=0, le=1, description="S2-Attn group size as a share of target_len")
    trainable: list[Literal["embed", "norm"]] = Field(
        ["embed", "norm"], description="Trained beside LoRA (the paper: both are needed for long context)"
    )
    reference: bool = Field(
        False,
        description="Also train a full-attention reference of the same budget (same data, steps and seed; doubles the "
        "train stage's time), which the evaluation reports beside the S2-Attn adapter",
    )

    @property
    def group_size(self) -> int:
        return round(self.target_len * self.group_ratio)

    @model_validator(mode="after")
    def _groups_tile(self) -> LongContextParams:
        group = self.target_len * self.group_ratio
        if abs(group - round(group)) > 1e-9 or self.target_len % round(group) or round(group) % 2:
            raise ValueError(
                f"group_ratio {self.group_ratio} does not divide target_len {self.target_len} into groups of an even "
                "number of tokens (S2-Attn shifts half the heads by half a "
                "group); e.g. 0.25 or 0.125 with a power-of-two target_len"
            )
        if len(set(self.trainable)) != len(self.trainable):
            raise ValueError(f"trainable lists an entry twice: {self.trainable}")
        if self.reference and not self.s2_attn:
            raise ValueError(
                "reference trains a full-attention adapter to compare S2-Attn with; with s2_attn: false the adapter "
                "itself trains with full attention (set s2_attn: true, or reference: false)"
            )
        return self


class QALoRAParams(_Section):
    """QA-LoRA (train.method: qalora): the base's linear layers quantized group-wise, a pooled adapter."""

    bits: Literal[2, 3, 4] = Field(4, description="Bits per weight of the group-wise quantized base (ONNX export: 4)")
    group_size: Literal[32, 64, 128] = Field(
        32, description="Input channels per quantization group; each group's pooled input is one feature of LoRA's A"
    )
    reference: bool = Field(
        False,
        description="Also train the tenant's QLoRA reference (method lora: same data, steps and seed; doubles the "
        "train stage's time), which the evaluation compares with: merged in float, and rounded to these bits and "
        "groups after training",
    )


REFERENCE_BASE = "base"
# train.preference.reference as a registry version: <tenant>@v<major>.<minor>.<patch> (its adapter artifact's version)
REFERENCE_VERSION = re.compile(r"^(?P<tenant>[A-Za-z0-9][A-Za-z0-9_.-]*)@(?P<version>v\d+\.\d+\.\d+)$")


class PreferenceParams(_Section):
    """Preference tuning (train.objective dpo or orpo): the objective's weights and DPO's reference model."""

    beta: float = Field(
        0.1,
        gt=0,
        description="DPO's beta: how far the policy may move from the reference (larger: closer); the rewards are "
        "beta x (policy - reference) answer log-probability",
    )
    orpo_lambda: float = Field(
        0.1, gt=0, description="ORPO's weight of the odds-ratio term beside the chosen answers' cross-entropy"
    )
    reference: str = Field(
        REFERENCE_BASE,
        min_length=1,
        description="DPO's reference model: base (the base with the adapter's B = 0: no second model in memory), "
        "a registry version of an adapter, <tenant>@<version> (e.g. acme-shop@v0.0.3: the tenant's production SFT "
        "adapter, fetched into models/reference/ when the train stage runs), or the folder of an adapter (relative "
        "to the project); the policy also starts from the reference adapter",
    )

    # Set by the train stage (`in_project`), never read from params.yaml: `reference` made a path from the project
    # root. Records and fingerprints keep `reference` as written, so they do not depend on where the project is.
    _resolved: Path | None = PrivateAttr(None)

    def in_project(self, root: Path) -> PreferenceParams:
        """A copy whose reference folder (relative to the project) is read from `root`."""
        copy = self.model_copy()
        folder = self.reference_adapter
        copy._resolved = None if folder is None or folder.is_absolute() else root / folder
        return copy

    @property
    def reference_adapter(self) -> Path | None:
        """The adapter folder DPO starts from and compares with, or None for the base (a registry version is
        a folder once `registry.reference.pinned_reference` has fetched it)."""
        if self.reference == REFERENCE_BASE:
            return None
        return self._resolved or Path(self.reference)

    @property
    def reference_version(self) -> tuple[str, str] | None:
        """(tenant, version) when `reference` names a registry version, else None."""
        match = REFERENCE_VERSION.match(self.reference)
        return (match["tenant"], match["version"]) if match else None


def _count_or_auto(v: Any, what: str) -> Any:
    """A `batch_size`-like setting: a whole number >= 1 or "auto". One clear message instead of pydantic's one
    per member of the union (and no bool taken as 1)."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"must be a whole number of {what} >= 1, or auto")


def _absolute_folders(v: list[Path], example: str) -> list[Path]:
    """An `allow_outside_dirs` list: absolute folders only (a relative one would silently mean inside the project)."""
    for path in v:
        if not path.is_absolute():
            raise ValueError(f"{str(path)!r} must be an absolute folder path (a folder outside the project{example})")
    return v


class TrainParams(_Section):
    """Adapter training (consumed by the train stage); tenants may override any key."""

    method: Literal["lora", "qalora"] = Field(
        "lora",
        description="lora: LoRA on the base as `quantization` loads it (nf4/fp4: QLoRA; none: 16-bit LoRA). "
        "qalora: QA-LoRA, the base quantized group-wise (train.qalora) and an adapter that folds into it exactly",
    )
    qalora: QALoRAParams = Field(default_factory=QALoRAParams, description="With method qalora")
    quantization: Literal["nf4", "fp4", "none"] = Field(
        "nf4", description="How method lora loads the base (method qalora quantizes it its own way: train.qalora)"
    )
    double_quant: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = []
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "paged_adamw_32bit"
    learning_rate: float = Field(2e-3, gt=0, lt=1)
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: LoRA's B matrices learn at learning_rate "
        "times this (the paper suggests 16); null: one rate",
    )
    modules_to_save_learning_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Learning rate of the modules_to_save copies (e.g. trained embeddings); null: learning_rate",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8,
        description="Packed rows per micro-batch, per device. auto: 2 on the CPU; on CUDA the most rows (up to 16 "
        "and the dataset's packed rows) that fit the GPU's free memory, measured with the model loaded "
        "(loraline.train.autobatch; single-device runs only). The micro-batch changes, grad_accum still multiplies "
        "it, so the tokens per optimizer step scale with the GPU; "
        "train_record.json's `batch` says what was resolved and how",
    )
    grad_accum: int = Field(1, ge=1)
    packing: bool = True
    max_seq_len: int = Field(1024, ge=16)
    gradient_checkpointing: bool = False
    checkpoint_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="With gradient_checkpointing: share of decoder layers "
        "checkpointed (the first ones); the rest keep activations",
    )
    fused_cross_entropy: bool = Field(
        True,
        description="Loss from hidden states chunk by chunk, never materializing "
        "[tokens x vocab] logits (exact; plain path for unsupported heads)",
    )
    cross_entropy_chunk: int = Field(1024, ge=1, description="Tokens per chunk of the fused cross-entropy")
    varlen_attention: bool = Field(
        True,
        description="Packed rows attend one example at a time, micro-batch as one row without pad tokens: flash "
        "varlen on CUDA, SDPA per example elsewhere (off: SDPA with a block-diagonal mask over each packed row)",
    )
    upcast_non_quantized: bool = Field(
        False,
        description="4-bit bases: cast embeddings, norms and lm_head to fp32 "
        "(peft's prepare_model_for_kbit_training); off keeps the compute dtype",
    )
    eval_every: int = Field(50, ge=1)
    save_every: int = Field(100, ge=1)
    checkpoint_remote: bool = Field(
        True,
        description="Push every checkpoint (save_every) to the project's default DVC remote, under "
        "loraline-checkpoints/<tenant>/<fingerprint>/, and resume from there when this clone has none: a run "
        "survives losing its machine (loraline.train.remote). Does nothing without a DVC repo or a default remote. "
        "It moves checkpoints, not training: left out of train_record.json and the checkpoint fingerprint",
    )
    early_stopping_patience: int | None = Field(None, ge=1)
    seed: int | None = Field(None, description="Defaults to the top-level seed")
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads while training on CPU; fix it for adapter hashes that repeat across machines",
    )
    devices: int = Field(
        1,
        ge=1,
        description="Data-parallel processes (torchrun): one per GPU on CUDA, gloo processes on CPU; "
        "batch_size is per device, so the global batch is batch_size x grad_accum x devices",
    )
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="fsdp: each device keeps 1/devices of the frozen base weights (FSDP2), for bases that "
        "do not fit one GPU; LoRA stays whole on every device. none: every device holds the whole base",
    )

    long_context: LongContextParams | None = Field(
        None, description="LongLoRA: extend the context (rope scaling, S2-Attn, trainable embeddings and norms)"
    )
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="sft: cross-entropy of the answers. dpo: Direct Preference Optimization on the dataset's pairs "
        "(chosen vs rejected answer) against a reference (train.preference.reference). orpo: the chosen answers' "
        "cross-entropy plus an odds-ratio term, no reference. dpo/orpo need a dataset with preference pairs",
    )
    preference: PreferenceParams = Field(
        default_factory=PreferenceParams, description="With objective dpo or orpo: beta, orpo_lambda, reference"
    )

    # Keys that say where the run's checkpoints go, not what it trains: the train stage leaves them out of
    # train_record.json and the fingerprint (a run resumes whichever way they are set).
    NOT_RECORDED: ClassVar[frozenset[str]] = frozenset({"checkpoint_remote"})

    @model_serializer(mode="wrap")
    def _dump_without_default_objective(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """objective, preference and checkpoint_remote at their defaults are left out of dumps: an SFT run's params
        dump (in train_record.json and the checkpoint fingerprint) keeps the bytes it had before the keys existed."""
        out = handler(self)
        if self.objective == "sft":
            out.pop("objective", None)
        if self.checkpoint_remote:
            out.pop("checkpoint_remote", None)
        if self.preference == PreferenceParams():
            out.pop("preference", None)
        return out

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_form(cls, v: Any) -> Any:
        return _count_or_auto(v, "packed rows")

    @model_validator(mode="after")
    def _long_context_fits(self) -> TrainParams:
        lc = self.long_context
        if lc is None:
            return self
        if self.max_seq_len < lc.target_len:
            raise ValueError(
                f"long_context.target_len is {lc.target_len} but max_seq_len is {self.max_seq_len}: set max_seq_len "
                "to at least target_len, or training never sees a row as long as the context it extends to"
            )
        if self.sharding == "fsdp":
            raise ValueError(
                "long_context is not supported with sharding fsdp (the sharded loader builds the base's own config)"
            )
        return self

    @model_validator(mode="after")
    def _qalora_fits(self) -> TrainParams:
        if self.method != "qalora":
            if self.qalora.reference:
                raise ValueError(
                    f"qalora.reference trains a QLoRA adapter to compare a QA-LoRA adapter with; method is "
                    f"{self.method!r} (set method: qalora, or reference: false)"
                )
            return self
        if self.use_dora:
            raise ValueError(
                "method qalora does not combine with use_dora: DoRA's magnitude rescales whole weights, "
                "which cannot fold into per-group zero points"
            )
        if self.sharding == "fsdp":
            raise ValueError(
                "method qalora is not supported with sharding fsdp (the sharded loader keeps the base's own layers)"
            )
        return self

    @model_validator(mode="after")
    def _preference_fits(self) -> TrainParams:
        if self.objective == "orpo" and self.preference.reference_adapter is not None:
            raise ValueError(
                f"preference.reference {self.preference.reference!r} names a reference adapter, but objective orpo "
                "has no reference model (set objective: dpo, or reference: base)"
            )
        if self.objective != "sft" and self.long_context is not None:
            raise ValueError(
                f"objective {self.objective} does not combine with long_context (its document rows have no pairs)"
            )
        return self

    @model_validator(mode="after")
    def _sharding_fits(self) -> TrainParams:
        if self.sharding == "fsdp":
            if self.use_dora:
                raise ValueError(
                    "sharding fsdp does not support use_dora (DoRA reads the whole base weight outside the forward)"
                )
            if self.upcast_non_quantized:
                raise ValueError("sharding fsdp keeps the base in the compute dtype; set upcast_non_quantized: false")
        return self


class MergeParams(_Section):
    """Merging each adapter into a full-precision copy of the base, and the check that it behaves the same."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Precision of the merged model; gate.max_merge_logit_diff must suit it (1e-3 fits float32)",
    )
    max_new_tokens: int = Field(32, ge=1, description="Greedy tokens generated per probe for the agreement check")
    quantized_reference: bool = Field(
        True, description="Also measure the gap to the 4-bit model the adapter was trained on"
    )
    check_reload: bool = Field(True, description="Reload the saved merged folder and compare its logits")
    device: Device = Field(
        "auto",
        description="Where the merge, its probes and its references run; auto: CUDA when present. The weights "
        "are written from the CPU at dtype either way; a merge on CUDA may differ from the CPU's in the last bits",
    )
    probes: int = Field(
        16,
        ge=0,
        le=256,
        description="Prompts drawn from the tenant's test split (the same ones on every run: rows "
        "ranked by a hash of the top-level seed, the tenant and the row id) added to the built-in probes; all of them "
        "are checked merged vs unmerged and their reference answers recorded for serve's deployment check. More "
        "than the split holds takes all of it; 0: the built-in probes only",
    )
    probe_max_tokens: int = Field(
        256,
        ge=1,
        description="Longest drawn probe prompt (tokens, chat template applied): longer rows are skipped, "
        "not cut, and the next in rank order taken. Bounds the probes' cost (their prompt logits are kept per token, "
        "vocabulary-wide, for the parity checks); with merge.max_new_tokens it must fit serve.max_model_len",
    )


EXPORT_GRAPHS = ("fp32", "fp16", "int8", "int4")


def export_graphs_problem(graphs: list[str] | tuple[str, ...]) -> str | None:
    """Why a list of export graphs cannot be built and checked, or None. Params load and export_onnx
    (callable without params) both ask it."""
    unknown = sorted(set(graphs) - set(EXPORT_GRAPHS))
    if unknown:
        return f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(EXPORT_GRAPHS)}"
    if len(set(graphs)) != len(graphs):
        return f"{list(graphs)} names a graph twice"
    if not {"fp32", "int4"} & set(graphs):
        return (
            "needs fp32 or int4: the gate's export parity is measured on a graph with an exact float32 twin "
            "(fp16 and int8 are only checked loosely against it)"
        )
    if "int8" in graphs and "fp32" not in graphs:
        return "int8 is quantized from the fp32 graph, so it needs fp32 too"
    return None


class ExportParams(_Section):
    """ONNX export of each merged model, with the KV cache in the graph, for plain onnxruntime."""

    graphs: list[Literal["fp32", "fp16", "int8", "int4"]] = Field(
        ["fp32", "int8"],
        min_length=1,
        description="The graphs written: fp32 (model.onnx), fp16, int8 (onnxruntime "
        "dynamic quantization of fp32), int4 (MatMulNBits from the merged weights, no float32 graph written: the one "
        "for 8B+ bases). fp32 or int4 is required (their parity is exact); int8 needs fp32",
    )
    fp16_max_logit_diff: float = Field(
        0.05,
        gt=0,
        description="The fp16 graph's bound: max abs logit difference from the float32 model (export fails above)",
    )
    int4_block_size: Literal[16, 32, 64, 128] = Field(32, description="Input channels per int4 scale and zero point")
    min_greedy_agreement: float = Field(
        0.75,
        ge=0,
        le=1,
        description="Each graph but int8 must generate what its reference generates (greedy, "
        "max_new_tokens) on at least this share of the probes; below it the export fails",
    )

    @field_validator("graphs")
    @classmethod
    def _buildable(cls, graphs: list[str]) -> list[str]:
        problem = export_graphs_problem(graphs)
        if problem:
            raise ValueError(problem)
        return graphs

    opset: int | None = Field(None, ge=14, description="ONNX opset; null lets torch.onnx choose")
    max_new_tokens: int = Field(32, ge=1, description="Greedy tokens per probe for the generation parity check")
    device: Device = Field(
        "auto",
        description="Where the PyTorch reference of the parity checks runs; auto: CUDA when present. The graph "
        "itself is always traced on the CPU, so it is the same bytes on any machine",
    )


class GeneralParams(_Section):
    """The general-text sample the evaluation measures forgetting on (evaluate.general): not the tenant's data.
    The prepare stage reads and tokenizes it (data/general/<tenant>), the evaluate stage scores base, candidate
    and production on it (general_loss), and the gate refuses a candidate past gate.max_forgetting."""

    path: Path = Field(
        Path(f"models/base/{GENERAL_TEXT}"),
        description="A file or folder in any format prepare reads (JSONL, JSON, CSV, Parquet, Arrow, save_to_disk, "
        ".txt/.md; plain-text rows are scored on every token, chat rows on their answers), relative to the project. "
        f"Default: the base stage's {GENERAL_TEXT}, Python standard-library docstrings the built base did not "
        "pretrain on (for base.model, the same docstrings, not held out: set a sample of the text to keep)",
    )
    rows: int = Field(
        128, ge=1, description="Rows scored: the same ones every run (the lowest content hashes), not the first ones"
    )
    max_tokens: int = Field(256, ge=8, description="Each row is cut to this many tokens (its first ones)")
    allow_outside_dirs: list[Path] = Field(
        default_factory=list,
        description="Absolute folders outside the project that `path` may resolve into; empty: a path outside the "
        "project is refused (DVC tracks it as the prepare stage's dependency either way)",
    )

    @field_validator("path")
    @classmethod
    def _a_path(cls, v: Path) -> Path:
        if str(v) in ("", "."):
            raise ValueError(
                "must name a file or folder of general text (a path relative to the project, or absolute)"
            )
        return v

    @field_validator("allow_outside_dirs")
    @classmethod
    def _absolute_dirs(cls, v: list[Path]) -> list[Path]:
        return _absolute_folders(v, "")

    def resolved(self, project: Path | None) -> Path:
        """`path` as the stages read it: relative ones from `project` (the working folder when None)."""
        return self.path if self.path.is_absolute() or project is None else Path(project) / self.path

    def check_inside(self, project: Path, sources: Iterable[tuple[Path, str]] = ()) -> None:
        """Refuse a path, or one of its `sources` (the files of a folder, each a (path, relative name)), that
        resolves (symlinks followed) outside `project` and every allowed folder."""
        roots = (Path(project).resolve(), *(Path(p).resolve() for p in self.allow_outside_dirs))
        given = [(self.resolved(project), str(self.path))]
        for path, name in [*given, *(member for source in sources for member in _members(*source))]:
            target = path.resolve()
            if not _within(target, roots):
                what = repr(name) if name == given[0][1] else f"{name} (in {str(self.path)!r})"
                raise OutsidePathError(
                    f"evaluate.general.path: {what} resolves to {target}, outside the project ({roots[0]}). Data from "
                    "outside the project is read only when params.yaml says so: add the folder to "
                    f"evaluate.general.allow_outside_dirs (e.g. allow_outside_dirs: [{target.parent}])"
                )


class EvaluateParams(_Section):
    """Held-out evaluation of base, candidate and production on each tenant's test split."""

    max_new_tokens: int = Field(64, ge=1, description="Greedy tokens generated per test row")
    max_examples: int | None = Field(
        None,
        ge=1,
        description="Evaluate at most this many test rows (null: all); preference pairs are all scored (two forward "
        "passes each, no generation: a preference metric over a handful of pairs would be noise)",
    )
    examples_in_report: int = Field(3, ge=0, description="Example generations shown side by side in report.md")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Test rows scored and generated at once (left-padded); on the CPU the answers do not depend "
        "on it. auto: 32 on the CPU; on CUDA as many rows (up to 256) as the card's memory holds beside the loaded "
        "model (evaluate/batching.py: from the card's total memory, so a card of one kind always picks the same "
        "number), halved and retried on an out-of-memory error. metrics.json's `batch_rows` says what was used",
    )
    device: Device = Field(
        "auto",
        description="Where the models are scored and generate; auto: CUDA when present (bfloat16 there, "
        "float32 on the CPU, so the numbers of the two differ slightly)",
    )
    general: GeneralParams = Field(
        GeneralParams(),
        description="The general-text sample general_loss is measured on (forgetting, gate.max_forgetting)",
    )
    judge: JudgeParams | None = Field(
        None,
        description="An LLM judge (an OpenAI-compatible server) comparing the candidate's answers with production's, "
        "else the base's, pairwise in both orders: metrics.json's `judge` block and the candidate's judge_win_rate "
        "(evaluate/judge.py; docs/evaluation.md: LLM judge). null: no judge",
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_form(cls, v: Any) -> Any:
        return _count_or_auto(v, "test rows")


class SeedTask(_Section):
    """One example task of a tenant: the style the synthesize stage imitates (self-instruct seeding)."""

    instruction: str = Field(min_length=1, description="An example user message, in the tenant's own phrasing")
    output: str = Field(min_length=1, description="The answer the tenant expects to it")


class SynthEndpointParams(_Section):
    """An OpenAI-compatible server (vLLM, Ollama, OpenAI...) for `synthesize.generator: openai`."""

    base_url: str | None = Field(
        None, description="e.g. http://127.0.0.1:8000/v1 (the /chat/completions path is appended)"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        min_length=1,
        description="Name of the environment variable holding the API key (the key itself never goes in a file)",
    )
    requests_per_minute: float = Field(
        60, gt=0, description="Client-side rate limit: requests start at least 60/rpm seconds apart"
    )
    max_retries: int = Field(
        5,
        ge=0,
        le=20,
        description="Retries of a request after HTTP 429, 5xx or a timeout (exponential backoff + jitter)",
    )
    backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubled at each retry, capped at 60 s")
    timeout_s: float = Field(60, gt=0, description="Per-request timeout")


class JudgeParams(_Section):
    """evaluate.judge: the model asked which of two answers to a test row is better (evaluate/judge.py)."""

    endpoint: SynthEndpointParams = Field(
        description="The judge's server, as synthesize.endpoint: base_url, api_key_env (the key is sent to base_url "
        "only, in the Authorization header), requests_per_minute, max_retries, backoff_s, timeout_s"
    )
    model: str = Field(min_length=1, description="The model name sent to the endpoint")
    rubric: str | None = Field(
        None,
        min_length=1,
        description="What makes an answer better: the judge's system message (null: the default "
        "rubric, evaluate/judge.py DEFAULT_RUBRIC). loraline adds the question, the answers and the reply format",
    )
    with_reference: bool = Field(
        True, description="Show the judge the test row's reference answer (reference-guided judging)"
    )
    max_rows: int | None = Field(
        100,
        ge=1,
        description="Test rows judged: the first max_rows of those "
        "evaluated, each judged twice (both orders); null: all",
    )
    max_tokens: int = Field(256, ge=1, description="Most tokens of one verdict reply")
    seed: int = Field(
        0, ge=0, description="Sent with temperature 0 so that the verdicts repeat where the server honours it"
    )

    @model_validator(mode="after")
    def _endpoint_given(self) -> JudgeParams:
        if not self.endpoint.base_url:
            raise ValueError("evaluate.judge needs endpoint.base_url")
        return self


class SynthFilterParams(_Section):
    """Which synthetic rows are kept; the others go to rejected.jsonl with the reason."""

    min_question_chars: int = Field(8, ge=1)
    max_question_chars: int = Field(400, ge=1)
    min_answer_chars: int = Field(2, ge=1)
    max_answer_chars: int = Field(2000, ge=1)
    min_grounding: float = Field(
        0.7, ge=0, le=1, description="Share of the answer's word tokens that must occur in its source span"
    )

    @model_validator(mode="after")
    def _bounds(self) -> SynthFilterParams:
        if self.min_question_chars > self.max_question_chars or self.min_answer_chars > self.max_answer_chars:
            raise ValueError("min_*_chars must not exceed the matching max_*_chars")
        return self


class SynthesizeParams(_Section):
    """Instruction/answer pairs generated from each tenant's documents (the synthesize stage)."""

    generator: Literal["offline", "hf", "openai"] = Field(
        "offline",
        description="offline: rule-based, no model; hf: a transformers "
        "teacher model; openai: an OpenAI-compatible endpoint",
    )
    model: str | None = Field(
        None, description="hf: model id or local path; openai: the model name sent to the endpoint"
    )
    trust_remote_code: bool = Field(False, description="hf: run code shipped with the model; off unless you trust it")
    questions_per_fact: int = Field(3, ge=1, le=10, description="offline: phrasings generated per extracted fact")
    pairs_per_passage: int = Field(
        3, ge=1, le=20, description="hf/openai: question/answer pairs asked for per passage"
    )
    max_rows_per_document: int | None = Field(
        None, ge=1, description="Cap on generated rows per document (null: no cap)"
    )
    temperature: float = Field(0.7, ge=0, le=2, description="hf/openai sampling temperature (0: greedy)")
    max_new_tokens: int = Field(512, ge=16, description="hf/openai: most tokens generated per passage")
    endpoint: SynthEndpointParams = SynthEndpointParams()
    filters: SynthFilterParams = SynthFilterParams()

    @model_validator(mode="after")
    def _model_given(self) -> SynthesizeParams:
        if self.generator != "offline" and not self.model:
            raise ValueError(f"generator {self.generator!r} needs synthesize.model")
        if self.generator == "openai" and not self.endpoint.base_url:
            raise ValueError("generator 'openai' needs synthesize.endpoint.base_url")
        return self


class GateParams(_Section):
    """Promotion rules (consumed by the gate); tenants may override any key."""

    primary_metric: str = "answer_loss"
    min_gain_over_base: float = Field(0.05, description="Relative improvement over the base on the primary metric")
    secondary_metric: str | None = Field(
        None,
        description="A second metric the candidate must also improve on over the base, e.g. answer_loss when "
        "the primary is a task metric such as json_field_accuracy (null: no second rule)",
    )
    min_secondary_gain: float = Field(0.05, description="Relative improvement over the base on the secondary metric")
    max_regression_vs_prod: float = Field(
        0.02, ge=0, description="Largest tolerated relative regression vs production"
    )
    max_forgetting: float | None = Field(
        0.10,
        ge=0,
        description="Largest tolerated relative increase of the candidate's general_loss over the base's "
        "(the loss on evaluate.general, text that is not the tenant's): more, and the adapter forgot too much of "
        "everything else. null: the rule is off (the gate says so)",
    )
    max_merge_logit_diff: float = Field(1e-3, gt=0)
    max_export_logit_diff: float = Field(1e-3, gt=0)
    min_judge_win_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="The candidate's judge win rate (evaluate.judge) against the version it replaces "
        "(production, judged again at release) or else the base must be at least this; null: no judge rule",
    )


# DEPLOY_TARGETS (layout) spelled as a type; a test checks the two agree.
DeployTarget = Literal["adapter", "merged", "onnx"]


class DeployParams(_Section):
    """What each tenant is deployed as (read by merge, export, evaluate, gate, the registry and the summary);
    tenants.<t>.deploy replaces it for one tenant."""

    targets: list[DeployTarget] = Field(
        default_factory=lambda: list(DEPLOY_TARGETS),
        description="adapter: the adapter served on the shared base (loraline serve); merged: a standalone Hugging "
        "Face folder (models/merged/<t>); onnx: its ONNX export (models/onnx/<t>). Without merged, the merge stage "
        "writes only its report (the probes' reference answers, from base "
        "+ adapter) and the gate's evidence is the adapter on the base",
    )

    @field_validator("targets")
    @classmethod
    def _targets_fit(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"must name at least adapter; allowed: {', '.join(DEPLOY_TARGETS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a target twice: {v}")
        if "adapter" not in v:
            raise ValueError(
                "must include adapter: serving (loraline serve) loads the adapter on the shared base, the "
                "registry versions it, and merged and onnx are built from it"
            )
        if "onnx" in v and "merged" not in v:
            raise ValueError("onnx needs merged: the ONNX graph is exported from the merged model's folder")
        return v

    def builds(self, target: str) -> bool:
        return target in self.targets


class OrchestrateParams(_Section):
    """How the Prefect flow drives the DVC stages (read by flows/, never by a stage)."""

    stage_timeout_minutes: float | None = Field(
        180, gt=0, description="A stage still running after this long is killed and fails (null: no limit)"
    )
    train_retries: int = Field(
        1, ge=0, le=5, description="Retries of a failed train stage; a retry resumes from the last checkpoint"
    )
    io_retries: int = Field(
        2, ge=0, le=10, description="Retries of DVC pushes and registry writes (I/O that may recover)"
    )
    retry_delay_seconds: float = Field(10, ge=0, description="Wait between retries")
    parallel_tenants: int = Field(
        1,
        ge=1,
        description="Tenants whose stages run at once, each on an equal share of the visible GPUs "
        "(`loraline run --parallel N` overrides it); the result is the same as one after another",
    )
    registry_remote: str | None = Field(
        None,
        description="Git remote the registry's tags are fetched from before each release and pushed to after "
        "it, so flow runs on several machines (work-pool workers) share one registry (null: tags stay in this clone)",
    )
    crash_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Times a flow run that crashed (its worker or machine lost) runs again once "
        "flows/automations.yaml's automations schedule it again; the run after that fails at its start",
    )


class CanaryParams(_Section):
    """serve.canary: a promotion first takes a share of its tenant's requests beside the version it replaces,
    and a serving replica keeps it or rolls it back in the registry once it has the evidence (docs/serving.md)."""

    fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Share of the tenant's requests the promoted version takes during its canary (sticky "
        "per client: the request's `user` field, else its X-Client-Id header; other requests are split by a counter)",
    )
    min_requests: int = Field(
        50,
        ge=1,
        description="Answers (successes and server errors; client 4xx do not count) the promoted version needs on "
        "one replica before that replica decides; below fraction 1, "
        "the previous version needs as many for the latency comparison",
    )
    max_error_rate: float = Field(
        0.02,
        ge=0,
        le=1,
        description="The promoted version is rolled back when more than this share of its answers are "
        "server errors (engine 5xx, an engine that lost the adapter, timeouts, a broken stream)",
    )
    max_latency_ratio: float = Field(
        1.5,
        gt=0,
        description="The promoted version is rolled back when its median seconds per output token exceed the "
        "previous version's over the same window by more than this factor",
    )


class ServeParams(_Section):
    """`loraline serve`: every tenant's production adapter on one vLLM server, behind loraline's gateway."""

    host: str = Field(
        "127.0.0.1", description="Where the gateway listens (clients call it; 0.0.0.0 for every interface)"
    )
    port: int = Field(8000, ge=1, le=65535, description="The gateway's port (OpenAI-compatible API)")
    engine_port: int = Field(
        8001, ge=1, le=65535, description="vLLM's own port, on 127.0.0.1 only: the gateway is the way in"
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        description="vLLM --max-lora-rank (null: the largest rank "
        "among the servable adapters, rounded up to vLLM's sizes)",
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        description="Adapters vLLM keeps loaded at once (null: 2 per tenant, so a new version loads beside the old)",
    )
    max_model_len: int | None = Field(None, ge=16, description="Context length served (null: the base's)")
    dtype: Literal["merge", "auto", "float32", "bfloat16", "float16"] = Field(
        "merge",
        description="vLLM --dtype. merge: merge.dtype, the precision of the merged model whose greedy answers the "
        "deployment check compares with; auto: vLLM's choice, which serves a float32 model in 16 bits",
    )
    engine_args: list[str] = Field(
        default_factory=list,
        description="Extra vLLM server arguments passed as they are, e.g. [--enforce-eager, --max-num-seqs, '64']",
    )
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="On CPU: vLLM's KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    poll_seconds: float = Field(
        5.0, gt=0, description="How often the gateway reads the registry for promotions, rollbacks and new tenants"
    )
    check_agreement: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of the merge stage's probes whose greedy answer through the server must equal "
        "the merged model's for a (re)loaded version to be served; below it, serving keeps the previous version",
    )
    startup_timeout_s: float = Field(300, gt=0, description="How long vLLM may take to start")
    auth: bool = Field(
        False,
        description="Each tenant's key, from the environment variable LORALINE_SERVE_KEY_<TENANT> (upper case, '-' as "
        "'_'), may call that tenant only: 401 without a valid key; another tenant's model is a 404, as an unknown one "
        "is, so a key learns of no other tenant. Off: no key is asked for",
    )
    # 32: the 64 concurrent requests took about 50 s each on 2 CPU cores; half that bounds a
    # request near 25 s there. vLLM batches up to --max-num-seqs at once (128 on CPU, 256 or 1024 on
    # a GPU): on a GPU, raise this towards it, or the engine runs smaller batches than it could.
    max_queue: int = Field(
        32,
        ge=0,
        description="Requests the gateway has at the engine at once (a stream counts until its last chunk); "
        "one more is answered at once with 429 and Retry-After instead of waiting behind them. 0: no limit",
    )
    log_traffic: bool = Field(
        False,
        description="Append each answered chat completion (response id, time, tenant, served version, the request's "
        "messages and the answer, streamed ones included) to logs/traffic/<tenant>/<UTC day>.jsonl, and accept "
        "feedback on it (POST /loraline/feedback) for `loraline feedback export`. API keys and headers are never "
        "written. Off: nothing is written and feedback is refused",
    )
    canary: CanaryParams | None = Field(
        None,
        description="Canary rollout: promotions made while this is set (release, `loraline registry promote`) first "
        "take canary.fraction of their tenant's requests, then are kept or rolled back in the registry by a serving "
        "replica. null: a promotion moves all of its tenant's traffic at once",
    )


class TenantParams(_Section):
    name: str = Field(description="Lower-case id: letters, digits and inner '-' (the key under `tenants`)")
    raw_dir: Path = Field(
        description="Folder of this tenant's raw files (searched recursively); "
        "inside the project unless allow_outside_dirs holds it"
    )
    allow_outside_dirs: list[Path] = Field(
        default_factory=list,
        description="Absolute folders outside the project that this tenant's raw data may come from: raw_dir itself, "
        "or the targets of symlinked files inside raw_dir. Empty (the default): a raw_dir or raw file resolving "
        "outside the project is refused. DVC still tracks the data: an outside raw_dir is the stages' dependency (by "
        "hash), and a symlinked file is hashed by its content as part of raw_dir",
    )
    system_prompt: str | None = Field(None, description="Overrides prepare.system_prompt for this tenant")
    synthetic_ratio: float | None = Field(None, ge=0, description="Overrides prepare.synthetic_ratio for this tenant")
    sources: list[SourceParams] = Field(
        default_factory=list,
        description="How to read raw files whose layout is not detected (docs/data.md)",
    )
    seed_tasks: list[SeedTask] = Field(
        default_factory=list, description="A handful of example tasks whose style the synthesize stage imitates"
    )
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the train section")
    gate: dict[str, Any] = Field(default_factory=dict, description="Overrides of the gate section")
    deploy: DeployParams | None = Field(
        None, description="Replaces the deploy section for this tenant (null: the default)"
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not TENANT_NAME.match(v) or len(v) > TENANT_NAME_MAX:
            raise ValueError(
                f"tenant name {v!r} must be 1-{TENANT_NAME_MAX} lower-case letters, digits and '-' (not first or "
                "last), e.g. acme-shop: it names the DVC artifacts "
                "<tenant>-adapter and <tenant>-onnx, which allow only [a-z0-9-]"
            )
        if v == TIMING_DIR:
            raise ValueError(f"tenant name {v!r} is reserved: reports/{TIMING_DIR}/ holds every stage's run timing")
        return v

    @field_validator("allow_outside_dirs")
    @classmethod
    def _absolute_dirs(cls, v: list[Path]) -> list[Path]:
        return _absolute_folders(v, ", e.g. /mnt/data/acme")

    def read_roots(self, project: Path | None) -> tuple[Path, ...]:
        """Folders this tenant's raw files may resolve into: the project first (raw_dir itself when the project
        is not known, as for params built in code), then allow_outside_dirs; all resolved."""
        return tuple(
            Path(p).resolve() for p in (project if project is not None else self.raw_dir, *self.allow_outside_dirs)
        )

    def check_raw_dir(self, project: Path, read_as: Path | None = None) -> None:
        """Refuse a raw_dir that resolves (symlinks followed) outside `project` and every allowed folder.
        `read_as`: the path a stage reads it by (relative ones from the working folder); default: the project's."""
        target = (read_as if read_as is not None else Path(project) / self.raw_dir).resolve()
        if not _within(target, self.read_roots(project)):
            raise OutsidePathError(
                f"tenants.{self.name}.raw_dir: {str(self.raw_dir)!r} resolves to {target}, outside the project "
                f"({Path(project).resolve()}). Data from outside the project is read only when params.yaml says so: "
                f"add the folder to tenants.{self.name}.allow_outside_dirs (e.g. allow_outside_dirs: [{target}]); "
                "DVC then tracks it by hash as the documents and prepare stages' dependency"
            )

    def check_sources(self, sources: Iterable[tuple[Path, str]], project: Path | None) -> None:
        """Refuse a raw source (file, or save_to_disk folder) of raw_dir that resolves outside the project and
        every allowed folder: a symlink out of the project. A symlinked folder outside the project is refused
        even when allowed, since DVC hashes the files under raw_dir but does not look into linked folders."""
        roots = self.read_roots(project)
        where = f"{'the project' if project is not None else 'raw_dir'} ({roots[0]})"
        for path, rel in (member for source in sources for member in _members(*source)):
            target = path.resolve()
            if _within(target, roots[:1]):
                continue
            if path.is_symlink() and path.is_dir():
                raise OutsidePathError(
                    f"tenants.{self.name}: raw folder {rel} (in {self.raw_dir}) is a symlink to {target}, outside "
                    f"{where}. DVC does not look inside a linked folder, so its changes would not re-run the stages: "
                    f"set raw_dir to a folder holding it and add that folder to tenants.{self.name}.allow_outside_dirs"
                )
            if not _within(target, roots[1:]):
                raise OutsidePathError(
                    f"tenants.{self.name}: raw file {rel} (in {self.raw_dir}) resolves to {target}, outside {where}. "
                    "Data from outside the project is read only when params.yaml says so: add a folder holding it to "
                    f"tenants.{self.name}.allow_outside_dirs (e.g. allow_outside_dirs: [{target.parent}]); DVC then "
                    "tracks the file by its content as part of raw_dir"
                )


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _members(path: Path, rel: str) -> Iterator[tuple[Path, str]]:
    """A raw source and, for a save_to_disk folder, every entry inside it (each may be a symlink)."""
    yield path, rel
    if path.is_dir():
        for inner in sorted(path.rglob("*")):
            yield inner, f"{rel}/{inner.relative_to(path).as_posix()}"


class Params(_Section):
    seed: int = 1234
    base: BaseParams = BaseParams()
    prepare: PrepareParams = PrepareParams()
    train: TrainParams = TrainParams()
    merge: MergeParams = MergeParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    gate: GateParams = GateParams()
    deploy: DeployParams = DeployParams()
    synthesize: SynthesizeParams = SynthesizeParams()
    orchestrate: OrchestrateParams = OrchestrateParams()
    serve: ServeParams = ServeParams()
    tenants: list[TenantParams] = Field(min_length=1)
    # Not a key of params.yaml: where it was loaded from, so that the stages bound their reads by the same folder.
    _project: Path | None = PrivateAttr(None)

    @property
    def project(self) -> Path | None:
        """The project folder (params.yaml's, resolved) that the tenants' raw data must stay in unless
        tenants.<t>.allow_outside_dirs allows more; None for params built in code (each raw_dir bounds its reads)."""
        return self._project

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenants_from_mapping(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return [
                {**(entry if isinstance(entry, dict) else {"raw_dir": entry}), "name": name}
                for name, entry in v.items()
            ]
        return v

    @model_validator(mode="after")
    def _tenants_valid(self) -> Params:
        names = [t.name for t in self.tenants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tenant names must be unique; repeated: {', '.join(dupes)}")
        return self

    def check_overrides(self) -> None:
        """Validate every tenant's train/gate overrides now, not when a later stage first reads them."""
        for t in self.tenants:
            for section, model, base in (("train", TrainParams, self.train), ("gate", GateParams, self.gate)):
                try:
                    model.model_validate({**base.model_dump(), **getattr(t, section)})
                except ValidationError as exc:
                    raise ConfigError(_format_errors(exc, model, prefix=f"tenants.{t.name}.{section}")) from None
            self._deploy_fits(t.name)

    def _deploy_fits(self, name: str) -> None:
        """Adapters that only a merged folder describes whole need `merged`: the evaluation and the probes of an
        adapter-only tenant load the adapter on the plain base, which would drop a LongLoRA adapter's rope scaling
        and a QA-LoRA adapter's quantized base."""
        train = self.train_for(name)
        needs = (
            "train.long_context"
            if train.long_context is not None
            else "train.method qalora"
            if train.method == "qalora"
            else None
        )
        if needs and not self.deploy_for(name).builds("merged"):
            raise ConfigError(
                f"tenants.{name}.deploy.targets: {needs} needs merged in deploy.targets (the adapter alone, "
                "on the plain base, is not the model it trained); add merged"
            )

    def tenant_params(self, name: str) -> TenantParams:
        for t in self.tenants:
            if t.name == name:
                return t
        raise ConfigError(f"unknown tenant {name!r}; params.yaml defines: {', '.join(self.tenant_names)}")

    @property
    def tenant_names(self) -> list[str]:
        return [t.name for t in self.tenants]

    def train_for(self, name: str) -> TrainParams:
        merged = {**self.train.model_dump(), **self.tenant_params(name).train}
        if merged.get("seed") is None:
            merged["seed"] = self.seed
        return TrainParams.model_validate(merged)

    def deploy_for(self, name: str) -> DeployParams:
        """The tenant's deploy section: tenants.<t>.deploy when given, else the top-level one."""
        return self.tenant_params(name).deploy or self.deploy

    def gate_for(self, name: str) -> GateParams:
        return GateParams.model_validate({**self.gate.model_dump(), **self.tenant_params(name).gate})

    def prepare_for(self, name: str) -> PrepareParams:
        """The prepare section for one tenant: its synthetic_ratio override, the seed defaulted to the top-level
        one."""
        t = self.tenant_params(name)
        update: dict[str, Any] = {}
        if t.synthetic_ratio is not None:
            update["synthetic_ratio"] = t.synthetic_ratio
        if self.prepare.seed is None:
            update["seed"] = self.seed
        long_context = self.train_for(name).long_context
        if long_context is not None:  # long rows are the point: too_long follows the target, documents become rows
            update["max_tokens"] = max(self.prepare.max_tokens, long_context.target_len)
            if self.prepare.document_rows is None:
                update["document_rows"] = long_context.target_len
        return self.prepare.model_copy(update=update)

    def system_prompt_for(self, name: str) -> str | None:
        t = self.tenant_params(name)
        return t.system_prompt if t.system_prompt is not None else self.prepare.system_prompt


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the location `loc` (for listing allowed keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return current if fields else None
        annotation = fields[part].annotation
        current = _first_model(annotation)
        if current is None:
            return None
    return current if hasattr(current, "model_fields") else None


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _format_errors(
    exc: ValidationError, root: type[BaseModel], prefix: str = "", tenant_names: list[str] | None = None
) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        shown_loc = list(loc)
        if (
            tenant_names
            and len(loc) > 1
            and loc[0] == "tenants"
            and isinstance(loc[1], int)
            and loc[1] < len(tenant_names)
        ):
            shown_loc[1] = tenant_names[loc[1]]
        key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(shown_loc)) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            allowed = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"{key}: unknown key; allowed keys here: {allowed}")
        elif err["type"] in ("literal_error", "enum"):
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        elif err["type"] == "finite_number":
            lines.append(f"{key}: must be a finite number, got {err.get('input')!r}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"{key}: {err['msg']}{shown}")
    return "\n".join(lines)


def parse_params(
    data: Any, source: str = "params.yaml", root: Path | None = None, *, project: Path | None = None
) -> Params:
    """Validate a params mapping; relative tenant folders are resolved against `root` when given.

    `project` (default: `root`) is the folder the tenants' raw data must stay in unless
    tenants.<t>.allow_outside_dirs says otherwise; None (params built in code) skips that check.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        names = list(data["tenants"]) if isinstance(data.get("tenants"), dict) else None
        raise ConfigError(f"{source} is invalid:\n{_format_errors(exc, Params, tenant_names=names)}") from None
    try:
        params.check_overrides()
        for tenant_params in params.tenants if (project or root) is not None else ():
            tenant_params.check_raw_dir(project or root)
        if (project or root) is not None:
            params.evaluate.general.check_inside(project or root)
    except ConfigError as exc:
        raise type(exc)(f"{source} is invalid:\n{exc}") from None
    if root is not None:
        tenants = [
            t.model_copy(update={"raw_dir": t.raw_dir if t.raw_dir.is_absolute() else root / t.raw_dir})
            for t in params.tenants
        ]
        params = params.model_copy(update={"tenants": tenants})
    if (project or root) is not None:
        params._project = Path(project or root).resolve()
    return params


def load_params(path: str | Path = DEFAULT_PARAMS_PATH, overrides: dict[str, Any] | None = None) -> Params:
    """Load params.yaml. `overrides` maps dotted keys to values (the CLI's --set key=value)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; loraline reads its settings from params.yaml") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        data = set_dotted(data, dotted, value)
    return parse_params(data, source=str(path), project=path.parent)  # the project: where params.yaml and dvc.yaml are


def set_dotted(data: dict, dotted: str, value: Any) -> dict:
    """Copy of `data` with `a.b.c` set to value (e.g. tenants.acme-shop.train.lora_r; list indices allowed)."""
    out = copy.deepcopy(data)
    node: Any = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        key: Any = int(part) if isinstance(node, list) else part
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        else:
            node = node[key]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out

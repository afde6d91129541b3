"""The records and reports stages leave beside their outputs, as typed models: base_record.json (base),
train_record.json (train), merge_report.json (merge), export_report.json (export). Later stages, the
registry and serving read them only through these models, and the stages write them only through them.

Invariants:
- Same bytes as the dicts they replace: `write` is io.write_json (sorted keys) of the fields that were
  given (`exclude_unset`), so a key a writer leaves out stays absent and a None it gives is written null.
  Numbers keep their JSON type (`Real` = float | int: an int stays an int, NaN stays NaN).
- Every variant written so far reads: a QA-LoRA or long-context run, a deploy target not built
  (`"merged"`/`"onnx": "not built (deploy.targets)"`), a hub, local or built base, and older files that
  lack keys added since (hence most fields default to None) or hold keys since dropped (kept as they are,
  `extra="allow"`: a file read and written again is unchanged). Only the keys every record has ever had
  are required.
- A record built in code with a key no model declares is refused by `write` (a typo is not a new field).
  A field assigned after construction is validated as the constructor's are (`report.vs_4bit = {...}` holds
  a QuantizedGap), so the stages build a record piece by piece and still write only typed parts.
- A file that does not match raises RecordError naming the file and the field (`steps.done: Input
  should be a valid integer`).

Open parts stay `dict[str, Any]`: params dumps, library versions, file hash maps, the long-context
config overrides, the corpus composition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError

from loraline import io


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("should be a number")
    return value


# A measured number or a tolerance, kept as written: an int is not rewritten as 1.0 (one error, not one per type).
Real = Annotated[float | int, PlainValidator(_number)]
Hashes = dict[str, str]  # file name -> sha256
R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A record or report that does not match its model; the message names the file and the field."""


class Part(BaseModel):
    """A piece of a record: declared fields typed, undeclared (older) keys kept as they are."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class Record(Part):
    """A whole record file: read, validated, written back to the same bytes."""

    KIND: ClassVar[str] = "record"

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """The record in `path` (FileNotFoundError when absent; RecordError when it is not this record)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise RecordError(f"{path} is not a valid {cls.KIND}: not JSON ({exc})") from None
        return cls.parse(data, path)

    @classmethod
    def parse(cls: type[R], data: Any, source: str | Path = "<memory>") -> R:
        """`data` (as json.loads gives it) validated; `source` names it in the error."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecordError(f"{source} is not a valid {cls.KIND}: {_problems(exc)}") from None

    def to_json(self) -> dict[str, Any]:
        """The record as the dict its file holds: the fields given, nothing else."""
        return self.model_dump(exclude_unset=True)

    def assign(self: R, fields: dict[str, Any]) -> R:
        """Each of `fields` set on the record (validated as the constructor validates it); the record."""
        for name, value in fields.items():
            setattr(self, name, value)
        return self

    def write(self, path: str | Path) -> Path:
        """Write the record to `path` atomically (io.write_json); refused when it holds undeclared keys."""
        unknown = _undeclared(self, "")
        if unknown:
            raise RecordError(f"{path}: {self.KIND} fields not declared in loraline.records: {', '.join(unknown)}")
        return io.write_json(path, self.to_json())


def _problems(exc: ValidationError) -> str:
    """Each error as `field.path: message (got value)`, joined."""
    out = []
    for err in exc.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "(the file)"
        got = "" if err["type"] == "missing" else f" (got {_short(err.get('input'))})"
        out.append(f"{where}: {err['msg']}{got}")
    return "; ".join(out)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _undeclared(model: BaseModel, prefix: str) -> list[str]:
    """Dotted names of the undeclared keys in `model` and the models inside it."""
    out = [f"{prefix}{k}" for k in model.model_extra or {}]
    for name in model.model_fields_set & set(type(model).model_fields):
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                at = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                out += _undeclared(item, at)
    return out


# --- shared parts ---------------------------------------------------------------------------------


class CodeFingerprint(Part):
    """provenance.code_fingerprint: one sha256 over the stage's import closure, and its module count."""

    sha256: str
    modules: int


class BaseRef(Part):
    """The base an adapter was trained on or merged into (train record and merge report: `base`)."""

    dir: str
    source: str | None = None
    model_ref: str | None = None
    sha256: str


class ProbeParity(Part):
    """One probe: a model's logits and greedy answer against its reference's (modelling.parity.compare;
    export adds the cached decoding steps and the answer's length)."""

    max_abs_logit_diff: Real
    mean_abs_logit_diff: Real
    next_token_equal: bool
    greedy_equal: bool
    greedy_common_prefix: int
    decode_max_abs_logit_diff: Real | None = None
    decode_step_diffs: list[Real] | None = None
    greedy_tokens: int | None = None


class Parity(Part):
    """modelling.parity.compare / summarize over a probe set."""

    max_abs_logit_diff: Real
    mean_abs_logit_diff: Real
    greedy_agreement: Real
    next_token_agreement: Real
    per_probe: list[ProbeParity] | None = None
    merged_greedy_texts: list[str] | None = None


# --- base_record.json -----------------------------------------------------------------------------


class BuiltOn(Part):
    device: str
    name: str
    build: dict[str, Any]


class Corpus(Part):
    sha256: str
    composition: dict[str, dict[str, Any]] | None = None
    document_files: list[str] | None = None
    python_version: str | None = None


class TokenizerFacts(Part):
    vocab_size: int
    special_tokens: dict[str, int] | None = None


class GeneralText(Part):
    """general_text.jsonl in the base folder: the forgetting check's default sample."""

    file: str
    rows: int
    source: str


class Pretraining(Part):
    steps: int
    copy_drill_steps: int | None = None
    tokens_seen: int | None = None
    loss: str | None = None
    epochs: Real | None = None
    final_loss: Real | None = None
    loss_curve: dict[str, Real] | None = None
    threads: int | None = None


class BaseRecord(Record):
    """models/base/base_record.json: the base every adapter sits on, built here (`source` built, the model
    in the folder) or recorded (a local folder or a Hugging Face id, never downloaded)."""

    KIND: ClassVar[str] = "base record"

    source: Literal["built", "local", "hub"]
    model_ref: str
    revision: str | None = None
    revision_pinned: bool | None = None  # hub: whether the revision is a commit
    cached: bool | None = None  # hub: whether the local Hugging Face cache holds it
    note: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    vocab_size: int | None = None
    tokenizer_class: str | None = None  # local/hub: the class AutoTokenizer resolved (modelling.loading reuses it)
    parameters: int | None = None
    seed: int | None = None
    chat_template_source: str | None = None
    chat_template_sha256: str | None = None
    params: dict[str, Any] | None = None  # base params as given (a recorded base: without `build`)
    built_on: BuiltOn | None = None
    corpus: Corpus | None = None
    tokenizer: TokenizerFacts | None = None
    general_text: GeneralText | None = None
    pretraining: Pretraining | None = None
    files: Hashes | None = None
    code: CodeFingerprint | None = None
    library_versions: dict[str, str | None] | None = None

    @property
    def trust_remote_code(self) -> bool:
        return bool((self.params or {}).get("trust_remote_code"))


# --- train_record.json ----------------------------------------------------------------------------


class Batch(Part):
    """train.autobatch.BatchChoice: the micro-batch that ran and how it was chosen."""

    rows: int
    requested: int | str
    how: str
    note: str
    peak_bytes: int | None = None
    budget_bytes: int | None = None


class TrainData(Part):
    dataset_dir: str
    sha256: str
    train_examples: int
    validation_examples: int


class Sharding(Part):
    """train.sharded.sharding_facts (train.sharding fsdp)."""

    sharded_layers: int
    layer_bytes_held: int
    layer_bytes: int
    whole_bytes: int


class Speed(Part):
    attention: str | None = None
    fused_cross_entropy: bool
    checkpointed_layers: int


class Steps(Part):
    planned: int
    done: int
    warmup: int | None = None
    epochs_started: int | None = None


class TokensSeen(Part):
    useful: int
    answer: int | None = None


class Loss(Part):
    """Validation losses of the shipped adapter and the base, and the mean of the last train steps."""

    final_train: Real | None = None
    final_val: Real | None = None
    base_val: Real | None = None
    best_val: Real | None = None
    best_step: int | None = None


class PreferenceMetrics(Part):
    """A preference objective's numbers over pairs (train.preference): the loss, how often the chosen answer's
    reward beats the rejected one's, the mean rewards and their margin; ORPO adds its two terms."""

    loss: Real | None = None
    reward_accuracy: Real | None = None
    reward_margin: Real | None = None
    chosen_reward: Real | None = None
    rejected_reward: Real | None = None
    nll: Real | None = None
    log_odds_ratio: Real | None = None


class TrainPreference(Part):
    """train.objective dpo | orpo: what it trained on and how the pairs moved (absent for sft)."""

    objective: str
    beta: Real | None = None
    orpo_lambda: Real | None = None
    reference: str | None = None
    pairs: dict[str, int]
    sft_rows_left_out: dict[str, int]
    train: PreferenceMetrics | None = None  # mean of the last steps, as loss.final_train
    base_val: PreferenceMetrics | None = None
    final_val: PreferenceMetrics | None = None  # of the shipped adapter


class LongContext(Part):
    """What train.long_context changed; merge applies config_overrides to the base before the adapter."""

    target_len: int
    original_context: int
    rope_scaling: str
    s2_attn: bool
    group_size: int | None = None
    trainable: list[str]
    config_overrides: dict[str, Any]


class TrainQalora(Part):
    """How train.method qalora quantized the base (the merge quantizes it the same way)."""

    bits: int
    group_size: int
    quantizer: str | None = None
    quantized_layers: int | None = None
    adapted_layers: int | None = None


class TrainRecord(Record):
    """models/adapters/<tenant>/train_record.json: what trained the adapter beside it."""

    KIND: ClassVar[str] = "train record"

    params: dict[str, Any]  # train params as given (batch_size as asked; `batch` says what ran)
    batch: Batch | None = None
    seed: int | None = None
    fingerprint: str
    data: TrainData
    base: BaseRef
    device: str | None = None
    devices: int | None = None
    sharding: Sharding | None = None
    compute_dtype: str | None = None
    optimizer: str | None = None
    speed: Speed | None = None
    steps: Steps
    stopped_early: bool | None = None
    tokens_seen: TokensSeen | None = None
    loss: Loss
    preference: TrainPreference | None = None
    long_context: LongContext | None = None
    qalora: TrainQalora | None = None
    code: CodeFingerprint | None = None
    library_versions: dict[str, str | None] | None = None
    files: Hashes | None = None

    @property
    def quantization(self) -> str | None:
        """What the adapter was trained against: "qalora", or train.quantization (nf4, fp4, none)."""
        return "qalora" if self.params.get("method") == "qalora" else self.params.get("quantization")

    @property
    def config_overrides(self) -> dict[str, Any]:
        """What to change in the base config before putting the adapter on it (long context: the rope)."""
        return dict(self.long_context.config_overrides) if self.long_context else {}


# --- merge_report.json ----------------------------------------------------------------------------


class TenantDrawFacts(Part):
    """merge.probes: how the tenant's test rows were drawn (merge.probes.ProbeSet.facts)."""

    split: str
    requested: int
    test_rows: int
    seed: int
    order: str
    max_prompt_tokens: int
    skipped_long: list[str]


class ProbeFacts(Part):
    count: int
    builtin: int | None = None
    tenant: int | None = None
    prompt_tokens: list[int] | None = None
    default: bool | None = None
    tenant_draw: TenantDrawFacts | None = None


class ProbeOrigin(Part):
    source: str  # "builtin" or "test"
    id: str | None = None


class ProbeReference(Part):
    """The probes as token ids and the reference model's greedy answers: what serving must reproduce.
    One written before merge.probes has no `sources` (built-in probes only)."""

    prompts: list[list[int]]
    sources: list[ProbeOrigin] | None = None
    greedy: list[list[int]] | None = None
    texts: list[str]
    max_new_tokens: int
    model: str | None = None  # a merge not built: "base + adapter, unmerged"


class AdapterRef(Part):
    dir: str
    files: Hashes
    train_fingerprint: str | None = None
    quantization: str | None = None


class TorchaoCheckpoint(Part):
    """QA-LoRA: <merged>/torchao, loaded back and checked (modelling.qalora_torchao)."""

    passed: bool
    loader: str | None = None
    torchao: str | None = None  # its version
    bits: int | None = None
    group_size: int | None = None
    bytes: int | None = None
    max_abs_weight_diff: Real | None = None
    vs_unmerged: Parity | None = None
    files: Hashes | None = None


class MergeQalora(Part):
    bits: int
    group_size: int
    layers: int | None = None
    merged: str | None = None
    lowbit_file: str | None = None
    torchao: TorchaoCheckpoint | None = None


class QuantizedGap(Part):
    """The merged model against the 4-bit model the adapter trained on; or why it was not measured."""

    skipped: str | None = None
    max_abs_logit_diff: Real | None = None
    mean_abs_logit_diff: Real | None = None
    greedy_agreement: Real | None = None
    next_token_agreement: Real | None = None
    per_probe: list[ProbeParity] | None = None
    quantization: dict[str, Any] | None = None


class ReloadCheck(Part):
    max_abs_logit_diff: Real
    loaded_dtype: str | None = None


class MergeReport(Record):
    """models/merged/<tenant>/merge_report.json (copied to reports/<tenant>/): the merge's parity checks and
    the probe reference serving replays. Without `merged` in deploy.targets: `merged` says so, and the
    reference is base + adapter unmerged (no merged_vs_unmerged, vs_4bit, reload, files)."""

    KIND: ClassVar[str] = "merge report"

    passed: bool
    merged: str | None = None  # layout.NOT_BUILT when deploy.targets does not build it
    device: str | None = None
    device_name: str | None = None
    dtype: str | None = None
    tolerance: Real | None = None
    max_new_tokens: int | None = None
    probes: ProbeFacts | None = None
    probe_reference: ProbeReference | None = None
    merged_vs_unmerged: Parity | None = None
    adapter: AdapterRef | None = None
    base: BaseRef | None = None
    qalora: MergeQalora | None = None
    vs_4bit: QuantizedGap | None = None
    reload: ReloadCheck | None = None
    files: Hashes | None = None
    code: CodeFingerprint | None = None
    library_versions: dict[str, str | None] | None = None


# --- export_report.json ---------------------------------------------------------------------------


class GraphReport(Part):
    """One ONNX graph: its file's facts (export.onnx_export, int4, lowbit), size, and parity against its
    reference (`vs_float`: a quantized graph against the unquantized model)."""

    file: str | None = None  # absent in reports written before graphs named their file
    external_data: bool | None = None
    opset: int | None = None
    inputs: list[str] | None = None
    outputs: list[str] | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    dtype: str | None = None
    weight_type: str | None = None
    method: str | None = None
    op: str | None = None
    bits: int | None = None
    stored_bits: int | None = None
    block_size: int | None = None
    layers: int | None = None
    float_layers: list[str] | None = None
    bytes: int | None = None
    float_bytes: int | None = None
    size_vs_float: Real | None = None
    max_abs_logit_diff: Real | None = None
    mean_abs_logit_diff: Real | None = None
    greedy_agreement: Real | None = None
    next_token_agreement: Real | None = None
    decode_max_abs_logit_diff: Real | None = None
    per_probe: list[ProbeParity] | None = None
    greedy_texts: list[str] | None = None
    vs_float: Parity | None = None


class LongContextProbe(Part):
    tokens: int
    original_context: int
    max_position_embeddings: int


class ExportReport(Record):
    """models/onnx/<tenant>/export_report.json (copied to reports/<tenant>/): each graph's parity. Without
    `onnx` in deploy.targets: only passed, `onnx` (saying so) and `targets`."""

    KIND: ClassVar[str] = "export report"

    passed: bool
    onnx: str | None = None  # layout.NOT_BUILT when deploy.targets does not build it
    targets: list[str] | None = None
    model_dir: str | None = None
    device: str | None = None
    device_name: str | None = None
    graph: GraphReport | None = None  # the first graph's file facts
    graphs: list[str] | None = None
    tolerance: Real | None = None
    fp16_tolerance: Real | None = None
    min_greedy_agreement: Real | None = None
    probes: list[list[dict[str, str]]] | None = None
    max_new_tokens: int | None = None
    decode_steps: int | None = None
    eos_token_ids: list[int] | None = None
    reference_greedy_texts: list[str] | None = None
    long_context_probe: LongContextProbe | None = None
    fp32: GraphReport | None = None
    fp16: GraphReport | None = None
    int8: GraphReport | None = None
    int4: GraphReport | None = None
    lowbit: GraphReport | None = None
    files: Hashes | None = None
    code: CodeFingerprint | None = None
    library_versions: dict[str, str | None] | None = None

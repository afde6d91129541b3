"""The canonical shapes that every raw row is mapped into, and the reasons a row can be rejected."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Literal

SPLITS = ("train", "validation", "test")


class RejectReason(str, Enum):
    """Why a raw row did not make it into the dataset (written to data/rejected/<tenant>.jsonl)."""

    MALFORMED_JSON = "malformed_json"
    MISSING_FIELD = "missing_field"
    EMPTY_FIELD = "empty_field"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_ROLE = "unknown_role"
    UNKNOWN_SHAPE = "unknown_shape"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    TOO_LONG = "too_long"
    INVALID_UTF8 = "invalid_utf8"
    UNREADABLE_FILE = "unreadable_file"
    # Content holding a tokenizer control token (e.g. "<|im_end|>") would be tokenized as a real turn
    # boundary, letting one row forge turns or end-of-text; such rows are rejected, not escaped.
    CONTROL_TOKEN = "control_token"
    # prepare.pii.mode=drop: the row holds PII (the detail names the types; the excerpt is masked).
    PII = "pii"
    # A synthetic row beyond prepare.synthetic_ratio x the real train rows (not chosen by the seeded draw).
    OVER_MIX_RATIO = "over_mix_ratio"
    # tenants.<t>.sources[]: a mapped field's source path is missing from the row (or is not text).
    MAPPING = "mapping"
    # prepare.conflicts first|reject: the row asks what another row asks (same normalized prompt) with a
    # different answer; the detail names that row.
    CONFLICTING_ANSWERS = "conflicting_answers"
    # Preference rows (preference.py): chosen and rejected are the same answer (normalized, PII masked);
    # chosen and rejected are no two answers to one context (full conversations diverging before their
    # last assistant turn, or a context ending with no user turn); a rated list (sources[].preference)
    # gives no pair (fewer than two rated answers, or none apart by min_margin).
    SAME_ANSWERS = "same_answers"
    BAD_PAIR = "bad_pair"
    NO_PAIR = "no_pair"


# Reasons only preference rows can have: listed in prepare_stats.json when the tenant has pairs or such
# rejects, so that an SFT tenant's stats keep their keys.
PREFERENCE_REASONS = (RejectReason.SAME_ANSWERS, RejectReason.BAD_PAIR, RejectReason.NO_PAIR)


class PrepareError(ValueError):
    """The prepare stage cannot produce a dataset for a tenant; the message names the files to fix."""


class ChatTemplateError(PrepareError):
    """The tokenizer's chat template cannot be used for completion-only masks (named in the message)."""


def safe_text(text: str) -> str:
    """`text` made writable as UTF-8: undecodable bytes (surrogateescape) shown as \\xNN, other lone
    surrogates (from "\\ud800" JSON escapes) as \\udNNN."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def top_field(path: str | None) -> str | None:
    """'messages' for 'messages[2].role': a reject's field is the row's key, its detail the full path."""
    return None if path is None else path.split("[", 1)[0].split(".", 1)[0]


def locate(source_file: str, row: int | None, field: str | None = None, item: int | None = None) -> str:
    """'file row 3, field 'output'': the prefix of every reject detail, so each one can be acted on.
    `item` is the element of an exploded list (sources[].explode), 0-based as in field paths."""
    where = source_file if row is None else f"{source_file} row {row}" + ("" if item is None else f" item {item}")
    return where if field is None else f"{where}, field {field!r}"


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: str


@dataclass(frozen=True)
class Record:
    """One canonical row: a conversation to train on, or a plain document (kind='document', text set).

    A preference pair (shape 'preference') is the conversation ending with the chosen answer, and
    `rejected` the other answer to the same context; its content hash covers both answers.

    `source_file` is relative to the tenant's raw folder, `row` is 1-based within that file (line
    for JSONL, element for JSON arrays, data row for CSV/Parquet, 1 for a whole document), and
    `content_hash` is the sha256 of the normalized content, used for deduplication and splitting.
    """

    tenant: str
    kind: Literal["chat", "document"]
    source_file: str
    row: int
    shape: str  # instruction | chat | sharegpt | prompt_completion | preference | document
    content_hash: str
    messages: tuple[Message, ...] = ()
    text: str = ""
    rejected: str = ""  # a pair's rejected answer (shape 'preference'); "" for every other row

    def to_dict(self) -> dict:
        d = asdict(self)
        d["messages"] = [asdict(m) for m in self.messages]
        return d


@dataclass(frozen=True)
class Reject:
    """A row that was not used, with enough to find and fix it: file, row, field and reason."""

    tenant: str
    source_file: str
    row: int | None  # None when the whole file could not be read
    field: str | None  # the row's top-level key ("messages"); the detail gives the full path
    reason: RejectReason
    detail: str
    excerpt: str = ""  # first characters of the raw row, secrets never logged beyond the row itself

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reason"] = self.reason.value
        # Details quote raw keys and values, which may hold lone surrogates that UTF-8 cannot encode.
        return {k: safe_text(v) if isinstance(v, str) else v for k, v in d.items()}


@dataclass
class PrepareStats:
    """Counts that reconcile exactly: rows_in == kept + rejected + duplicates + near_duplicates + contaminated.

    rows_in counts real and synthetic rows alike; `by_source` splits rows_in and kept between them.
    `pii` counts PII occurrences by type (masked, or found in dropped rows), `pii_rows` the rows
    holding any.
    """

    tenant: str
    rows_in: int = 0
    kept: int = 0
    rejected: int = 0
    duplicates: int = 0  # exact (same normalized content)
    near_duplicates: int = 0  # MinHash LSH, prepare.near_dedup
    contaminated: int = 0  # train/validation rows overlapping a test row, prepare.decontamination
    # Rows (exact duplicates aside) asking the same normalized prompt as another row with a different
    # answer, and how many prompts that is; prepare.conflicts keeps them (counted in kept or wherever
    # the later steps put them) or rejects some (rejected_by_reason.conflicting_answers).
    conflicting_answers: int = 0
    conflicting_prompts: int = 0
    # Kept chat rows sharing a group (sources[].group, or the passage prepare.group_min_chars finds), each
    # group whole in one split: groups of two rows or more, the rows in them, the largest, groups per split.
    groups: dict[str, object] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    by_file: dict[str, dict[str, int]] = field(default_factory=dict)
    by_shape: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    documents: int = 0
    document_rows: dict[str, int] = field(
        default_factory=dict
    )  # prepare.document_rows: rows cut from documents, by split
    token_length_percentiles: dict[str, float] = field(default_factory=dict)
    answer_token_percentiles: dict[str, float] = field(default_factory=dict)
    tokenizer: str = ""  # name_or_path; empty for an in-memory tokenizer, hence also tokenizer_hash
    tokenizer_hash: str = ""  # sha256 of tokenizer.json and the chat template
    data_hash: str = ""  # provenance.hash_tree of the tenant's raw folder
    pii: dict[str, int] = field(default_factory=dict)
    pii_rows: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # real/synthetic: rows_in, kept
    synthetic_quota: int = 0  # most synthetic rows the mix ratio allowed
    synthetic_hash: str = ""  # sha256 of the synthetic rows file ("" when there is none)
    # per tenants.<t>.sources[] entry, then "(detected)" for the rest: path, format, files and the outcomes
    sources: list[dict] = field(default_factory=list)
    # Kept preference pairs by split (each also counted in kept and splits); only for a tenant with pairs.
    pairs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.pairs:  # a tenant without pairs keeps the stats it had before preference rows existed
            del d["pairs"]
        return d

    @property
    def reconciles(self) -> bool:
        return self.rows_in == self.kept + self.rejected + self.duplicates + self.near_duplicates + self.contaminated

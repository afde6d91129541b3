"""Read the prepared dataset into examples whose targets are already shifted inside each example.

targets[i] is the token the model should predict after reading input_ids[0..i] (labels[i + 1]), and
the last target is -100. Shifting per example, before packing, is what keeps the loss from ever
crossing an example boundary: no position is asked to predict the next example's first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from loraline.config import TrainParams
from loraline.modelling.constants import IGNORE_INDEX
from loraline.train.errors import TrainError

REQUIRED_COLUMNS = ("input_ids", "labels")


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @cached_property  # counted once: every step counts its examples' targets (the loss divisor)
    def n_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def to_example(input_ids: list[int], labels: list[int]) -> Example:
    return Example(tuple(input_ids), tuple(labels[1:]) + (IGNORE_INDEX,))


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]


def load_splits(dataset_dir: Path) -> Splits:
    dd = open_dataset(dataset_dir)
    # Rows cut from documents (prepare.document_rows, e.g. for train.long_context) train beside the chat rows.
    return Splits(
        *(
            _examples(dd[s]) + (_examples(dd[f"{s}_documents"]) if f"{s}_documents" in dd else [])
            for s in ("train", "validation")
        )
    )


def open_dataset(dataset_dir: Path):
    """The prepared datasets.DatasetDict, checked to hold train and validation splits with the token columns."""
    import datasets

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise TrainError(f"dataset {dataset_dir} does not exist: run the prepare stage for this tenant first")
    try:
        dd = datasets.load_from_disk(str(dataset_dir))
    except Exception as exc:  # noqa: BLE001 -- any failure means "not a prepared dataset"
        raise TrainError(f"dataset {dataset_dir} is not a saved datasets.DatasetDict: {exc}") from exc
    missing = [s for s in ("train", "validation") if s not in dd]
    if missing:
        raise TrainError(f"dataset {dataset_dir} has no {' / '.join(missing)} split (the prepare stage writes both)")
    for split in ("train", "validation"):
        lacking = [c for c in REQUIRED_COLUMNS if c not in dd[split].column_names]
        if lacking:
            raise TrainError(f"dataset {dataset_dir} split {split} lacks column(s) {', '.join(lacking)}")
    return dd


def _examples(ds) -> list[Example]:
    cols = ds.select_columns(list(REQUIRED_COLUMNS)).to_dict()
    return [to_example(i, lab) for i, lab in zip(cols["input_ids"], cols["labels"])]


def check_splits(splits: Splits, params: TrainParams, dataset_dir: Path) -> None:
    """Reject what would make training meaningless or silently lossy, before the model is loaded.

    Examples longer than max_seq_len are rejected rather than truncated: truncation would cut
    answers (the only tokens with loss) and train on a different objective than the one reported.
    The prepare stage already caps rows at prepare.max_tokens, so the fix is to align the two.
    """
    if not splits.train:
        raise TrainError(
            f"dataset {dataset_dir}: the train split is empty; add rows or lower prepare.split.validation/test"
        )
    if not any(e.n_targets for e in splits.train):
        raise TrainError(f"dataset {dataset_dir}: no train example has answer tokens (labels are all -100)")
    for name, examples in (("train", splits.train), ("validation", splits.validation)):
        too_long = [e.n_tokens for e in examples if e.n_tokens > params.max_seq_len]
        if too_long:
            raise TrainError(
                f"train.max_seq_len ({params.max_seq_len}) is shorter than {len(too_long)} {name} example(s) "
                f"(longest: {max(too_long)} tokens); raise train.max_seq_len or lower prepare.max_tokens to at most "
                f"{params.max_seq_len} (long examples are never truncated: that would cut their answers)"
            )
    if params.early_stopping_patience is not None and not splits.validation:
        raise TrainError(
            "train.early_stopping_patience is set but the validation split is empty; "
            "raise prepare.split.validation or unset train.early_stopping_patience"
        )

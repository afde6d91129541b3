"""Documents as language-modelling rows (prepare.document_rows; set from train.long_context.target_len).

A long-context fine-tune needs long training text, and a held-out set of long text to measure it on.
With `document_rows: N`, every kept document (already scrubbed and deduplicated) is also tokenized
whole, ended with the end-of-text token, and cut into rows of at most N tokens, every token a target.
The split is per document (its content hash and prepare.split's salt, as for every row): all rows of
a document land in one split, so a test document is never seen in training, not even in part.
Rows are produced one document at a time, so memory holds one document's tokens, not the corpus.

They go into the prepared DatasetDict as `<split>_documents` (train_documents, validation_documents,
test_documents): the train stage trains on them beside the chat rows, and the evaluate stage
measures long-context perplexity on test_documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets

from loraline.config import SplitParams
from loraline.prepare.split import split_of
from loraline.prepare.stores import ArrowRows

DOCUMENT_ROW_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source_file": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "chunk": datasets.Value("int64"),
        "content_hash": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
    }
)
SPLIT_SUFFIX = "_documents"


def split_name(split: str) -> str:
    return f"{split}{SPLIT_SUFFIX}"


def document_rows(
    documents: Iterable[dict[str, Any]], tokenizer: Any, max_tokens: int, split: SplitParams, which: str
) -> Iterator[dict[str, Any]]:
    """The rows of split `which` cut from `documents` (rows of the documents dataset), in document order."""
    eos = tokenizer.eos_token_id
    for doc in documents:
        if split_of(doc["content_hash"], split) != which:
            continue
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        for chunk, start in enumerate(range(0, len(ids), max_tokens)):
            piece = ids[start : start + max_tokens]
            yield {
                "id": f"{doc['content_hash'][:16]}-{chunk}",
                "source_file": doc["source_file"],
                "row": doc["row"],
                "chunk": chunk,
                "content_hash": doc["content_hash"],
                "input_ids": piece,
                "labels": piece,
            }


def document_splits(
    documents: datasets.Dataset, tokenizer: Any, max_tokens: int, split: SplitParams, spill_dir: Path
) -> dict[str, datasets.Dataset]:
    """{train_documents, validation_documents, test_documents}, streamed through Arrow files in
    `spill_dir`; each with a fingerprint derived from its rows, so saved datasets repeat byte for byte."""
    out = {}
    for which in ("train", "validation", "test"):
        store = ArrowRows(Path(spill_dir) / f"{split_name(which)}.arrow", DOCUMENT_ROW_FEATURES)
        digest = hashlib.sha256(f"{which}/{max_tokens}".encode())
        for row in document_rows(documents, tokenizer, max_tokens, split, which):
            store.append(row)
            digest.update(row["id"].encode())
        ds = store.dataset()
        ds._fingerprint = digest.hexdigest()[:16]
        out[split_name(which)] = ds
    return out

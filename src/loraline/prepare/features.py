"""The columns of what prepare writes: the chat dataset's splits and the plain documents.

A tenant whose data holds preference pairs gets PREFERENCE_COLUMNS on every split (rows that are no
pair hold empty values; a row is a pair iff len(rejected_input_ids) > 0); any other tenant gets
exactly CHAT_FEATURES. Rows are stored between passes with both (STORE_FEATURES), and the columns a
tenant does not need are dropped when the dataset is written (`written_columns`).
"""

from __future__ import annotations

import datasets

CHAT_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "tenant": datasets.Value("string"),
        "source_file": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "shape": datasets.Value("string"),
        "source": datasets.Value("string"),  # "real" or "synthetic"
        "provenance": datasets.Value(
            "string"
        ),  # JSON: a synthetic row's generator, model, source span...; "null" for real rows
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "text": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "n_tokens": datasets.Value("int32"),
        "n_answer_tokens": datasets.Value("int32"),
    }
)

# A pair's rejected answer, and the context with that answer rendered and masked as input_ids/labels are.
PREFERENCE_COLUMNS = ("rejected", "rejected_input_ids", "rejected_labels", "n_rejected_tokens")
PREFERENCE_FEATURES = datasets.Features(
    {
        "rejected": datasets.Value("string"),
        "rejected_input_ids": datasets.List(datasets.Value("int32")),
        "rejected_labels": datasets.List(datasets.Value("int32")),
        "n_rejected_tokens": datasets.Value("int32"),
    }
)
STORE_FEATURES = datasets.Features({**CHAT_FEATURES, **PREFERENCE_FEATURES})


def written_columns(pairs: bool) -> datasets.Features:
    """The columns of a tenant's saved splits: with the preference columns only when it has pairs."""
    return STORE_FEATURES if pairs else CHAT_FEATURES


DOCUMENT_FEATURES = datasets.Features(
    {
        "text": datasets.Value("string"),
        "source_file": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "content_hash": datasets.Value("string"),
        "tenant": datasets.Value("string"),
    }
)


STORE_SCHEMA = STORE_FEATURES.arrow_schema

"""The columns of what prepare writes: the chat dataset's splits and the plain documents."""

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


DOCUMENT_FEATURES = datasets.Features(
    {
        "text": datasets.Value("string"),
        "source_file": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "content_hash": datasets.Value("string"),
        "tenant": datasets.Value("string"),
    }
)


CHAT_SCHEMA = CHAT_FEATURES.arrow_schema

"""prepare.document_rows: documents cut into language-modelling rows, split per document."""

from __future__ import annotations

import json

import datasets

from loraline.config import PrepareParams
from loraline.prepare.split import split_of

WORDS = "order refund shipped customer answer politely thank you quick brown fox lazy dog hello world".split()


def _write_documents(raw_dir, n=12):
    texts = {}
    for i in range(n):
        # documents of very different lengths: some one row, some many rows
        text = f"Document {i}. " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(20 + 37 * i))
        (raw_dir / f"doc{i:02d}.md").write_text(text, encoding="utf-8")
        texts[f"doc{i:02d}.md"] = text
    (raw_dir / "chat.jsonl").write_text(
        "".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n" for i in range(20)),
        encoding="utf-8",
    )
    return texts


def test_documents_become_rows_of_at_most_n_tokens_split_per_document(run, raw_dir, tokenizer):
    texts = _write_documents(raw_dir)
    params = PrepareParams(document_rows=64)
    result = run(params=params)
    dd = datasets.load_from_disk(str(result.dataset_dir))
    assert {"train", "validation", "test", "train_documents", "validation_documents", "test_documents"} == set(dd)

    rows = {s: dd[f"{s}_documents"].to_list() for s in ("train", "validation", "test")}
    docs = datasets.load_from_disk(str(result.documents_dir)).to_list()
    assert len(docs) == len(texts)
    for doc in docs:
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        where = split_of(doc["content_hash"], params.split)
        mine = [r for r in rows[where] if r["content_hash"] == doc["content_hash"]]
        # every token of the document, in order, in rows of at most 64 tokens, all in the document's split
        assert [t for r in sorted(mine, key=lambda r: r["chunk"]) for t in r["input_ids"]] == ids
        assert all(len(r["input_ids"]) <= 64 and r["labels"] == r["input_ids"] for r in mine)
        others = [r for s, rs in rows.items() if s != where for r in rs if r["content_hash"] == doc["content_hash"]]
        assert not others
    assert sum(len(rows[s]) for s in rows) > len(docs)  # long documents gave several rows
    stats = json.loads(result.stats_path.read_text())
    assert stats["document_rows"] == {f"{s}_documents": len(rows[s]) for s in rows}
    assert (
        stats["rows_in"]
        == stats["kept"] + stats["rejected"] + stats["duplicates"] + stats["near_duplicates"] + stats["contaminated"]
    )


def test_the_same_documents_give_the_same_bytes_and_without_the_param_no_rows(run, raw_dir):
    from loraline.provenance import hash_tree

    _write_documents(raw_dir, n=5)
    a, b = run("a", params=PrepareParams(document_rows=32)), run("b", params=PrepareParams(document_rows=32))
    assert hash_tree(a.dataset_dir) == hash_tree(b.dataset_dir)
    plain = run("c")
    assert set(datasets.load_from_disk(str(plain.dataset_dir))) == {"train", "validation", "test"}
    assert json.loads(plain.stats_path.read_text())["document_rows"] == {}


def test_train_reads_the_document_rows_beside_the_chat_rows(run, raw_dir):
    from loraline.train.data import load_splits

    _write_documents(raw_dir)
    result = run(params=PrepareParams(document_rows=64))
    dd = datasets.load_from_disk(str(result.dataset_dir))
    splits = load_splits(result.dataset_dir)
    assert len(splits.train) == len(dd["train"]) + len(dd["train_documents"])
    assert len(splits.validation) == len(dd["validation"]) + len(dd["validation_documents"])
    doc_example = splits.train[-1]
    assert doc_example.n_targets == doc_example.n_tokens - 1  # every token of a document row is a target

"""general_loss (evaluate/stage.py): the mean cross-entropy per target token of a model on the general-text
sample, whatever the batching; the sample read back from the prepare stage's folder; the report's lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraline.evaluate.report import forgetting_lines, render_report
from loraline.evaluate.stage import EvaluateError, _GeneralSet, general_facts, general_loss, load_general
from loraline.layout import GENERAL_ROWS, GENERAL_SAMPLE
from loraline.modelling.constants import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer(random_llama: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(random_llama), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(random_llama))


def _rows(tok) -> _GeneralSet:
    """Three plain-text rows of different lengths (every token a target) and one chat-like row (its last four only)."""
    texts = [
        "Ticket 1 from Ana: the printer is down.",
        "Bo",
        "Chen says the vpn is slow. Please route it to network now.",
    ]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    chat = tok("Ticket 7 from Bo: the mailbox is down. Please route it.", add_special_tokens=False)["input_ids"]
    return _GeneralSet([*ids, chat], [*ids, [IGNORE_INDEX] * (len(chat) - 4) + chat[-4:]], {})


def _reference(model, rows: _GeneralSet) -> tuple[float, int]:
    """Row by row, no padding: the sum of -log p(target) over targets after the first position, and their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(rows.input_ids, rows.labels):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            keep = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total, count


@pytest.mark.parametrize("batch_size", [1, 2, 3, "auto"])
def test_general_loss_is_the_mean_per_target_token_whatever_the_batches(model_and_tokenizer, batch_size):
    model, tok = model_and_tokenizer
    rows = _rows(tok)
    total, count = _reference(model, rows)
    loss = general_loss(model, tok, rows, batch_size)
    # micro-averaged over tokens: every token of the plain rows but their first (the one-word row: its end-of-text),
    # the chat row's four answer tokens
    assert loss.tokens == count == sum(len(ids) - 1 for ids in rows.input_ids[:3]) + 4
    assert loss.loss == pytest.approx(total / count, abs=1e-5)
    assert math.log(len(tok)) / 4 < loss.loss < 4 * math.log(len(tok))  # a random model: about uniform


def test_the_sample_is_read_back_from_the_prepare_stages_folder(tmp_path):
    folder = tmp_path / "general"
    with pytest.raises(EvaluateError, match="holds no general-text sample .* run the prepare stage for this tenant"):
        load_general(folder)
    folder.mkdir()
    (folder / GENERAL_ROWS).write_text(
        json.dumps({"id": "ab", "kind": "document", "input_ids": [1, 2], "labels": [1, 2]}) + "\n"
    )
    (folder / GENERAL_SAMPLE).write_text(json.dumps({"path": "g.jsonl", "rows": 1}))
    general = load_general(folder)
    assert general.input_ids == [[1, 2]] and general.labels == [[1, 2]]
    assert general_facts(general) == {"measured": True, "path": "g.jsonl", "rows": 1}
    assert general_facts(None)["measured"] is False and "general_loss not measured" in general_facts(None)["reason"]


def test_the_report_shows_the_sample_and_each_models_rise_over_the_base():
    facts = {
        "measured": True,
        "path": "models/base/general_text.jsonl",
        "sha256": "0123456789abcdef" * 4,
        "rows": 128,
        "kinds": {"document": 128},
        "target_tokens": 9551,
        "max_tokens": 256,
    }
    models = {
        "base": {"answer_loss": 4.7, "general_loss": 6.6},
        "candidate": {"answer_loss": 0.1, "general_loss": 9.9},
    }
    lines = forgetting_lines(models, facts)
    assert lines[0].startswith(
        "Sample `models/base/general_text.jsonl` (sha256 `0123456789ab`): 128 rows (128 document), 9551 scored tokens"
    )
    assert "| candidate | 9.9000 | +50.00% |" in lines and "| base | 6.6000 |  |" in lines
    report = render_report(
        tenant="t", test_rows=2, expects_json=False, max_new_tokens=4, models=models, examples=[], general=facts
    )
    assert "## Forgetting: general text" in report and "| general_loss ↓ | 6.6000 | 9.9000 | +3.3000 |" in report
    missing = render_report(
        tenant="t",
        test_rows=2,
        expects_json=False,
        max_new_tokens=4,
        examples=[],
        models={"base": {"answer_loss": 4.7}},
        general=general_facts(None),
    )
    assert "Not measured: no general-text sample was given" in missing

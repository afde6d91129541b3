"""The end-of-run summary reads the small metrics files and the timing beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loraline.config import parse_params
from loraline.layout import Layout
from loraline.records import BaseRecord, ExportReport, MergeReport
from loraline.summary import (
    HEADLINE_METRICS,
    base_line,
    collect_summary,
    export_lines,
    merge_line,
    render_text,
    train_line,
)

RECORDS = Path(__file__).resolve().parent.parent / "data" / "records"

TRAIN = {
    "val_loss_base": 2.0,
    "val_loss": 1.5,
    "val_loss_gain": 0.25,
    "train_loss": 1.4,
    "steps": 6,
    "tokens_seen": 900,
}


def test_the_summary_headline_is_what_the_evaluate_stage_writes_as_metrics():
    from loraline.evaluate.stage import HEADLINE_METRICS as written

    assert HEADLINE_METRICS == written


def test_train_line_adds_the_timing_when_there_is_one():
    assert train_line("t1", TRAIN).endswith("6 steps, 900 tokens")
    timed = train_line("t1", TRAIN, {"tokens_per_s": 1234.4, "device": "cpu", "wall_s": 12.2})
    assert timed.endswith("6 steps, 900 tokens, 1234 tokens/s on cpu, 12s") and "25% lower" in timed


def test_collect_summary_reads_the_train_metrics_and_timing_files(tmp_path):
    layout, params = Layout(tmp_path), parse_params({"tenants": {"t1": {"raw_dir": "raw"}}})
    for path, content in (
        (layout.metrics_path("train", "t1"), TRAIN),
        (layout.timing_path("train", "t1"), {"tokens_per_s": 50.0, "device": "cpu", "wall_s": 3.0}),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    summary = collect_summary(params, layout)
    assert "train[t1]: validation answer loss 2.000 (base) -> 1.500 (adapter), 25% lower" in render_text(summary)
    assert "50 tokens/s on cpu, 3s" in render_text(summary)


def test_the_base_line_says_what_the_base_record_says(tmp_path):
    """A built base: its size and pretraining; a recorded one: where it is (base_record.json, loraline.records)."""
    built = BaseRecord.read(RECORDS / "base_built.json")
    assert base_line(built) == (
        "base: built LlamaForCausalLM, 0.1M parameters, 150 steps / 0.04M tokens, final pretraining loss 2.724"
    )
    local = BaseRecord.read(RECORDS / "base_local.json")
    assert base_line(local) == f"base: local model {local.model_ref} (recorded, not downloaded)"
    layout = Layout(tmp_path)
    layout.base_dir.mkdir(parents=True)
    shutil.copy(RECORDS / "base_built.json", layout.base_record_path())
    summary = collect_summary(parse_params({"tenants": {"t1": {"raw_dir": "data/raw/t1"}}}), layout)
    assert summary.base == built


def test_the_merge_and_export_lines_say_what_their_reports_say():
    """The lines `loraline merge`/`export` and the direct runner print, from the typed reports real runs wrote."""
    layout = Layout()
    merged = merge_line("t", MergeReport.read(RECORDS / "merge_qalora.json"), layout)
    assert merged.startswith("merge[t]: merged vs adapter max logit diff 3.34e-06 (tolerance 0.001)")
    assert merged.endswith("on 4 probes (4 built-in, 0 from the test split); gap to 4-bit skipped -> models/merged/t")
    not_built = merge_line("t", MergeReport.read(RECORDS / "merge_not_built.json"), layout)
    assert not_built.startswith("merge[t]: merged not built (deploy.targets); reference answers to 20 probes")
    assert export_lines("t", ExportReport.read(RECORDS / "export_not_built.json"), layout) == [
        "export[t]: onnx not built (deploy.targets)"
    ]
    lines = export_lines("t", ExportReport.read(RECORDS / "export_fp32_fp16_int4.json"), layout)
    assert [line.split()[0] for line in lines] == ["export[t]", "fp32", "fp16", "int4"]
    assert lines[3].endswith("greedy agreement 100%; vs the float model 2.04")

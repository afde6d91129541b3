"""loraline.records: real records and reports read and write back to the same bytes, every variant the stages
write reads, and a file that does not match fails naming the file and the field.

The fixtures in tests/data/records/ are files real runs wrote: a built base (with and without its general-text
sample) and a local one; LoRA, QA-LoRA + long-context and older train records; merge reports of a QA-LoRA merge,
a merge not built (deploy.targets) and one from before probe sources; export reports of fp32+int8, fp32+fp16+int4,
a long-context probe, not built, and one from before graph facts named their file."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from loraline import io
from loraline.layout import NOT_BUILT
from loraline.records import BaseRecord, ExportReport, MergeReport, RecordError, TrainRecord

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "records"
MODELS = {"base": BaseRecord, "train": TrainRecord, "merge": MergeReport, "export": ExportReport}


def model_of(path: Path):
    return MODELS[path.name.split("_")[0]]


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def written(tmp_path: Path, record) -> str:
    return record.write(tmp_path / "out.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_a_real_record_reads_and_writes_back_to_the_same_bytes(tmp_path, path):
    record = model_of(path).read(path)
    assert written(tmp_path, record) == path.read_text(encoding="utf-8")


def test_the_variants_read_into_their_typed_parts():
    qalora = TrainRecord.read(FIXTURES / "train_qalora_long_context.json")
    assert qalora.qalora is not None and qalora.qalora.bits in (2, 3, 4, 8)
    assert qalora.quantization == "qalora"
    assert qalora.long_context is not None
    assert qalora.config_overrides == qalora.long_context.config_overrides
    lora = TrainRecord.read(FIXTURES / "train_lora.json")
    assert (lora.quantization, lora.long_context, lora.config_overrides) == ("nf4", None, {})
    assert lora.steps.done == lora.steps.planned and lora.batch is not None
    assert TrainRecord.read(FIXTURES / "train_before_batch.json").batch is None

    not_built = MergeReport.read(FIXTURES / "merge_not_built.json")
    assert not_built.merged == NOT_BUILT and not_built.merged_vs_unmerged is None
    assert not_built.probe_reference is not None and not_built.probe_reference.sources is not None
    old = MergeReport.read(FIXTURES / "merge_before_sources.json")
    assert old.probe_reference is not None and old.probe_reference.sources is None
    merged = MergeReport.read(FIXTURES / "merge_qalora.json")
    assert merged.qalora is not None and merged.qalora.torchao is not None and merged.qalora.torchao.passed
    assert merged.vs_4bit is not None and merged.vs_4bit.skipped

    assert ExportReport.read(FIXTURES / "export_not_built.json").onnx == NOT_BUILT
    int4 = ExportReport.read(FIXTURES / "export_fp32_fp16_int4.json")
    assert int4.int4 is not None and int4.int4.vs_float is not None and int4.fp16 is not None
    assert ExportReport.read(FIXTURES / "export_long_context.json").long_context_probe is not None

    assert BaseRecord.read(FIXTURES / "base_local.json").source == "local"
    assert BaseRecord.read(FIXTURES / "base_built_before_general_text.json").general_text is None


def hub_base() -> dict:
    """base/stage.py _inspect_hub for a model not in the local cache, as _record_external completes it."""
    return {
        "source": "hub",
        "model_ref": "org/model",
        "revision": "main",
        "revision_pinned": False,
        "cached": False,
        "note": "not in the local Hugging Face cache; config and chat template are checked when a stage loads it",
        "chat_template_source": "unverified",
        "chat_template_sha256": None,
        "params": {"chat_template": None, "model": "org/model", "revision": None, "trust_remote_code": True},
        "code": {"modules": 16, "sha256": "0" * 64},
        "library_versions": {"torch": "2.13.0"},
        "general_text": {"file": "general_text.jsonl", "rows": 200, "source": "Python 3.11 docstrings"},
    }


def fsdp_train() -> dict:
    record = fixture("train_lora.json")
    record["sharding"] = {"sharded_layers": 2, "layer_bytes_held": 10, "layer_bytes": 20, "whole_bytes": 30}
    record["devices"] = 2
    return record


def lowbit_export() -> dict:
    """A merged QA-LoRA model's export: its own low-bit graph (export/lowbit.py + export/build.py _lowbit)."""
    report = fixture("export_fp32_int8.json")
    report["lowbit"] = {
        **{k: v for k, v in report["fp32"].items() if k not in ("inputs", "outputs", "opset", "dtype")},
        "file": "model.int4.onnx",
        "op": "com.microsoft.MatMulNBits",
        "bits": 4,
        "stored_bits": 4,
        "block_size": 32,
        "layers": 14,
        "float_bytes": 459642,
        "size_vs_float": 0.3,
    }
    return report


@pytest.mark.parametrize(
    "model, data",
    [(BaseRecord, hub_base()), (TrainRecord, fsdp_train()), (ExportReport, lowbit_export())],
    ids=["hub base", "fsdp train", "qalora lowbit export"],
)
def test_the_variants_no_fixture_holds_read_and_write_back(tmp_path, model, data):
    assert written(tmp_path, model.parse(data)) == io.dumps_json(data)


def test_numbers_keep_their_json_type_and_nan_stays_nan(tmp_path):
    data = fixture("merge_qalora.json")
    data["tolerance"] = 0  # an int tolerance is not rewritten as 0.0
    data["merged_vs_unmerged"]["max_abs_logit_diff"] = float("nan")
    report = MergeReport.parse(data)
    assert report.tolerance == 0 and isinstance(report.tolerance, int)
    assert math.isnan(report.merged_vs_unmerged.max_abs_logit_diff)
    assert written(tmp_path, report) == io.dumps_json(data)


def test_a_record_built_in_code_writes_only_what_it_was_given(tmp_path):
    report = ExportReport(passed=True, onnx=NOT_BUILT, targets=["adapter"])
    assert written(tmp_path, report) == (FIXTURES / "export_not_built.json").read_text(encoding="utf-8")
    data = fixture("train_lora.json")
    record = TrainRecord(**data)  # long_context, qalora and sharding given as None: written as null
    assert json.loads(written(tmp_path, record))["long_context"] is None


def test_keys_of_older_versions_are_kept_but_a_new_undeclared_key_is_refused(tmp_path):
    data = fixture("train_lora.json")
    data["code_revision"] = "abc123"  # written by older versions, since moved to the timing file
    record = TrainRecord.parse(data)
    assert record.to_json()["code_revision"] == "abc123"
    with pytest.raises(RecordError, match=r"not declared.*code_revision"):
        record.write(tmp_path / "train_record.json")
    merge = copy.deepcopy(fixture("merge_qalora.json"))
    merge["merged_vs_unmerged"]["per_probe"][0]["typo"] = 1
    with pytest.raises(RecordError, match=r"merged_vs_unmerged\.per_probe\[0\]\.typo"):
        MergeReport.parse(merge).write(tmp_path / "merge_report.json")


def test_a_wrong_type_fails_naming_the_file_and_the_field(tmp_path):
    data = fixture("train_lora.json")
    data["steps"]["done"] = "six"
    path = tmp_path / "train_record.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RecordError) as err:
        TrainRecord.read(path)
    assert str(path) in str(err.value) and "train record" in str(err.value)
    assert "steps.done: Input should be a valid integer" in str(err.value) and "'six'" in str(err.value)


def test_a_missing_required_field_fails_naming_the_file_and_the_field(tmp_path):
    data = fixture("merge_before_sources.json")
    del data["passed"]
    del data["probe_reference"]["texts"]
    path = tmp_path / "merge_report.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RecordError) as err:
        MergeReport.read(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not a valid merge report: ")
    assert "passed: Field required" in message and "probe_reference.texts: Field required" in message


def test_a_base_record_of_an_unknown_source_fails():
    with pytest.raises(RecordError, match=r"source: Input should be 'built', 'local' or 'hub'"):
        BaseRecord.parse({**hub_base(), "source": "s3"}, "models/base/base_record.json")


def test_a_file_that_is_not_json_fails_naming_it_and_a_missing_one_is_file_not_found(tmp_path):
    path = tmp_path / "export_report.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(RecordError, match=rf"{path} is not a valid export report: not JSON"):
        ExportReport.read(path)
    with pytest.raises(FileNotFoundError):
        ExportReport.read(tmp_path / "absent.json")

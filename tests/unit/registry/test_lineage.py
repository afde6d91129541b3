from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from loraline.cli import main
from loraline.config import ConfigError, parse_params
from loraline.registry.lineage import artifact_paths, check_artifacts_declared, missing_artifacts, tenant_lineage

RECORDS = Path(__file__).resolve().parents[2] / "data" / "records"


def _params(*tenants):
    return parse_params({"tenants": {t: {"raw_dir": f"data/raw/{t}", "train": {"lora_r": 4}} for t in tenants}})


def _dvc_yaml(root, *tenants):
    arts = {n: {"path": p, "type": "model"} for t in tenants for n, p in artifact_paths(t).items()}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": arts, "stages": {}}))


def test_missing_artifacts_are_named_with_the_entries_to_add(tmp_path):
    _dvc_yaml(tmp_path, "t1")
    params = _params("t1", "t2")
    assert missing_artifacts(tmp_path, params) == {"t2-adapter": "models/adapters/t2", "t2-onnx": "models/onnx/t2"}
    with pytest.raises(ConfigError, match="lacks t2-adapter, t2-onnx") as err:
        check_artifacts_declared(tmp_path, params)
    assert "  t2-onnx:\n    path: models/onnx/t2" in str(err.value)
    check_artifacts_declared(tmp_path, _params("t1"))


def test_loraline_check_fails_on_an_undeclared_tenant(tmp_path, capsys):
    _dvc_yaml(tmp_path, "t1")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tenants": {"t1": {"raw_dir": "x"}, "t2": {"raw_dir": "y"}}}))
    assert main(["check", "--params", str(path)]) == 2
    assert "t2-adapter" in capsys.readouterr().err


def test_repo_dvc_yaml_declares_every_tenant():
    from loraline.config import load_params

    assert missing_artifacts(".", load_params("params.yaml")) == {}


def test_lineage_quotes_dvc_lock_params_and_metrics(tmp_path):
    lock = {
        "schema": "2.0",
        "stages": {
            "prepare@t1": {"outs": [{"path": "data/prepared/t1", "md5": "p.dir"}]},
            "train@t1": {
                "deps": [{"path": "data/prepared/t1", "md5": "p.dir"}],
                "outs": [{"path": "models/adapters/t1", "md5": "a.dir"}],
            },
            "export@t1": {"outs": [{"path": "models/onnx/t1", "md5": "o.dir"}]},
            "train@t2": {"outs": [{"path": "models/adapters/t2", "md5": "other.dir"}]},
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "models/adapters/t1").mkdir(parents=True)
    record = json.loads((RECORDS / "train_lora.json").read_text())  # a real train record
    record["data"]["sha256"] = "d"
    (tmp_path / "models/adapters/t1/train_record.json").write_text(json.dumps(record))
    (tmp_path / "reports/t1").mkdir(parents=True)
    (tmp_path / "reports/t1/eval_metrics.json").write_text(
        json.dumps({"test_rows": 3, "models": {"candidate": {"answer_loss": 1.0}}})
    )
    (tmp_path / "reports/t1/gate.json").write_text(
        json.dumps({"passed": False, "failed": ["beats_base"], "rules": []})
    )
    lin = tenant_lineage(tmp_path, _params("t1", "t2"), "t1", snapshot="abc")
    assert (
        lin["outputs"]["adapter"] == "a.dir" and lin["outputs"]["onnx"] == "o.dir" and lin["outputs"]["merged"] is None
    )
    assert lin["data"] == {"prepared_md5": "p.dir", "train_data_sha256": "d", "raw_dir": "data/raw/t1"}
    assert set(lin["dvc"]) == {"prepare@t1", "train@t1", "export@t1"}
    assert lin["params"]["train"]["lora_r"] == 4 and "primary_metric" in lin["params"]["gate"]
    assert lin["metrics"]["gate"] == {"passed": False, "failed": ["beats_base"]} and lin["metrics"]["test_rows"] == 3
    assert lin["git"]["snapshot"] == "abc" and "dvc" in lin["libraries"]
    json.dumps(lin)

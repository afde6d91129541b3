from __future__ import annotations

import pytest
import yaml

from loraline.cli import build_parser, main

COMMANDS = [
    "check",
    "documents",
    "synthesize",
    "base",
    "prepare",
    "train",
    "merge",
    "export",
    "evaluate",
    "gate",
    "generate",
    "run",
    "registry",
    "feedback",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_for_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.option_strings:
            assert action.help, f"{command} {action.option_strings} has no help text"
            assert action.option_strings[-1] in out


@pytest.fixture
def params_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.md").write_text("A document.")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tenants": {"acme": {"raw_dir": str(raw), "train": {"lora_r": 4}}}}))
    return path


def test_check_prints_resolved_tenants(params_file, capsys):
    assert main(["check", "--params", str(params_file)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "tenant acme" in out and "r=4" in out and "train=['lora_r']" in out


def test_bad_override_is_a_configuration_error(params_file, capsys):
    assert main(["check", "--params", str(params_file), "--set", "train.lora_r=0"]) == 2
    assert "train.lora_r" in capsys.readouterr().err
    assert main(["check", "--params", str(params_file), "--set", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_unknown_tenant_is_reported(params_file, capsys):
    assert main(["documents", "--params", str(params_file), "--tenant", "zzz"]) == 2
    assert "unknown tenant 'zzz'" in capsys.readouterr().err


def test_documents_command_writes_the_folder(params_file, tmp_path, capsys):
    out = tmp_path / "docs"
    assert main(["documents", "--params", str(params_file), "--tenant", "acme", "--out", str(out)]) == 0
    assert (out / "a.md").read_text() == "A document."
    assert "1 files" in capsys.readouterr().out


def test_run_finds_the_project_root_from_any_folder_inside_it(tmp_path, monkeypatch):
    from loraline.cli.main import _project_root

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    deep = tmp_path / "data" / "raw"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert _project_root() == tmp_path
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(FileNotFoundError, match="no dvc.yaml"):
        _project_root()


def test_the_flow_is_a_module_of_the_package_and_flows_pipeline_py_points_at_it():
    import runpy
    from pathlib import Path

    from loraline.flows.pipeline import pipeline

    entry = runpy.run_path(str(Path(__file__).resolve().parents[2] / "flows" / "pipeline.py"), run_name="entry")
    assert entry["pipeline"] is pipeline


def test_feedback_export_writes_the_raw_file_and_says_what_it_made(tmp_path, monkeypatch, capsys):
    from loraline.serve.traffic import FeedbackEvent, ResponseEvent, TrafficLog

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tenants": {"acme": {"raw_dir": "data/raw/acme"}}}))
    log = TrafficLog(tmp_path / "logs" / "traffic")
    ask = [{"role": "user", "content": "hi"}]
    day = log.append(ResponseEvent("chatcmpl-1", "2024-05-01T10:00:00Z", "acme", "v0.0.1", ask, "hello"))
    log.append(FeedbackEvent("chatcmpl-1", "2024-05-02T10:00:00Z", "acme", "up"))
    assert main(["feedback", "export", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert "acme: 1 responses, 1 feedback events: 1 SFT rows, 0 pairs" in out
    assert (tmp_path / "data/raw/acme/feedback-2024-05-01-2024-05-01.jsonl").is_file()
    with day.open("a") as fh:
        fh.write("{oops\n")
    assert main(["feedback", "export", "--tenant", "acme", "--since", "2024-05-01"]) == 1
    assert f"loraline feedback: error: {day.relative_to(tmp_path)}:2: not JSON" in capsys.readouterr().err
    assert main(["feedback", "export", "--tenant", "nobody"]) == 2

"""End to end: the real `dvc repro` in a temporary copy of the repository, on a tiny base model.

Checks what a user relies on: every stage's outputs exist and reconcile, a second run re-runs
nothing, and editing one tenant's raw rows re-runs that tenant's stages only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from e2e_project import PER_TENANT, TINY_TRAIN, assert_new_rows_rerun, copy_project, sh, stages_run

from loraline.dvcfiles import read_lock

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def project(tmp_path_factory, built) -> Path:
    return copy_project(built.project, tmp_path_factory.mktemp("e2e") / "project")


@pytest.fixture(scope="module")
def first_run(built) -> str:
    return built.repro_output


def test_repro_runs_every_stage_and_writes_outputs(project: Path, first_run: str):
    tenants = list(yaml.safe_load((project / "params.yaml").read_text())["tenants"])
    expected = {"base"} | {f"{stage}@{t}" for stage in PER_TENANT for t in tenants}
    assert stages_run(first_run) == expected

    base = project / "models" / "base"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "base_record.json",
    ):
        assert (base / name).is_file(), name
    assert "chat_template" in json.loads((base / "tokenizer_config.json").read_text())

    from datasets import load_from_disk

    for t in tenants:
        stats = json.loads((project / "reports" / t / "prepare_stats.json").read_text())
        outcomes = ("kept", "rejected", "duplicates", "near_duplicates", "contaminated")
        assert stats["rows_in"] == sum(stats[k] for k in outcomes)
        assert (project / "data" / "prepared" / t / "README.md").is_file()
        assert stats["rejected"] > 0, "the sample data carries deliberately bad rows"
        rejects = (project / "data" / "rejected" / f"{t}.jsonl").read_text().splitlines()
        assert len(rejects) == stats["rejected"]
        dataset = load_from_disk(str(project / "data" / "prepared" / t / "dataset"))
        assert set(dataset) == {"train", "validation", "test"}
        assert sum(len(dataset[s]) for s in dataset) + stats["documents"] == stats["kept"]
        assert len(dataset["test"]) > 0 and len(dataset["train"]) > len(dataset["test"])
        adapter = project / "models" / "adapters" / t
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        train = json.loads((project / "reports" / t / "metrics" / "train.json").read_text())
        assert train["steps"] == TINY_TRAIN["max_steps"] and train["val_loss"] is not None
        merge = json.loads((project / "reports" / t / "merge_report.json").read_text())
        assert merge["passed"] and merge["merged_vs_unmerged"]["max_abs_logit_diff"] < 1e-3
        parity = json.loads((project / "reports" / t / "metrics" / "merge.json").read_text())
        assert parity["max_abs_logit_diff"] == merge["merged_vs_unmerged"]["max_abs_logit_diff"]
        assert (project / "models" / "merged" / t / "model.safetensors").is_file()
        export = json.loads((project / "reports" / t / "export_report.json").read_text())
        assert export["passed"] and (project / "models" / "onnx" / t / "model.onnx").is_file()
        evaluation = json.loads((project / "reports" / t / "eval_metrics.json").read_text())
        assert evaluation["test_rows"] == 6 and {"base", "candidate"} <= set(evaluation["models"])
        assert "answer_loss" in evaluation["models"]["candidate"]
        assert (project / "reports" / t / "evaluation" / "report.md").is_file()
        gate = json.loads((project / "reports" / t / "gate.json").read_text())
        assert [r["name"] for r in gate["rules"]] == [
            "beats_base",
            "beats_base_secondary",
            "no_regression_vs_prod",
            "merge_parity",
            "export_parity",
            "max_forgetting",
            "judge_win_rate",
        ]
        general = evaluation["general"]  # the forgetting check: the base's held-out docstrings, tokenized by prepare
        assert general["measured"] and general["path"] == "models/base/general_text.jsonl" and general["rows"] == 128
        assert all(evaluation["models"][m]["general_loss"] > 0 for m in ("base", "candidate"))
        assert gate["passed"] == all(r["passed"] for r in gate["rules"])
        assert next(r for r in gate["rules"] if r["name"] == "merge_parity")["passed"]

    # Generated outputs are DVC's, never git's.
    ignored = sh("git", "status", "--porcelain", "--ignored", cwd=project)
    assert "models/base" in ignored and "data/prepared" in ignored and "data/general" in ignored
    assert set(read_lock(project)) == expected
    assert set(read_lock(project, ["globex-it"])) == {s for s in expected if "@" not in s or s.endswith("@globex-it")}


# What another library's warning looks like on the console: Python's warnings (UserWarning, FutureWarning, ...),
# a logging record's text, torch's glog-style "W1206 19:39:04.845 ..." lines.
THIRD_PARTY_WARNING = re.compile(r"Warning\b|warn|deprecat|Failed to load|^[WE]\d{4} \d", re.IGNORECASE)


def test_the_console_of_a_run_holds_no_other_librarys_warnings(first_run: str):
    """Every stage of the pipeline ran: nothing on its console is a warning we did not write (loraline/quiet.py
    silences the harmless ones at their source, one by one; a new one fails here until someone decides)."""
    ours = re.compile(r"^(loraline[\w ]*|\w+\[[\w-]+\]|[\w-]+@[\w-]+): ")  # "loraline run: warning: ..."
    lines = [line.split("\r")[-1] for line in first_run.splitlines()]
    found = [line for line in lines if THIRD_PARTY_WARNING.search(line) and not ours.match(line)]
    assert not found, "\n".join(found[:20])


def test_second_repro_runs_nothing(project: Path, first_run: str):
    out = sh("dvc", "repro", "--all-pipelines", cwd=project)
    assert stages_run(out) == set()
    assert "up to date" in sh("dvc", "status", cwd=project)


def test_editing_one_tenants_rows_reruns_only_that_tenant(project: Path, first_run: str):
    tenant = "acme-shop"
    before = json.loads((project / "reports" / tenant / "prepare_stats.json").read_text())
    others = [project / "data" / "prepared" / "globex-it", project / "models" / "adapters" / "globex-it"]
    before_others = [p.stat().st_mtime_ns for p in others]
    target = sorted((project / "data" / "raw" / tenant).glob("*.jsonl"))[0]
    with target.open("a", encoding="utf-8") as fh:
        row = {
            "instruction": "Extract the order request as JSON.",
            "input": "Hello, where is my parcel? Order 99173, thanks.",
            "output": '{"intent": "track"}',
        }
        fh.write(json.dumps(row) + "\n")

    out = sh("dvc", "repro", "--all-pipelines", cwd=project)

    assert_new_rows_rerun(stages_run(out), tenant)
    after = json.loads((project / "reports" / tenant / "prepare_stats.json").read_text())
    assert after["rows_in"] == before["rows_in"] + 1
    assert [p.stat().st_mtime_ns for p in others] == before_others


def test_push_to_the_default_local_remote_and_metrics(project: Path, first_run: str):
    sh("dvc", "push", cwd=project)
    assert any((project / ".dvc-remote").rglob("*")), "the local remote holds the pushed outputs"
    shown = sh("dvc", "metrics", "show", cwd=project)
    assert "reports/acme-shop/metrics/prepare.json" in shown and "rows_in" in shown
    assert "reports/acme-shop/metrics/train.json" in shown and "val_loss" in shown
    assert "reports/timing/train@acme-shop.json" in shown and "wall_s" in shown
    # only the small metrics files: the detailed reports (per-probe lists, library versions) are outputs
    assert "prepare_stats.json" not in shown and "merge_report.json" not in shown and "per_probe" not in shown
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=project))
    files = next(iter(metrics.values()))["data"]  # the workspace's
    tenants = ("acme-shop", "globex-it")
    stages = ("synthesize", "prepare", "train", "merge", "export", "evaluate", "gate")
    assert {f"reports/{t}/metrics/{s}.json" for t in tenants for s in stages} <= set(files)
    assert all(
        f.startswith("reports/timing/")
        for f in set(files) - {f"reports/{t}/metrics/{s}.json" for t in tenants for s in stages}
    )
    header = shown.splitlines()[0].split()
    assert len(header) <= 60, (
        header
    )  # one column per key across every file: a few dozen (52 with general_loss), not hundreds
    diff = sh("dvc", "metrics", "diff", "--all", cwd=project)
    assert "val_loss" in diff and "per_probe" not in diff
    plots = sh("dvc", "plots", "show", "--json", cwd=project)
    assert "reports/acme-shop/train/val_loss.csv" in plots


def test_loraline_run_without_prefect_releases_then_is_idempotent(project: Path, first_run: str):
    sh("dvc", "repro", "--all-pipelines", cwd=project)  # whatever earlier tests changed
    out = sh("loraline", "run", "--no-prefect", "--no-push", cwd=project)
    # nothing to run: one DVC status of every stage in-process, no `dvc repro` per stage, straight to the releases
    assert re.search(r"loraline run: all 17 stages up to date \(DVC status, [\d.]+s\): nothing to run", out), out[
        -3000:
    ]
    assert "dvc repro:" not in out
    assert "== loraline summary ==" in out
    for tenant in ("acme-shop", "globex-it"):
        stats = json.loads((project / "reports" / tenant / "prepare_stats.json").read_text())
        row = f"{tenant}\\s+{stats['rows_in']}\\s+{stats['kept']}\\s+{stats['rejected']}\\s+{stats['duplicates']}"
        assert re.search(row, out), f"summary table lacks {tenant}'s counts"
    assert len(re.findall(r"registry: v0\.0\.1 \(new\), promoted to prod", out)) == 2, out[-3000:]
    tags = set(sh("git", "tag", cwd=project).split())
    assert {"acme-shop-adapter@v0.0.1", "acme-shop-adapter#prod#1", "globex-it-onnx#prod#1"} <= tags

    again = sh("loraline", "run", "--no-push", cwd=project)  # the Prefect path: not started for nothing
    assert "all 17 stages up to date" in again
    assert "temporary server" not in again and "Created flow run" not in again, again[-3000:]
    assert set(sh("git", "tag", cwd=project).split()) == tags
    assert again.count("registry: v0.0.1 (unchanged)") == 2, again[-3000:]

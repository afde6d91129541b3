"""Helpers shared by the registry tests (git repositories in tmp_path)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def commit_file(root: Path, rel: str, text: str, message: str = "change") -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    git(root, "add", rel)
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")


DVC_YAML = """
artifacts:
  t1-adapter: {path: models/adapters/t1, type: model}
  t1-onnx: {path: models/onnx/t1, type: model}
stages:
  train:
    foreach: [t1]
    do:
      cmd: mkdir -p models/adapters/${item} && cp src.txt models/adapters/${item}/adapter.bin && echo cfg > models/adapters/${item}/config.json
      deps:
        - src.txt
      outs:
        - models/adapters/${item}
  merge:
    foreach: [t1]
    do:
      cmd: rm -rf models/merged/${item} && mkdir -p models/merged && cp -r models/adapters/${item} models/merged/${item}
      deps:
        - models/adapters/${item}
      outs:
        - models/merged/${item}
  export:
    foreach: [t1]
    do:
      cmd: mkdir -p models/onnx/${item} && cp models/merged/${item}/adapter.bin models/onnx/${item}/model.onnx
      deps:
        - models/merged/${item}
      outs:
        - models/onnx/${item}
"""


def dvc_project(root: Path, remote: Path) -> Path:
    """A git + DVC project whose three tiny stages stand in for train/merge/export of tenant t1."""
    import yaml
    from dvc.repo import Repo

    git(root, "init", "-q", "-b", "main")
    Repo.init(str(root))
    (root / ".dvc" / "config").write_text(
        f"[core]\n    analytics = false\n    remote = local\n['remote \"local\"']\n    url = {remote}\n"
    )
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(yaml.safe_dump({"tenants": {"t1": {"raw_dir": "data/raw/t1"}}}))
    (root / "src.txt").write_text("adapter one\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return root


def build(root: Path, content: str, gate_passed: bool = True) -> None:
    """Change the source, `dvc repro` + `dvc push`, and write the reports the real evaluate/gate stages would."""
    import json

    from dvc.repo import Repo

    import contextlib

    (root / "src.txt").write_text(content)
    with contextlib.chdir(root), Repo(str(root)) as repo:  # DVC resolves "no targets" from the working directory
        repo.reproduce()
        repo.push()
    reports = root / "reports" / "t1"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "eval_metrics.json").write_text(json.dumps({"test_rows": 2, "models": {
        "base": {"answer_loss": 2.0}, "candidate": {"answer_loss": 1.0}}}))
    (reports / "metrics").mkdir(exist_ok=True)
    (reports / "metrics" / "merge.json").write_text(json.dumps({"passed": True, "max_abs_logit_diff": 0.0}))
    (reports / "metrics" / "export.json").write_text(json.dumps({"passed": True, "max_abs_logit_diff": 0.0}))
    rule = {"name": "beats_base", "passed": gate_passed, "reason": "answer_loss gain 0.5 >= 0.05" if gate_passed else "answer_loss gain 0.01 < 0.05"}
    (reports / "gate.json").write_text(json.dumps({"passed": gate_passed, "failed": [] if gate_passed else ["beats_base"], "rules": [rule]}))

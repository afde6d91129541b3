"""Helpers shared by the registry tests (git repositories in tmp_path)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from dvc_layout import write_dvc_files

from loraline.layout import dvc_target


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
      cmd: mkdir -p models/adapters/${item} && cp src.txt models/adapters/${item}/adapter.bin
        && echo cfg > models/adapters/${item}/config.json
      deps:
        - src.txt
      outs:
        - models/adapters/${item}
  merge:
    foreach: [t1]
    do:
      cmd: mkdir -p models/merged reports/${item}/metrics && cp -r models/adapters/${item} models/merged/${item}
        && cp parity.json reports/${item}/metrics/merge.json
      deps:
        - models/adapters/${item}
        - parity.json
      outs:
        - models/merged/${item}
      metrics:
        - reports/${item}/metrics/merge.json:
            cache: false
  export:
    foreach: [t1]
    do:
      cmd: mkdir -p models/onnx/${item} reports/${item}/metrics
        && cp models/merged/${item}/adapter.bin models/onnx/${item}/model.onnx
        && cp parity.json reports/${item}/metrics/export.json
      deps:
        - models/merged/${item}
        - parity.json
      outs:
        - models/onnx/${item}
      metrics:
        - reports/${item}/metrics/export.json:
            cache: false
  evaluate:
    foreach: [t1]
    do:
      cmd: mkdir -p reports/${item} && cp evaluation.json reports/${item}/eval_metrics.json
      deps:
        - models/adapters/${item}
        - models/merged/${item}
        - evaluation.json
      outs:
        - reports/${item}/eval_metrics.json
  gate:
    foreach: [t1]
    do:
      cmd: cp verdict.json reports/${item}/gate.json
      deps:
        - reports/${item}/eval_metrics.json
        - reports/${item}/metrics/merge.json
        - reports/${item}/metrics/export.json
        - verdict.json
      outs:
        - reports/${item}/gate.json
"""

# What the stub evaluate and gate stages copy into place (the real stages compute them).
EVALUATION = {
    "test_rows": 2,
    "models": {
        "base": {"answer_loss": 2.0, "general_loss": 3.0},
        "candidate": {"answer_loss": 1.0, "general_loss": 3.1},
    },
}
PARITY = {"passed": True, "max_abs_logit_diff": 0.0}


def verdict(gate_passed: bool) -> dict:
    rule = {
        "name": "beats_base",
        "passed": gate_passed,
        "reason": "answer_loss gain 0.5 >= 0.05" if gate_passed else "answer_loss gain 0.01 < 0.05",
    }
    return {"passed": gate_passed, "failed": [] if gate_passed else ["beats_base"], "rules": [rule]}


def dvc_project(root: Path, remote: Path, targets: list[str] | None = None) -> Path:
    """A git + DVC project whose five tiny stages stand in for train/merge/export/evaluate/gate of tenant t1.
    `targets`: t1's deploy.targets; without onnx, dvc.yaml declares no t1-onnx artifact (as a user's would not)."""
    import json

    import yaml
    from dvc.repo import Repo

    tenant: dict = {"raw_dir": "data/raw/t1"}
    dvc_yaml = DVC_YAML
    if targets is not None:
        tenant["deploy"] = {"targets": targets}
        if "onnx" not in targets:
            dvc_yaml = dvc_yaml.replace("  t1-onnx: {path: models/onnx/t1, type: model}\n", "")

    git(root, "init", "-q", "-b", "main")
    Repo.init(str(root))
    (root / ".dvc" / "config").write_text(
        f"[core]\n    analytics = false\n    remote = local\n['remote \"local\"']\n    url = {remote}\n"
    )
    write_dvc_files(root, dvc_yaml)
    (root / "params.yaml").write_text(yaml.safe_dump({"tenants": {"t1": tenant}}))
    (root / "src.txt").write_text("adapter one\n")
    (root / "parity.json").write_text(json.dumps(PARITY))
    (root / "evaluation.json").write_text(json.dumps(EVALUATION))
    (root / "verdict.json").write_text(json.dumps(verdict(True)))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return root


def repro(root: Path, *targets: str, single_item: bool = False) -> None:
    """`dvc repro [targets]` in `root` (stage ids such as `train@t1`; none: `dvc repro -P`), as a user would run it."""
    import contextlib

    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:  # DVC resolves targets from the working directory
        if targets:
            for target in targets:
                repo.reproduce(dvc_target(target), single_item=single_item)
        else:
            repo.reproduce(all_pipelines=True)


def build(root: Path, content: str, gate_passed: bool = True) -> None:
    """Change the adapter's source (and the gate's verdict), then `dvc repro` + `dvc push`."""
    import contextlib
    import json

    from dvc.repo import Repo

    (root / "src.txt").write_text(content)
    (root / "verdict.json").write_text(json.dumps(verdict(gate_passed)))
    repro(root)
    with contextlib.chdir(root), Repo(str(root)) as repo:
        repo.push()


def commit_new_adapter(root: Path, content: str) -> None:
    """The adapter changes and only train's record follows (`dvc commit -f train@t1`): the stages after it are
    stale."""
    import contextlib

    from dvc.repo import Repo

    adapter = root / "models/adapters/t1/adapter.bin"
    adapter.unlink()  # DVC may have linked it to its cache: replace it, never write through
    adapter.write_text(content)
    with contextlib.chdir(root), Repo(str(root)) as repo:
        repo.commit(dvc_target("train@t1"), force=True)


def bare_remote_and_two_clones(repo: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(remote, machine A, machine B): `repo` pushed to a bare remote that A and B clone, as two workers of a
    pool would."""
    remote = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(remote))
    for name in ("a", "b"):
        git(tmp_path, "clone", "-q", str(remote), str(tmp_path / name))
    return remote, tmp_path / "a", tmp_path / "b"

"""End to end: a real reading-comprehension export (SQuAD v1.1 dev, 215 questions on 24 passages,
tests/data/squad) added as a tenant with the entry `loraline inspect` suggests for it, prepared through
the real `dvc repro`: questions about one passage are not near-duplicates, every passage lies whole in
one split, and every row is accounted for."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from e2e_project import copy_project, sh, stages_run

from loraline.layout import dvc_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SQUAD = Path(__file__).parents[1] / "data" / "squad" / "squad-v1.1-dev-sample.jsonl"
OUTCOMES = ("kept", "rejected", "duplicates", "near_duplicates", "contaminated")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, built) -> tuple[Path, dict]:
    project = copy_project(built.project, tmp_path_factory.mktemp("squad") / "project")
    raw = project / "data" / "raw" / "squad"
    raw.mkdir(parents=True)
    shutil.copy(SQUAD, raw / SQUAD.name)
    suggested = sh("loraline", "inspect", str(raw / SQUAD.name), cwd=project)
    assert "group: context" in suggested, suggested  # inspect sees the shared passages and names the field
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"]["squad"] = {
        "raw_dir": "data/raw/squad",
        "sources": [
            {
                "path": SQUAD.name,
                "columns": {"instruction": "{context}\n\n{question}", "output": "answers.text[0]"},
                "group": "context",
            }
        ],
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("loraline", "pipelines", cwd=project)  # the new tenant's dvc.yaml
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "a SQuAD tenant", cwd=project)
    out = sh("dvc", "repro", dvc_target("prepare@squad"), cwd=project)
    assert "prepare@squad" in stages_run(out)
    return project, json.loads((project / "reports" / "squad" / "prepare_stats.json").read_text())


def test_questions_about_one_passage_are_kept(prepared):
    _, stats = prepared
    assert stats["rows_in"] == 215 and stats["rows_in"] == sum(stats[k] for k in OUTCOMES)
    assert stats["kept"] >= 0.95 * 215, stats
    assert stats["contaminated"] == 0  # a passage shared with test rows is no copy of them: the split keeps it whole


def test_every_passage_is_whole_in_one_split(prepared):
    from datasets import load_from_disk

    project, stats = prepared
    dataset = load_from_disk(str(project / "data" / "prepared" / "squad" / "dataset"))
    splits_of: dict[str, set[str]] = defaultdict(set)
    for split in dataset:
        for row in dataset[split]:
            if row["source"] == "real":
                user = next(m["content"] for m in row["messages"] if m["role"] == "user")
                splits_of[user.rsplit("\n\n", 1)[0]].add(split)
    assert len(splits_of) == 24 and all(len(s) == 1 for s in splits_of.values()), splits_of
    assert stats["groups"]["groups"] == 24 and set(stats["groups"]["by_split"]) <= {"train", "validation", "test"}
    card = (project / "data" / "prepared" / "squad" / "README.md").read_text()
    assert "24 groups of rows sharing a context" in card, card

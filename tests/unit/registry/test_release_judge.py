"""At release, with gate.min_judge_win_rate set, the candidate is judged again against the production version it
would replace: a real git + DVC project and GTO tags (registry_helpers), the judge a small local server
(evaluate/judge_helpers.FakeJudge); only production's model evaluation is faked (its answers are given)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from registry_helpers import build, dvc_project

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))
from judge_helpers import KEY_ENV, SECRET, FakeJudge, judge_params, longer_wins  # noqa: E402

from loraline.config import load_params  # noqa: E402
from loraline.layout import Layout  # noqa: E402
from loraline.registry.base import ReleaseRefused, Version  # noqa: E402
from loraline.release import ProductionMeasure, judge_production, release_tenant  # noqa: E402

ROWS = [
    {
        "id": f"r{i}",
        "prompt": f"question {i}?",
        "reference": "ref",
        "predictions": {"base": "b", "candidate": f"answer {i}"},
    }
    for i in range(4)
]


@pytest.fixture(autouse=True)
def api_key(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def _generations(root: Path) -> None:
    path = Layout(root).evaluation_dir("t1") / "generations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))


def _version(version: str) -> Version:
    return Version("t1-adapter", version, "c" * 40, datetime(2025, 1, 1, tzinfo=timezone.utc))


def test_the_candidates_answers_are_judged_against_productions_with_its_version(tmp_path: Path):
    _generations(tmp_path)
    production = ["a much longer answer", "x", "answer 2", "short"]  # the candidate: longer, shorter... than these
    with FakeJudge(longer_wins) as server:
        block = judge_production(
            Layout(tmp_path),
            judge_params(server.base_url, max_rows=None),
            "t1",
            _version("v0.0.3"),
            [r["id"] for r in ROWS],
            production,
        )
    shown = [body["messages"][1]["content"] for body in server.chats()]
    assert "[Answer A]\nanswer 0\n\n[Answer B]\na much longer answer\n" in shown[0]
    assert block["against"] == "production" and block["against_model"] == {"version": "v0.0.3", "commit": "c" * 40}
    assert (block["wins"], block["losses"], block["ties"]) == (4, 2, 2) and block["win_rate"] == pytest.approx(5 / 8)
    assert (Layout(tmp_path).judge_cache_dir("t1")).is_dir()

    with pytest.raises(ReleaseRefused, match="other test rows than production was measured on"):
        judge_production(
            Layout(tmp_path),
            judge_params("http://127.0.0.1:1/v1"),
            "t1",
            _version("v0.0.3"),
            ["r0", "r1"],
            production[:2],
        )


@pytest.mark.parametrize(
    "production_answer, promoted", [("", True), ("an answer longer than every candidate's", False)]
)
def test_promotion_waits_on_the_judge_against_the_current_production(
    tmp_path: Path, production_answer: str, promoted: bool
):
    (tmp_path / "proj").mkdir()
    root = dvc_project(tmp_path / "proj", tmp_path / "remote")
    build(root, "adapter one\n")
    params = load_params(root / "params.yaml")
    first = release_tenant(root, params, "t1", evaluate=lambda *a: pytest.fail("nothing in production to measure"))
    assert first.promoted

    build(root, "adapter two\n")
    _generations(root)
    with FakeJudge(longer_wins) as server:
        params = load_params(
            root / "params.yaml",
            overrides={"evaluate.judge": judge_params(server.base_url).model_dump(), "gate.min_judge_win_rate": 0.6},
        )

        def measure(root_, params_, tenant, production):  # production's metrics as good; its answers given
            answers = [production_answer] * len(ROWS)
            return ProductionMeasure(
                {"answer_loss": 1.0},
                judge_production(
                    Layout(root_), params_.evaluate.judge, tenant, production, [r["id"] for r in ROWS], answers
                ),
            )

        second = release_tenant(root, params, "t1", evaluate=measure)
    rule = next(r for r in second.rules if r["name"] == "judge_win_rate")
    assert second.promoted is promoted and rule["passed"] is promoted
    assert (
        rule["value"] == (1.0 if promoted else 0.0) and "against production (version v0.0.1, commit " in rule["reason"]
    )
    if not promoted:
        assert (
            "judge_win_rate: judge win rate against production" in second.reason
            and second.production_after == "v0.0.1"
        )
    for path in root.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path

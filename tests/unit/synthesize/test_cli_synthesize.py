"""`loraline synthesize` after `loraline documents`, in a scratch project: one summary line per tenant."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from synth_helpers import FAQ, POLICY

from loraline.cli import main


def test_cli_writes_rows_rejects_and_stats(tmp_path: Path, monkeypatch, capsys) -> None:
    raw = tmp_path / "raw" / "lampwick"
    raw.mkdir(parents=True)
    (raw / "policy.md").write_text(POLICY, encoding="utf-8")
    (raw / "faq.md").write_text(FAQ, encoding="utf-8")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "seed": 11,
                "synthesize": {"questions_per_fact": 2},
                "tenants": {
                    "lampwick": {
                        "raw_dir": "raw/lampwick",
                        "seed_tasks": [
                            {
                                "instruction": "Customer email: is my parcel late?",
                                "output": "Parcels arrive in five days.",
                            }
                        ],
                    }
                },
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    assert main(["documents", "-q"]) == 0
    assert main(["synthesize", "--tenant", "lampwick", "-q"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    stats = json.loads(Path("reports/lampwick/synthesize_stats.json").read_text())
    assert line.startswith(f"synthesize[lampwick]: {stats['generated']} generated = {stats['kept']} kept + ")
    assert stats["seed"] == 11 and stats["seed_tasks"] == 1 and stats["params"]["questions_per_fact"] == 2
    assert Path("data/synthetic/lampwick/rows.jsonl").stat().st_size > 0
    assert Path("data/synthetic/lampwick/rejected.jsonl").exists()

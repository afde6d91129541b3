"""End to end: a DPO tenant (train.objective dpo) whose raw data are preference pairs built from acme-shop's order
emails (the right JSON of a request that is not urgent chosen, the same JSON marked urgent rejected: a wrong field
value the e2e base prefers on every pair) goes through the real `dvc repro` to a passed gate decided on preference
accuracy, which rises from the base's to well above it on the held-out pairs; then a DPO run whose reference is a
registry version of another tenant's SFT adapter (train.preference.reference: acme-shop@v0.0.1), fetched by
`loraline train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from e2e_project import copy_project, sh, stages_run

from loraline.layout import dvc_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TENANT = "acme-prefs"
PAIRS = 600
# The e2e base (0.1M parameters) learns slowly: a higher rate and beta than a real base wants, and 72 steps.
TRAIN = {"objective": "dpo", "max_steps": 72, "learning_rate": 0.02, "preference": {"beta": 0.5}}
# The gate decides on the pairs' ranking: the share of held-out pairs whose chosen answer the model finds likelier.
GATE = {"primary_metric": "preference_accuracy", "min_gain_over_base": 0.5, "secondary_metric": None}


def preference_pairs(raw: Path, limit: int) -> list[dict]:
    """acme-shop's order emails that are not urgent as pairs: the right JSON chosen, the same JSON with `urgent: true`
    rejected (a model that flags everything urgent, corrected by reviewers)."""
    rows: list[dict] = []
    for path in sorted(raw.glob("orders_email_*.jsonl")):
        for line in path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                row = json.loads(line)
                answer = json.loads(row["output"])
                prompt = f"{row['instruction']}\n\n{row['input']}"
            except (ValueError, KeyError, TypeError):
                continue  # the sample's deliberately bad rows
            if not isinstance(answer, dict) or answer.get("urgent") is not False:
                continue
            rows.append(
                {"prompt": prompt, "chosen": row["output"], "rejected": json.dumps({**answer, "urgent": True})}
            )
    return rows[:limit]


@pytest.fixture(scope="module")
def project(tmp_path_factory, built) -> Path:
    project = copy_project(built.project, tmp_path_factory.mktemp("preference") / "project")
    # acme-shop's SFT adapter as registry version v0.0.1, before the new tenant's documents rebuild the tiny base
    # (it reads every tenant's documents) and leave acme-shop's stages stale
    sh("loraline", "registry", "release", "--tenant", "acme-shop", cwd=project)
    rows = preference_pairs(project / "data" / "raw" / "acme-shop", PAIRS)
    assert len(rows) == PAIRS
    raw = project / "data" / "raw" / TENANT
    raw.mkdir(parents=True)
    (raw / "order_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"][TENANT] = {"raw_dir": f"data/raw/{TENANT}", "deploy": {"targets": ["adapter"]}}
    params["tenants"][TENANT] |= {"train": TRAIN, "gate": GATE}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert f"pipelines/{TENANT}/dvc.yaml" in sh("loraline", "pipelines", cwd=project)  # written: the tenant's stages
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "a DPO tenant", cwd=project)
    return project


def test_a_dpo_tenant_passes_its_gate_on_its_pairs(project: Path):
    out = sh("dvc", "repro", dvc_target(f"gate@{TENANT}"), cwd=project)
    ran = stages_run(out)
    assert {f"{stage}@{TENANT}" for stage in ("prepare", "train", "merge", "evaluate", "gate")} <= ran
    # (the built base reads every tenant's documents, so a new tenant's documents folder rebuilds it)
    assert not [s for s in ran if s.endswith(("@acme-shop", "@globex-it"))], ran

    reports = project / "reports" / TENANT
    stats = json.loads((reports / "prepare_stats.json").read_text())
    assert stats["rows_in"] == PAIRS == sum(stats[k] for k in ("kept", "rejected", "duplicates", "near_duplicates"))
    assert sum(stats["pairs"].values()) == stats["kept"] > 0.95 * PAIRS

    record = json.loads((project / "models" / "adapters" / TENANT / "train_record.json").read_text())
    preference = record["preference"]
    assert preference["objective"] == "dpo" and preference["reference"] == "base"
    assert preference["pairs"] == {s: stats["pairs"][s] for s in ("train", "validation")}
    assert preference["final_val"]["reward_accuracy"] > preference["base_val"]["reward_accuracy"] == 0.0
    assert "validation dpo loss" in out and "reward accuracy" in out

    metrics = json.loads((reports / "eval_metrics.json").read_text())
    assert metrics["preference"]["pairs"] == stats["pairs"]["test"]
    base, candidate = metrics["models"]["base"], metrics["models"]["candidate"]
    # the base ranks the wrong answer higher on most pairs; the adapter turns most of them round
    assert base["preference_accuracy"] < 0.3 and candidate["preference_accuracy"] >= base["preference_accuracy"] + 0.5
    assert candidate["logp_margin"] > 0 > base["logp_margin"]
    assert candidate["reward_accuracy"] >= 0.8 and candidate["reward_margin"] > 0 == base["reward_margin"]
    gate = json.loads((reports / "gate.json").read_text())
    assert gate["passed"], gate
    assert "## Preference pairs" in (reports / "evaluation" / "report.md").read_text()


def test_dpo_from_a_registry_version_of_an_sft_adapter(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"][TENANT]["train"] = {**TRAIN, "max_steps": 6, "preference": {"reference": "acme-shop@v0.0.1"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = sh("loraline", "train", "--tenant", TENANT, "--quiet", cwd=project)
    assert "validation dpo loss" in out
    fetched = list((project / "models" / "reference" / TENANT).glob("acme-shop-v0.0.1-*"))
    assert len(fetched) == 1 and (fetched[0] / "adapter_model.safetensors").is_file()
    shipped = project / "models" / "adapters" / "acme-shop" / "adapter_model.safetensors"
    assert (fetched[0] / "adapter_model.safetensors").read_bytes() == shipped.read_bytes()
    record = json.loads((project / "models" / "adapters" / TENANT / "train_record.json").read_text())
    assert record["preference"]["reference"] == f"models/reference/{TENANT}/{fetched[0].name}"
    assert "models/reference" in (project / ".gitignore").read_text()

    params["tenants"][TENANT]["train"]["preference"]["reference"] = "acme-shop@v9.9.9"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(AssertionError, match=r"acme-shop@v9\.9\.9.*acme-shop-adapter has no version v9\.9\.9"):
        sh("loraline", "train", "--tenant", TENANT, "--quiet", cwd=project)

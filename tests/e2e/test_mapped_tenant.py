"""End to end: a tenant whose raw data has its own layout, described by tenants.<t>.sources only,
goes through the real `dvc repro` to a passed gate, with every row accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from e2e_project import copy_project, sh, stages_run

from loraline.layout import dvc_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SOURCES = [
    # a ticketing system's export: nested fields, the system prompt from another key, the answer as text
    {
        "path": "exports/*.jsonl.gz",
        "columns": {
            "system": "meta.guidance",
            "instruction": "{ticket.subject}\n\n{ticket.body}",
            "output": "routing",
        },
    },
]


def _export(project: Path) -> int:
    """globex-it's chat rows rewritten as a gzip'd ticket export; returns how many rows were written."""
    import gzip

    raw = project / "data" / "raw" / "globex-it"
    rows = []
    for line in (raw / "helpdesk_chats.jsonl").read_bytes().split(b"\n"):
        try:
            chat = json.loads(line.decode("utf-8"))["messages"]
            by_role = {m["role"]: m["content"] for m in chat}
            system, user, assistant = by_role["system"], by_role["user"], by_role["assistant"]
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            continue  # the sample's deliberately bad rows
        subject, _, body = user.partition("\n")
        rows.append(
            {
                "ticket": {"subject": subject, "body": body.strip() or "-"},
                "meta": {"guidance": system},
                "routing": assistant,
            }
        )
    (raw / "helpdesk_chats.jsonl").unlink()
    (raw / "exports").mkdir()
    (raw / "exports" / "tickets.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    )
    return len(rows)


@pytest.fixture(scope="module")
def project(tmp_path_factory, built) -> tuple[Path, int]:
    # A finished run whose globex-it then exports its tickets in another layout.
    project = copy_project(built.project, tmp_path_factory.mktemp("mapped") / "project")
    rows = _export(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"]["globex-it"]["sources"] = SOURCES
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "globex-it as a ticket export", cwd=project)
    return project, rows


def test_a_mapped_tenant_trains_and_passes_its_gate(project):
    project, rows = project
    out = sh("dvc", "repro", dvc_target("gate@globex-it"), cwd=project)
    assert {
        "prepare@globex-it",
        "train@globex-it",
        "merge@globex-it",
        "export@globex-it",
        "gate@globex-it",
    } <= stages_run(out)

    stats = json.loads((project / "reports" / "globex-it" / "prepare_stats.json").read_text())
    outcomes = ("kept", "rejected", "duplicates", "near_duplicates", "contaminated")
    (mapped, *rest) = stats["sources"]
    assert mapped["path"] == "exports/*.jsonl.gz" and mapped["files"] == 1 and mapped["rows_in"] == rows
    assert mapped["kept"] > 0.8 * rows
    rejects = [
        json.loads(line)
        for line in (project / "data" / "rejected" / "globex-it.jsonl").read_text().split("\n")
        if line
    ]
    assert len(rejects) == stats["rejected"]
    assert not [r for r in rejects if r["reason"] == "mapping"], "every exported row maps"
    assert mapped["rows_in"] == sum(mapped[k] for k in outcomes) and stats["rows_in"] == sum(
        stats[k] for k in outcomes
    )
    # the rest: files no entry matches (read by shape detection) and the synthesize stage's rows
    assert {e["path"] for e in rest} <= {"(detected)", "synthetic:rows.jsonl"}, rest
    assert sum(e["rows_in"] for e in stats["sources"]) == stats["rows_in"]

    from datasets import load_from_disk

    train = load_from_disk(str(project / "data" / "prepared" / "globex-it" / "dataset"))["train"]
    real = next(r for r in train if r["source"] == "real")
    assert [m["role"] for m in real["messages"]] == ["system", "user", "assistant"]
    assert real["messages"][1]["content"].startswith("Subject:") and "\n\n" in real["messages"][1]["content"]

    gate = json.loads((project / "reports" / "globex-it" / "gate.json").read_text())
    assert gate["passed"], gate
    assert (project / "models" / "adapters" / "globex-it" / "adapter_model.safetensors").is_file()

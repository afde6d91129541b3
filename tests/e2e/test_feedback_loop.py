"""The feedback loop end to end: the real `loraline serve` (vLLM on the CPU behind the gateway) with
serve.log_traffic and serve.auth answers the real `openai` client, whole and streamed; each answer is in the
tenant's traffic log under the id the client got, and no key is written anywhere; feedback on them
(POST /loraline/feedback, with the tenant's key) is recorded, refused to another tenant's key and to a bad
body; then, with the server stopped, `loraline feedback export` writes them into the tenant's raw_dir as an
SFT row and a preference pair (PII masked), which the next `dvc repro` prepares and accounts for.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from e2e_project import sh, stages_run
from e2e_serve import KEYS, Serving, client, released_copy, start_serve

from loraline.layout import dvc_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.serve]

TENANT = "acme-shop"
# A few tokens each (the test runs on 2 CPU cores), sampled: the tiny model's greedy answer is blank lines, which
# the export drops as empty answers. Seeded: the same answers from run to run, and not the same two answers.
SAMPLING = {"max_tokens": 8, "temperature": 1.0}
ASK = {"role": "system", "content": "Extract the order request from the customer email as JSON."}
WHOLE = [ASK, {"role": "user", "content": "Subject: Cancel order\n\nPlease cancel order #41872.\n\nThanks,\nMaya"}]
# The log keeps what the user typed; the export masks the email (prepare.pii) before writing.
EMAIL = "jane.doe@example.com"
STREAMED = [
    ASK,
    {"role": "user", "content": f"Subject: Refund\n\nThe linen throw in order #55190 came torn. Refund me at {EMAIL}"},
]
REWRITE = '{"intent": "refund", "order": "55190", "category": "decor", "urgent": false}'
OUTCOMES = ("kept", "rejected", "duplicates", "near_duplicates", "contaminated")


@pytest.fixture(scope="module")
def project(tmp_path_factory, built) -> Path:
    return released_copy(built.project, tmp_path_factory.mktemp("feedback") / "project")


def test_feedback_on_served_answers_becomes_the_tenant_s_next_data(project: Path):
    days = {_utc_day()}
    serving = start_serve(project, "serve.log_traffic=true", keys=KEYS)
    try:
        answers = _chat(serving.url)
        days.add(_utc_day())  # a run across midnight writes to both days
        _check_logged(project, answers, days)
        whole_id, streamed_id = answers
        _send_feedback(serving.url, whole_id, streamed_id)
    finally:
        _stop(serving)
    _check_no_secrets(project)

    before = json.loads((project / "reports" / TENANT / "prepare_stats.json").read_text())
    exported = _export(project, answers)
    out = sh("dvc", "repro", dvc_target(f"prepare@{TENANT}"), cwd=project)
    assert f"prepare@{TENANT}" in stages_run(out), out[-3000:]
    _check_prepared(project, exported, before, answers)


def _utc_day() -> str:
    return datetime.now(timezone.utc).date().isoformat()


def _chat(url: str) -> dict[str, tuple[list[dict], str]]:
    """One whole and one streamed chat completion: response id -> (messages sent, answer text)."""
    acme = client(url, TENANT)
    raw = acme.chat.completions.with_raw_response.create(model=TENANT, messages=WHOLE, seed=1, **SAMPLING)
    reply = raw.parse()
    assert raw.headers["x-loraline-version"] == "v0.0.1" and reply.model == TENANT
    chunks = list(acme.chat.completions.create(model=TENANT, messages=STREAMED, seed=2, **SAMPLING, stream=True))
    [stream_id] = {c.id for c in chunks}  # every chunk of a stream carries its response's id
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answers = {reply.id: (WHOLE, reply.choices[0].message.content), stream_id: (STREAMED, streamed)}
    assert len({text.strip() for _, text in answers.values()} - {""}) == 2, answers
    return answers


def _check_logged(project: Path, answers: dict[str, tuple[list[dict], str]], days: set[str]) -> None:
    """Each answer is a response event of the tenant's log, under the id its client got, in its UTC day's file."""
    folder = project / "logs" / "traffic" / TENANT
    files = sorted(folder.iterdir())
    assert {f.name for f in files} <= {f"{day}.jsonl" for day in days}, files
    logged = {}
    for path in files:
        for line in path.read_text().splitlines():
            event = json.loads(line)
            assert event["event"] == "response" and path.name == f"{event['time'][:10]}.jsonl", event
            logged[event["id"]] = event
    assert set(logged) == set(answers)
    for response_id, (messages, text) in answers.items():
        event = logged[response_id]
        assert (event["tenant"], event["version"]) == (TENANT, "v0.0.1")
        assert (event["messages"], event["response"]) == (messages, text)
    assert sorted(p.name for p in (project / "logs" / "traffic").iterdir()) == [TENANT]  # nothing for globex-it


def _send_feedback(url: str, whole_id: str, streamed_id: str) -> None:
    """Thumbs up on the whole answer and a rewrite of the streamed one, with the tenant's key; another tenant's
    key, no key and a bad body are refused, and nothing of theirs is recorded."""

    def post(body: dict, tenant: str | None = TENANT) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        return httpx.post(f"{url}/loraline/feedback", json=body, headers=headers, timeout=30)

    for body in ({"id": whole_id, "rating": "up"}, {"id": streamed_id, "rating": "down", "rewrite": REWRITE}):
        answer = post(body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["object"] == "loraline.feedback"
        assert (answer.json()["id"], answer.json()["model"]) == (body["id"], TENANT)

    other = post({"id": whole_id, "rating": "down"}, tenant="globex-it")
    assert other.status_code == 404 and other.json()["error"]["param"] == "id", other.text
    assert f"no answer with id {whole_id!r} was given to `globex-it`" in other.json()["error"]["message"]
    assert post({"id": whole_id, "rating": "down"}, tenant=None).status_code == 401
    bad = post({"id": whole_id, "rating": "sideways"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating", bad.text
    assert '`rating` must be "up", "down" or a finite number' in bad.json()["error"]["message"]
    unknown = post({"id": streamed_id, "stars": 5})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "stars", unknown.text


def _stop(serving: Serving) -> None:
    serving.proc.terminate()
    try:
        serving.proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(serving.proc.pid, 9)
        serving.proc.wait(60)
        raise AssertionError("loraline serve did not stop on SIGTERM:\n" + serving.log.read_text()[-3000:]) from None


def _check_no_secrets(project: Path) -> None:
    """No key, and no Authorization header, in any file the server wrote (its log included)."""
    written = [p for p in (project / "logs").rglob("*") if p.is_file()]
    written += [p for p in (project / "reports" / "serve").rglob("*") if p.is_file()] + [project / "serve.log"]
    secrets = [k.encode() for k in KEYS.values()] + [b"bearer", b"authorization"]
    assert len(written) > 2
    for path in written:
        data = path.read_bytes().lower()
        assert not [s for s in secrets if s in data], f"{path} holds {[s for s in secrets if s in data]}"


def _export(project: Path, answers: dict[str, tuple[list[dict], str]]) -> Path:
    """`loraline feedback export`: the up-rated answer an SFT row, the rewrite a pair over the served answer."""
    out = sh("loraline", "feedback", "export", "--tenant", TENANT, cwd=project)
    assert f"{TENANT}: 2 responses, 2 feedback events: 1 SFT rows, 1 pairs -> " in out, out
    [path] = (project / "data" / "raw" / TENANT).glob("feedback-*.jsonl")
    assert str(path.relative_to(project)) in out and "PII masked: email 1" in out, out
    (whole_id, (_, whole)), (streamed_id, (_, streamed)) = answers.items()
    sft, pair = (json.loads(line) for line in path.read_text().splitlines())
    meta = {"from": "feedback", "responses": [whole_id], "versions": ["v0.0.1"]}
    assert sft == {"messages": [*WHOLE, {"role": "assistant", "content": whole}], "meta": {"kind": "up", **meta}}
    masked = [{**turn, "content": turn["content"].replace(EMAIL, "<EMAIL>")} for turn in STREAMED]
    assert pair == {
        "messages": masked,
        "chosen": REWRITE,
        "rejected": streamed,
        "meta": {**meta, "kind": "rewrite", "responses": [streamed_id]},
    }
    assert EMAIL not in path.read_text()
    return path


def _check_prepared(project: Path, exported: Path, before: dict, answers: dict[str, tuple[list[dict], str]]) -> None:
    """prepare read both rows and kept them: the pair counted in `pairs`, every row accounted for."""
    from datasets import load_from_disk

    stats = json.loads((project / "reports" / TENANT / "prepare_stats.json").read_text())
    assert "pairs" not in before and before["by_shape"].get("preference") is None
    assert stats["by_file"][exported.name] == {"rows_in": 2, "kept": 2, **dict.fromkeys(OUTCOMES[1:], 0)}
    assert stats["rows_in"] == before["rows_in"] + 2 == sum(stats[k] for k in OUTCOMES)
    assert sum(stats["pairs"].values()) == 1 == stats["by_shape"]["preference"]

    (_, (_, whole)), (_, (_, streamed)) = answers.items()
    rows = [
        row
        for split in load_from_disk(str(project / "data" / "prepared" / TENANT / "dataset")).values()
        for row in split
    ]
    [pair] = [r for r in rows if len(r["rejected_input_ids"]) > 0]  # the tenant's only pair
    masked = [{**turn, "content": turn["content"].replace(EMAIL, "<EMAIL>")} for turn in STREAMED]
    assert pair["messages"] == [*masked, {"role": "assistant", "content": REWRITE}]  # context + the chosen answer
    assert (pair["shape"], pair["rejected"]) == ("preference", streamed) and pair["n_rejected_tokens"] > 0
    assert [r["shape"] for r in rows if r["messages"] == [*WHOLE, {"role": "assistant", "content": whole}]] == ["chat"]
    assert sum(r["rejected"] == "" and r["n_rejected_tokens"] == 0 for r in rows) == len(rows) - 1  # SFT rows

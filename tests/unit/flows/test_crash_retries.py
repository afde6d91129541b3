"""A flow run that loses its worker or machine: flows/automations.yaml marks it Crashed (Lost), schedules it again
for any worker of the pool (tests/e2e/test_two_machines.py shows it end to end); the flow bounds how often
(orchestrate.crash_retries), so a run that crashes every time fails instead of looping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraline.config import ConfigError, parse_params
from loraline.flows.pipeline import refuse_a_crash_loop

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("run_count", "crash_retries"), [(1, 0), (1, 2), (2, 2), (3, 2)])
def test_a_run_within_its_crash_retries_goes_on(run_count, crash_retries):
    refuse_a_crash_loop(run_count, crash_retries)


def test_one_start_past_the_crash_retries_fails_saying_why():
    with pytest.raises(RuntimeError) as info:
        refuse_a_crash_loop(4, 2)
    assert str(info.value).startswith(
        "this flow run has started 4 times: it crashed (its worker or machine lost) 3 times and was scheduled "
        "again, more than orchestrate.crash_retries (2)"
    )
    with pytest.raises(RuntimeError, match="started 2 times"):
        refuse_a_crash_loop(2, 0)  # 0: a crashed run is never run again


def test_crash_retries_is_a_bounded_count_defaulting_to_two():
    tenants = {"tenants": {"t": {"raw_dir": "data/raw/t"}}}
    assert parse_params(tenants).orchestrate.crash_retries == 2
    assert parse_params({**tenants, "orchestrate": {"crash_retries": 0}}).orchestrate.crash_retries == 0
    with pytest.raises(ConfigError, match=r"orchestrate\.crash_retries"):
        parse_params({**tenants, "orchestrate": {"crash_retries": -1}})


def test_the_automations_are_valid_and_cover_every_deployment_of_prefect_yaml():
    from prefect.events.schemas.automations import AutomationCore

    automations = [
        AutomationCore.model_validate(a)
        for a in yaml.safe_load((REPO / "flows" / "automations.yaml").read_text())["automations"]
    ]
    silent, lost = automations
    assert silent.trigger.posture == "Proactive" and silent.trigger.after == {"prefect.flow-run.heartbeat"}
    # a heartbeat every 30 s at the shortest (Prefect's minimum): a live run always beats the window
    assert silent.trigger.within.total_seconds() >= 2 * 30
    assert [(a.state, a.name) for a in silent.actions] == [("CRASHED", "Lost")]
    # only what the first one marked is run again: a crash a live worker reports may recur at once, for ever
    assert lost.trigger.expect == {"prefect.flow-run.Lost"}
    assert [(a.state, a.name) for a in lost.actions] == [("SCHEDULED", "AwaitingRetry")]
    tag = lost.trigger.match_related.root["prefect.resource.id"].removeprefix("prefect.tag.")
    assert silent.trigger.match_related == lost.trigger.match_related  # both about loraline's runs only
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert all(tag in d["tags"] for d in deployments), [d["name"] for d in deployments if tag not in d["tags"]]


@pytest.mark.slow
def test_a_flow_runs_first_start_counts_one_outside_a_flow_too(monkeypatch):
    """Through Prefect's own engine (a temporary API server): the server's run_count, this start included."""
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from loraline.flows.pipeline import _run_count

    @flow
    def starts() -> int:
        return _run_count()

    assert _run_count() == 1  # no flow run: `loraline run --no-prefect` and plain calls
    with prefect_test_harness(server_startup_timeout=120):
        assert starts() == 1

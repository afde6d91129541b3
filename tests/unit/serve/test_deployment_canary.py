"""A canary through the deployment: started from a promotion on probation, split, decided, followed,
with a scripted engine and an in-memory registry of canary decisions (the real ones:
tests/e2e/test_serve_canary.py)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from test_deployment import REF, ScriptedEngine, events

from loraline.config import CanaryParams, ServeParams
from loraline.registry.canary import CanaryDecision
from loraline.serve.canary import Outcome, Verdict
from loraline.serve.deployment import Deployment
from loraline.serve.versions import Production, ServedVersion

NOW = datetime.now(timezone.utc)


class Registry:
    """Production per tenant and the canary decisions, as registry.canary keeps them; `fail` makes writes fail."""

    def __init__(self) -> None:
        self.production: dict[str, Production] = {}
        self.decisions: dict[tuple[str, int], CanaryDecision] = {}
        self.fail: Exception | None = None

    def promote(self, tenant: str, version: str, canary: bool = True) -> None:
        before = self.production.get(tenant)
        number = before.number + 1 if before else 1
        stable = (before.version, f"c-{before.version}") if canary and before else None
        self.production[tenant] = Production(version, f"c-{version}", NOW, number, stable)

    def decide(self, tenant: str, number: int, version: str, verdict: Verdict) -> CanaryDecision | None:
        if self.fail is not None:
            raise self.fail
        if (tenant, number) in self.decisions:
            return self.decisions[(tenant, number)]
        now = self.production[tenant]
        if (now.number, now.version) != (number, version):
            return None
        self.decisions[(tenant, number)] = made = CanaryDecision(
            f"{tenant}-adapter", number, version, verdict.keep, verdict.reason, "this replica", verdict.facts()
        )
        if verdict.keep:
            self.production[tenant] = Production(version, now.commit, NOW, number)
        else:
            self.promote(tenant, now.stable[0], canary=False)
        return made

    def decision(self, tenant: str, number: int) -> CanaryDecision | None:
        return self.decisions.get((tenant, number))


def make(
    tmp_path, registry: Registry, engine: ScriptedEngine | None = None, **canary
) -> tuple[Deployment, ScriptedEngine]:
    engine = engine or ScriptedEngine()

    def prepare(tenant, version, commit):
        return ServedVersion(tenant, version, commit, tmp_path / tenant / version, 16, REF)

    params = ServeParams(canary=CanaryParams(**{"fraction": 0.5, "min_requests": 2, **canary}))
    return Deployment(
        engine, params, prepare, lambda: dict(registry.production), tmp_path / "events.jsonl", registry
    ), engine


def serve(deployment: Deployment, n: int, ok_on: dict[str, bool] | None = None, tokens: int = 10) -> list[str]:
    """n requests without a client; the versions that took them, each answered ok unless ok_on says otherwise."""
    took = []
    for _ in range(n):
        served = deployment.acquire("acme")
        took.append(served.version)
        deployment.release(served, Outcome((ok_on or {}).get(served.version, True), 1.0, tokens))
    return took


def wait_for(condition, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def on_canary(tmp_path):
    """acme served at v0.0.1, then v0.0.2 promoted on canary and synced: (deployment, engine, registry)."""
    registry = Registry()
    registry.promote("acme", "v0.0.1")
    deployment, engine = make(tmp_path, registry)
    deployment.sync()
    registry.promote("acme", "v0.0.2")
    [started] = deployment.sync()
    assert started["event"] == "canary_started" and started["serving"] == "v0.0.1" and started["fraction"] == 0.5
    return deployment, engine, registry


def test_a_promotion_on_canary_takes_its_share_beside_the_previous_version(on_canary):
    deployment, engine, _ = on_canary
    assert engine.loaded == ["acme@v0.0.1", "acme@v0.0.2"] and deployment.routes["acme"].version == "v0.0.1"
    took = [deployment.acquire("acme").version for _ in range(6)]
    assert took == ["v0.0.1", "v0.0.2"] * 3
    assert {deployment.acquire("acme", "client-9").version for _ in range(5)} in ({"v0.0.1"}, {"v0.0.2"})  # sticky


def test_a_good_canary_is_kept_in_the_registry_and_takes_the_whole_tenant(on_canary, tmp_path):
    deployment, engine, registry = on_canary
    serve(deployment, 4)  # 2 answers each: the verdict is in, written by a thread of its own
    wait_for(lambda: "acme" not in deployment.canaries)
    decision = registry.decisions[("acme", 2)]
    assert (
        decision.kept
        and "within serve.canary's bounds" in decision.reason
        and decision.facts["canary"]["answers"] == 2
    )
    assert deployment.routes["acme"].version == "v0.0.2" and serve(deployment, 3) == ["v0.0.2"] * 3
    wait_for(lambda: engine.loaded == ["acme@v0.0.2"])  # the previous version unloaded once idle
    kept = events(tmp_path)[-1]
    assert kept["event"] == "canary_kept" and kept["serving"] == "v0.0.2" and kept["decided_by"] == "this replica"
    assert kept["counted_here"]["stable"]["answers"] == 2


def test_a_failing_canary_is_rolled_back_in_the_registry_and_its_requests_finish_first(on_canary, tmp_path):
    deployment, engine, registry = on_canary
    deployment.release(deployment.acquire("acme"))  # the first request to v0.0.1, the second ...
    running = deployment.acquire("acme")  # ... to the canary: in flight when the verdict comes
    assert running.version == "v0.0.2"
    serve(deployment, 4, ok_on={"v0.0.2": False})
    wait_for(lambda: "acme" not in deployment.canaries)
    assert registry.production["acme"].version == "v0.0.1"
    assert registry.decisions[("acme", 2)].reason.startswith("error rate 1.00 (2 of 2 answers)")
    assert serve(deployment, 3) == ["v0.0.1"] * 3
    time.sleep(0.5)
    assert "acme@v0.0.2" in engine.loaded  # still answering the request in flight
    deployment.release(running, Outcome(True, 1.0, 5))
    wait_for(lambda: engine.loaded == ["acme@v0.0.1"])
    rolled = events(tmp_path)[-1]
    assert (
        rolled["event"] == "canary_rolled_back" and rolled["serving"] == "v0.0.1" and rolled["production"] == "v0.0.1"
    )


def test_a_request_the_canary_fails_goes_to_the_stable_version_even_once_the_canary_is_over(on_canary):
    deployment, _, registry = on_canary
    deployment.release(deployment.acquire("acme"))
    on_new = deployment.acquire("acme")
    assert (
        on_new.version == "v0.0.2" and deployment.fall_back(deployment.routes["acme"]) is None
    )  # the route has nothing behind it
    registry.promote("acme", "v0.0.1", canary=False)  # rolled back (elsewhere) while the request ran
    deployment.sync()
    stable = deployment.fall_back(on_new)
    assert stable.version == "v0.0.1" and deployment._inflight["acme@v0.0.1"] == 1
    deployment.release(on_new, Outcome(False, 1.0, 0))
    deployment.release(stable, Outcome(True, 1.0, 3))
    assert deployment._inflight["acme@v0.0.1"] == deployment._inflight["acme@v0.0.2"] == 0


def test_a_canary_failing_the_deployment_check_is_rolled_back_at_once(tmp_path):
    registry = Registry()
    registry.promote("acme", "v0.0.1")
    deployment, engine = make(tmp_path, registry)
    deployment.sync()
    engine.answers["acme@v0.0.2"] = ["wrong", *REF.texts[1:]]
    registry.promote("acme", "v0.0.2")
    [failed] = deployment.sync()
    assert failed["event"] == "check_failed" and failed["serving"] == "v0.0.1"
    assert (
        failed["registry"]["kept"] is False and "deployment check failed: 3/4 probes" in failed["registry"]["reason"]
    )
    assert registry.production["acme"].version == "v0.0.1" and deployment.canaries == {}
    assert engine.loaded == ["acme@v0.0.1"] and deployment.sync() == []


def test_a_rollback_the_registry_could_not_take_is_written_at_a_later_pass(tmp_path):
    registry = Registry()
    registry.promote("acme", "v0.0.1")
    deployment, engine = make(tmp_path, registry)
    deployment.sync()
    engine.answers["acme@v0.0.2"] = ["wrong"] * len(REF.texts)
    registry.promote("acme", "v0.0.2")
    registry.fail = RuntimeError("git remote unreachable")
    [failed] = deployment.sync()
    assert failed["registry"] is None and registry.production["acme"].version == "v0.0.2"
    assert deployment.routes["acme"].version == "v0.0.1"  # the refused version serves nothing meanwhile
    registry.fail = None
    deployment.sync()
    assert registry.production["acme"].version == "v0.0.1" and not registry.decisions[("acme", 2)].kept


def test_a_replica_follows_a_decision_made_by_another(on_canary, tmp_path):
    deployment, engine, registry = on_canary
    registry.decisions[("acme", 2)] = CanaryDecision(
        "acme-adapter", 2, "v0.0.2", False, "slow elsewhere", "replica b", {}
    )
    registry.promote("acme", "v0.0.1", canary=False)  # replica b's rollback, fetched here
    [ended] = deployment.sync()
    assert (
        ended["event"] == "canary_rolled_back"
        and ended["decided_by"] == "replica b"
        and ended["reason"] == "slow elsewhere"
    )
    assert deployment.canaries == {} and serve(deployment, 2) == ["v0.0.1"] * 2
    wait_for(lambda: engine.loaded == ["acme@v0.0.1"])


def test_a_new_promotion_during_a_canary_replaces_it(on_canary):
    deployment, engine, registry = on_canary
    registry.promote("acme", "v0.0.3")  # on canary against v0.0.2, which was production
    got = deployment.sync()
    assert [e["event"] for e in got] == ["canary_ended", "served", "canary_started"]
    canary = deployment.canaries["acme"]
    assert (canary.stable.version, canary.version.version) == ("v0.0.2", "v0.0.3")
    wait_for(lambda: engine.loaded == ["acme@v0.0.2", "acme@v0.0.3"])


def test_a_replica_starting_during_a_canary_serves_both_versions(tmp_path):
    registry = Registry()
    registry.promote("acme", "v0.0.1")
    registry.promote("acme", "v0.0.2")
    deployment, engine = make(tmp_path, registry)
    assert [e["event"] for e in deployment.sync()] == ["served", "canary_started"]
    assert engine.loaded == ["acme@v0.0.1", "acme@v0.0.2"] and deployment.routes["acme"].version == "v0.0.1"


def test_without_serve_canary_a_promotion_moves_everything_at_once(tmp_path):
    registry = Registry()
    registry.promote("acme", "v0.0.1")
    engine = ScriptedEngine()
    prepare = lambda t, v, c: ServedVersion(t, v, c, tmp_path, 16, REF)  # noqa: E731
    deployment = Deployment(engine, ServeParams(), prepare, lambda: dict(registry.production), tmp_path / "e.jsonl")
    deployment.sync()
    registry.promote("acme", "v0.0.2")
    assert [e["event"] for e in deployment.sync()] == ["served"] and deployment.canaries == {}
    assert serve(deployment, 2) == ["v0.0.2"] * 2

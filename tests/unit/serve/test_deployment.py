"""Swaps, the deployment check and draining, with a scripted engine (the real one: tests/e2e/test_serve.py)."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from loraline import records
from loraline.config import ServeParams
from loraline.serve.deployment import Deployment
from loraline.serve.versions import ProbeReference, Production, ServedVersion

REF = ProbeReference(
    prompts=[[1, 2], [3], [4, 5], [6]],
    texts=['{"a": 1}', "hello", "order 17 shipped", "P2"],
    max_new_tokens=8,
    sources=["builtin", "builtin", "test", "test"],
)


class ScriptedEngine:
    """Answers probes per engine name: `answers[name]` (default: the reference's texts)."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.answers: dict[str, list[str]] = {}

    def load(self, name: str, path: Path) -> None:
        if name in self.loaded:  # as vLLM does
            raise RuntimeError(f"The lora adapter '{name}' has already been loaded")
        self.calls.append(("load", name))
        self.loaded.append(name)

    def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        self.loaded.remove(name)

    def greedy(self, name: str, prompt: list[int], max_tokens: int) -> str:
        texts = self.answers.get(name, REF.texts)
        return " " + texts[REF.prompts.index(prompt)]  # leading space: compared stripped, as vLLM's text is


def make(
    tmp_path: Path, production: dict, engine: ScriptedEngine | None = None, **serve
) -> tuple[Deployment, ScriptedEngine]:
    engine = engine or ScriptedEngine()

    def prepare(tenant, version, commit):
        return ServedVersion(tenant, version, commit, tmp_path / tenant / version, 16, REF)

    now = datetime.now(timezone.utc)
    read = lambda: {t: Production(v, f"c-{v}", now, 1) for t, v in production.items()}  # noqa: E731
    return Deployment(engine, ServeParams(**serve), prepare, read, tmp_path / "events.jsonl"), engine


def events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def test_every_tenant_in_production_is_loaded_checked_and_routed(tmp_path):
    deployment, engine = make(tmp_path, {"acme": "v0.0.1", "globex": "v0.0.3"})
    got = deployment.sync()
    assert {t: v.version for t, v in deployment.routes.items()} == {"acme": "v0.0.1", "globex": "v0.0.3"}
    assert engine.loaded == ["acme@v0.0.1", "globex@v0.0.3"]
    assert [e["event"] for e in got] == ["served", "served"] and all(e["check"]["agreement"] == 1.0 for e in got)
    assert deployment.sync() == []  # nothing changed: nothing reloaded


def test_a_promotion_loads_beside_the_old_version_and_unloads_it_once_its_requests_finish(tmp_path):
    production = {"acme": "v0.0.1"}
    deployment, engine = make(tmp_path, production)
    deployment.sync()
    in_flight = deployment.acquire("acme")  # a request still running on v0.0.1
    production["acme"] = "v0.0.2"
    [event] = deployment.sync()
    assert event["event"] == "served" and event["previous"] == "v0.0.1" and event["since_promotion_s"] >= 0
    assert deployment.acquire("acme").version == "v0.0.2"  # new requests go to the new version at once
    time.sleep(0.5)
    assert "acme@v0.0.1" in engine.loaded  # the old one stays while its request runs
    deployment.release(in_flight)
    deadline = time.monotonic() + 5
    while "acme@v0.0.1" in engine.loaded and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.loaded == ["acme@v0.0.2"]


def test_a_version_failing_the_deployment_check_is_unloaded_and_the_old_one_kept(tmp_path):
    production = {"acme": "v0.0.1"}
    deployment, engine = make(tmp_path, production)
    deployment.sync()
    engine.answers["acme@v0.0.2"] = ['{"a": 2}', *REF.texts[1:]]  # one probe answered unlike the merged model
    production["acme"] = "v0.0.2"
    [event] = deployment.sync()
    assert event["event"] == "check_failed" and event["serving"] == "v0.0.1"
    assert event["check"]["agreement"] == 0.75 and event["check"]["mismatches"][0]["served"] == ' {"a": 2}'
    assert deployment.routes["acme"].version == "v0.0.1" and engine.loaded == ["acme@v0.0.1"]
    assert deployment.sync() == []  # the refused version is not retried on every poll ...
    production["acme"] = "v0.0.3"  # ... but the next promotion is
    assert deployment.sync()[0]["event"] == "served"
    assert [e["event"] for e in events(tmp_path)] == ["served", "check_failed", "served"]


def test_check_agreement_below_one_tolerates_that_many_mismatches(tmp_path):
    deployment, engine = make(tmp_path, {"acme": "v0.0.1"}, check_agreement=0.5)
    engine.answers["acme@v0.0.1"] = ["wrong", "hello", "wrong", "P2"]
    assert deployment.sync()[0]["event"] == "served"


def test_the_check_counts_the_tenant_probes_with_the_built_in_ones(tmp_path):
    production = {"acme": "v0.0.1"}
    deployment, engine = make(tmp_path, production, check_agreement=0.75)
    engine.answers["acme@v0.0.1"] = [*REF.texts[:3], "P3"]  # one tenant probe answered otherwise: 3/4 passes 75%
    [event] = deployment.sync()
    assert event["event"] == "served" and event["check"]["agreement"] == 0.75
    assert event["check"]["by_source"] == {"builtin": {"probes": 2, "agreed": 2}, "tenant": {"probes": 2, "agreed": 1}}
    assert event["check"]["summary"] == (
        "3/4 probes answered as the merge report's reference does (built-in 2/2, tenant 1/2; need 75%)"
    )
    assert event["check"]["mismatches"] == [{"probe": 3, "source": "test", "served": " P3", "merged": "P2"}]
    engine.answers["acme@v0.0.2"] = [*REF.texts[:2], "wrong", "P3"]  # the built-in probes alone cannot carry it
    production["acme"] = "v0.0.2"
    [event] = deployment.sync()
    assert event["event"] == "check_failed" and event["check"]["summary"].startswith("2/4 probes")
    assert "(built-in 2/2, tenant 0/2;" in event["check"]["summary"] and deployment.routes["acme"].version == "v0.0.1"


def test_a_probe_the_engine_refuses_fails_the_check_and_keeps_the_old_version(tmp_path):
    class Refusing(ScriptedEngine):
        def greedy(self, name, prompt, max_tokens):
            if name == "acme@v0.0.2" and prompt == REF.prompts[-1]:
                raise RuntimeError("probe through acme@v0.0.2 failed: 400 maximum context length is 16 tokens")
            return super().greedy(name, prompt, max_tokens)

    production = {"acme": "v0.0.1"}
    deployment, engine = make(tmp_path, production, engine=Refusing())
    deployment.sync()
    production["acme"] = "v0.0.2"
    [event] = deployment.sync()
    assert event["event"] == "check_failed" and event["serving"] == "v0.0.1" and engine.loaded == ["acme@v0.0.1"]
    assert event["check"]["summary"] == (
        "a probe failed in the engine: probe through acme@v0.0.2 failed: 400 maximum context length is 16 tokens"
    )
    assert deployment.sync() == []  # refused, as a failed check is


def test_a_merge_report_from_before_tenant_probes_is_still_served(tmp_path):
    old = {"prompts": [[1, 2], [3]], "texts": ['{"a": 1}', "hello"], "greedy": [[7], [8]], "max_new_tokens": 8}
    ref = ProbeReference.from_report(records.ProbeReference.model_validate(old))
    assert ref.sources == ["builtin", "builtin"] and ref.prompts == old["prompts"]
    engine = ScriptedEngine()
    engine.greedy = lambda name, prompt, max_tokens: old["texts"][old["prompts"].index(prompt)]
    deployment = Deployment(engine, ServeParams(), lambda t, v, c: None, dict, tmp_path / "events.jsonl")
    check = deployment.check(ServedVersion("acme", "v0.0.1", "c", tmp_path, 16, ref))
    assert check["passed"] and check["summary"] == (
        "2/2 probes answered as the merge report's reference does (built-in 2/2, tenant 0/0; need 100%)"
    )


def test_a_probe_reference_whose_lists_disagree_is_refused():
    with pytest.raises(ValueError, match="inconsistent: 2 prompts, 2 answers, 1 sources"):
        ProbeReference.from_report(
            records.ProbeReference.model_validate(
                {
                    "prompts": [[1], [2]],
                    "texts": ["a", "b"],
                    "max_new_tokens": 8,
                    "sources": [{"source": "builtin", "id": "0"}],
                }
            )
        )


def test_a_version_that_cannot_be_loaded_leaves_the_tenant_as_it_was(tmp_path):
    class Refusing(ScriptedEngine):
        def load(self, name, path):
            raise RuntimeError("rank 512 > max_lora_rank 256")

    deployment, _ = make(tmp_path, {"acme": "v0.0.1"}, engine=Refusing())
    [event] = deployment.sync()
    assert event["event"] == "load_failed" and "max_lora_rank" in event["error"] and deployment.routes == {}


def test_the_watcher_follows_the_registry_until_stopped(tmp_path):
    production = {"acme": "v0.0.1"}
    deployment, _ = make(tmp_path, production, poll_seconds=0.05)
    stop = threading.Event()
    watcher = threading.Thread(target=deployment.watch, args=(stop,))
    watcher.start()
    try:
        deadline = time.monotonic() + 5
        while "acme" not in deployment.routes and time.monotonic() < deadline:
            time.sleep(0.05)
        production["acme"] = "v0.0.2"  # e.g. `loraline registry promote` by hand
        while deployment.routes["acme"].version != "v0.0.2" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join(5)
    assert deployment.routes["acme"].version == "v0.0.2" and not watcher.is_alive()

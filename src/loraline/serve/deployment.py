"""Which version of each tenant the engine serves, and how that changes without failing a request.

A swap (a promotion, a rollback, a tenant reaching production for the first time) loads the new
version beside the old one under its own engine name (`<tenant>@<version>`), runs the deployment
check, and only then moves the tenant's route in one assignment. Requests already forwarded finish
on the old version, which is unloaded once none is left on it; nothing is restarted.

The deployment check: the merge stage's probe prompts (the built-in ones and those drawn from the
tenant's test split, merge.probes) go through the engine under the new name, greedy, and at least
serve.check_agreement of the answers, counted over all of them, must equal the merge report's reference
answers: the merged model's, or base + adapter's for a tenant whose deploy.targets has no merged.
Otherwise the new version is unloaded and the tenant stays on the version it had: the registry is
left as it is, and the event is logged and written to the events file (one JSON line per event).

With serve.canary, a promotion on probation (registry.canary) is loaded and checked the same way, but
then takes only a share of the tenant's requests beside the version it replaces (serve.canary). Once
its evidence is in, this replica writes its verdict to the registry, where the first decision of any
replica stands: kept (all traffic moves) or rolled back. Every replica then follows the registry: a
kept canary becomes the tenant's route, a rolled back one is unloaded once its requests finish. A
canary that fails the deployment check is rolled back in the registry at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from loraline.config import ServeParams
from loraline.registry.canary import CanaryDecision
from loraline.serve.canary import Canary, Outcome, Tally, Verdict
from loraline.serve.versions import Production, ServedVersion

log = logging.getLogger(__name__)


class EngineCalls(Protocol):
    def load(self, name: str, path: Path) -> None: ...
    def unload(self, name: str) -> None: ...
    def greedy(self, name: str, prompt: list[int], max_tokens: int) -> str: ...


class CanaryRecords(Protocol):
    """Where canary decisions are kept (the registry: registry.canary)."""

    def decide(self, tenant: str, number: int, version: str, verdict: Verdict) -> CanaryDecision | None:
        """Write the verdict on promotion `number`; the decision that stands (None: production moved on)."""
        ...

    def decision(self, tenant: str, number: int) -> CanaryDecision | None: ...


# tenant, version, commit -> the prepared version (fetched and made servable)
Prepare = Callable[[str, str, str], ServedVersion]
# -> tenant: its production in the registry
ReadProduction = Callable[[], dict[str, Production]]


@dataclass
class Deployment:
    engine: EngineCalls
    params: ServeParams
    prepare: Prepare
    read_production: ReadProduction
    events_path: Path
    records: CanaryRecords | None = None  # None: no canary decisions (serve.canary off)
    routes: dict[str, ServedVersion] = field(
        default_factory=dict
    )  # tenant -> its version (under a canary: the stable one)
    canaries: dict[str, Canary] = field(default_factory=dict)
    _inflight: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # routes, canaries and in-flight counts
    _sync_lock: threading.Lock = field(default_factory=threading.Lock)  # one swap at a time (watcher, refresh)
    _engine_lock: threading.Lock = field(default_factory=threading.Lock)  # orders loads and unloads of one name
    _unloading: dict[str, threading.Event] = field(default_factory=dict)  # engine name -> cancels its pending unload
    _refused: dict[str, str] = field(default_factory=dict)  # tenant -> version its check refused (not retried)
    _unwritten: dict[str, tuple[int, str, Verdict]] = field(
        default_factory=dict
    )  # failed checks whose rollback the registry lacks

    # ---- requests ---------------------------------------------------------------------------
    def acquire(self, tenant: str, client: str | None = None) -> ServedVersion | None:
        """The version a request for `tenant` from `client` goes to, counted in flight until release()."""
        with self._lock:
            served = self.routes.get(tenant)
            canary = self.canaries.get(tenant)
            if canary is not None and canary.takes(client):
                served = canary.version
            if served is not None:
                self._inflight[served.served_name] += 1
            return served

    def fall_back(self, served: ServedVersion) -> ServedVersion | None:
        """The tenant's route, counted in flight, for a request that `served` failed with a server error when that
        is not the route: a canary, even one rolled back while the request ran, or a version being replaced.
        None when `served` is the route itself."""
        with self._lock:
            route = self.routes.get(served.tenant)
            if route is None or route.served_name == served.served_name:
                return None
            self._inflight[route.served_name] += 1
            return route

    def release(self, served: ServedVersion, outcome: Outcome | None = None) -> None:
        """The request on `served` is over; `outcome`: what it says about that version (None: nothing, a client's
        4xx)."""
        with self._lock:
            self._inflight[served.served_name] -= 1
            canary = self.canaries.get(served.tenant)
            if canary is None or outcome is None:
                return
            canary.record(served, outcome)
            ready = not canary.concluding and canary.verdict() is not None
            canary.concluding = canary.concluding or ready
        if ready:  # decided now, not at the next poll: the registry write must not hold up this request
            threading.Thread(target=self._sync_logged, daemon=True, name=f"canary-{served.tenant}").start()

    # ---- following the registry -------------------------------------------------------------
    def sync(self) -> list[dict[str, Any]]:
        """Write the verdicts that are in, then serve every tenant's production; returns the events of this pass."""
        events = []
        with self._sync_lock:
            self._conclude()
            for tenant, production in sorted(self.read_production().items()):
                events += self._follow(tenant, production)
        return events

    def _follow(self, tenant: str, production: Production) -> list[dict[str, Any]]:
        events = []
        canary = self.canaries.get(tenant)
        if canary is not None:
            if production.stable is not None and (production.number, production.version) == (
                canary.number,
                canary.version.version,
            ):
                return []  # still on probation
            events.append(self._end_canary(tenant, canary, production))
        current = self.routes.get(tenant)
        if (current and current.version == production.version) or self._refused.get(tenant) == production.version:
            return events
        if production.stable is None or self.params.canary is None or self.records is None:
            return [
                *events,
                self._swap(tenant, production.version, production.commit, production.assigned_at, current),
            ]
        version, commit = production.stable
        if current is None or current.version != version:  # the canary is measured against the version it replaces
            events.append(self._swap(tenant, version, commit, production.assigned_at, current))
            if (
                events[-1]["event"] != "served"
            ):  # that one cannot be served: the promoted one takes it all, as without a canary
                return [
                    *events,
                    self._swap(
                        tenant, production.version, production.commit, production.assigned_at, self.routes.get(tenant)
                    ),
                ]
        return [*events, self._start_canary(tenant, production)]

    def _swap(
        self, tenant: str, version: str, commit: str, assigned_at: datetime, current: ServedVersion | None
    ) -> dict[str, Any]:
        started = time.time()
        new, event = self._load_checked(tenant, version, commit, current)
        if new is None:
            return self._record(event)
        now = time.time()
        # Recorded before the route moves, so the events file never lags the traffic it describes:
        # whoever sees the new version answer finds its event already written.
        served = self._record(
            {
                **event,
                "event": "served",
                "serving": version,
                "swap_s": round(now - started, 2),
                "since_promotion_s": round(now - assigned_at.timestamp(), 2),
            }
        )
        with self._lock:
            self.routes[tenant] = new
        self._refused.pop(tenant, None)
        if current is not None:
            self._unload_later(current)
        return served

    def _start_canary(self, tenant: str, production: Production) -> dict[str, Any]:
        started = time.time()
        stable = self.routes[tenant]
        new, event = self._load_checked(tenant, production.version, production.commit, stable)
        if new is None:
            if event["event"] == "check_failed":  # a version that fails the check is rolled back for every replica
                verdict = Verdict(
                    False,
                    f"deployment check failed: {event['check']['summary']}",
                    Tally().summary(),
                    Tally().summary(),
                    None,
                )
                self._unwritten[tenant] = production.number, production.version, verdict  # until the registry has it
                event["registry"] = self._decide(tenant, production.number, production.version, verdict)
            return self._record(event)
        assert self.params.canary is not None
        now = time.time()
        recorded = self._record(
            {
                **event,
                "event": "canary_started",
                "serving": stable.version,
                "fraction": self.params.canary.fraction,
                "swap_s": round(now - started, 2),
                "since_promotion_s": round(now - production.assigned_at.timestamp(), 2),
            }
        )
        with self._lock:
            self.canaries[tenant] = Canary(production.number, new, stable, self.params.canary)
        self._refused.pop(tenant, None)
        return recorded

    def _end_canary(self, tenant: str, canary: Canary, production: Production) -> dict[str, Any]:
        """The registry has moved on from the canary's promotion: kept, rolled back, or replaced by another
        promotion."""
        decision = self._read_decision(tenant, canary.number)
        kept = production.version == canary.version.version
        with self._lock:
            here = {"canary": canary.on_canary.summary(), "stable": canary.on_stable.summary()}
        name = "canary_ended" if decision is None else "canary_kept" if decision.kept else "canary_rolled_back"
        event = self._record(
            {  # before the traffic moves, as a swap's
                "event": name,
                "tenant": tenant,
                "version": canary.version.version,
                "stable": canary.stable.version,
                "serving": (canary.version if kept else canary.stable).version,
                "production": production.version,
                "reason": decision.reason if decision else f"production is {production.version} in the registry",
                "decided_by": decision.by if decision else None,
                "counted_here": here,
            }
        )
        with self._lock:
            del self.canaries[tenant]
            if kept:
                self.routes[tenant] = canary.version
        self._unload_later(canary.stable if kept else canary.version)
        return event

    def _conclude(self) -> None:
        """Write to the registry every verdict that is in (a canary's, or a failed check's rollback not yet
        written)."""
        with self._lock:
            ready = [(t, c.number, c.version.version, c.verdict()) for t, c in self.canaries.items()]
        for tenant, number, version, verdict in ready:
            if verdict is not None:
                self._decide(tenant, number, version, verdict)
        for tenant, (number, version, verdict) in list(self._unwritten.items()):
            self._decide(tenant, number, version, verdict)

    def _decide(self, tenant: str, number: int, version: str, verdict: Verdict) -> dict[str, Any] | None:
        """The verdict written to the registry; what stands there (None: production moved on, or the write
        failed and is retried at the next pass)."""
        assert self.records is not None
        try:
            decision = self.records.decide(tenant, number, version, verdict)
        except Exception as exc:  # noqa: BLE001 -- the registry busy or its remote away: retried at the next pass
            log.warning(
                "serve: could not write the canary verdict on %s %s to the registry (%s); retrying at the next poll",
                tenant,
                version,
                exc,
            )
            return None
        if tenant in self._unwritten and self._unwritten[tenant][0] == number:
            del self._unwritten[tenant]
        if decision is None:
            return None
        return {"kept": decision.kept, "reason": decision.reason, "decided_by": decision.by}

    def _read_decision(self, tenant: str, number: int) -> CanaryDecision | None:
        try:
            return self.records.decision(tenant, number) if self.records is not None else None
        except Exception as exc:  # noqa: BLE001 -- only the event's words depend on it
            log.warning("serve: could not read the canary decision of %s: %s", tenant, exc)
            return None

    def _load_checked(
        self, tenant: str, version: str, commit: str, current: ServedVersion | None
    ) -> tuple[ServedVersion | None, dict[str, Any]]:
        """The version loaded and checked; or None and the event (not yet recorded) saying why it is not served."""
        event: dict[str, Any] = {
            "tenant": tenant,
            "version": version,
            "commit": commit,
            "previous": current.version if current else None,
        }
        try:
            new = self.prepare(tenant, version, commit)
            self._load(new)
        except Exception as exc:  # noqa: BLE001 -- any failure leaves the tenant on what it had
            self._refused[tenant] = version
            return None, {**event, "event": "load_failed", "error": str(exc)[:1000]}
        try:
            check = self.check(new)
        except Exception as exc:  # noqa: BLE001 -- a probe the engine refuses (one past serve.max_model_len, say) fails it
            check = {"passed": False, "agreement": None, "summary": f"a probe failed in the engine: {exc}"[:1000]}
        event["check"] = check
        if not check["passed"]:
            self.engine.unload(new.served_name)
            self._refused[tenant] = version
            kept = current.version if current else "nothing"
            log.error(
                "%s %s failed the deployment check (%s); still serving %s", tenant, version, check["summary"], kept
            )
            return None, {**event, "event": "check_failed", "serving": current.version if current else None}
        return new, event

    def check(self, served: ServedVersion) -> dict[str, Any]:
        """Greedy answers through the engine against the merge report's reference answers, on its probes."""
        ref = served.reference
        if ref is None:
            return {
                "passed": self.params.check_agreement == 0,
                "summary": "no probe reference in this version's merge report",
                "agreement": None,
            }
        answers = [self.engine.greedy(served.served_name, p, ref.max_new_tokens) for p in ref.prompts]
        equal = [a.strip() == t.strip() for a, t in zip(answers, ref.texts, strict=True)]
        agreement = sum(equal) / max(len(equal), 1)
        mismatches = [
            {"probe": i, "source": s, "served": a, "merged": t}
            for i, (a, t, s, ok) in enumerate(zip(answers, ref.texts, ref.sources, equal, strict=True))
            if not ok
        ]
        builtin, tenant = _agreed(equal, ref.sources, "builtin"), _agreed(equal, ref.sources, "test")
        return {
            "passed": agreement >= self.params.check_agreement,
            "agreement": round(agreement, 4),
            "by_source": {"builtin": builtin, "tenant": tenant},
            "summary": f"{sum(equal)}/{len(equal)} probes answered as the merge report's reference does (built-in "
            f"{builtin['agreed']}/{builtin['probes']}, tenant {tenant['agreed']}/{tenant['probes']}; "
            f"need {self.params.check_agreement:.0%})",
            "mismatches": mismatches[:3],
        }

    def _load(self, new: ServedVersion) -> None:
        """Into the engine; a version still draining there (a rollback onto it, a canary's stable version taken
        up again) is taken back from its pending unload instead: the engine refuses a name it has."""
        with self._engine_lock:
            pending = self._unloading.pop(new.served_name, None)
            if pending is not None:
                pending.set()
                return
            self.engine.load(new.served_name, new.adapter)

    def _unload_later(self, old: ServedVersion) -> None:
        cancel = threading.Event()
        with self._engine_lock:
            self._unloading[old.served_name] = cancel
        threading.Thread(target=self._unload_when_idle, args=(old, cancel), daemon=True).start()

    def _unload_when_idle(self, old: ServedVersion, cancel: threading.Event, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._engine_lock:
                if cancel.is_set():
                    return
                with self._lock:
                    idle = self._inflight[old.served_name] <= 0 and old.served_name not in self._routed()
                if idle or time.monotonic() >= deadline:
                    del self._unloading[old.served_name]
                    self.engine.unload(old.served_name)
                    return
            time.sleep(0.2)

    def _routed(self) -> set[str]:
        """Engine names requests may go to now (under the lock)."""
        canaries = [v for c in self.canaries.values() for v in (c.version, c.stable)]
        return {v.served_name for v in [*self.routes.values(), *canaries]}

    def _record(self, event: dict[str, Any]) -> dict[str, Any]:
        event = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **event}
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.events_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
        log.info("serve: %s", json.dumps(event)[:500])
        return event

    def watch(self, stop: threading.Event) -> None:
        """Follow the registry until `stop` is set: promotions and rollbacks made anywhere (the flow,
        `loraline registry promote/rollback`, another machine whose tags were fetched) are served."""
        while not stop.wait(self.params.poll_seconds):
            self._sync_logged()

    def _sync_logged(self) -> None:
        try:
            self.sync()
        except Exception as exc:  # noqa: BLE001 -- a failed pass (e.g. git busy) is retried at the next one
            log.warning("serve: reading the registry failed: %s", exc)


def _agreed(equal: list[bool], sources: list[str], source: str) -> dict[str, int]:
    """How many probes of `source` there are and how many of them were answered as the reference does."""
    mine = [ok for ok, s in zip(equal, sources, strict=True) if s == source]
    return {"probes": len(mine), "agreed": sum(mine)}

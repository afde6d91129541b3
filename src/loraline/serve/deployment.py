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
from loraline.serve.versions import ServedVersion

log = logging.getLogger(__name__)


class EngineCalls(Protocol):
    def load(self, name: str, path: Path) -> None: ...
    def unload(self, name: str) -> None: ...
    def greedy(self, name: str, prompt: list[int], max_tokens: int) -> str: ...


# tenant, version, commit -> the prepared version (fetched and made servable)
Prepare = Callable[[str, str, str], ServedVersion]
# -> tenant: (version, commit, when production was assigned)
ReadProduction = Callable[[], dict[str, tuple[str, str, datetime]]]


@dataclass
class Deployment:
    engine: EngineCalls
    params: ServeParams
    prepare: Prepare
    read_production: ReadProduction
    events_path: Path
    routes: dict[str, ServedVersion] = field(default_factory=dict)
    _inflight: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # routes and in-flight counts
    _sync_lock: threading.Lock = field(default_factory=threading.Lock)  # one swap at a time (watcher, refresh)
    _refused: dict[str, str] = field(default_factory=dict)  # tenant -> version its check refused (not retried)

    # ---- requests ---------------------------------------------------------------------------
    def acquire(self, tenant: str) -> ServedVersion | None:
        """The version a request for `tenant` goes to, counted in flight until release()."""
        with self._lock:
            served = self.routes.get(tenant)
            if served is not None:
                self._inflight[served.served_name] += 1
            return served

    def release(self, served: ServedVersion) -> None:
        with self._lock:
            self._inflight[served.served_name] -= 1

    # ---- following the registry -------------------------------------------------------------
    def sync(self) -> list[dict[str, Any]]:
        """Serve every tenant's production version; returns the events of this pass."""
        events = []
        with self._sync_lock:
            for tenant, (version, commit, assigned_at) in sorted(self.read_production().items()):
                current = self.routes.get(tenant)
                if (current and current.version == version) or self._refused.get(tenant) == version:
                    continue
                events.append(self._swap(tenant, version, commit, assigned_at, current))
        return events

    def _swap(self, tenant: str, version: str, commit: str, assigned_at: datetime, current: ServedVersion | None) -> dict[str, Any]:
        started = time.time()
        event: dict[str, Any] = {"tenant": tenant, "version": version, "commit": commit, "previous": current.version if current else None}
        try:
            new = self.prepare(tenant, version, commit)
            self.engine.load(new.served_name, new.adapter)
        except Exception as exc:  # noqa: BLE001 -- any failure leaves the tenant on what it had
            self._refused[tenant] = version
            return self._record({**event, "event": "load_failed", "error": str(exc)[:1000]})
        try:
            check = self.check(new)
        except Exception as exc:  # noqa: BLE001 -- a probe the engine refuses (one past serve.max_model_len, say) fails it
            check = {"passed": False, "agreement": None, "summary": f"a probe failed in the engine: {exc}"[:1000]}
        event["check"] = check
        if not check["passed"]:
            self.engine.unload(new.served_name)
            self._refused[tenant] = version
            kept = current.version if current else "nothing"
            log.error("%s %s failed the deployment check (%s); still serving %s", tenant, version, check["summary"], kept)
            return self._record({**event, "event": "check_failed", "serving": current.version if current else None})
        now = time.time()
        # Recorded before the route moves, so the events file never lags the traffic it describes:
        # whoever sees the new version answer finds its event already written.
        served = self._record({
            **event, "event": "served", "serving": version, "swap_s": round(now - started, 2),
            "since_promotion_s": round(now - assigned_at.timestamp(), 2),
        })
        with self._lock:
            self.routes[tenant] = new
        self._refused.pop(tenant, None)
        if current is not None:
            threading.Thread(target=self._unload_when_idle, args=(current,), daemon=True).start()
        return served

    def check(self, served: ServedVersion) -> dict[str, Any]:
        """Greedy answers through the engine against the merge report's reference answers, on its probes."""
        ref = served.reference
        if ref is None:
            return {"passed": self.params.check_agreement == 0, "summary": "no probe reference in this version's merge report",
                    "agreement": None}
        answers = [self.engine.greedy(served.served_name, p, ref.max_new_tokens) for p in ref.prompts]
        equal = [a.strip() == t.strip() for a, t in zip(answers, ref.texts, strict=True)]
        agreement = sum(equal) / max(len(equal), 1)
        mismatches = [{"probe": i, "source": s, "served": a, "merged": t}
                      for i, (a, t, s, ok) in enumerate(zip(answers, ref.texts, ref.sources, equal, strict=True)) if not ok]
        builtin, tenant = _agreed(equal, ref.sources, "builtin"), _agreed(equal, ref.sources, "test")
        return {
            "passed": agreement >= self.params.check_agreement, "agreement": round(agreement, 4),
            "by_source": {"builtin": builtin, "tenant": tenant},
            "summary": f"{sum(equal)}/{len(equal)} probes answered as the merge report's reference does (built-in "
                       f"{builtin['agreed']}/{builtin['probes']}, tenant {tenant['agreed']}/{tenant['probes']}; "
                       f"need {self.params.check_agreement:.0%})",
            "mismatches": mismatches[:3],
        }

    def _unload_when_idle(self, old: ServedVersion, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._inflight[old.served_name] <= 0 and all(v.served_name != old.served_name for v in self.routes.values()):
                    break
            time.sleep(0.2)
        self.engine.unload(old.served_name)

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
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 -- a failed pass (e.g. git busy) is retried at the next one
                log.warning("serve: reading the registry failed: %s", exc)


def _agreed(equal: list[bool], sources: list[str], source: str) -> dict[str, int]:
    """How many probes of `source` there are and how many of them were answered as the reference does."""
    mine = [ok for ok, s in zip(equal, sources, strict=True) if s == source]
    return {"probes": len(mine), "agreed": sum(mine)}

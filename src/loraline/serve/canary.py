"""A canary on one replica: which requests the promoted version takes, what they showed, and the verdict.

While a promotion is on canary (registry.canary), the tenant is served by two versions: the previous
production (stable) and the promoted one (canary), which takes `fraction` of the requests. A request
that says who sent it (OpenAI's `user` field, else an X-Client-Id header) goes by a hash of the tenant,
the canary's version and that client: the same client stays on the same side for the whole canary, on
every replica. Other requests are split by a counter, so exactly `fraction` of them go to the canary
(with 0.5: every second one).

Each answer is counted for the version that gave it: successes and server errors (engine 5xx, an engine
that no longer has the adapter, no answer, a stream that broke); a client's 4xx says nothing about the
version and is not counted. A success's seconds per output token is its latency sample. Once the canary
has min_requests answers, the verdict: rolled back when its error rate is above max_error_rate; else,
unless fraction is 1 (nothing to compare with), once the stable version has min_requests answers too,
rolled back when the canary's median seconds per token is above max_latency_ratio times the stable's;
else kept. Counts are this replica's own: the first replica to reach a verdict decides for all
(registry.canary).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from loraline.config import CanaryParams
from loraline.serve.versions import ServedVersion


@dataclass(frozen=True)
class Outcome:
    """How one forwarded request went, as evidence about the version that answered it."""

    ok: bool  # False: a server error
    seconds: float
    tokens: int  # output tokens (0 where unknown: no latency sample)


@dataclass
class Tally:
    answers: int = 0
    errors: int = 0
    per_token_s: list[float] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.answers += 1
        if not outcome.ok:
            self.errors += 1
        elif outcome.tokens > 0:
            self.per_token_s.append(outcome.seconds / outcome.tokens)

    @property
    def error_rate(self) -> float:
        return self.errors / self.answers if self.answers else 0.0

    @property
    def median_per_token_s(self) -> float | None:
        return statistics.median(self.per_token_s) if self.per_token_s else None

    def summary(self) -> dict[str, Any]:
        median = self.median_per_token_s
        return {
            "answers": self.answers,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "median_s_per_token": round(median, 6) if median is not None else None,
            "latency_samples": len(self.per_token_s),
        }


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str
    canary: dict[str, Any]  # Tally.summary of each side
    stable: dict[str, Any]
    latency_ratio: float | None

    def facts(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Canary:
    """The canary of `version` (production assignment `number`) against `stable`, on this replica."""

    number: int
    version: ServedVersion
    stable: ServedVersion
    params: CanaryParams
    on_canary: Tally = field(default_factory=Tally)
    on_stable: Tally = field(default_factory=Tally)
    keyless: int = 0  # requests without a client, split by this counter
    concluding: bool = False  # a verdict is being written to the registry

    def takes(self, client: str | None) -> bool:
        """Whether this request goes to the canary."""
        fraction = self.params.fraction
        if client:
            key = f"{self.version.tenant}\0{self.version.version}\0{client}".encode()
            return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") < fraction * 2**64
        n, self.keyless = self.keyless, self.keyless + 1
        return math.floor((n + 1) * fraction) > math.floor(n * fraction)

    def record(self, served: ServedVersion, outcome: Outcome) -> None:
        if served.served_name == self.version.served_name:
            self.on_canary.add(outcome)
        elif served.served_name == self.stable.served_name:
            self.on_stable.add(outcome)

    def verdict(self) -> Verdict | None:
        """Keep or roll back, once the evidence is in; None before."""
        p, canary, stable = self.params, self.on_canary, self.on_stable
        if canary.answers < p.min_requests:
            return None
        if canary.error_rate > p.max_error_rate:
            return self._verdict(
                False,
                f"error rate {canary.error_rate:.2f} ({canary.errors} of {canary.answers} answers) "
                f"above serve.canary.max_error_rate {p.max_error_rate:g}",
                None,
            )
        if p.fraction < 1 and stable.answers < p.min_requests:
            return None
        ratio = self._latency_ratio()
        if ratio is not None and ratio > p.max_latency_ratio:
            return self._verdict(
                False,
                f"median {canary.median_per_token_s * 1000:.1f} ms per output token, {ratio:.2f} times "
                f"{self.stable.version}'s {stable.median_per_token_s * 1000:.1f} ms, above "
                f"serve.canary.max_latency_ratio {p.max_latency_ratio:g}",
                ratio,
            )
        latency = f"latency {ratio:.2f} times {self.stable.version}'s" if ratio is not None else "latency not compared"
        return self._verdict(
            True,
            f"error rate {canary.error_rate:.2f} ({canary.errors} of {canary.answers} answers), "
            f"{latency}: within serve.canary's bounds",
            ratio,
        )

    def _latency_ratio(self) -> float | None:
        mine, theirs = self.on_canary.median_per_token_s, self.on_stable.median_per_token_s
        return mine / theirs if mine is not None and theirs else None

    def _verdict(self, keep: bool, reason: str, ratio: float | None) -> Verdict:
        return Verdict(
            keep,
            reason,
            self.on_canary.summary(),
            self.on_stable.summary(),
            round(ratio, 4) if ratio is not None else None,
        )

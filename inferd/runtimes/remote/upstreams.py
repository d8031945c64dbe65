"""The ordered upstreams of a remote deployment: failover, cooldown, health. Pure logic.

Each attempt goes to the first upstream in the configured order that is not
cooling down and that this request has not tried yet (failover). An upstream
that fails (connection error, timeout, 408/409/429/5xx) cools down for
``cooldown_s``: attempts skip it while another is usable. When every
upstream is cooling, the one whose cooldown ends first is tried, so a single
upstream is never simply refused and an outage ends as soon as it ends.

Health is what ``inferctl status`` shows for the deployment: ``ok`` while no
upstream is failing, otherwise ``degraded`` with a line saying which and how
(an authentication failure is named as such). A success, from a request or
from the runner's probe, makes an upstream healthy again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Upstream:
    url: str
    failures: int = 0                 # consecutive, since its last success
    cooldown_until: float = 0.0
    auth_failed: bool = False
    last_status: int | None = None
    last_error: str = ""

    def cooling(self, now: float) -> bool:
        return now < self.cooldown_until

    @property
    def healthy(self) -> bool:
        return self.failures == 0 and not self.auth_failed

    def state(self, now: float) -> str:
        if self.auth_failed:
            return "auth_failed"
        if self.cooling(now):
            return "cooling"
        return "failing" if self.failures else "ok"


@dataclass
class Upstreams:
    urls: list[str]
    cooldown_s: float
    clock: Callable[[], float]
    all: list[Upstream] = field(init=False)

    def __post_init__(self) -> None:
        self.all = [Upstream(url) for url in self.urls]

    def pick(self, tried: set[str]) -> Upstream:
        """The upstream for the next attempt of a request that has tried ``tried``."""
        now = self.clock()
        usable = [u for u in self.all if not u.cooling(now)]
        fresh = [u for u in usable if u.url not in tried]
        if fresh:
            return fresh[0]
        if usable:
            return usable[0]
        return min(self.all, key=lambda u: u.cooldown_until)

    def succeeded(self, upstream: Upstream) -> None:
        upstream.failures = 0
        upstream.cooldown_until = 0.0
        upstream.auth_failed = False
        upstream.last_error = ""

    def failed(self, upstream: Upstream, status: int | None, error: str) -> None:
        """A retryable failure (the upstream is down or overloaded): it cools down."""
        upstream.failures += 1
        upstream.last_status = status
        upstream.last_error = error
        upstream.cooldown_until = self.clock() + self.cooldown_s

    def refused_auth(self, upstream: Upstream, status: int, error: str) -> None:
        upstream.auth_failed = True
        upstream.last_status = status
        upstream.last_error = error

    def failing(self) -> list[Upstream]:
        return [u for u in self.all if not u.healthy]

    def health(self) -> tuple[str, str]:
        """("ok", "") or ("degraded", what is wrong)."""
        failing = self.failing()
        if not failing:
            return "ok", ""
        parts = []
        for u in failing:
            if u.auth_failed:
                parts.append(f"{u.url}: authentication failed ({u.last_status}): check the key in api_key_env")
            else:
                parts.append(f"{u.url}: {u.failures} failure(s) in a row, last: {u.last_error}")
        return "degraded", "; ".join(parts)

    def report(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [{"url": u.url, "state": u.state(now), "failures": u.failures, "last_status": u.last_status,
                 "last_error": u.last_error} for u in self.all]

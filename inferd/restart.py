"""Restart policy: what the supervisor does when a child exits. Pure logic.

Modelled on Akka's OneForOneStrategy and Erlang's supervisor intensity:

* the **decider** maps each :class:`~inferd.failures.Failure` to a directive:
  ContextPoisoned -> Restart, OutOfMemory -> Resume, Unrecoverable -> Stop,
  anything else -> Escalate;
* a per-child **retry window** allows at most ``max_restarts`` restarts within
  ``within_s`` (a sliding window); over it the child is FAILED and stays down
  until an operator restarts it (``inferctl restart``);
* between restarts an exponential **backoff** with jitter, from a minimum to a
  maximum, reset once the child has stayed up for ``reset_after_s``;
* Escalate restarts the child too, but each such restart also counts against
  a daemon-wide **intensity** (across all children): past it, the daemon stops
  its children and exits non-zero, so that systemd's Restart=on-failure takes
  over. A child already over its own window is stopped, not restarted, so its
  exit does not count.

The clock and the random source are parameters, so every rule is unit-tested
without sleeping.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass

from inferd.failures import Failure


class Directive(str, enum.Enum):
    RESTART = "restart"     # a new process
    RESUME = "resume"       # keep the process; only the affected work fails
    STOP = "stop"           # no restart: it cannot work with this config
    ESCALATE = "escalate"   # restart, and count against the daemon-wide intensity


DECIDER = {
    Failure.CONTEXT_POISONED: Directive.RESTART,
    Failure.OUT_OF_MEMORY: Directive.RESUME,
    Failure.UNRECOVERABLE: Directive.STOP,
    Failure.UNKNOWN: Directive.ESCALATE,
}


def decide(failure: Failure) -> Directive:
    return DECIDER[failure]


class RetryWindow:
    """At most ``max_restarts`` within any ``within_s`` seconds."""

    def __init__(self, max_restarts: int, within_s: float):
        self.max_restarts = max_restarts
        self.within_s = within_s
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the window has room; False if it does not."""
        while self._times and self._times[0] <= now - self.within_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def __len__(self) -> int:
        return len(self._times)

    def clear(self) -> None:
        self._times.clear()


class Backoff:
    """delay = min(max_s, min_s * 2**n) * (1 + jitter * U[0, 1)), n = restarts since the last reset."""

    def __init__(self, min_s: float, max_s: float, reset_after_s: float, jitter: float, rng: random.Random):
        self.min_s = min_s
        self.max_s = max_s
        self.reset_after_s = reset_after_s
        self.jitter = jitter
        self.rng = rng
        self.attempt = 0

    def next_delay(self, uptime_s: float) -> float:
        """The wait before the next start of a child that ran for ``uptime_s``."""
        if uptime_s >= self.reset_after_s:
            self.attempt = 0
        base = min(self.max_s, self.min_s * 2 ** min(self.attempt, 62))
        self.attempt += 1
        return base * (1 + self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0


class Intensity(RetryWindow):
    """The daemon-wide escalation budget: Erlang's intensity within period."""

    def exceeded(self, now: float) -> bool:
        return not self.allow(now)


@dataclass(frozen=True)
class Decision:
    action: str          # RESTART_AFTER, FAIL, or SHUTDOWN
    failure: Failure
    directive: Directive
    delay_s: float = 0.0
    reason: str = ""


RESTART_AFTER = "restart"   # start the child again after delay_s
FAIL = "fail"               # leave it down (state failed) until an operator restarts it
SHUTDOWN = "shutdown"       # stop every child and exit with exitcodes.ESCALATED


@dataclass(frozen=True)
class Limits:
    max_restarts: int
    within_s: float


class SupervisionPolicy:
    def __init__(self, limits: dict[str, Limits], *, backoff_min_s: float, backoff_max_s: float,
                 backoff_reset_s: float, jitter: float, escalation_max: int, escalation_window_s: float,
                 rng: random.Random | None = None):
        rng = rng or random.Random()
        self.windows = {child: RetryWindow(lim.max_restarts, lim.within_s) for child, lim in limits.items()}
        self.backoffs = {child: Backoff(backoff_min_s, backoff_max_s, backoff_reset_s, jitter, rng)
                         for child in limits}
        self.intensity = Intensity(escalation_max, escalation_window_s)

    def on_exit(self, child: str, failure: Failure, uptime_s: float, now: float) -> Decision:
        directive = decide(failure)
        if directive is Directive.STOP:
            return Decision(FAIL, failure, directive, reason="unrecoverable: not restarted")
        if directive is Directive.RESUME:  # an exit is never a Resume; treat it as unknown
            directive = Directive.ESCALATE
        window = self.windows[child]
        if not window.allow(now):  # over its own window: stopped, and no restart to count
            return Decision(FAIL, failure, directive,
                            reason=f"restarted {window.max_restarts} times within {window.within_s:g} s")
        if directive is Directive.ESCALATE and self.intensity.exceeded(now):
            return Decision(SHUTDOWN, failure, directive,
                            reason=f"more than {self.intensity.max_restarts} escalations within "
                                   f"{self.intensity.within_s:g} s across all children")
        return Decision(RESTART_AFTER, failure, directive, self.backoffs[child].next_delay(uptime_s))

    def limit(self, child: str, limits: Limits) -> None:
        """A new child (a reload, a scale-up), or new limits for one: a fresh window."""
        window = self.windows.get(child)
        if window is None or (window.max_restarts, window.within_s) != (limits.max_restarts, limits.within_s):
            self.windows[child] = RetryWindow(limits.max_restarts, limits.within_s)
        if child not in self.backoffs:
            any_backoff = next(iter(self.backoffs.values()))
            self.backoffs[child] = Backoff(any_backoff.min_s, any_backoff.max_s, any_backoff.reset_after_s,
                                           any_backoff.jitter, any_backoff.rng)

    def forget(self, child: str) -> None:
        self.windows.pop(child, None)
        self.backoffs.pop(child, None)

    def tune(self, *, backoff_min_s: float, backoff_max_s: float, backoff_reset_s: float, jitter: float,
             escalation_max: int, escalation_window_s: float) -> None:
        """New backoff and escalation settings (a reload); the windows' history is kept."""
        for backoff in self.backoffs.values():
            backoff.min_s, backoff.max_s, backoff.reset_after_s, backoff.jitter = (
                backoff_min_s, backoff_max_s, backoff_reset_s, jitter)
        self.intensity.max_restarts, self.intensity.within_s = escalation_max, escalation_window_s

    def clear(self, child: str) -> None:
        """An operator restart: a fresh window and no backoff."""
        self.windows[child].clear()
        self.backoffs[child].reset()

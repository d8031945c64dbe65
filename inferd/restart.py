"""Restart policy: what the supervisor does when a child exits.

The supervisor asks a policy, and only the policy decides. This one restarts
after a fixed short delay, always; the retry-window policy with a failure
decider replaces it without touching the supervisor's loop.
"""

from __future__ import annotations

from typing import Protocol


class RestartPolicy(Protocol):
    def on_exit(self, child: str, status: int, now: float) -> float | None:
        """Seconds to wait before restarting ``child``, or None to leave it stopped."""


class FixedDelay:
    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def on_exit(self, child: str, status: int, now: float) -> float | None:
        return self.delay_s

"""Rate-limited logging for what a peer can make us say.

A peer that floods the broker with malformed messages must not also flood
the journal (or spend the broker's time formatting lines). Each
:class:`RateLimitedLog` lets ``burst`` lines through per ``interval_s`` and
counts the rest; the first line after a quiet spell says how many were
suppressed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, burst: int = 10, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self._window_start = -float("inf")
        self._count = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: Any, exc_info: bool = False) -> None:
        self.log(logging.ERROR, msg, *args, exc_info=exc_info)

    def log(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = self.clock()
        if now - self._window_start >= self.interval_s:
            if self.suppressed:
                self.logger.log(level, "%d similar message(s) suppressed in the last %.0f s",
                                self.suppressed, now - self._window_start)
            self._window_start, self._count, self.suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            self.logger.log(level, msg, *args, exc_info=exc_info)
        else:
            self.suppressed += 1

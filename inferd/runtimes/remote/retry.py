"""When to retry an upstream call, and how long to wait first. Pure logic.

The rules trusted OpenAI clients follow (openai-python, Portkey, LiteLLM):

* retry only before the first token has reached the client: after that, a
  retry would stream the output twice;
* retry connection errors, timeouts, 408, 409, 429 and 5xx; an upstream may
  say otherwise with ``x-should-retry: true|false``;
* wait what the upstream asks (``retry-after-ms``, then ``Retry-After`` in
  seconds or as an HTTP date), else an exponential backoff with jitter;
  never more than 60 s, and never past the request's deadline.
"""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from typing import Mapping

MAX_DELAY_S = 60.0
RETRYABLE_STATUS = frozenset({408, 409, 429})


def retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def should_retry(status: int | None, headers: Mapping[str, str] | None = None) -> bool:
    """Whether a failed attempt may be retried: ``status`` None is a connection error or timeout."""
    override = (headers or {}).get("x-should-retry", "").strip().lower()
    if override in ("true", "false"):
        return override == "true"
    return status is None or retryable_status(status)


def retry_after_s(headers: Mapping[str, str], now: float) -> float | None:
    """The wait the upstream asks for, in seconds; None when it asks for none (or nonsense).

    ``headers`` must look names up case-insensitively (aiohttp's do); ``now`` is wall-clock time.
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if 0 <= ms < float("inf"):
            return ms / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - now
        return max(0.0, seconds)
    return seconds if 0 <= seconds < float("inf") else None


@dataclass(frozen=True)
class Backoff:
    base_s: float
    cap_s: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Before retry number ``attempt`` (0 for the first): half of min(cap, base * 2**attempt),
        plus up to as much again at random, so retries from many requests spread out."""
        ceiling = min(self.cap_s, MAX_DELAY_S, self.base_s * 2 ** min(attempt, 62))
        return ceiling / 2 + rng.random() * ceiling / 2


def plan_retry(attempt: int, max_retries: int, hint_s: float | None, backoff: Backoff, now: float,
               deadline: float, rng: random.Random) -> float | None:
    """The wait before retry number ``attempt`` (0 for the first), or None: no retry left, or
    waiting (and then trying at all) would run past ``deadline`` (both on the monotonic clock)."""
    if attempt >= max_retries:
        return None
    wait = min(MAX_DELAY_S, hint_s) if hint_s is not None else backoff.delay(attempt, rng)
    if now + wait >= deadline:
        return None
    return wait

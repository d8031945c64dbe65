"""The ModelRunner interface every runtime implements (echo, torch, remote).

A runner lives in a worker process and is driven by one engine thread
(``inferd.worker.engine``), so it needs no locking. The interface is
iteration-level, as in Orca and vLLM: requests are admitted and cancelled
between steps, and each :meth:`ModelRunner.step` advances every admitted
request by one iteration, producing at most one chunk per request. A runner
that batches does so inside ``step``; one that waits on something (a delay, a
network stream) says how long through :meth:`ModelRunner.next_step_in`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

from inferd.devices import Device
from inferd.errors import ErrorCode


@dataclass(slots=True)
class RunRequest:
    rid: int
    prompt: str
    params: dict[str, Any]
    messages: list[dict[str, str]] | None = None   # a chat, for runtimes whose spec says chat
    deadline: float | None = None             # time.monotonic() by which the broker gives up on it


@dataclass(slots=True)
class Output:
    """One step's result for one request.

    ``text`` is a chunk (None: no chunk this time). ``finish_reason`` marks the
    request's last output. ``error`` ends the request with that code instead.
    """

    rid: int
    text: str | None = None
    finish_reason: str | None = None
    error: ErrorCode | None = None
    message: str = ""
    usage: dict[str, int] | None = None   # on a finished request: prompt_tokens, completion_tokens
    details: dict[str, Any] | None = None     # sent with an error (a retry hint, an upstream's status)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestRejected(Exception):
    """Raised by :meth:`ModelRunner.admit` for a request it can never serve (a prompt
    longer than the model's context): that request alone fails with ``code``."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


class ModelRunner(abc.ABC):
    # A long load's current phase ("reading weights"), shown in heartbeats until the runner is ready.
    progress: str = ""

    def __init__(self, options: dict[str, Any], devices: tuple[Device, ...], capacity: int):
        self.options = options
        self.devices = devices    # pinned through CUDA_VISIBLE_DEVICES; empty for a remote runtime
        # The most requests admitted at once: the worker's credits. A runner may lower it
        # (the torch runtime's batch slots), never raise it.
        self.capacity = capacity
        # A runner whose outputs arrive on their own (a network stream) calls this, from any
        # thread, to have the engine call step() now; the engine sets it.
        self.wake: Callable[[], None] = lambda: None

    @property
    def where(self) -> str:
        return ",".join(d.id for d in self.devices) or "no device"

    @abc.abstractmethod
    def load(self) -> None:
        """Load onto ``self.devices``. May take long; the worker heartbeats meanwhile."""

    @abc.abstractmethod
    def admit(self, request: RunRequest) -> None:
        """Take a request; its outputs come from later steps. Never more than ``capacity`` at once.
        Raises :class:`RequestRejected` for a request that can never be served."""

    @abc.abstractmethod
    def cancel(self, rid: int) -> None:
        """Stop working on a request now; no further output for it. Unknown rids are ignored."""

    @abc.abstractmethod
    def step(self) -> list[Output]:
        """Advance every due request by one iteration.

        A failure is an exception; the worker classifies it
        (``inferd.failures.classify``): out of memory fails the step's requests
        and the worker carries on, anything else ends the worker process.
        """

    @abc.abstractmethod
    def next_step_in(self) -> float | None:
        """Seconds until :meth:`step` has work (0: now); None when nothing is admitted."""

    def warmup(self) -> None:
        """Run the model once before taking requests. The default does nothing."""

    def rebuild(self) -> None:
        """Rebuild the model session (drop caches, reload, warm up). The default does all three."""
        self.close()
        self.load()
        self.warmup()

    def release_memory(self) -> None:
        """Free cached device memory after an out-of-memory step (Resume). The default does nothing."""

    def load_report(self) -> dict[str, Any]:
        """Runtime-specific load figures for the worker's heartbeat."""
        return {}

    def close(self) -> None:
        """Release the device's resources."""

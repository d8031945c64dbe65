"""The engine thread: the only thread that touches the ModelRunner, and the worker's data path.

The worker's main thread must keep heartbeating while a model loads or a step
runs (a long step must never look like a dead worker), so the runner lives in
this thread. Requests reach it, and its outputs leave it, through its own
*port* (``inferd.worker.link``: a DEALER socket of its own in the worker
process), with no hop through the main thread: between steps the engine reads
what the broker sent (REQUEST, CANCEL) and after each step sends all of the
step's outputs in one message. It waits on the port for the next step's time
or the next message. The main thread's own commands (rebuild, reset, stop)
come through a queue, with a wake-up of the port. In-process (the unit tests),
a :class:`LocalPort` keeps the outputs in a deque instead.

The engine's ``state`` is what the worker reports: loading, warming, ready,
rebuilding (``inferctl rebuild``: requests already running finish, requests
that arrive meanwhile wait here, then the session is rebuilt and they run),
and poisoned or failed.

A runner's exception is classified (``inferd.failures``) and the decider
says what to do: Resume (out of memory) fails the step's requests, frees the
cache and carries on; anything else fails the active requests and stops the
engine with ``failure`` set, and the main thread exits with its status.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterable, Protocol

from inferd.errors import ErrorCode
from inferd.failures import Failure, classify, describe
from inferd.restart import Directive, decide
from inferd.runtimes.base import ModelRunner, Output, RequestRejected, RunRequest

log = logging.getLogger("inferd.worker")

ADMIT, CANCEL, REBUILD, RESET, STOP = "admit", "cancel", "rebuild", "reset", "stop"


class Port(Protocol):
    """Where the engine thread gets work and puts outputs (all methods but ``wake`` from that thread)."""

    def open(self) -> None:
        """(Re)connect: what was sent to the previous connection is dropped."""

    def poll(self, timeout: float | None) -> Iterable[tuple[str, Any]]:
        """Wait up to ``timeout`` seconds (None: no limit) for input or a wake-up; return the
        commands that arrived, ``(ADMIT, RunRequest)`` or ``(CANCEL, rid)``."""

    def emit(self, outputs: list[Output]) -> None:
        """Deliver one step's outputs, together."""

    def wake(self) -> None:
        """Make a :meth:`poll` under way return now; any thread may call it."""


class LocalPort:
    """The port of an engine driven in-process: nothing arrives but the engine's own commands, and
    the outputs wait in ``outputs`` for whoever ``notify`` tells."""

    def __init__(self, notify: Callable[[], None]):
        self.outputs: collections.deque[list[Output]] = collections.deque()
        self._notify = notify
        self._woken = threading.Event()

    def open(self) -> None:
        pass

    def poll(self, timeout: float | None) -> Iterable[tuple[str, Any]]:
        if timeout != 0:
            self._woken.wait(timeout)
        self._woken.clear()
        return ()

    def emit(self, outputs: list[Output]) -> None:
        self.outputs.append(outputs)
        self._notify()

    def wake(self) -> None:
        self._woken.set()


class Engine(threading.Thread):
    def __init__(self, runner: ModelRunner, wake: Callable[[], None], port: Port | None = None):
        super().__init__(name="inferd-engine", daemon=True)
        self.runner = runner
        self.commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.port = port or LocalPort(wake)
        self.state = "loading"
        self.failure: Failure | None = None   # set when the engine stops for good
        self.failure_message = ""
        self.resumes = 0                      # out-of-memory steps survived
        self.rebuilds = 0                     # model sessions rebuilt on request
        # The runner's own load figures, taken by this thread after each step (the runner is
        # not thread-safe); the main thread sends the latest in its heartbeats.
        self.report: dict[str, Any] = {}
        self._wake = wake
        self._active: set[int] = set()
        self._rebuild_requested = False
        self._deferred: dict[int, RunRequest] = {}  # admitted while a rebuild is pending
        runner.wake = self.port.wake

    @property
    def outputs(self) -> collections.deque[list[Output]]:
        """The outputs not yet collected, of an engine on a :class:`LocalPort`."""
        return self.port.outputs

    @property
    def in_flight(self) -> int:
        return len(self._active)

    # Called from other threads: the main thread, or a test.
    def _post(self, kind: str, arg: Any = None) -> None:
        self.commands.put((kind, arg))
        self.port.wake()

    def admit(self, request: RunRequest) -> None:
        self._post(ADMIT, request)

    def cancel(self, rid: int) -> None:
        self._post(CANCEL, rid)

    def rebuild(self) -> None:
        self._post(REBUILD)

    def reset(self) -> None:
        """Drop every request and reconnect the port: the worker registers anew."""
        self._post(RESET)

    def stop(self) -> None:
        self._post(STOP)

    # The engine thread.
    def run(self) -> None:
        started = time.monotonic()
        if not self._prepare("loading the model", self.runner.load):
            return
        self._set_state("warming")
        if not self._prepare("warming up the model", self.runner.warmup):
            return
        log.info("ready in %.2f s on %s, %d credit(s)", time.monotonic() - started, self.runner.where,
                 self.runner.capacity)
        self.port.open()
        self._set_state("ready")
        while True:
            try:
                if not self._serve_once():
                    return
            except Exception as exc:  # a runner's admit or cancel failed: treated like a failed step
                if not self._on_step_failure(exc):
                    return

    def _prepare(self, what: str, action: Callable[[], None]) -> bool:
        """Load, warm up or rebuild; False (and the engine stopped) if it failed."""
        try:
            action()
            self.report = self.runner.load_report()
            return True
        except Exception as exc:
            log.exception("%s failed", what)
            # A poisoned context may load fine in a new process; anything else will fail again.
            # Requests held for a rebuild get no answer here: none has started, so the broker
            # re-queues them for another worker when this one is gone.
            kind = classify(exc)
            self._stop_with(kind if kind is Failure.CONTEXT_POISONED else Failure.UNRECOVERABLE, exc)
            return False

    def _set_state(self, state: str) -> None:
        self.state = state
        self._wake()  # the main thread reports a new state at once

    def _serve_once(self) -> bool:
        wait = 0.0 if self._rebuild_due() else self.runner.next_step_in()
        # What the broker sent, then the main thread's commands: a RESET drops what came before it.
        for command in self.port.poll(wait if wait is None or wait > 0 else 0):
            if not self._apply(command):
                return False
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            if not self._apply(command):
                return False
        if self._rebuild_due():
            return self._rebuild()
        wait = self.runner.next_step_in()
        if wait is not None and wait <= 0:
            return self._step()
        return True

    def _apply(self, command: tuple[str, Any]) -> bool:
        kind, arg = command
        if kind == ADMIT:
            if not self._rebuild_requested and len(self._active) - len(self._deferred) >= self.runner.capacity:
                # The broker never sends more than our credits; if it does, say so rather than overcommit.
                self._emit([Output(arg.rid, error=ErrorCode.INTERNAL, message="worker has no free credit")])
                return True
            self._active.add(arg.rid)
            if self._rebuild_requested:
                self._deferred[arg.rid] = arg
            else:
                self._admit(arg)
        elif kind == CANCEL:
            if arg in self._active:
                self._active.discard(arg)
                if self._deferred.pop(arg, None) is None:
                    self.runner.cancel(arg)
                    self.report = self.runner.load_report()  # the slot it freed shows at once
                self._emit([Output(arg, error=ErrorCode.CANCELLED, message="cancelled")])
        elif kind == RESET:
            log.warning("dropping %d request(s): the worker registers anew", len(self._active))
            for rid in self._active:
                if rid not in self._deferred:
                    self.runner.cancel(rid)
            self._active.clear()
            self._deferred.clear()
            self.report = self.runner.load_report()
            self.port.open()
        elif kind == REBUILD:
            if not self._rebuild_requested:
                log.info("rebuild requested: finishing %d running request(s) first", len(self._active))
                self._rebuild_requested = True
                self._set_state("rebuilding")
        else:
            return False
        return True

    def _admit(self, request: RunRequest) -> None:
        try:
            self.runner.admit(request)
        except RequestRejected as exc:
            self._active.discard(request.rid)
            self._emit([Output(request.rid, error=exc.code, message=str(exc))])

    def _rebuild_due(self) -> bool:
        """A rebuild was asked for and every request the runner holds has finished."""
        return self._rebuild_requested and len(self._active) == len(self._deferred)

    def _rebuild(self) -> bool:
        started = time.monotonic()
        if not self._prepare("rebuilding the model session", self.runner.rebuild):
            return False
        self._rebuild_requested = False
        self.rebuilds += 1
        log.info("model session rebuilt in %.2f s; %d waiting request(s) start now",
                 time.monotonic() - started, len(self._deferred))
        for request in self._deferred.values():
            self._admit(request)
        self._deferred.clear()
        self._set_state("ready")
        return True

    def _step(self) -> bool:
        """One step; False when the failure it met ends the worker."""
        try:
            outputs = self.runner.step()
        except Exception as exc:
            return self._on_step_failure(exc)
        self.report = self.runner.load_report()
        for out in outputs:
            if out.final:
                self._active.discard(out.rid)
        if outputs:
            self._emit(outputs)
        return True

    def _on_step_failure(self, exc: Exception) -> bool:
        kind = classify(exc)
        message = describe(exc)
        if decide(kind) is Directive.RESUME:
            log.warning("out of memory in a step: failing its %d request(s) and carrying on: %s",
                        len(self._active), message)
            self._emit(self._fail_running(ErrorCode.OUT_OF_MEMORY, message))
            self.resumes += 1
            try:
                self.runner.release_memory()
            except Exception:
                log.exception("releasing memory after an out-of-memory step failed")
            self.report = self.runner.load_report()
            return True
        if kind is Failure.CONTEXT_POISONED:
            log.error("the device context is poisoned: %s", message)
        else:
            log.exception("the runner failed (%s)", kind.value)
        self._emit(self._fail_active(
            ErrorCode.CONTEXT_POISONED if kind is Failure.CONTEXT_POISONED else ErrorCode.INTERNAL, message))
        self._stop_with(kind, exc)
        return False

    def _stop_with(self, kind: Failure, exc: BaseException) -> None:
        """Tell the main thread to report ``kind`` and exit with its status. Nothing
        here touches the device again: a poisoned context can hang a synchronize."""
        self.failure = kind
        self.failure_message = describe(exc)
        self._set_state("poisoned" if kind is Failure.CONTEXT_POISONED else "failed")

    def _fail_running(self, code: ErrorCode, message: str) -> list[Output]:
        """Fail the requests the runner holds (a failed step's) and drop them from it;
        requests waiting for a rebuild were not in the step and keep waiting."""
        running = [rid for rid in self._active if rid not in self._deferred]
        for rid in running:
            self.runner.cancel(rid)
            self._active.discard(rid)
        return [Output(rid, error=code, message=message) for rid in running]

    def _fail_active(self, code: ErrorCode, message: str) -> list[Output]:
        """Fail every request, for an engine that stops. The runner is not touched:
        cancelling frees device memory, unsafe on a poisoned context."""
        failed = [Output(rid, error=code, message=message) for rid in self._active]
        self._active.clear()
        self._deferred.clear()
        return failed

    def _emit(self, outputs: list[Output]) -> None:
        self.port.emit(outputs)

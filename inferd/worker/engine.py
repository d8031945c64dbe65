"""The engine thread: the only thread that touches the ModelRunner.

The worker's main thread owns the socket and must keep heartbeating while a
model loads or a step runs (a long step must never look like a dead worker).
So the runner lives here, fed through a command queue, and its outputs go
back through a deque plus a wake-up message on an inproc socket. One wake-up
per step, not per output, keeps the hand-off cheap.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any, Callable

from inferd.errors import ErrorCode
from inferd.runtimes.base import ModelRunner, Output, RunRequest

log = logging.getLogger("inferd.worker")

ADMIT, CANCEL, STOP = "admit", "cancel", "stop"


class Engine(threading.Thread):
    def __init__(self, runner: ModelRunner, wake: Callable[[], None]):
        super().__init__(name="inferd-engine", daemon=True)
        self.runner = runner
        self.commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.outputs: collections.deque[list[Output]] = collections.deque()
        self.state = "loading"
        self.load_error: str | None = None
        self.last_progress = time.monotonic()
        self._wake = wake
        self._active: set[int] = set()

    # Called from the main thread.
    def admit(self, request: RunRequest) -> None:
        self.commands.put((ADMIT, request))

    def cancel(self, rid: int) -> None:
        self.commands.put((CANCEL, rid))

    def stop(self) -> None:
        self.commands.put((STOP, None))

    # The engine thread.
    def run(self) -> None:
        started = time.monotonic()
        try:
            self.runner.load()
        except Exception as exc:
            log.exception("loading the model failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            self._wake()
            return
        log.info("runner loaded in %.2f s on %s", time.monotonic() - started, self.runner.device.id)
        self.state = "ready"
        self._wake()
        while self._serve_once():
            pass

    def _serve_once(self) -> bool:
        wait = self.runner.next_step_in()
        if wait is None or wait > 0:
            try:
                command = self.commands.get(timeout=wait)
            except queue.Empty:
                command = None
            if command is not None and not self._apply(command):
                return False
        while True:  # everything else already waiting, without blocking
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            if not self._apply(command):
                return False
        wait = self.runner.next_step_in()
        if wait is not None and wait <= 0:
            self._step()
        return True

    def _apply(self, command: tuple[str, Any]) -> bool:
        kind, arg = command
        if kind == ADMIT:
            self._active.add(arg.rid)
            self.runner.admit(arg)
        elif kind == CANCEL:
            if arg in self._active:
                self._active.discard(arg)
                self.runner.cancel(arg)
                self._emit([Output(arg, error=ErrorCode.CANCELLED, message="cancelled")])
        else:
            return False
        return True

    def _step(self) -> None:
        try:
            outputs = self.runner.step()
        except Exception as exc:
            log.exception("runner step failed")
            outputs = self._fail_active(f"{type(exc).__name__}: {exc}")
        self.last_progress = time.monotonic()
        for out in outputs:
            if out.final:
                self._active.discard(out.rid)
        if outputs:
            self._emit(outputs)

    def _fail_active(self, message: str) -> list[Output]:
        failed = []
        for rid in self._active:
            try:
                self.runner.cancel(rid)
            except Exception:
                log.exception("cancel after a failed step failed too")
            failed.append(Output(rid, error=ErrorCode.INTERNAL, message=f"runtime error: {message}"))
        return failed

    def _emit(self, outputs: list[Output]) -> None:
        self.outputs.append(outputs)
        self._wake()

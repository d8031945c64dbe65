"""The echo runtime: streams the prompt back, one whitespace-separated word per chunk.

A chat (``messages``) is echoed as its contents joined in order.

It is the serving path's load for tests and benchmarks: no model, so what is
measured is inferd itself. Params: ``max_tokens`` (at most that many chunks)
and ``delay_ms`` (the wait between chunks, to hold requests in flight; the
option ``delay_ms`` sets its default).

With ``options.fault_injection = true`` (never by default) it also injects the
failures that supervision must survive, so they can be tested end to end on a
machine without a GPU. A request's ``fault`` param fires when the request is
first stepped:

* ``poison``: the context is poisoned (the worker exits, status 4, and is restarted);
* ``oom``: out of memory (the batch fails with OUT_OF_MEMORY, the worker carries on);
* ``crash``: the process dies by SIGSEGV;
* ``hang``: the step never returns (the broker's watchdog has it killed);
* ``error``: an unexpected exception (the worker exits, status 1: Escalate).

``options.load_fault = "unrecoverable"`` makes every load fail for good, and
``options.load_delay_ms`` makes every load take that long (a big model's load).
"""

from __future__ import annotations

import os
import signal
import threading
import time

from inferd.failures import ContextPoisonedError, OutOfMemoryError, UnrecoverableError
from inferd.protocol import FINISH_LENGTH, FINISH_STOP
from inferd.runtimes.base import ModelRunner, Output, RunRequest


class _Stream:
    __slots__ = ("words", "next", "limit", "delay", "due", "fault")

    def __init__(self, words: list[str], limit: int, delay: float, due: float, fault: str | None):
        self.words = words
        self.next = 0
        self.limit = limit
        self.delay = delay
        self.due = due
        self.fault = fault


def _inject(fault: str) -> None:
    if fault == "poison":
        raise ContextPoisonedError("injected fault: CUDA error: an illegal memory access was encountered")
    if fault == "oom":
        raise OutOfMemoryError("injected fault: out of memory")
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
        threading.Event().wait()  # as after a real crash, nothing more runs (the signal may land a moment later)
    if fault == "hang":
        threading.Event().wait()
    raise RuntimeError(f"injected fault: {fault}")


class EchoRunner(ModelRunner):
    def load(self) -> None:
        self._faults = self.options.get("fault_injection") is True
        if self._faults and self.options.get("load_fault") == "unrecoverable":
            raise UnrecoverableError("injected fault: the model cannot be loaded")
        if self._faults:
            time.sleep(self.options.get("load_delay_ms", 0) / 1000)
        self._streams: dict[int, _Stream] = {}

    def admit(self, request: RunRequest) -> None:
        # A chat echoes its messages' contents, in order.
        text = " ".join(m["content"] for m in request.messages) if request.messages else request.prompt
        words = text.split()
        limit = min(len(words), request.params.get("max_tokens", len(words)))
        delay = request.params.get("delay_ms", self.options.get("delay_ms", 0)) / 1000
        fault = request.params.get("fault") if self._faults else None
        self._streams[request.rid] = _Stream(words, limit, delay, time.monotonic(), fault)

    def cancel(self, rid: int) -> None:
        self._streams.pop(rid, None)

    def step(self) -> list[Output]:
        now = time.monotonic()
        outputs = []
        for rid, s in list(self._streams.items()):
            if s.due > now:
                continue
            if s.fault:
                _inject(s.fault)
            if s.limit == 0:
                outputs.append(Output(rid, None, FINISH_STOP))
                del self._streams[rid]
                continue
            text = s.words[s.next]
            s.next += 1
            if s.next == s.limit:
                outputs.append(Output(rid, text, FINISH_LENGTH if s.limit < len(s.words) else FINISH_STOP))
                del self._streams[rid]
            else:
                outputs.append(Output(rid, text))
                s.due = now + s.delay
        return outputs

    def next_step_in(self) -> float | None:
        if not self._streams:
            return None
        return max(0.0, min(s.due for s in self._streams.values()) - time.monotonic())

    def load_report(self) -> dict:
        return {"active": len(self._streams)}

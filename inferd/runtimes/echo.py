"""The echo runtime: streams the prompt back, one whitespace-separated word per chunk.

It is the serving path's load for tests and benchmarks: no model, so what is
measured is inferd itself. Params: ``max_tokens`` (at most that many chunks)
and ``delay_ms`` (the wait between chunks, to hold requests in flight).
"""

from __future__ import annotations

import time

from inferd.protocol import FINISH_LENGTH, FINISH_STOP
from inferd.runtimes.base import ModelRunner, Output, RunRequest


class _Stream:
    __slots__ = ("words", "next", "limit", "delay", "due")

    def __init__(self, words: list[str], limit: int, delay: float, due: float):
        self.words = words
        self.next = 0
        self.limit = limit
        self.delay = delay
        self.due = due


class EchoRunner(ModelRunner):
    def load(self) -> None:
        self._streams: dict[int, _Stream] = {}

    def admit(self, request: RunRequest) -> None:
        words = request.prompt.split()
        limit = min(len(words), request.params.get("max_tokens", len(words)))
        delay = request.params.get("delay_ms", 0) / 1000
        self._streams[request.rid] = _Stream(words, limit, delay, time.monotonic())

    def cancel(self, rid: int) -> None:
        self._streams.pop(rid, None)

    def step(self) -> list[Output]:
        now = time.monotonic()
        outputs = []
        for rid, s in list(self._streams.items()):
            if s.due > now:
                continue
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

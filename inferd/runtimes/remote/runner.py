"""RemoteRunner: the ModelRunner of the remote runtime, an asyncio loop beside the engine thread.

The engine drives every runner the same way (admit, cancel, step). A remote
request is not stepped, it streams: so the runner runs its own event loop on
a thread of its own, where :class:`~inferd.runtimes.remote.client.UpstreamClient`
holds one task per request. Outputs go into a deque, and the engine is woken
(``self.wake``) at most once every ``WAKE_INTERVAL_S`` (2 ms) to collect all that
arrived: under load one step carries many streams' chunks.

Cancel cancels the request's task, which closes its HTTP connection at once.
Nothing an upstream does raises out of :meth:`step`: an outage fails
requests with typed errors and shows in the load report as a degraded
upstream; it never ends the worker, so it never spends the restart budget.
Waiting on a slow provider is not a hang either (the broker's watchdog leaves
remote workers alone); what is, a wedged event loop, :meth:`step` reports by
raising, and the worker is restarted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from typing import Any

from inferd.errors import ErrorCode
from inferd.failures import UnrecoverableError
from inferd.runtimes.base import ModelRunner, Output, RunRequest
from inferd.runtimes.remote.client import UpstreamClient
from inferd.runtimes.remote.settings import Settings

log = logging.getLogger("inferd.remote")

REPORT_INTERVAL_S = 0.25
LOOP_CHECK_S = 1.0        # how often the engine looks at the loop while streams are open
LOOP_STALL_S = 30.0       # a loop silent this long is wedged (a bug): the worker exits and is restarted
# At most one engine wake-up per this long while streams flow. Every step costs the worker's other
# two threads a hand-off and a CHUNKS message, whatever it carries; at 1 ms, 256 streams at 20 ms a
# token under a loaded machine gave 4 to 17 chunks a step (bench_remote), at 2 ms 8 to 23 and half
# the steps. A chunk waits 2 ms at most, a tenth of a provider's time between two tokens.
WAKE_INTERVAL_S = 0.002


class RemoteRunner(ModelRunner):
    def load(self) -> None:
        self.settings = Settings.from_options(self.options)
        api_key = None
        if self.settings.api_key_env:
            # Surrounding whitespace is a newline from `$(cat keyfile)`, never part of a key.
            api_key = os.environ.get(self.settings.api_key_env, "").strip()
            # Both would fail the same way after every restart: do not loop.
            if not api_key:
                raise UnrecoverableError(f"the environment variable {self.settings.api_key_env} (api_key_env) "
                                         "is not set or empty")
            if not api_key.isprintable() or " " in api_key:
                raise UnrecoverableError(f"the key in {self.settings.api_key_env} (api_key_env) contains spaces or "
                                         "control characters; it cannot go in a header")
        self._outputs: collections.deque[Output] = collections.deque()
        self._poked = False
        self._last_wake = 0.0
        self._tasks: dict[int, asyncio.Task] = {}
        self._report: dict[str, Any] = {}
        self._report_changed = False
        self._loop_seen = self._next_check = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="inferd-remote", daemon=True)
        self._thread.start()
        self.client = self._call(self._open(api_key))
        log.info("remote runtime: %s API of %s, model %s, %d stream(s) at most", self.settings.api,
                 ", ".join(self.settings.urls), self.settings.model, self.capacity)

    @property
    def where(self) -> str:
        return "no device (remote)"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _open(self, api_key: str | None) -> UpstreamClient:
        client = UpstreamClient(self.settings, api_key, self.capacity, self._emit)
        self._probing: asyncio.Future = self._loop.create_future()
        self._probing.set_result(None)
        self._housekeeping = asyncio.create_task(self._housekeep(client))
        return client

    # --- the engine thread ---------------------------------------------------------------------

    def admit(self, request: RunRequest) -> None:
        body = self.settings.body(request)  # a request this API cannot take is rejected here (RequestRejected)
        self._loop.call_soon_threadsafe(self._start, request, body)

    def cancel(self, rid: int) -> None:
        self._loop.call_soon_threadsafe(self._cancel, rid)

    def step(self) -> list[Output]:
        now = time.monotonic()
        self._next_check = now + LOOP_CHECK_S
        stalled = now - self._loop_seen
        if stalled > LOOP_STALL_S:  # a wedged loop streams nothing ever again: a new process will
            raise RuntimeError(f"the remote runtime's event loop has not run for {stalled:.0f} s")
        self._poked = False  # before draining: an output added after the drain pokes again
        outputs = []
        while self._outputs:
            outputs.append(self._outputs.popleft())
        self._report_changed = False
        return outputs

    def next_step_in(self) -> float | None:
        if self._outputs or self._report_changed:
            return 0.0
        # While streams are open, step now and then even if nothing arrives: step() checks the loop.
        return max(0.0, self._next_check - time.monotonic()) if self._tasks else None

    def load_report(self) -> dict[str, Any]:
        return self._report

    def close(self) -> None:
        if getattr(self, "_loop", None) is None or self._loop.is_closed():
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    # --- the loop thread -----------------------------------------------------------------------

    def _emit(self, output: Output) -> None:
        self._outputs.append(output)
        if not self._poked:
            # Not a wake-up per output: at most one per WAKE_INTERVAL_S, at once when the last is
            # older. Under load each step then carries many streams' chunks (one hop to the engine,
            # one CHUNKS message for all of them); an idle worker's first output goes at once.
            self._poked = True
            delay = self._last_wake + WAKE_INTERVAL_S - self._loop.time()
            if delay > 0:
                self._loop.call_later(delay, self._wake_engine)
            else:
                self._loop.call_soon(self._wake_engine)

    def _wake_engine(self) -> None:
        self._last_wake = self._loop.time()
        self.wake()

    def _start(self, request: RunRequest, body: bytes) -> None:
        self._tasks[request.rid] = self._loop.create_task(self._serve(request, body))

    def _cancel(self, rid: int) -> None:
        task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()

    async def _serve(self, request: RunRequest, body: bytes) -> None:
        try:
            await self.client.stream(request, body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must fail the request, not the worker
            log.exception("request %s failed in the remote client", request.rid)
            self._emit(Output(request.rid, error=ErrorCode.INTERNAL,
                              message=self.client.scrub(f"remote client: {type(exc).__name__}: {exc}")))
        finally:
            if self._tasks.get(request.rid) is asyncio.current_task():
                del self._tasks[request.rid]

    async def _housekeep(self, client: UpstreamClient) -> None:
        """Refresh the load report, log health changes, and probe failing upstreams."""
        health = "ok"
        next_probe = 0.0
        while True:
            now = self._loop_seen = self._loop.time()
            if now >= next_probe and self._probing.done():  # in a task: a slow probe must not stall this loop
                next_probe = now + self.settings.probe_interval_s
                self._probing = asyncio.create_task(self._probe(client))
            state, problem = client.upstreams.health()
            if state != health:
                if state == "ok":
                    log.info("upstreams healthy again")
                else:
                    log.warning("upstreams degraded: %s", client.scrub(problem))
                health = state
            report = {"active": len(self._tasks), "health": state, "problem": client.scrub(problem),
                      "upstreams": client.upstreams.report(), "upstream": client.stats.report()}
            if report != self._report:  # an idle engine takes the new report at once, so status shows it
                self._report = report
                self._report_changed = True
                self.wake()
            await asyncio.sleep(REPORT_INTERVAL_S)

    @staticmethod
    async def _probe(client: UpstreamClient) -> None:
        try:
            await client.probe()
        except Exception:
            log.exception("probing the upstreams failed")

    async def _shutdown(self) -> None:
        self._housekeeping.cancel()
        self._probing.cancel()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), self._housekeeping, self._probing, return_exceptions=True)
        await self.client.close()

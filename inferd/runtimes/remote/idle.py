"""The read timeout of open streams (``read_timeout_ms``), kept by one timer for all of them.

aiohttp's own ``sock_read`` timeout re-arms a timer on every read: for a
worker streaming hundreds of responses, a timer cancelled and another pushed
on the event loop's heap per token, and a heap full of cancelled ones. Here
a stream only counts its reads, and one periodic check, every quarter of the
timeout, fails a stream that has read nothing for the whole timeout: it fires
between 1 and 1.25 times ``read_timeout_ms`` after the last read, the way
aiohttp's would, with the same exception (a ``TimeoutError``), set on the
response's body so that the read waiting on it raises.

aiohttp's timeout still covers the wait for the response's headers; the
client turns it off for the body (:meth:`Watch.start`).
"""

from __future__ import annotations

import asyncio

import aiohttp

CHECKS_PER_TIMEOUT = 4


class Watch:
    """One stream's reads, counted by its reader (``reads += 1``) and looked at by the watchdog."""

    __slots__ = ("content", "reads", "seen", "idle")

    def __init__(self, content: aiohttp.StreamReader):
        self.content = content
        self.reads = 0
        self.seen = 0       # ``reads`` at the last check
        self.idle = 0       # checks since the last read


class ReadWatchdog:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._watches: set[Watch] = set()
        self._task: asyncio.Task | None = None

    def watch(self, resp: aiohttp.ClientResponse) -> Watch:
        """Watch ``resp``'s body from now on, instead of aiohttp's per-read timer; :meth:`unwatch` it after."""
        if resp.connection is not None:
            resp.connection.protocol.read_timeout = None  # the timer armed by the last read is its last
        watch = Watch(resp.content)
        self._watches.add(watch)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return watch

    def unwatch(self, watch: Watch) -> None:
        self._watches.discard(watch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.timeout_s / CHECKS_PER_TIMEOUT)
            self.check()

    def check(self) -> None:
        for watch in list(self._watches):
            if watch.reads != watch.seen:
                watch.seen, watch.idle = watch.reads, 0
                continue
            watch.idle += 1
            if watch.idle >= CHECKS_PER_TIMEOUT:
                self._watches.discard(watch)
                watch.content.set_exception(aiohttp.ServerTimeoutError(
                    f"no data from the upstream for {self.timeout_s:g} s (read_timeout_ms)"))

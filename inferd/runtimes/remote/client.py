"""One worker's HTTP client: streams requests from the upstreams, on one aiohttp connection pool.

Every request ends in exactly one final output: a finish reason, or a typed
error. The upstream outcome maps to the error as docs/protocol.md says:

====================================  =======================================
upstream outcome                      inferd error
====================================  =======================================
400, 413, 422                         BAD_REQUEST, with the upstream's message
401, 403                              UPSTREAM_AUTH
429, retries exhausted                BACKPRESSURE, ``retry_after_ms`` hint
5xx, timeouts, connection errors,     UPSTREAM_ERROR (``details.kind``: status,
retries exhausted; other 4xx          timeout, connection)
an error event, invalid JSON          UPSTREAM_ERROR (stream_error,
                                      invalid_json), not retried
any failure after the first token     UPSTREAM_ERROR, never retried
the deadline passes                   DEADLINE_EXCEEDED
====================================  =======================================

The API key is read from the environment by the runner and lives only in the
Authorization header; every message that leaves this module is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from typing import Any, Callable

import aiohttp

from inferd.errors import ErrorCode
from inferd.metrics import REQUEST_BUCKETS_S, TTFT_BUCKETS_S, Distribution
from inferd.protocol import FINISH_LENGTH, FINISH_STOP
from inferd.runtimes.base import Output, RunRequest
from inferd.runtimes.remote.chunks import ChunkError, Usage, decode, error_message
from inferd.runtimes.remote.idle import ReadWatchdog, Watch
from inferd.runtimes.remote.retry import plan_retry, retry_after_s, should_retry
from inferd.runtimes.remote.settings import Settings
from inferd.runtimes.remote.sse import SSEError, SSEParser
from inferd.runtimes.remote.upstreams import Upstream, Upstreams

log = logging.getLogger("inferd.remote")

NO_DEADLINE_S = 3600.0           # for a request that came without one (tests, direct use)
MAX_ERROR_BODY = 64 * 1024       # of an upstream's error answer, read for its message
PROBE_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 1.0


class UpstreamFailure(Exception):
    def __init__(self, code: ErrorCode, message: str, kind: str, *, retryable: bool, status: int | None = None,
                 hint_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind
        self.retryable = retryable
        self.status = status
        self.hint_s = hint_s


def code_for_status(status: int) -> ErrorCode:
    if status in (400, 413, 422):
        return ErrorCode.BAD_REQUEST
    if status in (401, 403):
        return ErrorCode.UPSTREAM_AUTH
    if status == 429:
        return ErrorCode.BACKPRESSURE
    return ErrorCode.UPSTREAM_ERROR


class Stats:
    """The upstream figures a worker reports: attempts, retries, status codes, errors, latencies."""

    def __init__(self) -> None:
        self.attempts = 0
        self.retries = 0
        self.failovers = 0
        self.status: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.first_token_ms = Distribution(TTFT_BUCKETS_S)     # from the attempt's start to its first token
        self.latency_ms = Distribution(REQUEST_BUCKETS_S)      # first attempt to final output, when it succeeds

    def report(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "retries": self.retries, "failovers": self.failovers,
                "status": {str(k): v for k, v in sorted(self.status.items())}, "errors": dict(self.errors),
                "first_token_ms": self.first_token_ms.summary(), "latency_ms": self.latency_ms.summary(),
                # Fixed buckets, which add up across workers: what the gateway exports to Prometheus.
                "first_token_histogram": self.first_token_ms.histogram(),
                "latency_histogram": self.latency_ms.histogram()}


class UpstreamClient:
    """Lives on the runner's event loop; every method runs there."""

    def __init__(self, settings: Settings, api_key: str | None, capacity: int,
                 emit: Callable[[Output], None], rng: random.Random | None = None):
        self.settings = settings
        self.emit = emit
        self.rng = rng or random.Random()
        self.upstreams = Upstreams(list(settings.urls), settings.cooldown_s, time.monotonic)
        self.stats = Stats()
        self._secret = api_key or ""
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **settings.headers}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        # One pool for the worker: a connection per stream it may hold, and one for probes per upstream.
        # aiohttp's sock_read bounds the wait for the headers; the watchdog, the wait between chunks.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=capacity + len(settings.urls), limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s,
                                          sock_read=settings.read_timeout_s))
        self.watchdog = ReadWatchdog(settings.read_timeout_s)

    async def close(self) -> None:
        await self.watchdog.close()
        await self.session.close()

    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "[redacted]") if self._secret else text

    # --- one request ---------------------------------------------------------------------------

    async def stream(self, request: RunRequest, body: bytes) -> None:
        """Stream ``request`` (``body``, its JSON for the upstream): its chunks, then exactly one final output."""
        rid = request.rid
        deadline = request.deadline if request.deadline is not None else time.monotonic() + NO_DEADLINE_S
        started = time.monotonic()
        sent = [0]                   # chunks already streamed to the client
        tried: set[str] = set()
        attempt = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    upstream = self.upstreams.pick(tried)
                    if tried and upstream.url not in tried:
                        self.stats.failovers += 1
                    tried.add(upstream.url)
                    try:
                        finish = await self._attempt(upstream, body, rid, sent)
                        break
                    except UpstreamFailure as failure:
                        self.stats.errors[failure.kind] += 1
                        retryable = failure.retryable and not sent[0]
                        wait = (plan_retry(attempt, self.settings.max_retries, failure.hint_s, self.settings.backoff,
                                           time.monotonic(), deadline, self.rng) if retryable else None)
                        if wait is None:
                            self._fail(rid, failure, upstream, attempt + 1, sent[0])
                            return
                        log.debug("request %s: %s: retry %d in %.2f s", rid, self.scrub(failure.message),
                                  attempt + 1, wait)
                        attempt += 1
                        self.stats.retries += 1
                        await asyncio.sleep(wait)
        except TimeoutError:
            self.stats.errors["deadline"] += 1
            self.emit(Output(rid, error=ErrorCode.DEADLINE_EXCEEDED, message=(
                f"the request's deadline passed during the upstream exchange ({attempt + 1} attempt(s), "
                f"{sent[0]} chunk(s) streamed)")))
            return
        self.stats.latency_ms.add((time.monotonic() - started) * 1000)
        reason, usage = finish
        self.emit(Output(rid, None, reason, usage=usage.as_dict() if usage is not None else None))

    def _fail(self, rid: int, failure: UpstreamFailure, upstream: Upstream, attempts: int, sent: int) -> None:
        details: dict[str, Any] = {"upstream": upstream.url, "kind": failure.kind, "attempts": attempts}
        if failure.status is not None:
            details["status"] = failure.status
        code, message = failure.code, failure.message
        if sent:
            code = ErrorCode.UPSTREAM_ERROR
            details["chunks"] = sent
            message = f"{message} (after {sent} chunk(s); not retried)"
        elif attempts > 1:
            message = f"{message} (after {attempts} attempts)"
        if code is ErrorCode.BACKPRESSURE:
            wait = failure.hint_s if failure.hint_s is not None else self.settings.backoff.delay(attempts, self.rng)
            details["retry_after_ms"] = max(1, round(wait * 1000))
        self.emit(Output(rid, error=code, message=self.scrub(message), details=details))

    async def _attempt(self, upstream: Upstream, body: bytes, rid: int, sent: list[int]) -> tuple[str, Usage | None]:
        """One call to ``upstream``; returns the finish reason and the usage it reported, or raises
        UpstreamFailure."""
        self.stats.attempts += 1
        began = time.monotonic()
        where = upstream.url
        try:
            async with self.session.post(self.settings.endpoint(where), data=body, headers=self.headers) as resp:
                self.stats.status[resp.status] += 1
                if resp.status != 200:
                    raise await self._status_failure(upstream, resp)
                watch = self.watchdog.watch(resp)
                try:
                    return await self._read_stream(resp, upstream, rid, sent, began, watch)
                except BaseException:
                    resp.close()  # a cancel, a failure: the connection goes now, never back to the pool
                    raise
                finally:
                    self.watchdog.unwatch(watch)
        except UpstreamFailure:
            raise
        except TimeoutError as exc:  # aiohttp's read or connect timeout (the deadline cancels instead)
            failure = UpstreamFailure(ErrorCode.UPSTREAM_ERROR, f"upstream {where} timed out: {exc or 'no data'}",
                                      "timeout", retryable=True)
        except aiohttp.ClientPayloadError as exc:
            failure = UpstreamFailure(ErrorCode.UPSTREAM_ERROR, f"upstream {where} broke the stream: {exc}",
                                      "connection", retryable=True)
        except (aiohttp.ClientError, OSError) as exc:
            failure = UpstreamFailure(ErrorCode.UPSTREAM_ERROR,
                                      f"connection to upstream {where} failed: {type(exc).__name__}: {exc}",
                                      "connection", retryable=True)
        self.upstreams.failed(upstream, None, self.scrub(failure.message))
        raise failure

    async def _read_stream(self, resp: aiohttp.ClientResponse, upstream: Upstream, rid: int, sent: list[int],
                           began: float, watch: Watch) -> tuple[str, Usage | None]:
        self.upstreams.succeeded(upstream)
        parser = SSEParser()
        chat = self.settings.api == "chat"
        emit = self.emit
        finish: str | None = None
        usage: Usage | None = None
        events_seen = 0
        read = resp.content.readany  # what iter_any() calls, without its iterator's frame per read
        while data := await read():
            watch.reads += 1
            try:
                events = parser.feed(data)
            except SSEError as exc:
                raise UpstreamFailure(ErrorCode.UPSTREAM_ERROR, f"upstream {upstream.url}: {exc}", "invalid_stream",
                                      retryable=False) from None
            events_seen += len(events)
            for event in events:
                if event.data == "[DONE]":
                    await self._drain(resp)
                    return finish or FINISH_STOP, usage
                try:
                    text, reason, reported = decode(event.data, chat, event.event == "error")
                except ChunkError as exc:
                    raise UpstreamFailure(ErrorCode.UPSTREAM_ERROR, f"upstream {upstream.url} sent {exc.message}",
                                          exc.kind, retryable=False) from None
                if text:
                    if not sent[0]:
                        self.stats.first_token_ms.add((time.monotonic() - began) * 1000)
                    sent[0] += 1
                    emit(Output(rid, text))
                if reason:  # the protocol's two: "length", or "stop" for every other end (content_filter...)
                    finish = FINISH_LENGTH if reason == FINISH_LENGTH else FINISH_STOP
                if reported is not None:
                    usage = reported
        if finish:  # it said how it finished, then closed without [DONE]: nothing is missing
            return finish, usage
        if not events_seen:  # a whole answer that is no event stream (a JSON body): trying again won't help
            raise UpstreamFailure(ErrorCode.UPSTREAM_ERROR, f"upstream {upstream.url} answered 200 without an event "
                                  f"stream (Content-Type: {resp.content_type})", "invalid_stream", retryable=False)
        failure = UpstreamFailure(ErrorCode.UPSTREAM_ERROR, f"upstream {upstream.url} closed the stream before "
                                  "[DONE]", "connection", retryable=True)
        self.upstreams.failed(upstream, 200, self.scrub(failure.message))
        raise failure

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        """Read what follows [DONE] (the end of the chunked body), so that the connection goes back
        to the pool instead of being closed; an upstream that keeps talking loses it."""
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while await resp.content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError):
            resp.close()

    async def _status_failure(self, upstream: Upstream, resp: aiohttp.ClientResponse) -> UpstreamFailure:
        status = resp.status
        try:
            message = error_message(await resp.content.read(MAX_ERROR_BODY))
        except (aiohttp.ClientError, TimeoutError):
            message = ""
        message = f"upstream {upstream.url} answered {status}" + (f": {message}" if message else "")
        retryable = should_retry(status, resp.headers)
        if status in (401, 403):
            self.upstreams.refused_auth(upstream, status, self.scrub(message))
        elif retryable:
            self.upstreams.failed(upstream, status, self.scrub(message))
        return UpstreamFailure(code_for_status(status), message, "status", retryable=retryable, status=status,
                               hint_s=retry_after_s(resp.headers, time.time()))

    # --- health -------------------------------------------------------------------------------

    async def probe(self) -> None:
        """Ask each failing upstream whose cooldown is over whether it is back (GET /models), so that
        a deployment nobody is calling recovers too. Any answer but an overload or a 5xx will do."""
        now = time.monotonic()
        for upstream in self.upstreams.failing():
            if upstream.cooling(now):
                continue
            try:
                async with self.session.get(upstream.url + "/models", headers=self.headers,
                                            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.upstreams.failed(upstream, None, f"probe: cannot reach upstream {upstream.url}: "
                                                      f"{type(exc).__name__}")
                continue
            if status in (401, 403):
                self.upstreams.refused_auth(upstream, status, f"probe: upstream {upstream.url} answered {status}")
            elif should_retry(status):
                self.upstreams.failed(upstream, status, f"probe: upstream {upstream.url} answered {status}")
            else:
                self.upstreams.succeeded(upstream)

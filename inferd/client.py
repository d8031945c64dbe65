"""Python clients for inferd: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both speak the client protocol of ``docs/protocol.md`` over one DEALER socket
and can keep many requests in flight on it::

    with Client() as client:
        for chunk in client.generate("echo", "hello world", max_tokens=8):
            print(chunk.text, chunk.finish_reason)

Failures raise the typed exceptions of :mod:`inferd.errors`. Leaving a stream
early (``break``, ``close()``, garbage collection) cancels the request on the
daemon, so no worker keeps generating for nobody.

Thread safety: a :class:`Client` owns a ZeroMQ socket, and ZeroMQ sockets must
not be shared between threads. Use one Client per thread (they are cheap), or
one :class:`AsyncClient` per event loop. Streams of one Client may be
interleaved freely within its thread.

The client never hangs on a daemon that is not there:

* a runtime dir whose daemon has stopped (its socket files left behind) raises
  :class:`~inferd.errors.DaemonNotRunning` at once;
* a SUBMIT that gets neither ACCEPTED nor ERROR within ``answer_timeout_s``
  (default 5 s: the broker is down or restarting) raises
  :class:`~inferd.errors.Unavailable`, after a CANCEL in case it arrives later;
* once accepted, after ``liveness_s`` of silence (AsyncClient: up to a quarter more) it pings,
  and a broker that does not answer, or answers with a new epoch (it restarted and lost the
  request), raises :class:`~inferd.errors.Unavailable`.

A request larger than the daemon's ``max_message_bytes`` raises
:class:`~inferd.errors.MessageTooLarge` before anything is sent: ZeroMQ would
otherwise reset the connection. The socket keeps a fixed routing id, so the
final replies of a connection that was reset anyway still reach it, and it
reads everything the broker sends as it arrives (no receive high-water mark),
so the broker never takes it for a slow reader.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import zmq

from inferd import curve, errors, protocol as P, zmqio
from inferd.paths import daemon_alive, default_runtime_dir

__all__ = ["AsyncClient", "Chunk", "Client", "default_endpoint"]

# Grace beyond a request's own deadline before the client gives up on the broker's answer.
DEADLINE_GRACE_S = 1.0
# No daemon accepts a smaller max_message_bytes: requests up to this size need no size check.
MIN_MESSAGE_LIMIT = 1024
# The limit assumed of a broker whose PONG does not say (the config's default).
DEFAULT_MESSAGE_LIMIT = 1 << 20
# An AsyncClient looks at its requests' timeouts (answer, liveness, deadline) at most this often, with
# one timer for all of them, not one armed and cancelled per reply awaited (measured at a fifth of its
# CPU per streamed chunk). A timeout fires up to this much late.
SWEEP_S = 0.05
# What was sent just before a client closes (the CANCEL of a stream left early, most often) still
# goes out for this long; closing does not wait for it.
CLOSE_LINGER_MS = 200


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    index: int
    finish_reason: str | None = None


def default_endpoint(runtime_dir: str | os.PathLike | None = None) -> str:
    """The frontend socket in ``runtime_dir``, else $INFERD_RUNTIME_DIR, else the default dir."""
    return f"ipc://{Path(runtime_dir) if runtime_dir else default_runtime_dir()}/frontend.sock"


def _check_reachable(endpoint: str) -> None:
    if not endpoint.startswith("ipc://"):
        return
    path = Path(endpoint[len("ipc://"):])
    if not path.exists():
        raise errors.DaemonNotRunning(f"inferd is not running: no socket at {path}")
    if daemon_alive(path.parent) is False:
        raise errors.DaemonNotRunning(f"inferd is not running: {path} was left by a daemon that stopped")


def _open_socket(ctx: zmq.Context, endpoint: str, keys: curve.ClientKeys | None, send_timeout_s: float) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A DEALER with no connection (a refused CURVE handshake, say) blocks a send for ever.
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
    # Read whatever the broker sends as soon as it arrives, whatever the caller is doing:
    # a client whose queue fills up is a slow reader to the broker, which ends its requests.
    sock.setsockopt(zmq.RCVHWM, 0)
    # A fixed identity across reconnects: finals held for a reset connection still arrive.
    sock.setsockopt(zmq.ROUTING_ID, b"inferd-client-" + os.urandom(12))
    if keys is not None:
        keys.apply(sock)
    sock.connect(endpoint)
    return sock


def _unreachable(endpoint: str, timeout_s: float) -> errors.Unavailable:
    return errors.Unavailable(f"cannot send to inferd at {endpoint}: no connection took the message within "
                              f"{timeout_s:g} s (for tcp: is the port right, and does the daemon accept this "
                              f"client's CURVE keys?)")


def _checked_size(body: bytes, limit: int) -> None:
    if len(body) > limit:
        raise errors.MessageTooLarge(len(body), limit)


def _submit_body(cid: int, deployment: str, prompt: str | None, priority: int | None, deadline_ms: int | None,
                 affinity: str | None, params: dict[str, Any], messages: list | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid, "deployment": deployment}
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = messages
    if priority is not None:
        body["priority"] = priority
    if deadline_ms is not None:
        body["deadline_ms"] = deadline_ms
    if affinity is not None:
        body["affinity"] = affinity
    if params:
        body["params"] = params
    return body


def _merge_params(params: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Runtime params given as ``params={...}``, as keywords, or both (a key given twice is an error)."""
    if params is None:
        return kwargs
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of runtime params, got {type(params).__name__}")
    twice = sorted(set(params) & set(kwargs))
    if twice:
        raise TypeError(f"runtime param(s) {', '.join(twice)} given both in params= and as keywords")
    return {**params, **kwargs}


def _gap(expected: int, body: dict[str, Any]) -> errors.ConnectionReset | None:
    """A CHUNK whose index skips, or a DONE whose count differs: messages were lost in a reset."""
    if "index" in body:
        got, what = body["index"], "chunk"
    else:
        got, what = body.get("chunks"), "a DONE counting"
    if got == expected:
        return None
    return errors.ConnectionReset(f"the connection to inferd was reset and output was lost "
                                  f"({expected} chunk(s) received in order, then {what} {got})")


def _pong_problem(body: dict[str, Any], epoch: Any, cid: Any) -> errors.InferdError | None:
    """What a PONG says about a request still waiting for its final: lost in a restart or a reset."""
    if body.get("epoch") != epoch:
        return errors.Unavailable("inferd restarted while the request was in flight; it was lost")
    if cid not in body.get("in_flight", (cid,)):
        return errors.ConnectionReset("the connection to inferd was reset and the request's final reply "
                                      "was lost (the broker has ended it)")
    return None


def _error(body: dict[str, Any]) -> errors.InferdError:
    return errors.from_wire(str(body.get("code")), str(body.get("message", "")), body.get("details"))


_REPLIES = {command.decode(): command for command in (P.ACCEPTED, P.CHUNK, P.DONE, P.ERROR, P.PONG)}


def _replies(frames: list[bytes]) -> list[tuple[bytes, dict[str, Any]]]:
    """The replies in one message from the broker: ``[IFDC2, [[command, body], ...]]``. Anything
    else is skipped: the broker only sends well-formed messages."""
    try:
        pairs = P.decode_replies(frames)
    except P.ProtocolError:
        return []
    return [(_REPLIES[name], body) for name, body in pairs if name in _REPLIES]


class _Tracker:
    """Liveness for one request: when to ping, and when to give up."""

    def __init__(self, deadline_ms: int | None, liveness_s: float, answer_s: float):
        now = time.monotonic()
        self.give_up = now + deadline_ms / 1000 + DEADLINE_GRACE_S if deadline_ms else float("inf")
        self.answer_by = now + answer_s     # the SUBMIT's ACCEPTED (or ERROR) is due by then
        self.accepted = False
        self.liveness_s = liveness_s
        self.answer_s = answer_s
        self.heard(now)

    def heard(self, now: float) -> None:
        self.last_heard = now
        self.ping_sent: float | None = None

    def wait_s(self, now: float) -> float:
        if not self.accepted:
            nxt = self.answer_by
        elif self.ping_sent is not None:
            nxt = self.ping_sent + self.answer_s
        else:
            nxt = self.last_heard + self.liveness_s
        return max(0.0, min(nxt, self.give_up) - now)

    def timed_out(self, now: float, endpoint: str) -> errors.InferdError | None:
        """What to raise now that nothing came in time, or None: wait on (not yet accepted: nothing
        to ask about) or ping first (accepted)."""
        if now >= self.give_up:
            return errors.DeadlineExceeded("no final answer from inferd before the request's deadline")
        if not self.accepted and now >= self.answer_by:
            return errors.Unavailable(
                f"no answer to the request from inferd at {endpoint} within {self.answer_s:g} s: the broker "
                f"is down or restarting; it was not accepted (a CANCEL follows it in case it arrives later)")
        if self.ping_sent is not None:
            return errors.Unavailable(f"lost contact with inferd at {endpoint}")
        return None


class Client:
    """A blocking client. Not thread-safe: use one per thread."""

    def __init__(self, endpoint: str | None = None, *, runtime_dir: str | os.PathLike | None = None,
                 answer_timeout_s: float = 5.0, liveness_s: float = 10.0, curve_keys: curve.ClientKeys | None = None):
        self.endpoint = endpoint or default_endpoint(runtime_dir)
        _check_reachable(self.endpoint)
        self.answer_timeout_s = answer_timeout_s
        self.liveness_s = liveness_s
        self._ctx = zmq.Context.instance()
        self._sock = _open_socket(self._ctx, self.endpoint, curve_keys, answer_timeout_s)
        self._ids = itertools.count(1)
        self._inbox: dict[Any, collections.deque[tuple[bytes, dict]]] = {}
        self._limit: int | None = None  # the broker's max_message_bytes, asked for when first needed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close(CLOSE_LINGER_MS)

    def generate(self, deployment: str, prompt: str | list[dict[str, str]], *, priority: int | None = None,
                 deadline_ms: int | None = None, affinity: str | None = None, params: dict[str, Any] | None = None,
                 **kwargs: Any) -> "Stream":
        """Submit a request now and return its stream of :class:`Chunk`.

        ``prompt`` is a string, or a chat: a list of ``{"role", "content"}`` messages (sent as
        ``messages``). Once the stream ends, ``stream.usage`` holds the token counts DONE carried.

        Errors the broker answers at once (BACKPRESSURE, UNKNOWN_DEPLOYMENT,
        BAD_REQUEST) raise when the stream is first iterated, so that many
        requests can be submitted without waiting for each answer.

        Runtime params go as keywords (``max_tokens=8``) or as a dict (``params={"max_tokens": 8}``).
        """
        params = _merge_params(params, kwargs)
        cid = next(self._ids)
        chat = None if isinstance(prompt, str) else prompt
        frames = P.encode(P.CLIENT, P.SUBMIT, _submit_body(cid, deployment, None if chat else prompt, priority,
                                                             deadline_ms, affinity, params, chat))
        if len(frames[2]) > MIN_MESSAGE_LIMIT:
            _checked_size(frames[2], self._message_limit())
        self._inbox[cid] = collections.deque()
        try:
            self._send_frames(frames)
        except errors.Unavailable:
            self._inbox.pop(cid)
            raise
        return Stream(self, cid, _Tracker(deadline_ms, self.liveness_s, self.answer_timeout_s))

    def _message_limit(self) -> int:
        if self._limit is None:
            self._limit = self.ping().get("max_message_bytes", DEFAULT_MESSAGE_LIMIT)
        return self._limit

    def complete(self, deployment: str, prompt: str | list[dict[str, str]], **kwargs: Any) -> str:
        """Run a request to the end and return its whole text."""
        stream = self.generate(deployment, prompt, **kwargs)
        texts = [chunk.text for chunk in stream]
        return stream.join.join(texts)

    def ping(self) -> dict[str, Any]:
        """Round trip to the broker; returns its PONG body (epoch, version)."""
        cid = f"ping-{next(self._ids)}"
        self._inbox[cid] = collections.deque()
        try:
            self._send(P.PING, {"id": cid})
            deadline = time.monotonic() + self.answer_timeout_s
            while True:
                message = self._take(cid, deadline - time.monotonic())
                if message is None:
                    raise errors.Unavailable(f"no answer from inferd at {self.endpoint} "
                                             f"within {self.answer_timeout_s:g} s")
                if message[0] == P.PONG:
                    return message[1]
                if message[0] == P.ERROR:
                    raise _error(message[1])
        finally:
            self._inbox.pop(cid, None)

    # internals shared with Stream

    def _send(self, command: bytes, body: dict[str, Any]) -> None:
        self._send_frames(P.encode(P.CLIENT, command, body))

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            zmqio.send(self._sock, frames)
        except zmq.Again:
            raise _unreachable(self.endpoint, self.answer_timeout_s) from None

    def _send_cancel(self, cid: Any) -> None:
        """Best effort, never blocking: with no connection there is nothing to cancel on."""
        try:
            zmqio.send(self._sock, P.encode(P.CLIENT, P.CANCEL, {"id": cid}), zmqio.DONTWAIT)
        except zmq.Again:
            pass

    def _take(self, cid: Any, timeout_s: float) -> tuple[bytes, dict] | None:
        """The next message for ``cid``, buffering others' messages; None on timeout."""
        box = self._inbox[cid]
        deadline = None
        while not box:
            if self._drain():
                continue
            if deadline is None:
                deadline = time.monotonic() + max(0.0, timeout_s)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not zmqio.readable(self._sock, remaining):
                return None
        return box.popleft()

    def _drain(self) -> bool:
        """File every message waiting into the inboxes; False if there was none."""
        inbox = self._inbox
        sock = self._sock
        got = False
        while zmqio.pending(sock):
            got = True
            for command, body in _replies(zmqio.recv(sock, zmqio.DONTWAIT)):
                box = inbox.get(body.get("id"))
                if box is not None:
                    box.append((command, body))
        return got


class Stream:
    """The chunks of one request. Iterate it; close it (or leave the loop) to cancel."""

    def __init__(self, client: Client, cid: int, tracker: _Tracker):
        self.id = cid
        self.join = ""
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None   # from DONE: prompt_tokens, completion_tokens
        self._client = client
        self._tracker = tracker
        self._accepted = False
        self._epoch: int | None = None
        self._finished = False
        self._last: Chunk | None = None

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            try:
                self.close()
            except Exception:
                pass  # interpreter shutdown: the broker notices the gone client

    def __next__(self) -> Chunk:
        while not self._finished:
            command, body = self._next_message()
            if not self._accepted and "epoch" in body:  # the first reply of an accepted request
                self._accepted = self._tracker.accepted = True
                self._epoch = body["epoch"]
                self.join = body.get("join", "")
            if command == P.CHUNK:
                gap = _gap(self._last.index + 1 if self._last else 0, body)
                if gap:
                    self.close()
                    raise gap
                chunk = Chunk(body.get("text", ""), body["index"], body.get("finish_reason"))
                self._last = chunk
                return chunk
            elif command == P.DONE:
                self._end()
                gap = _gap(self._last.index + 1 if self._last else 0, body)
                if gap:
                    raise gap
                self.finish_reason = body.get("finish_reason")
                self.usage = body.get("usage")
                # The last chunk rides in DONE; a DONE without text closes the stream with an empty one.
                index = self._last.index + 1 if self._last else 0
                return Chunk(body.get("text", ""), index, self.finish_reason)
            elif command == P.ERROR:
                self._end()
                raise _error(body)
            elif command == P.PONG:
                problem = _pong_problem(body, self._epoch, self.id)
                if problem:
                    self.close()
                    raise problem
        raise StopIteration

    def _next_message(self) -> tuple[bytes, dict]:
        tracker = self._tracker
        while True:
            message = self._client._take(self.id, tracker.wait_s(time.monotonic()))
            now = time.monotonic()
            if message is not None:
                tracker.heard(now)
                return message
            error = tracker.timed_out(now, self._client.endpoint)
            if error is not None:
                self.close()
                raise error
            if not tracker.accepted:
                continue
            self._client._send(P.PING, {"id": self.id})
            tracker.ping_sent = now

    def _end(self) -> None:
        self._finished = True
        self._client._inbox.pop(self.id, None)

    def cancel(self) -> None:
        """Cancel the request; iterating further raises :class:`~inferd.errors.Cancelled`."""
        if not self._finished:
            self._client._send_cancel(self.id)

    def close(self) -> None:
        """Stop reading; cancels the request on the daemon if it has not ended."""
        if not self._finished:
            self._client._send_cancel(self.id)
            self._end()


class _Inbox:
    """What one request of an :class:`AsyncClient` has received and not yet read, and the future
    its reader waits on when there is nothing (at most one at a time: one per wait, not per message).

    ``received`` counts arrivals; :class:`_Timeouts` compares it with ``seen`` to tell the tracker
    that the broker was heard from, so that a reply costs no clock reading."""

    __slots__ = ("box", "waiter", "tracker", "received", "seen", "closed")

    def __init__(self, tracker: _Tracker) -> None:
        self.box: collections.deque[tuple[bytes, dict[str, Any]]] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.tracker = tracker
        self.received = 0
        self.seen = 0
        self.closed = False


class _Timeouts:
    """When each open request of an AsyncClient is next looked at: a heap of due times, so that the
    requests not due cost nothing (a sweep through every request, 20 times a second, measured 15 ms a
    sweep with 10,000 waiting). Replies are not pushed here: a request is looked at when its wait
    would end, and at least every quarter of its ``liveness_s``, when the replies counted since tell
    its tracker that the broker was heard from. Silence is so noticed between 1 and 1.25 times
    ``liveness_s`` after the last reply; the answer and the deadline are kept to the sweep's period."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Inbox]] = []
        self._order = itertools.count()  # ties: never compare two inboxes

    def watch(self, waiting: _Inbox, now: float) -> None:
        """Look at ``waiting`` again when its wait ends, or a quarter of its liveness from ``now``."""
        tracker = waiting.tracker
        due = now + min(tracker.wait_s(now), tracker.liveness_s / 4)
        heapq.heappush(self._heap, (due, next(self._order), waiting))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def expire(self, now: float) -> list[_Inbox]:
        """The open requests whose wait is over at ``now``; every request due is looked at again later."""
        over = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            waiting = heapq.heappop(heap)[2]
            if waiting.closed:
                continue
            if waiting.received != waiting.seen:
                waiting.seen = waiting.received
                waiting.tracker.heard(now)
            elif waiting.tracker.wait_s(now) <= 0:
                over.append(waiting)  # it pings or gives up; looked at again after a sweep's period
                heapq.heappush(heap, (now + SWEEP_S, next(self._order), waiting))
                continue
            self.watch(waiting, now)
        return over


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class AsyncClient:
    """An asyncio client. Use it from one event loop; many requests may run concurrently.

    ::

        async with AsyncClient() as client:
            async for chunk in client.generate("echo", "hello world"):
                ...

    Per request it costs one future at most per wait, and no task: the socket is a plain
    (not ``zmq.asyncio``) one, read through the loop's ``add_reader`` on its FD, each wake-up
    draining every message waiting into the requests' inboxes; sends are queued and flushed
    once per loop iteration, so that many concurrent requests (a gateway's) share one wake-up
    of ZeroMQ's I/O thread.
    """

    def __init__(self, endpoint: str | None = None, *, runtime_dir: str | os.PathLike | None = None,
                 answer_timeout_s: float = 5.0, liveness_s: float = 10.0, curve_keys: curve.ClientKeys | None = None):
        self.endpoint = endpoint or default_endpoint(runtime_dir)
        _check_reachable(self.endpoint)
        self.answer_timeout_s = answer_timeout_s
        self.liveness_s = liveness_s
        self._ctx = zmq.Context.instance()
        self._sock = _open_socket(self._ctx, self.endpoint, curve_keys, answer_timeout_s)
        self._limit: int | None = None
        self._ids = itertools.count(1)
        self._inbox: dict[Any, _Inbox] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: collections.deque[list[bytes]] = collections.deque()
        self._stuck_since: float | None = None   # when a send first found no connection to take it
        self._timeouts = _Timeouts()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._loop is not None and not self._sock.closed:
            self._loop.remove_reader(self._sock.FD)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper, self._sweep_at = None, math.inf
        if self._outbox and not self._sock.closed:
            self._flush()
        self._sock.close(CLOSE_LINGER_MS)

    def _ensure_reader(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.FD, self._drain)

    def _drain(self) -> None:
        """Deliver every message waiting. ZeroMQ's FD is edge-triggered: it signals that the
        socket's state changed, so the socket is read until it has nothing left."""
        sock = self._sock
        inbox = self._inbox
        while not sock.closed and zmqio.pending(sock):
            for reply in _replies(zmqio.recv(sock, zmqio.DONTWAIT)):
                waiting = inbox.get(reply[1].get("id"))
                if waiting is not None:
                    waiting.box.append(reply)
                    waiting.received += 1
                    if waiting.waiter is not None:
                        _wake(waiting.waiter)

    def _open_inbox(self, cid: Any, tracker: _Tracker) -> _Inbox:
        waiting = self._inbox[cid] = _Inbox(tracker)
        now = time.monotonic()
        self._timeouts.watch(waiting, now)
        self._arm(now, 0.0)
        return waiting

    def _close_inbox(self, cid: Any) -> None:
        waiting = self._inbox.pop(cid, None)
        if waiting is not None:
            waiting.closed = True

    def _arm(self, now: float, at_least_s: float) -> None:
        """Have :meth:`_sweep` run when the first request is due, ``at_least_s`` from now at the earliest."""
        due = self._timeouts.next_due()
        if due is None or self._sock.closed or due >= self._sweep_at:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_at = max(due, now + at_least_s)
        self._sweeper = self._loop.call_later(self._sweep_at - now, self._sweep)

    def _sweep(self) -> None:
        """Wake each request whose wait is over: it then pings or gives up."""
        self._sweeper, self._sweep_at = None, math.inf
        now = time.monotonic()
        for waiting in self._timeouts.expire(now):
            if waiting.waiter is not None:
                _wake(waiting.waiter)
        self._arm(now, SWEEP_S)

    async def _next(self, waiting: _Inbox) -> tuple[bytes, dict[str, Any]]:
        """The request's next reply; one already received is taken at once. TimeoutError if the sweep
        found its wait over first."""
        if not waiting.box:
            waiter = waiting.waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                waiting.waiter = None
            if not waiting.box:
                raise TimeoutError
        return waiting.box.popleft()

    def _send(self, command: bytes, body: dict[str, Any]) -> None:
        self._queue(P.encode(P.CLIENT, command, body))

    def _queue(self, frames: list[bytes]) -> None:
        self._outbox.append(frames)
        if len(self._outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        sock = self._sock
        while self._outbox and not sock.closed:
            try:
                zmqio.send(sock, self._outbox[0], zmqio.DONTWAIT)
            except zmq.Again:  # no connection yet (or a refused CURVE handshake), or a full pipe
                now = time.monotonic()
                self._stuck_since = self._stuck_since or now
                if now - self._stuck_since > self.answer_timeout_s:
                    self._outbox.clear()  # their requests time out unanswered and say why
                else:
                    self._loop.call_later(0.005, self._flush)
                return
            self._outbox.popleft()
        self._stuck_since = None
        # A send may take the FD's edge for messages that arrived meanwhile: read them now.
        self._drain()

    async def ping(self) -> dict[str, Any]:
        self._ensure_reader()
        cid = f"ping-{next(self._ids)}"
        waiting = self._open_inbox(cid, _Tracker(None, self.liveness_s, self.answer_timeout_s))
        try:
            self._send(P.PING, {"id": cid})
            command, body = await self._next(waiting)
        except TimeoutError:
            if self._stuck_since is not None:
                raise _unreachable(self.endpoint, self.answer_timeout_s) from None
            raise errors.Unavailable(f"no answer from inferd at {self.endpoint} "
                                     f"within {self.answer_timeout_s:g} s") from None
        finally:
            self._close_inbox(cid)
        if command == P.ERROR:
            raise _error(body)
        return body

    async def generate(self, deployment: str, prompt: str, *, priority: int | None = None,
                       deadline_ms: int | None = None, affinity: str | None = None,
                       params: dict[str, Any] | None = None, **kwargs: Any) -> AsyncIterator[Chunk]:
        """Submit a request and yield its chunks; leaving the loop early cancels it.
        Runtime params go as keywords or as ``params={...}``."""
        params = _merge_params(params, kwargs)
        index = 0
        # aclosing: leaving this loop early must close (and so cancel) the request now, not at collection.
        async with contextlib.aclosing(self.request(deployment, prompt, priority=priority, deadline_ms=deadline_ms,
                                                    affinity=affinity, params=params)) as replies:
            async for command, body in replies:
                if command == P.CHUNK:
                    yield Chunk(body["text"], index)
                    index += 1
                elif command == P.DONE:  # with the last chunk's text, or closing the stream with an empty one
                    yield Chunk(body.get("text", ""), index, body.get("finish_reason"))

    async def request(self, deployment: str, prompt: str | None = None, *, messages: list | None = None,
                      priority: int | None = None, deadline_ms: int | None = None, affinity: str | None = None,
                      params: dict[str, Any] | None = None) -> AsyncIterator[tuple[bytes, dict[str, Any]]]:
        """Submit a request and yield its replies as the broker sends them (protocol v2, as
        ``(command, body)``), up to its DONE: maybe an ACCEPTED, then CHUNKs, then DONE, which may carry
        the last chunk's ``text`` and ``index``. The first reply carries ``epoch`` and ``join``. An ERROR
        raises its typed exception, and so do chunks lost in a reset connection. Give exactly one of
        ``prompt`` and ``messages`` (a chat). Leave it early by closing it (``contextlib.aclosing``):
        that cancels the request."""
        params = params or {}
        self._ensure_reader()
        cid = next(self._ids)
        frames = P.encode(P.CLIENT, P.SUBMIT, _submit_body(cid, deployment, prompt, priority, deadline_ms,
                                                             affinity, params, messages))
        if len(frames[2]) > MIN_MESSAGE_LIMIT:
            if self._limit is None:
                self._limit = (await self.ping()).get("max_message_bytes", DEFAULT_MESSAGE_LIMIT)
            _checked_size(frames[2], self._limit)
        tracker = _Tracker(deadline_ms, self.liveness_s, self.answer_timeout_s)
        waiting = self._open_inbox(cid, tracker)
        finished = False
        epoch = None
        received = 0
        try:
            self._queue(frames)
            while True:
                try:
                    command, body = await self._next(waiting)
                except TimeoutError:
                    now = time.monotonic()
                    error = tracker.timed_out(now, self.endpoint)
                    if error is not None:
                        if not tracker.accepted and self._stuck_since is not None:
                            error = _unreachable(self.endpoint, self.answer_timeout_s)
                        raise error from None
                    if not tracker.accepted:
                        continue
                    self._send(P.PING, {"id": cid})
                    tracker.ping_sent = now
                    continue
                if not tracker.accepted and "epoch" in body:  # the first reply of an accepted request
                    tracker.accepted = True
                    epoch = body["epoch"]
                if command == P.CHUNK or command == P.DONE:
                    gap = _gap(received, body)
                    if gap:
                        raise gap
                    if command == P.DONE:
                        finished = True
                        yield command, body
                        return
                    received += 1
                    yield command, body
                elif command == P.ERROR:
                    finished = True
                    raise _error(body)
                elif command == P.PONG:
                    problem = _pong_problem(body, epoch, cid)
                    if problem:
                        raise problem
                else:  # ACCEPTED
                    yield command, body
        finally:
            self._close_inbox(cid)
            if not finished:
                try:
                    self._send(P.CANCEL, {"id": cid})
                except Exception:
                    pass  # the loop is closing: the broker notices the gone client

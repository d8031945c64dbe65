"""The engine thread's own connection to the broker: the worker's data path.

A request must not hop from the worker's main thread to the engine thread (a
queue and the GIL cost about 55 us of a one-word round trip), and a long model
step must not hold up heartbeats. So the worker has two DEALER sockets: the
main thread's (identity ``<worker id>``: READY, HEARTBEAT, REBUILD,
DISCONNECT) and this one, used by the engine thread only (identity
``<worker id>+engine``: REQUEST and CANCEL in, CHUNKS and ERROR out). When it
(re)connects it sends ATTACH with the main thread's registration
``generation``: the broker dispatches to a registered worker only once the
ATTACH of its current registration has arrived, so that no REQUEST can reach
a socket that is not there yet, or one that belongs to an older registration.

Wake-ups (the main thread's commands, a runner's ``wake`` from its own thread)
go through a pipe, which any thread may write and ZeroMQ's poller can watch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable

import zmq

from inferd import protocol as P, zmqio
from inferd.runtimes.base import Output, RunRequest
from inferd.worker.engine import ADMIT, CANCEL

log = logging.getLogger("inferd.worker")

RECONNECT_MS = 20
_FROM_BROKER = frozenset({P.REQUEST, P.CANCEL})


class EngineLink:
    def __init__(self, ctx: zmq.Context, worker_id: str, endpoint: str, max_bytes: int):
        self.ctx = ctx
        self.worker = worker_id
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.generation = 0          # the main thread's registration, set before it asks for a reset
        self.sock: zmq.Socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._polled: list[tuple[Any, int]] = [(self._wake_r, zmq.POLLIN)]  # for zmq_poll, no Poller object

    def open(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        sock = self.sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, (self.worker + P.ENGINE_SUFFIX).encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        # Outputs queue while the broker is busy rather than being dropped: what would bound them is
        # the broker's own heartbeat check, which gives up on a worker it cannot keep up with.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self.endpoint)
        self._polled = [(self._wake_r, zmq.POLLIN), (sock, zmq.POLLIN)]
        self._send(P.ATTACH, {"generation": self.generation})

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def poll(self, timeout: float | None) -> Iterable[tuple[str, Any]]:
        if timeout != 0:
            for ready, _ in zmq.zmq_poll(self._polled, zmqio.poll_ms(timeout)):
                if ready == self._wake_r:
                    os.read(self._wake_r, 4096)
        if self.sock is None:
            return ()
        commands = []
        while zmqio.pending(self.sock):
            frames = zmqio.recv(self.sock, zmqio.DONTWAIT)
            try:
                command, body = P.decode(P.WORKER, frames, _FROM_BROKER)
            except P.ProtocolError as exc:
                log.error("malformed message from the broker: %s", exc.reason)
                continue
            if command == P.CANCEL:
                commands.append((CANCEL, body.get("rid")))
                continue
            deadline_ms = body.get("deadline_ms")
            deadline = time.monotonic() + deadline_ms / 1000 if isinstance(deadline_ms, (int, float)) else None
            commands.append((ADMIT, RunRequest(body.get("rid"), body.get("prompt") or "", body.get("params") or {},
                                               messages=body.get("messages"), deadline=deadline)))
        return commands

    def emit(self, outputs: list[Output]) -> None:
        """One message for all of a step's chunks and successful ends (a batch of 32 would otherwise
        be 32 messages), then one per error: a request's chunks always reach the broker before its
        final. Past half the broker's message limit the entries go out in several messages (UTF-8
        is at most 4 bytes a character)."""
        chunks: list[list[Any]] = []
        errors: list[Output] = []
        size = 0
        for out in outputs:
            if out.error is not None:
                if out.text is not None:
                    chunks.append([out.rid, out.text])
                errors.append(out)
                continue
            if out.finish_reason is None and out.text is None:
                continue  # no chunk this step
            text = out.text or ""
            if chunks and size + 4 * len(text) > self.max_bytes // 2:
                self._send(P.CHUNKS, {"chunks": chunks})
                chunks, size = [], 0
            size += 4 * len(text) + 32
            if out.finish_reason is None:
                chunks.append([out.rid, text])
            elif out.usage:
                chunks.append([out.rid, out.text, out.finish_reason, out.usage])
            else:
                chunks.append([out.rid, out.text, out.finish_reason])
        if chunks:
            self._send(P.CHUNKS, {"chunks": chunks})
        for out in errors:
            self._send(P.ERROR, {"rid": out.rid, **P.error_body(None, out.error, out.message, out.details)})

    def _send(self, command: bytes, body: dict[str, Any]) -> None:
        body["worker"] = self.worker
        try:
            zmqio.send(self.sock, [P.WORKER, command, P.pack(body)], zmqio.DONTWAIT)
        except zmq.Again:
            pass  # no connection to the broker now: it fails these requests itself when it notices

"""The broker process: sockets and a poll loop around :class:`BrokerCore`.

Sockets (all bound under a private umask in the runtime dir):

* frontend, ROUTER: clients. ROUTER_MANDATORY turns "that client is gone"
  into an error we can act on (cancel its work) instead of a silent drop.
* backend, ROUTER: workers, identified by their worker id. ROUTER_HANDOVER
  lets a restarted worker take its identity over at once.
* control, ROUTER: inferctl.
* a DEALER connected to the supervisor's link socket.

MAXMSGSIZE bounds every inbound message, so a peer cannot make the broker
allocate without limit; ZeroMQ disconnects such a peer before the bytes reach
us. Everything that does reach us is answered or logged, never raised.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import zmq

from inferd import curve, protocol as P, zmqio
from inferd.broker.core import BrokerCore
from inferd.broker.delivery import FULL, GONE, SENT
from inferd.config import Config
from inferd.errors import ErrorCode
from inferd.paths import Endpoints, private_umask
from inferd.proc import child_signals, child_spec, die_with_parent, setup_logging
from inferd.ratelog import RateLimitedLog

log = logging.getLogger("inferd.broker")

# Messages read from one socket before looking at the others again: amortizes
# the poll call under load without starving any socket.
BURST = 256


# Operator commands the supervisor carries out, and the fields each takes.
OPERATOR_FIELDS = {
    P.RELOAD: {"config": (str, False)},
    P.SCALE: {"deployment": (str, True), "replicas": (int, True)},
    P.DRAIN_WORKERS: {"target": (str, True), "then": (str, False)},
}


class ZmqTransport:
    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket, link: zmq.Socket):
        self.frontend = frontend
        self.backend = backend
        self.link = link

    def to_client(self, client: bytes, replies: list[tuple[bytes, dict[str, Any]]]) -> int:
        """One message with every reply in ``replies``: SENT, or FULL (its queue is at
        client_send_hwm) or GONE (no such connection): see ``delivery``."""
        frames = P.encode_replies(P.CLIENT, replies)
        frames.insert(0, client)
        try:
            zmqio.send(self.frontend, frames, zmqio.DONTWAIT)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EAGAIN:
                return FULL
            if exc.errno == errno.EHOSTUNREACH:
                return GONE
            raise
        return SENT

    def to_worker(self, worker: str, command: bytes, body: dict[str, Any]) -> None:
        """To the worker's main thread, or for REQUEST and CANCEL to its engine's socket."""
        identity = worker + P.ENGINE_SUFFIX if command in P.ENGINE_COMMANDS else worker
        try:
            zmqio.send(self.backend, [identity.encode(), P.WORKER, command, P.pack(body)], zmqio.DONTWAIT)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            # The worker's connection is gone; the supervisor or the heartbeat check will say so.

    def to_supervisor(self, command: bytes, body: dict[str, Any]) -> None:
        try:
            self.link.send_multipart(P.encode(P.SUPERVISOR, command, body), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("supervisor link is full; dropped %s", command.decode())


class Broker:
    def __init__(self, config: Config, endpoints: Endpoints):
        self.ctx = zmq.Context()
        max_bytes = config.broker.max_message_bytes
        self.frontend = self._socket(zmq.ROUTER, max_bytes, router_mandatory=1,
                                     sndhwm=config.broker.client_send_hwm)
        self.backend = self._socket(zmq.ROUTER, max_bytes, router_mandatory=1, router_handover=1)
        self.control = self._socket(zmq.ROUTER, max_bytes)
        self.link = self._socket(zmq.DEALER, max_bytes)
        self.auth = None
        if config.broker.curve_secret_key:
            self.auth = curve.serve(self.ctx, self.frontend, config.broker.curve_secret_key,
                                    config.broker.curve_allowed_clients)
        with private_umask():
            self.frontend.bind(endpoints.frontend)
            self.backend.bind(endpoints.backend)
            self.control.bind(endpoints.control)
        self.link.connect(endpoints.supervisor)
        self.transport = ZmqTransport(self.frontend, self.backend, self.link)
        self.core = BrokerCore(config, self.transport)
        self._pending_control: dict[int, tuple[bytes, Any]] = {}  # RESTART token -> (inferctl peer, its id)
        self._control_token = 0
        self.stopping = False
        self._bug_log = RateLimitedLog(log)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _socket(self, kind: int, max_bytes: int, **options: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name.upper()), value)
        return sock

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def run(self) -> None:
        child_signals(self._on_term, self._wake_w)
        self.transport.to_supervisor(P.HELLO, {"pid": os.getpid(), "epoch": self.core.epoch})
        poller = zmq.Poller()
        for sock in (self.frontend, self.backend, self.control, self.link):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        handlers = {
            self.frontend: self._from_client,
            self.backend: self._from_worker,
            self.control: self._from_control,
            self.link: self._from_supervisor,
        }
        log.info("broker ready (epoch %x)", self.core.epoch)
        while not self.stopping:
            self.core.flush()  # what the last burst produced, one message per client
            events = poller.poll(zmqio.poll_ms(self.core.next_timeout()))
            for sock, _ in events:
                if sock == self._wake_r:
                    os.read(self._wake_r, 512)
                    continue
                handler = handlers[sock]
                for _ in range(BURST):
                    if not zmqio.pending(sock):  # (cheaper than the zmq.Again of a failing receive)
                        break
                    try:
                        frames = zmqio.recv(sock, zmqio.DONTWAIT)
                    except zmq.Again:
                        break
                    self._handle(handler, frames)
            self.core.tick()
        log.info("broker stopping: failing what is outstanding")
        self.core.shutdown()
        self.core.flush()
        self.close()

    def _handle(self, handler: Callable[[list[bytes]], None], frames: list[bytes]) -> None:
        """Run one message's handler. Every peer's input is validated before use; this is the last
        line of defence: a bug that one message triggers must not cost every request in flight."""
        try:
            handler(frames)
        except Exception:
            self._bug_log.error("BUG: handling a message raised; the message is dropped", exc_info=True)

    def _from_client(self, frames: list[bytes]) -> None:
        if len(frames) == 4 and frames[1] == P.CLIENT_V1:
            return self._refuse_v1(frames[0], frames[3])
        self.core.on_client(frames[0], frames[1:])

    def _refuse_v1(self, client: bytes, data: bytes) -> None:
        """A protocol v1 client gets its answer in v1's own framing, so that it can read it: an ERROR
        BAD_REQUEST saying that the broker speaks v2, as the final reply of its request (never
        accepted) when its id can be read."""
        try:
            cid = P.unpack(data).get("id")
        except P.ProtocolError:
            cid = None
        body = P.error_body(cid if P.valid_request_id(cid) else None, ErrorCode.BAD_REQUEST, P.V1_REFUSAL)
        try:
            zmqio.send(self.frontend, [client, P.CLIENT_V1, P.ERROR, P.pack(body)], zmqio.DONTWAIT)
        except zmq.ZMQError:
            pass  # gone or full: it learns nothing more by waiting for this

    def _from_worker(self, frames: list[bytes]) -> None:
        self.core.on_worker(frames[0], frames[1:])

    def _from_supervisor(self, frames: list[bytes]) -> None:
        self.core.on_supervisor(frames)
        while self.core.control_replies:  # the supervisor's answers to RESTART
            answer = self.core.control_replies.pop(0)
            peer, cid = self._pending_control.pop(answer.get("token"), (None, None))
            if peer is None:
                continue
            if answer.get("ok"):
                result = {"message": answer.get("message", ""), **(answer.get("result") or {})}
                self._control_reply(peer, P.OK, {"id": cid, "result": result})
            else:
                self._control_reply(peer, P.ERROR, P.error_body(cid, ErrorCode.BAD_REQUEST,
                                                                 str(answer.get("message", "")),
                                                                 answer.get("details")))

    def _from_control(self, frames: list[bytes]) -> None:
        peer, rest = frames[0], frames[1:]
        try:
            command, body = P.decode(P.CONTROL, rest, P.CONTROL_COMMANDS)
            if command == P.RESTART:
                P.check_fields(body, {"id": ((int, str), False), "worker": (str, True)}, "RESTART")
                self._control_token += 1
                self._pending_control[self._control_token] = (peer, body.get("id"))
                self.core.restart_worker(body["worker"], self._control_token)
                return  # answered when the supervisor has acted
            if command in OPERATOR_FIELDS:  # reload, scale, drain: the supervisor acts and answers
                P.check_fields(body, {"id": ((int, str), False), **OPERATOR_FIELDS[command]}, command.decode())
                self._control_token += 1
                self._pending_control[self._control_token] = (peer, body.get("id"))
                self.transport.to_supervisor(P.OPERATOR, {
                    **{k: v for k, v in body.items() if k != "id"}, "command": command.decode(),
                    "token": self._control_token})
                return
            if command == P.REBUILD:
                P.check_fields(body, {"id": ((int, str), False), "deployment": (str, True)}, "REBUILD")
                if body["deployment"] not in self.core.deployments:
                    self._control_reply(peer, P.ERROR, P.error_body(
                        body.get("id"), ErrorCode.UNKNOWN_DEPLOYMENT, f"no deployment {body['deployment']!r}"))
                    return
                result = {"workers": self.core.rebuild(body["deployment"])}
            else:
                result = self.core.status() if command == P.STATUS else self.core.metrics()
            self._control_reply(peer, P.OK, {"id": body.get("id"), "result": result})
        except P.ProtocolError as exc:
            self._control_reply(peer, P.ERROR, P.error_body(exc.request_id, ErrorCode.BAD_REQUEST, exc.reason))

    def _control_reply(self, peer: bytes, command: bytes, body: dict[str, Any]) -> None:
        try:
            zmqio.send(self.control, [peer, *P.encode(P.CONTROL, command, body)], zmqio.DONTWAIT)
        except zmq.Again:
            pass  # inferctl gave up waiting; it will say so itself

    def close(self) -> None:
        for sock in (self.frontend, self.backend, self.control, self.link):
            sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def main() -> None:
    spec = child_spec()
    config = Config.from_dict(spec["config"])
    setup_logging("broker", config.daemon.log_level)
    die_with_parent()
    broker = Broker(config, Endpoints.for_dir(Path(spec["runtime_dir"]), spec.get("frontend")))
    try:
        broker.run()
    except Exception:
        log.exception("broker crashed")
        sys.exit(1)

"""The broker's logic: admission, queueing, dispatch by credits, streaming, failure.

:class:`BrokerCore` owns every request from SUBMIT to its one final reply. It
holds no sockets: the process loop (``inferd.broker.process``) decodes frames,
calls a handler here, and the core answers through a :class:`Transport`. That
split keeps this module testable with a recording transport and a fake clock,
and keeps the loop a thin shell (vLLM's engine core / core client split).

The invariant this module exists to keep: every accepted request gets exactly
one final reply (DONE or ERROR), whatever dies. All finals go through
:meth:`BrokerCore._finish`, which refuses to send a second one.

Messages are the hot path's cost, so the core sends as few as the protocol
allows (docs/protocol.md, v2): a request's ACCEPTED goes out only if nothing
else has answered it within ``broker.accept_delay_ms`` (otherwise its first
reply carries ``epoch`` and ``join``). The default, 20 ms, is long enough
that a short request's first reply comes first, and short enough that a
client waiting on a long queue learns at once that it was accepted. And the
replies bound for one client are collected until :meth:`BrokerCore.flush`,
which the process loop calls once per poll burst, and leave as one message.
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from inferd import __version__, exitcodes, failures, protocol as P, runtimes
from inferd.broker import reconfigure
from inferd.config import Config, DeploymentConfig
from inferd.errors import ErrorCode
from inferd.broker.delivery import FULL, GONE, SENT, HeldClient
from inferd.metrics import DeploymentMetrics
from inferd.ratelog import RateLimitedLog
from inferd.queue import BoundedPriorityQueue, Entry, QueueFull
from inferd.routing import POLICIES, RoutingPolicy, Sticky

log = logging.getLogger("inferd.broker")

# A request may be dispatched this many times: once, plus once more if its
# first worker died before streaming anything.
MAX_DISPATCHES = 2
# The most replies coalesced into one message to a client: a burst's worth at 64 in flight. It keeps
# ZeroMQ's per-connection queue (client_send_hwm messages) a bound on replies, and a slow reader
# detectable, as in protocol v1.
MAX_COALESCED = 64


class Transport(Protocol):
    def to_client(self, client: bytes, replies: list[tuple[bytes, dict[str, Any]]]) -> int:
        """Send ``replies`` to ``client`` as one message: SENT, FULL or GONE (``delivery``)."""

    def to_worker(self, worker: str, command: bytes, body: dict[str, Any]) -> None: ...

    def to_supervisor(self, command: bytes, body: dict[str, Any]) -> None: ...


@dataclass(eq=False, slots=True)
class Request:
    rid: int
    client: bytes
    cid: Any                      # the client's own request id
    deployment: "Deployment"
    prompt: str
    params: dict[str, Any]
    priority: int
    affinity: str | None
    arrived: float
    deadline: float
    messages: list | None = None  # a chat instead of a prompt (the runtime's spec says chat)
    entry: Entry | None = None    # set while queued
    worker: "WorkerRecord | None" = None
    dispatched_at: float = 0.0
    first_chunk_at: float = 0.0
    last_chunk_at: float = 0.0
    chunks: int = 0
    dispatches: int = 0
    announced: bool = False       # the client knows it was accepted (an ACCEPTED, or epoch and join in a reply)
    done: bool = False            # the client has had its final reply


@dataclass(eq=False, slots=True)
class WorkerRecord:
    id: str
    deployment: "Deployment"
    pid: int
    device: str
    credits: int
    state: str
    last_seen: float
    requests: dict[int, Request] = field(default_factory=dict)   # dispatched, not yet final from the worker
    dispatch_seq: int = 0
    last_progress: float = 0.0    # its last output, or when it last went from idle to busy
    resumes: int = 0              # out-of-memory steps it survived
    rebuilds: int = 0             # model sessions rebuilt (inferctl rebuild)
    failure: str | None = None    # what it reported in band before going down
    runner: dict[str, Any] = field(default_factory=dict)  # the runtime's own load report
    draining: bool = False        # no new work: a reload, scale-down or `inferctl drain` retires it
    generation: int = 0           # its registration (READY); its engine's ATTACH must name the same
    attached: bool = False        # its engine's socket is up for this registration: REQUESTs can reach it
    # Kept as plain attributes, not properties: a routing policy reads them for every worker
    # of the pool on every dispatch. recount() after any change to requests, credits or state.
    outstanding: int = 0
    free: int = 0

    def recount(self) -> None:
        self.outstanding = len(self.requests)
        self.free = max(0, self.credits - self.outstanding) if self.serving else 0

    @property
    def serving(self) -> bool:
        """Ready, its engine attached, and not being drained: a routing policy may give it work."""
        return self.state == "ready" and self.attached and not self.draining

    def hold(self, req: Request) -> None:
        self.requests[req.rid] = req
        self.recount()

    def release(self, rid: int) -> None:
        del self.requests[rid]
        self.recount()


class Deployment:
    def __init__(self, config: DeploymentConfig, router: RoutingPolicy):
        self.config = config
        self.name = config.name
        self.spec = runtimes.SPECS[config.runtime]
        self.queue: BoundedPriorityQueue[Request] = BoundedPriorityQueue(
            config.queue_capacity, config.priority_levels)
        self.workers: dict[str, WorkerRecord] = {}
        # The ready workers, sorted by id: what a routing policy chooses among. Rebuilt only
        # when a worker joins, leaves or changes state, not on every dispatch.
        self.pool: list[WorkerRecord] = []
        self.router = router
        self.metrics = DeploymentMetrics()
        # Smoothed dispatch-to-final time, for the BACKPRESSURE retry hint.
        self.service_ms = 100.0
        # False once the supervisor reports every worker of this deployment failed (not
        # restarting): its requests then get UNAVAILABLE at once instead of waiting.
        self.available = True

    def ready_workers(self) -> int:
        return sum(1 for w in self.workers.values() if w.serving)


def make_router(dep: DeploymentConfig) -> RoutingPolicy:
    if dep.routing == Sticky.name:
        return Sticky(epsilon=dep.sticky_epsilon)
    return POLICIES[dep.routing]()


class BrokerCore:
    def __init__(self, config: Config, transport: Transport, *, clock: Callable[[], float] = time.monotonic,
                 pid: int | None = None):
        self.config = config
        self.transport = transport
        self.clock = clock
        self.pid = pid or os.getpid()
        self.epoch = int.from_bytes(os.urandom(6), "big")
        self.started = time.time()
        self.deployments = {d.name: Deployment(d, make_router(d)) for d in config.deployments}
        self.workers: dict[str, WorkerRecord] = {}
        self.requests: dict[int, Request] = {}
        self.by_client: dict[tuple[bytes, Any], Request] = {}
        self._deadlines: list[tuple[float, int]] = []
        # Request ids start at a random base for each broker process: a worker still winding down
        # the requests of a broker that died must never answer for a new broker's request.
        self._next_rid = (self.epoch & 0xFFFFFFFF) << 20
        self._dispatch_seq = 0
        self._hb_interval = config.broker.heartbeat_interval_ms / 1000
        self._hb_expiry = self._hb_interval * config.broker.heartbeat_liveness
        self._next_heartbeat = clock() + self._hb_interval
        self._load_interval = config.devices.poll_interval_ms / 1000
        self._next_load = clock() + self._load_interval
        self.supervisor_view: dict[str, Any] = {}
        self.draining = False
        self._drain_deadline = math.inf
        self._drained_sent = False
        self._drain_failed = 0         # requests failed because the drain's grace ran out
        self._readiness: tuple[dict[str, int], list[str]] = ({}, [])
        # The supervisor's answers to operator commands, for the process loop to relay.
        self.control_replies: list[dict[str, Any]] = []
        # Worker id -> pid of a process reported unresponsive, which may not register again.
        self._condemned: dict[str, int] = {}
        self._last_failure: dict[str, str] = {}  # worker id -> what it reported before going down
        # Client connections that cannot take replies now, with what they are owed (``delivery``).
        self.held: dict[bytes, HeldClient] = {}
        self._to_cut: list[bytes] = []
        # Replies collected for each client since the last flush(): (command, body, owed).
        self._outgoing: dict[bytes, list[tuple[bytes, dict[str, Any], bool]]] = {}
        # Accepted requests in arrival order, with when an ACCEPTED of their own is due.
        self._unannounced: collections.deque[tuple[float, Request]] = collections.deque()
        self._accept_delay_s = config.broker.accept_delay_ms / 1000
        self._hold_s = config.broker.client_hold_s
        self._peer_log = RateLimitedLog(log, clock=clock)
        # Reload, scale and drain (inferd.broker.reconfigure): deployments removed by a reload,
        # draining until their deadline, and workers draining for the supervisor.
        self.retiring: dict[str, tuple[Deployment, float]] = {}
        self.draining_workers: dict[str, float] = {}   # worker id -> deadline
        # Worker id -> the generation of its engine's last ATTACH, which may arrive before its READY.
        self._attached: dict[str, int] = {}

    # --- clients ---------------------------------------------------------------------------

    def on_client(self, client: bytes, frames: list[bytes]) -> None:
        if client in self.held:
            self._flush(client, self.clock())  # it is connected, and perhaps reading again
        try:
            command, body = P.decode(P.CLIENT, frames, P.CLIENT_COMMANDS)
            if command == P.SUBMIT:
                P.check_fields(body, P.SUBMIT_FIELDS, "SUBMIT")
                self._submit(client, body)
            elif command == P.CANCEL:
                P.check_fields(body, P.CANCEL_FIELDS, "CANCEL")
                self._cancel_by_client(client, body["id"])
            else:
                P.check_fields(body, P.PING_FIELDS, "PING")
                self._to_client(client, P.PONG, {
                    "id": body.get("id"), "epoch": self.epoch, "version": __version__,
                    "max_message_bytes": self.config.broker.max_message_bytes,
                    "in_flight": [cid for (c, cid) in self.by_client if c == client]})
        except P.ProtocolError as exc:
            self._reject(client, exc.request_id, ErrorCode.BAD_REQUEST, exc.reason)

    def _reject(self, client: bytes, cid: Any, code: ErrorCode, message: str,
                details: dict[str, Any] | None = None) -> None:
        """An ERROR for a message that was not accepted.

        If its id belongs to a request still in flight (a duplicate SUBMIT, a
        malformed CANCEL), the error must not carry that id: the client would
        take it for that request's final reply. It goes out with a nil id and
        the id in ``details.id`` instead.
        """
        if not P.valid_request_id(cid):
            cid = None
        elif (client, cid) in self.by_client:
            details = {**(details or {}), "id": cid}
            cid = None
        self._to_client(client, P.ERROR, P.error_body(cid, code, message, details))

    def _submit(self, client: bytes, body: dict[str, Any]) -> None:
        cid = body["id"]
        if not P.valid_request_id(cid):
            raise P.ProtocolError("SUBMIT: id must be a non-empty string of at most 128 bytes or a 64-bit integer")
        if (client, cid) in self.by_client:
            raise P.ProtocolError(f"SUBMIT: request id {cid!r} is already in flight on this connection", cid)
        if self.draining:
            return self._reject(client, cid, ErrorCode.SHUTTING_DOWN, "inferd is shutting down")
        held = self.held.get(client)
        if held is not None and held.cut:
            code = ErrorCode.SLOW_READER if held.reason == FULL else ErrorCode.CONNECTION_RESET
            return self._reject(client, cid, code, "this connection must first read the "
                                f"{len(held.replies)} final replies it is owed")
        dep = self.deployments.get(body["deployment"])
        if dep is None:
            removed = " (removed by a reload)" if body["deployment"] in self.retiring else ""
            return self._reject(client, cid, ErrorCode.UNKNOWN_DEPLOYMENT,
                                f"no deployment named {body['deployment']!r}{removed}; deployments: "
                                f"{', '.join(sorted(self.deployments)) or 'none'}",
                                {"deployments": sorted(self.deployments)})
        cfg = dep.config
        if not dep.available:
            dep.metrics.final(ErrorCode.UNAVAILABLE.value)
            return self._reject(client, cid, ErrorCode.UNAVAILABLE,
                                f"deployment {dep.name!r} has no worker left: all failed and stopped",
                                {"hint": "inferctl restart WORKER"})
        priority = body.get("priority")
        if priority is None:
            priority = cfg.default_priority
        elif not 0 <= priority < cfg.priority_levels:
            raise P.ProtocolError(f"SUBMIT: priority must be between 0 (most urgent) and "
                                  f"{cfg.priority_levels - 1} for deployment {dep.name!r}", cid)
        deadline_ms = body.get("deadline_ms")
        if deadline_ms is not None and deadline_ms <= 0:
            raise P.ProtocolError("SUBMIT: deadline_ms must be > 0", cid)
        # A request may shorten the deployment's deadline, never extend it (Triton's rule).
        deadline_ms = min(deadline_ms or cfg.default_deadline_ms, cfg.default_deadline_ms)
        params = body.get("params") or {}
        problem = runtimes.validate_params(cfg.runtime, params, cfg.options)
        if problem:
            raise P.ProtocolError(f"SUBMIT: params.{problem}", cid)
        messages = body.get("messages")
        if (messages is None) == (body.get("prompt") is None):
            raise P.ProtocolError("SUBMIT: exactly one of 'prompt' and 'messages' is required", cid)
        if messages is not None:
            if not dep.spec.chat:
                raise P.ProtocolError(f"SUBMIT: runtime {cfg.runtime!r} of deployment {dep.name!r} takes a "
                                      f"prompt, not messages", cid)
            problem = P.message_problem(messages)
            if problem:
                raise P.ProtocolError(f"SUBMIT: messages{problem if problem[0] == '[' else ' ' + problem}", cid)

        now = self.clock()
        req = Request(self._next_rid, client, cid, dep, body.get("prompt") or "", params, priority,
                      body.get("affinity"), now, now + deadline_ms / 1000, messages)
        try:
            req.entry, evicted = dep.queue.push(req, priority)
        except QueueFull:
            dep.metrics.rejected_backpressure += 1
            dep.metrics.final(ErrorCode.BACKPRESSURE.value)
            return self._reject(client, cid, ErrorCode.BACKPRESSURE,
                                f"deployment {dep.name!r} queue is full ({cfg.queue_capacity} queued)",
                                {"retry_after_ms": self._retry_hint(dep, priority)})
        self._next_rid += 1
        self.requests[req.rid] = req
        self.by_client[(client, cid)] = req
        self._track_deadline(req)
        if evicted is not None:
            victim = evicted.item
            victim.entry = None
            self._finish(victim, P.ERROR, P.error_body(
                victim.cid, ErrorCode.BACKPRESSURE,
                f"evicted from the full queue of {dep.name!r} by a more urgent request",
                {"retry_after_ms": self._retry_hint(dep, victim.priority)}), "rejected_backpressure")
        if self._accept_delay_s:
            self._unannounced.append((now + self._accept_delay_s, req))
        else:
            self._to_client(client, P.ACCEPTED, self._announce(req, {"id": cid}), owed=True)
        self._dispatch(dep)

    def _announce(self, req: Request, body: dict[str, Any]) -> dict[str, Any]:
        """The first reply to an accepted request carries its acceptance: ``epoch`` and ``join``."""
        if not req.announced:
            req.announced = True
            body["epoch"] = self.epoch
            body["join"] = req.deployment.spec.chunk_joiner
        return body

    def _announce_due(self, now: float) -> None:
        """An ACCEPTED for each request that nothing else has answered within accept_delay_ms."""
        pending = self._unannounced
        while pending and pending[0][0] <= now:
            req = pending.popleft()[1]
            if not req.announced and not req.done:
                self._to_client(req.client, P.ACCEPTED, self._announce(req, {"id": req.cid}), owed=True)

    def _track_deadline(self, req: Request) -> None:
        """Add the request to the deadline heap, keeping the heap bounded.

        Finished requests leave their entries behind (removing from the middle
        of a heap is O(n)); without a rebuild the heap would hold every
        request of the last ``default_deadline_ms``, growing with throughput.
        """
        heapq.heappush(self._deadlines, (req.deadline, req.rid))
        if len(self._deadlines) > 2 * len(self.requests) + 1024:
            self._deadlines = [(r.deadline, r.rid) for r in self.requests.values() if not r.done]
            heapq.heapify(self._deadlines)

    def _retry_hint(self, dep: Deployment, priority: int) -> int:
        """Roughly how long until the queue ahead of ``priority`` drains."""
        capacity = sum(w.credits for w in dep.workers.values()) or 1
        estimate = dep.queue.ahead_of(priority) * dep.service_ms / capacity
        return int(min(30_000, max(10, estimate)))

    def _cancel_by_client(self, client: bytes, cid: Any) -> None:
        # Cancelling something that already ended is a no-op: answering it
        # would give that request a second final reply.
        req = self.by_client.get((client, cid))
        if req is not None:
            self._finish(req, P.ERROR, P.error_body(cid, ErrorCode.CANCELLED, "cancelled by the client"),
                         "cancelled")

    # --- delivery to clients -----------------------------------------------------------------

    def _to_client(self, client: bytes, command: bytes, body: dict[str, Any], owed: bool = False) -> None:
        """Queue a reply for the client's next message (:meth:`flush`), or hold it if its connection
        cannot take replies now (``delivery``).

        ``owed`` marks what an accepted request is promised: its ACCEPTED and its final.
        """
        held = self.held.get(client)
        if held is None:
            replies = self._outgoing.get(client)
            if replies is None:
                self._outgoing[client] = [(command, body, owed)]
            else:
                replies.append((command, body, owed))
                if len(replies) >= MAX_COALESCED:
                    del self._outgoing[client]
                    self._send(client, replies)
        else:
            self._keep(client, held, command, body, owed)

    def _keep(self, client: bytes, held: HeldClient, command: bytes, body: dict[str, Any], owed: bool) -> None:
        if held.keep(command, body, owed):
            self._to_cut.append(client)
            self._peer_log.warning("client %s reads too slowly: ending its requests and holding their finals",
                                   client.hex()[:32])

    def flush(self) -> None:
        """Send each client the replies collected for it, as one message; hold those that cannot go."""
        if not self._outgoing:
            return
        outgoing, self._outgoing = self._outgoing, {}
        for client, replies in outgoing.items():
            self._send(client, replies)

    def _send(self, client: bytes, replies: list[tuple[bytes, dict[str, Any], bool]]) -> None:
        status = self.transport.to_client(client, [(command, body) for command, body, _ in replies])
        if status:
            held = HeldClient(status, self.config.broker.client_send_hwm, self._cut_error)
            held.set_reason(status, self.clock(), self._hold_s)
            self.held[client] = held
            for command, body, owed in replies:
                self._keep(client, held, command, body, owed)
            if status == GONE and not held.cut:
                self._cut_now(client, held)

    def _cut_now(self, client: bytes, held: HeldClient) -> None:
        held.start_cut()
        self._to_cut.append(client)
        self._peer_log.warning("client %s is unreachable: ending its requests and holding their finals",
                               client.hex()[:32])

    def _cut_error(self, cid: Any, reason: int) -> dict[str, Any]:
        if reason == FULL:
            return P.error_body(cid, ErrorCode.SLOW_READER,
                                f"this connection read too slowly: {2 * self.config.broker.client_send_hwm} replies "
                                f"waited for it, so its requests were stopped")
        return P.error_body(cid, ErrorCode.CONNECTION_RESET,
                            "this connection was reset while the request was in flight (a message over "
                            "max_message_bytes does that); output was lost")

    def _cut(self) -> None:
        """End every request of the connections cut since the last call, one final each."""
        while self._to_cut:
            client = self._to_cut.pop()
            held = self.held.get(client)
            if held is None:
                continue
            for req in [r for (c, _), r in self.by_client.items() if c == client and not r.done]:
                self._finish(req, P.ERROR, self._cut_error(req.cid, held.reason), "cancelled")

    def _flush(self, client: bytes, now: float) -> None:
        """Write what a held connection is owed, in order, as far as it will take it."""
        held = self.held[client]
        status = SENT
        while held.replies:
            command, body, _ = held.replies[0]
            status = self.transport.to_client(client, [(command, body)]) or SENT
            if status:
                break
            held.sent_first()
        if not held.replies:
            del self.held[client]
            if held.cut:
                log.info("client %s took the replies it was owed (%d chunk(s) were dropped)",
                         client.hex()[:32], held.dropped_chunks)
        elif status == GONE and now >= held.expires:
            del self.held[client]
            self._peer_log.warning("client %s did not come back within %g s; %d owed repl(ies) dropped",
                                   client.hex()[:32], self._hold_s, len(held.replies))
        else:
            if status == GONE and not held.cut:  # what was sent to it meanwhile is lost
                self._cut_now(client, held)
            held.set_reason(status, now, self._hold_s)

    # --- workers ---------------------------------------------------------------------------

    def on_worker(self, identity: bytes, frames: list[bytes]) -> None:
        # A worker has two sockets: its main thread's (identity: the worker id) and its engine's.
        wid = identity.decode(errors="replace").removesuffix(P.ENGINE_SUFFIX)
        try:
            command, body = P.decode(P.WORKER, frames, P.WORKER_COMMANDS)
        except P.ProtocolError as exc:
            self._peer_log.warning("worker %s sent a malformed message: %s", wid[:64], exc.reason)
            return
        if body.get("worker") != wid:
            self._peer_log.warning("worker %s sent a message claiming to be %s; ignored", wid[:64],
                                   P.short(body.get("worker")))
            return
        worker = self.workers.get(wid)
        try:
            P.check_worker_message(command, body)
        except P.ProtocolError as exc:
            self._peer_log.warning("worker %s sent a malformed %s: %s", wid[:64], command.decode(), exc.reason)
            if worker is not None and command == P.ERROR:
                # A final we cannot read is still a final: its request must not wait for a
                # watchdog that may never fire.
                worker.last_seen = self.clock()
                self._malformed_output(worker, body.get("rid"), f"{command.decode()}: {exc.reason}", final=True)
            return
        if command == P.READY:
            return self._register(wid, body)
        if command == P.ATTACH:
            return self._attach(wid, worker, body["generation"])
        if worker is None:
            # A worker we do not know (we restarted, or it was declared dead): make it re-register.
            self.transport.to_worker(wid, P.DISCONNECT, {"reason": "not registered"})
            return
        worker.last_seen = self.clock()
        if command == P.HEARTBEAT:
            self._update_load(worker, body)
            return
        if command == P.CHUNKS:
            if self._chunks(worker, body["chunks"]):
                self._dispatch(worker.deployment)
            return
        req = worker.requests.get(body["rid"])
        if req is None:
            return  # a late message for a request already given up on
        worker.last_progress = worker.last_seen
        worker.release(req.rid)
        req.worker = None
        self._worker_final(req, body)
        self._dispatch(worker.deployment)

    def _malformed_output(self, worker: WorkerRecord, rid: Any, why: str, *, final: bool) -> None:
        """The worker sent something unreadable about ``rid``: that request ends with INTERNAL.

        After a malformed final the worker holds no slot for it any more; after a
        malformed chunk it still does, so the request keeps its slot until the
        worker answers the CANCEL that :meth:`_retire` sends.
        """
        req = worker.requests.get(rid) if type(rid) is int else None
        if req is None:
            return
        if final:
            worker.release(req.rid)
            req.worker = None
        if req.done:
            self._retire(req, None)
        else:
            self._finish(req, P.ERROR, P.error_body(
                req.cid, ErrorCode.INTERNAL, f"worker {worker.id} sent a malformed reply ({why})"), "failed")
        self._dispatch(worker.deployment)

    def _register(self, wid: str, body: dict[str, Any]) -> None:
        if self._condemned.get(wid) == body.get("pid"):
            return  # reported unresponsive; the supervisor is killing it
        self._condemned.pop(wid, None)
        self._last_failure.pop(wid, None)
        dep = self.deployments.get(body["deployment"])
        if dep is None and body["deployment"] in self.retiring:
            dep = self.retiring[body["deployment"]][0]
        if dep is None:
            self._peer_log.error("worker %s registered for unknown deployment %s", wid[:64],
                                 P.short(body["deployment"]))
            self.transport.to_worker(wid, P.DISCONNECT, {"reason": "unknown deployment"})
            return
        if wid in self.workers:
            self._lose_worker(self.workers[wid], "re-registered")
        worker = WorkerRecord(wid, dep, body["pid"], body.get("device") or "?",
                              0, "loading", self.clock(), generation=body.get("generation") or 0)
        worker.attached = self._attached.get(wid) == worker.generation
        self._apply_load(worker, body)
        self.workers[wid] = worker
        dep.workers[wid] = worker
        self._sync_router(worker)
        log.info("worker %s registered: deployment=%s device=%s pid=%d state=%s credits=%d",
                 wid, dep.name, worker.device, worker.pid, worker.state, worker.credits)
        self._dispatch(dep)
        self._report_readiness()

    def _attach(self, wid: str, worker: WorkerRecord | None, generation: int) -> None:
        """The worker's engine socket is up for registration ``generation``."""
        self._attached[wid] = generation
        if worker is not None and worker.generation == generation and not worker.attached:
            worker.attached = True
            worker.last_seen = self.clock()
            worker.recount()
            self._sync_router(worker)
            self._report_readiness()
            self._dispatch(worker.deployment)

    def _update_load(self, worker: WorkerRecord, body: dict[str, Any]) -> None:
        if self._apply_load(worker, body):
            self._sync_router(worker)
            self._report_readiness()
        self._dispatch(worker.deployment)

    def _sync_router(self, worker: WorkerRecord) -> None:
        """The routing policy's members are the deployment's registered, ready workers."""
        dep = worker.deployment
        if worker.serving and self.workers.get(worker.id) is worker:
            dep.router.join(worker.id)
        else:
            dep.router.leave(worker.id)
        dep.pool = sorted((w for w in dep.workers.values() if w.serving), key=lambda w: w.id)

    @staticmethod
    def _apply_load(worker: WorkerRecord, body: dict[str, Any]) -> bool:
        """Take the credits, state and failure a worker reports (already validated); True if its state changed."""
        worker.credits = body["credits"]
        for counter in ("resumes", "rebuilds"):
            if body.get(counter) is not None:
                setattr(worker, counter, body[counter])
        if body.get("runner") is not None:
            worker.runner = body["runner"]
        if body.get("failure") is not None:
            worker.failure = f"{body['failure']}: {body.get('reason') or ''}"
            log.error("worker %s reports %s", worker.id, worker.failure)
        changed = body["state"] != worker.state
        worker.state = body["state"]
        worker.recount()
        return changed

    def _chunks(self, worker: WorkerRecord, entries: Any) -> bool:
        """A worker's CHUNKS: ``[rid, text]`` each, or ``[rid, text, finish_reason(, usage)]`` for a
        request's successful end. True if any request ended (a credit came free)."""
        ended = False
        for entry in entries:
            problem = P.chunk_problem(entry)
            if problem:
                self._peer_log.warning("worker %s sent a malformed chunk: %s", worker.id, problem)
                if type(entry) is list and entry:
                    # An entry with a finish_reason was meant as the request's end: the worker holds
                    # no slot for it any more, and would not answer a CANCEL.
                    self._malformed_output(worker, entry[0], f"CHUNKS: {problem}", final=len(entry) >= 3)
                continue
            req = worker.requests.get(entry[0])
            if req is None:
                continue  # a late chunk for a request already given up on
            worker.last_progress = worker.last_seen
            if len(entry) == 2:
                if not req.done:
                    index = self._count_chunk(req)
                    self._to_client(req.client, P.CHUNK,
                                    self._announce(req, {"id": req.cid, "index": index, "text": entry[1]}))
                continue
            ended = True
            worker.release(req.rid)
            req.worker = None
            self._note_service(req)
            if req.done:
                self._retire(req, None)
                continue
            done = {"id": req.cid, "finish_reason": entry[2]}
            if entry[1] is not None:  # the last chunk's text rides in DONE
                done["index"] = self._count_chunk(req)
                done["text"] = entry[1]
            done["chunks"] = req.chunks
            metrics = req.deployment.metrics
            usage = entry[3] if len(entry) == 4 else None
            if usage is not None:
                done["usage"] = usage
                metrics.prompt_tokens += usage["prompt_tokens"]
                metrics.generated_tokens += usage["completion_tokens"]
            else:
                metrics.generated_tokens += req.chunks
            self._finish(req, P.DONE, done, "completed")
        return ended

    def _count_chunk(self, req: Request) -> int:
        """Account for one chunk of ``req``; returns its index."""
        now = self.clock()
        metrics = req.deployment.metrics
        if not req.chunks:
            req.first_chunk_at = now
            metrics.first_chunk_ms.add((now - req.arrived) * 1000)
        else:
            metrics.inter_chunk_ms.add((now - req.last_chunk_at) * 1000)
        req.last_chunk_at = now
        req.chunks += 1
        return req.chunks - 1

    def _note_service(self, req: Request) -> None:
        """The worker has answered: fold its dispatch-to-final time into the BACKPRESSURE hint."""
        dep = req.deployment
        dep.service_ms = 0.9 * dep.service_ms + 0.1 * (self.clock() - req.dispatched_at) * 1000

    def _worker_final(self, req: Request, body: dict[str, Any]) -> None:
        """A worker's ERROR for ``req``."""
        self._note_service(req)
        if req.done:
            self._retire(req, None)
            return
        code = body.get("code")
        if code not in ErrorCode.__members__:
            code = ErrorCode.INTERNAL.value
        counter = {ErrorCode.CANCELLED.value: "cancelled", ErrorCode.DEADLINE_EXCEEDED.value: "timed_out",
                   ErrorCode.BAD_REQUEST.value: "bad_request"}.get(code, "failed")
        self._finish(req, P.ERROR, P.error_body(req.cid, ErrorCode(code), str(body.get("message", "")),
                                                body.get("details")), counter)

    def on_worker_exited(self, wid: str, pid: int, status: int, expected: str | None = None) -> None:
        """The supervisor saw the process exit: faster than waiting for missed heartbeats.
        ``expected`` says why the supervisor stopped it (an operator restart, a drain): not a loss."""
        worker = self.workers.get(wid)
        self.draining_workers.pop(wid, None)
        if worker is not None and worker.pid == pid:
            poisoned = status == exitcodes.WORKER_POISONED
            self._lose_worker(worker, expected or failures.describe_exit(status),
                              ErrorCode.CONTEXT_POISONED if poisoned else ErrorCode.WORKER_LOST,
                              expected=expected is not None)

    def _lose_worker(self, worker: WorkerRecord, why: str, code: ErrorCode = ErrorCode.WORKER_LOST,
                     expected: bool = False) -> None:
        self.workers.pop(worker.id, None)
        if worker.failure:
            self._last_failure[worker.id] = worker.failure
        dep = worker.deployment
        dep.workers.pop(worker.id, None)
        self._sync_router(worker)
        lost = list(worker.requests.values())
        worker.requests.clear()
        worker.recount()
        if expected:
            log.info("worker %s (pid %d) stopped: %s; %d request(s) affected", worker.id, worker.pid, why, len(lost))
        else:
            log.warning("worker %s (pid %d) lost: %s; %d request(s) affected", worker.id, worker.pid, why,
                        len(lost))
        for req in lost:
            req.worker = None
            if req.done:
                self._retire(req, None)
            elif req.chunks == 0 and req.dispatches < MAX_DISPATCHES and not self.draining:
                req.entry = dep.queue.requeue(req, req.priority)
            else:
                self._finish(req, P.ERROR, P.error_body(
                    req.cid, code, f"worker {worker.id} {'stopped' if expected else 'was lost'} ({why}) after "
                                   f"streaming {req.chunks} chunk(s)"),
                    "failed")
        self._report_readiness()
        self._dispatch(dep)

    # --- dispatch --------------------------------------------------------------------------

    def _dispatch(self, dep: Deployment) -> None:
        while len(dep.queue):
            worker = dep.router.choose(dep.pool, dep.queue.peek().affinity)
            if worker is None:
                return  # no free credit anywhere: the queue waits
            req = dep.queue.pop()
            req.entry = None
            if not worker.requests:
                worker.last_progress = self.clock()
            self._dispatch_seq += 1
            worker.dispatch_seq = self._dispatch_seq
            worker.hold(req)
            req.worker = worker
            req.dispatches += 1
            now = self.clock()
            if req.dispatches == 1:
                dep.metrics.queue_ms.add((now - req.arrived) * 1000)
            req.dispatched_at = now
            work = {"rid": req.rid, "prompt": req.prompt, "params": req.params,
                    "deadline_ms": max(1, round((req.deadline - now) * 1000))}
            if req.messages is not None:
                work["messages"] = req.messages
            self.transport.to_worker(worker.id, P.REQUEST, work)

    # --- finals ----------------------------------------------------------------------------

    def _finish(self, req: Request, command: bytes, body: dict[str, Any], counter: str) -> None:
        """Send the request's one final reply and account for it."""
        if req.done:
            raise AssertionError(f"request {req.rid} would get a second final reply")
        req.done = True
        if command == P.DONE and req.client in self.held and self.held[req.client].cut:
            # Chunks of it may have been dropped since its connection was held: it did not succeed.
            command, body, counter = P.ERROR, self._cut_error(req.cid, self.held[req.client].reason), "cancelled"
        self._to_client(req.client, command, self._announce(req, body), owed=True)
        m = req.deployment.metrics
        if command == P.DONE:
            m.latency_ms.add((self.clock() - req.arrived) * 1000)
        m.final("OK" if command == P.DONE else body["code"])
        self._retire(req, counter)

    def _retire(self, req: Request, counter: str | None) -> None:
        """Bookkeeping after a final: free the queue slot, tell a worker to stop, forget it."""
        dep = req.deployment
        if counter:
            setattr(dep.metrics, counter, getattr(dep.metrics, counter) + 1)
        if self.by_client.get((req.client, req.cid)) is req:
            del self.by_client[(req.client, req.cid)]
        if req.entry is not None:
            dep.queue.remove(req.entry)
            req.entry = None
        if req.worker is not None:
            # The worker still holds a slot for it: ask it to stop, and keep the
            # slot counted until the worker answers with its own final.
            self.transport.to_worker(req.worker.id, P.CANCEL, {"rid": req.rid})
        else:
            self.requests.pop(req.rid, None)
        if self.draining:
            self._maybe_drained()

    # --- time ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Cut held clients' requests, retry their replies, expire deadlines, exchange heartbeats,
        detect silent workers, finish a drain."""
        now = self.clock()
        self._cut()
        if self._unannounced:
            self._announce_due(now)
        for client in [c for c, h in self.held.items() if now >= h.next_try]:
            self._flush(client, now)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            req = self.requests.get(rid)
            if req is not None and not req.done:
                where = "in the queue" if req.entry is not None else "while running"
                self._finish(req, P.ERROR, P.error_body(
                    req.cid, ErrorCode.DEADLINE_EXCEEDED,
                    f"deadline of {round((req.deadline - req.arrived) * 1000)} ms passed {where}"), "timed_out")
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self._hb_interval
            for worker in list(self.workers.values()):
                if now - worker.last_seen > self._hb_expiry:
                    self._unresponsive(worker, f"no message for {now - worker.last_seen:.1f} s")
                # A rebuild is not a hang; nor is a remote worker waiting on its provider (bounded by
                # read_timeout_ms and deadlines; its runner watches its own event loop).
                elif (worker.requests and worker.state != "rebuilding" and worker.deployment.spec.transport == "local"
                      and now - worker.last_progress > worker.deployment.config.watchdog_s):
                    self._unresponsive(worker, f"hung: no progress for {now - worker.last_progress:.1f} s "
                                               f"with {worker.outstanding} request(s) in flight")
                else:
                    self.transport.to_worker(worker.id, P.HEARTBEAT, {})
        if now >= self._next_load:
            self._next_load = now + self._load_interval
            self.transport.to_supervisor(P.LOAD, {
                "workers": {wid: w.outstanding for wid, w in self.workers.items()},
                "queued": {name: len(dep.queue) for name, dep in self.deployments.items()}})
        if self.draining and now >= self._drain_deadline:
            self._end_drain()
        if self.retiring or self.draining_workers:
            reconfigure.tick(self, now)

    def _end_drain(self) -> None:
        """The drain's grace is over: whatever still runs ends with SHUTTING_DOWN."""
        self._drain_deadline = math.inf
        for req in [r for r in self.requests.values() if not r.done]:
            self._drain_failed += 1
            self._finish(req, P.ERROR, P.error_body(
                req.cid, ErrorCode.SHUTTING_DOWN, "inferd shut down before the request finished"), "failed")
        self._maybe_drained()

    def _unresponsive(self, worker: WorkerRecord, why: str) -> None:
        """A silent or hung worker: give up on it here, and have the supervisor kill the process.

        Its main thread may still be alive (a hung model step does not stop the
        heartbeats), so that process may not register again: it would be given
        work it can never do before the supervisor's SIGKILL lands.
        """
        self._lose_worker(worker, why)
        self._condemned[worker.id] = worker.pid
        self.transport.to_supervisor(P.UNRESPONSIVE, {"worker": worker.id, "pid": worker.pid, "reason": why})

    def next_timeout(self) -> float:
        """Seconds until :meth:`tick` has something to do."""
        when = min(self._next_heartbeat, self._next_load, self._drain_deadline)
        if self._to_cut:
            return 0.0
        for held in self.held.values():
            when = min(when, held.next_try)
        if self.retiring or self.draining_workers:
            when = min(when, self.clock() + 0.05)
        # Entries of requests that have ended (or been announced) are dropped from the front first,
        # so that a request answered in a millisecond costs no wake-up at its stale time later.
        deadlines, unannounced = self._deadlines, self._unannounced
        while deadlines and self._ended(deadlines[0][1]):
            heapq.heappop(deadlines)
        if deadlines:
            when = min(when, deadlines[0][0])
        while unannounced and (unannounced[0][1].announced or unannounced[0][1].done):
            unannounced.popleft()
        if unannounced:
            when = min(when, unannounced[0][0])
        return max(0.0, when - self.clock())

    def _ended(self, rid: int) -> bool:
        req = self.requests.get(rid)
        return req is None or req.done

    # --- supervisor link -------------------------------------------------------------------

    def on_supervisor(self, frames: list[bytes]) -> None:
        try:
            command, body = P.decode(P.SUPERVISOR, frames, frozenset({
                P.WORKERS, P.WORKER_EXITED, P.DRAIN, P.RESTARTED, P.ANSWER, P.CONFIG, P.DRAIN_WORKER}))
        except P.ProtocolError as exc:
            log.error("malformed message from the supervisor: %s", exc.reason)
            return
        if command == P.WORKERS:
            self.supervisor_view = body
            self._update_availability(body.get("workers", []))
        elif command == P.WORKER_EXITED:
            try:
                P.check_fields(body, {"worker": (str, True), "pid": (int, True), "status": (int, True),
                                      "expected": (str, False)}, "WORKER_EXITED")
            except P.ProtocolError as exc:
                log.error("malformed message from the supervisor: %s", exc.reason)
                return
            self.on_worker_exited(body["worker"], body["pid"], body["status"], body.get("expected"))
        elif command in (P.RESTARTED, P.ANSWER):
            self.control_replies.append(body)
        elif command == P.CONFIG:
            reconfigure.apply(self, Config.from_dict(body["config"]), float(body.get("grace_s", 0)))
        elif command == P.DRAIN_WORKER:
            reconfigure.drain_worker(self, str(body.get("worker")), float(body.get("grace_s", 0)))
        else:
            self.drain(float(body.get("grace_s", 0)))

    def _update_availability(self, rows: list[dict[str, Any]]) -> None:
        """A deployment whose every worker is failed (not restarting) cannot serve: say so now."""
        for dep in self.deployments.values():
            states = [row["state"] for row in rows if row.get("deployment") == dep.name]
            available = not states or any(state != "failed" for state in states)
            if available == dep.available:
                continue
            dep.available = available
            log.log(logging.INFO if available else logging.ERROR, "deployment %s is %s", dep.name,
                    "available again" if available else "unavailable: all its workers failed")
            if not available:
                for req in list(dep.queue.drain()):
                    req.entry = None
                    self._finish(req, P.ERROR, P.error_body(
                        req.cid, ErrorCode.UNAVAILABLE, f"deployment {dep.name!r} has no worker left"), "failed")

    def rebuild(self, name: str) -> dict[str, int]:
        """An operator's ``inferctl rebuild``: each ready worker of the deployment rebuilds its model session.

        The workers stop taking requests (state rebuilding, no credits), finish
        what they run, rebuild, and report ready again; the queue holds new
        requests meanwhile. Workers still loading are not asked: they load a fresh
        session anyway. Returns each asked worker's rebuild count before this one,
        so a caller can wait for the next. KeyError for an unknown deployment.
        """
        dep = self.deployments[name]
        asked = {}
        for worker in dep.workers.values():
            if worker.state in ("ready", "rebuilding"):
                self.transport.to_worker(worker.id, P.REBUILD, {})
                asked[worker.id] = worker.rebuilds
                worker.state = "rebuilding"
                worker.recount()
                self._sync_router(worker)
        log.info("rebuild of %s asked of %d worker(s): %s", name, len(asked), ", ".join(sorted(asked)) or "none")
        self._report_readiness()
        return asked

    def restart_worker(self, wid: str, token: Any) -> None:
        """An operator's ``inferctl restart``: the supervisor acts and answers with RESTARTED."""
        self.transport.to_supervisor(P.RESTART, {"worker": wid, "token": token})

    def drain(self, grace_s: float) -> None:
        """Stop accepting, fail what is queued, give in-flight work ``grace_s`` to finish."""
        if not self.draining:
            log.info("draining: %d request(s) in flight, grace %.1f s", self.in_flight(), grace_s)
        self.draining = True
        self._drain_deadline = min(self._drain_deadline, self.clock() + grace_s)
        for dep in self.deployments.values():
            for req in list(dep.queue.drain()):
                req.entry = None
                self._finish(req, P.ERROR, P.error_body(
                    req.cid, ErrorCode.SHUTTING_DOWN, "inferd is shutting down; the request was not started"),
                    "failed")
        if grace_s <= 0:
            # No grace (a fast stop): answer now, before the workers' exits can be reported as losses.
            self._end_drain()
        else:
            self._maybe_drained()

    def _maybe_drained(self) -> None:
        if not self._drained_sent and not any(not r.done for r in self.requests.values()):
            self._drained_sent = True
            self.flush()  # the finals leave before the supervisor hears that there are none left
            self.transport.to_supervisor(P.DRAINED, {"failed": self._drain_failed})

    def shutdown(self) -> None:
        """The broker itself is going away: give everything outstanding its final reply."""
        self.drain(0)
        self.tick()

    def _report_readiness(self) -> None:
        ready = {name: dep.ready_workers() for name, dep in self.deployments.items()}
        workers = sorted(w.id for w in self.workers.values() if w.serving)
        if (ready, workers) != self._readiness:
            self._readiness = (ready, workers)
            self.transport.to_supervisor(P.READINESS, {"deployments": ready, "workers": workers})

    # --- views for inferctl ----------------------------------------------------------------

    def in_flight(self, dep: Deployment | None = None) -> int:
        return sum(1 for r in self.requests.values()
                   if not r.done and r.worker is not None and (dep is None or r.deployment is dep))

    def metrics(self) -> dict[str, Any]:
        out = {name: dep.metrics.snapshot(len(dep.queue), self.in_flight(dep))
               for name, dep in self.deployments.items()}
        for name, dep in self.deployments.items():  # a remote runtime's upstream figures, per worker
            upstream = {w.id: w.runner["upstream"] for w in dep.workers.values() if "upstream" in w.runner}
            if upstream:
                out[name]["upstream"] = upstream
        return out

    def status(self) -> dict[str, Any]:
        view = self.supervisor_view
        rows = []
        for proc in view.get("workers", []):
            worker = self.workers.get(proc["id"])
            row = dict(proc)
            if proc["state"] == "running":
                registered = worker is not None and worker.pid == proc["pid"]
                row["state"] = ("draining" if worker.draining else worker.state) if registered else "starting"
            row["credits"] = worker.credits if worker else 0
            row["in_flight"] = worker.outstanding if worker else 0
            row["resumes"] = worker.resumes if worker else 0
            row["rebuilds"] = worker.rebuilds if worker else 0
            row["failure"] = worker.failure if worker else self._last_failure.get(proc["id"])
            row["runner"] = worker.runner if worker else {}
            rows.append(row)
        deployments = {}
        for name, dep in self.deployments.items():
            ready = dep.ready_workers()
            state = ("healthy" if ready >= dep.config.replicas else "degraded" if ready else "unavailable")
            # A worker may be up while what it serves from is not (a remote runtime's upstream).
            problems = [f"{w.id}: {w.runner.get('problem', '')}" for w in dep.pool
                        if w.runner.get("health", "ok") != "ok"]
            if problems and state == "healthy":
                state = "degraded"
            if not dep.available:
                state = "failed"
            deployments[name] = {"state": state, "runtime": dep.config.runtime, "replicas": dep.config.replicas,
                                 "routing": dep.config.routing, "problems": problems,
                                 "ready": ready, "queued": len(dep.queue), "in_flight": self.in_flight(dep)}
        daemon = dict(view.get("daemon", {}))
        if "started_at" in daemon:
            daemon["uptime_s"] = round(time.time() - daemon.pop("started_at"), 1)
        return {
            "daemon": daemon,
            "devices": view.get("devices", []),
            "broker": {"pid": self.pid, "epoch": self.epoch, "version": __version__,
                       "uptime_s": round(time.time() - self.started, 1),
                       "state": "draining" if self.draining else "serving"},
            "deployments": deployments,
            "workers": rows,
            "ready": all(d["state"] in ("healthy", "degraded") for d in deployments.values()) and not self.draining,
        }

"""Unit tests for inferd.broker.core.BrokerCore: pure logic, a recording transport and a fake clock."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from inferd import __version__, protocol as P
from inferd.broker.core import MAX_DISPATCHES, BrokerCore
from inferd.broker.delivery import FULL, GONE, SENT
from inferd.config import parse

# --- harness ----------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Recorder:
    """A Transport that records every message as (kind, target, command, body)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any, bytes, dict]] = []
        # Client connections that cannot take a message now: FULL or GONE (inferd.broker.delivery).
        self.blocked: dict[bytes, int] = {}
        self.messages: list[tuple[bytes, int]] = []   # (client, replies in it): one ZeroMQ message each

    def to_client(self, client: bytes, replies: list[tuple[bytes, dict]]) -> int:
        status = self.blocked.get(client, SENT)
        if status == SENT:
            self.messages.append((client, len(replies)))
            for command, body in replies:
                self.log.append(("client", client, command, body))
        return status

    def to_worker(self, worker: str, command: bytes, body: dict) -> None:
        self.log.append(("worker", worker, command, body))

    def to_supervisor(self, command: bytes, body: dict) -> None:
        self.log.append(("supervisor", None, command, body))


class Harness:
    def __init__(self, broker: dict | None = None, **deployment: Any):
        dep = {"name": "echo", "runtime": "echo"}
        dep.update(deployment)
        # Slow heartbeats by default so that only the heartbeat tests see expiries, and every
        # ACCEPTED at once (accept_delay_ms 0), so that each test sees each request's acceptance
        # where it happens; the tests of deferred ACCEPTEDs set a delay.
        broker_cfg = {"heartbeat_interval_ms": 60000, "heartbeat_liveness": 2, "accept_delay_ms": 0}
        broker_cfg.update(broker or {})
        self.config = parse({"broker": broker_cfg, "deployment": [dep]}, "<test>")
        self.clock = Clock()
        self.rec = Recorder()
        self.core = BrokerCore(self.config, self.rec, clock=self.clock)
        self.cursor = 0
        self.pids: dict[str, int] = {}

    # messages in
    def client(self, client: bytes, command: bytes, body: dict) -> None:
        self.core.on_client(client, [P.CLIENT, command, P.pack(body)])

    def submit(self, cid: Any, prompt: str = "hello world", client: bytes = b"c1", **fields: Any) -> None:
        self.client(client, P.SUBMIT, {"id": cid, "deployment": "echo", "prompt": prompt, **fields})

    def cancel(self, cid: Any, client: bytes = b"c1") -> None:
        self.client(client, P.CANCEL, {"id": cid})

    def worker(self, wid: str, command: bytes, identity: str | None = None, **body: Any) -> None:
        body.setdefault("worker", wid)
        self.core.on_worker((identity or wid).encode(), [P.WORKER, command, P.pack(body)])

    def ready(self, wid: str = "echo-0", credits: int = 2, pid: int | None = None, state: str = "ready",
              attach: bool = True) -> None:
        """A worker registers (its main thread's READY) and its engine's socket attaches (ATTACH)."""
        pid = pid if pid is not None else 1000 + len(self.pids)
        self.pids[wid] = pid
        self.worker(wid, P.READY, deployment="echo", device="cpu:0", pid=pid, runtime="echo", state=state,
                    credits=credits, in_flight=0, generation=pid)
        if attach:
            self.attach(wid, pid)

    def attach(self, wid: str, generation: int) -> None:
        self.worker(wid, P.ATTACH, identity=wid + P.ENGINE_SUFFIX, generation=generation)

    def heartbeat(self, wid: str, credits: int = 2, state: str = "ready") -> None:
        self.worker(wid, P.HEARTBEAT, state=state, credits=credits, in_flight=0)

    def chunk(self, wid: str, rid: int, text: str, **extra: Any) -> None:
        entry = [rid, text, extra["finish_reason"]] if "finish_reason" in extra else [rid, text]
        self.worker(wid, P.CHUNKS, chunks=[entry])

    def done(self, wid: str, rid: int, finish_reason: str = "stop", text: str | None = None,
             usage: dict | None = None) -> None:
        """The request's successful end: a CHUNKS entry with a finish_reason (and its last text, if any)."""
        entry = [rid, text, finish_reason] if usage is None else [rid, text, finish_reason, usage]
        self.worker(wid, P.CHUNKS, chunks=[entry])

    def werror(self, wid: str, rid: int, code: str, message: str = "boom") -> None:
        self.worker(wid, P.ERROR, rid=rid, code=code, message=message)

    def exited(self, wid: str, pid: int | None = None, status: int = -9) -> None:
        self.core.on_worker_exited(wid, self.pids[wid] if pid is None else pid, status)

    def advance(self, seconds: float) -> None:
        """As the process loop: the last burst's replies flushed, time passes, then a tick."""
        self.core.flush()
        self.clock.advance(seconds)
        self.core.tick()
        self.core.flush()

    # messages out
    def take(self, heartbeats: bool = False) -> list[tuple[str, Any, bytes, dict]]:
        """Every message since the last take (broker->worker HEARTBEATs and READINESS left out),
        the replies collected for clients flushed first, as the process loop does after each burst."""
        self.core.flush()
        new = self.rec.log[self.cursor:]
        self.cursor = len(self.rec.log)
        return [m for m in new if heartbeats or m[2] not in (P.HEARTBEAT, P.READINESS, P.LOAD)]

    def to_clients(self, msgs) -> list[tuple[bytes, bytes, dict]]:
        return [(m[1], m[2], m[3]) for m in msgs if m[0] == "client"]

    def requests_sent(self, msgs) -> list[tuple[str, int, str]]:
        return [(m[1], m[3]["rid"], m[3]["prompt"]) for m in msgs if m[0] == "worker" and m[2] == P.REQUEST]

    def outstanding(self, wid: str) -> int:
        return len(worker_rids(self.core.workers[wid]))

    def metrics(self) -> dict:
        return self.core.metrics()["echo"]


def worker_rids(record) -> set:
    """The broker-side rids a worker record holds (dispatched, no final from the worker yet)."""
    return set(record.requests)


def only(msgs: list) -> tuple:
    assert len(msgs) == 1, msgs
    return msgs[0]


def error_code(msg) -> str:
    kind, target, command, body = msg
    assert command == P.ERROR, msg
    return body["code"]


# --- submit, stream, done ---------------------------------------------------------------------


def test_submit_accepted_then_request_then_chunks_then_done():
    h = Harness()
    h.ready("echo-0", credits=2)
    h.take()
    h.submit(1, "hello world", params={"max_tokens": 5})
    msgs = h.take()
    assert len(msgs) == 2
    # The REQUEST goes out at once; the replies to clients wait for the end of the poll burst.
    assert msgs[1] == ("client", b"c1", P.ACCEPTED, {"id": 1, "epoch": h.core.epoch, "join": " "})
    kind, wid, command, body = msgs[0]
    assert (kind, wid, command) == ("worker", "echo-0", P.REQUEST)
    assert set(body) == {"rid", "prompt", "params", "deadline_ms"}
    assert body["deadline_ms"] == h.core.deployments["echo"].config.default_deadline_ms  # what is left of it
    assert body["prompt"] == "hello world"
    assert body["params"] == {"max_tokens": 5}
    rid = body["rid"]
    assert isinstance(rid, int)

    h.clock.advance(0.05)
    h.chunk("echo-0", rid, "hello")
    h.clock.advance(0.05)
    h.done("echo-0", rid, "stop", text="world")
    assert h.take() == [  # the last chunk rides in DONE
        ("client", b"c1", P.CHUNK, {"id": 1, "index": 0, "text": "hello"}),
        ("client", b"c1", P.DONE, {"id": 1, "finish_reason": "stop", "index": 1, "text": "world", "chunks": 2}),
    ]
    m = h.metrics()
    assert m["completed"] == 1
    assert (m["failed"], m["cancelled"], m["timed_out"], m["rejected_backpressure"]) == (0, 0, 0, 0)
    assert m["queued"] == 0 and m["in_flight"] == 0
    assert m["queue_ms"]["count"] == 1 and m["queue_ms"]["max"] == pytest.approx(0.0)
    assert m["first_chunk_ms"]["count"] == 1 and m["first_chunk_ms"]["max"] == pytest.approx(50.0)
    assert m["latency_ms"]["count"] == 1 and m["latency_ms"]["max"] == pytest.approx(100.0)
    assert h.core.requests == {}
    assert h.core.by_client == {}
    assert h.outstanding("echo-0") == 0


def test_done_without_chunks_and_length_finish():
    h = Harness()
    h.ready("echo-0")
    h.submit("a")
    rid = only(h.requests_sent(h.take()))[1]
    h.done("echo-0", rid, "length")
    assert h.to_clients(h.take()) == [(b"c1", P.DONE, {"id": "a", "finish_reason": "length", "chunks": 0})]


def test_queue_time_is_measured_until_dispatch():
    h = Harness()
    h.submit(1)
    h.clock.advance(0.25)
    h.ready("echo-0")
    assert len(h.requests_sent(h.take())) == 1
    assert h.metrics()["queue_ms"]["max"] == pytest.approx(250.0)


def test_ping_answered_with_pong():
    h = Harness()
    h.client(b"c9", P.PING, {"id": 7})
    pong = {"epoch": h.core.epoch, "version": __version__, "max_message_bytes": 1 << 20, "in_flight": []}
    assert h.take() == [("client", b"c9", P.PONG, {"id": 7, **pong})]
    h.client(b"c9", P.PING, {})
    assert h.take() == [("client", b"c9", P.PONG, {"id": None, **pong})]
    h.ready("echo-0", credits=1)
    h.submit("A", client=b"c9")
    h.submit("B", client=b"c9")
    h.submit("C", client=b"other")
    h.take()
    h.client(b"c9", P.PING, {"id": 8})   # the ids this connection has in flight: how a client learns
    assert h.take()[-1][3]["in_flight"] == ["A", "B"]  # that a final reply was lost


def test_request_ids_are_scoped_per_client():
    h = Harness()
    h.ready("echo-0", credits=4)
    h.submit(1, "from c1", client=b"c1")
    h.submit(1, "from c2", client=b"c2")
    msgs = h.take()
    sent = h.requests_sent(msgs)
    assert [p for _, _, p in sent] == ["from c1", "from c2"]
    h.done("echo-0", sent[1][1])
    assert h.to_clients(h.take()) == [(b"c2", P.DONE, {"id": 1, "finish_reason": "stop", "chunks": 0})]


# --- bad requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,code,needle", [
    ({"priorty": 1}, "BAD_REQUEST", "priorty"),
    ({"priority": 3}, "BAD_REQUEST", "priority"),
    ({"priority": -1}, "BAD_REQUEST", "priority"),
    ({"priority": True}, "BAD_REQUEST", "priority"),
    ({"deadline_ms": 0}, "BAD_REQUEST", "deadline_ms"),
    ({"deadline_ms": -5}, "BAD_REQUEST", "deadline_ms"),
    ({"params": {"max_tokens": 0}}, "BAD_REQUEST", "max_tokens"),
    ({"params": {"temperature": 1}}, "BAD_REQUEST", "temperature"),
    ({"deployment": "nope"}, "UNKNOWN_DEPLOYMENT", "nope"),
])
def test_bad_submit_is_rejected_and_not_accepted(fields, code, needle):
    h = Harness()
    h.ready("echo-0")
    h.take()
    h.submit("r1", **fields)
    client, command, body = only(h.to_clients(msgs := h.take()))
    assert msgs == [("client", b"c1", P.ERROR, body)]
    assert body["id"] == "r1"
    assert body["code"] == code
    assert needle in body["message"]
    if code == "UNKNOWN_DEPLOYMENT":
        assert body["details"] == {"deployments": ["echo"]}
    assert h.core.requests == {} and h.core.by_client == {}


def test_malformed_frames_get_bad_request_with_nil_id():
    h = Harness()
    h.core.on_client(b"c1", [b"IFDC9", P.SUBMIT, P.pack({"id": 1})])
    h.core.on_client(b"c1", [P.CLIENT, P.SUBMIT])
    h.core.on_client(b"c1", [P.CLIENT, P.SUBMIT, b"\xc1"])
    msgs = h.to_clients(h.take())
    assert [(c, cmd, b["id"], b["code"]) for c, cmd, b in msgs] == [(b"c1", P.ERROR, None, "BAD_REQUEST")] * 3


def test_unknown_command_gets_bad_request_with_the_id():
    h = Harness()
    h.core.on_client(b"c1", [P.CLIENT, b"FROB", P.pack({"id": "x1"})])
    _, _, body = only(h.to_clients(h.take()))
    assert (body["id"], body["code"]) == ("x1", "BAD_REQUEST")


def test_malformed_cancel_of_in_flight_request_has_nil_id():
    h = Harness()
    h.submit("r1")
    h.take()
    h.client(b"c1", P.CANCEL, {"id": "r1", "extra": 1})
    _, command, body = only(h.to_clients(h.take()))
    assert (command, body["id"], body["code"]) == (P.ERROR, None, "BAD_REQUEST")
    assert body["details"]["id"] == "r1"
    assert (b"c1", "r1") in h.core.by_client  # still in flight
    h.cancel("r1")
    _, _, body = only(h.to_clients(h.take()))
    assert (body["id"], body["code"]) == ("r1", "CANCELLED")


def test_malformed_cancel_of_unknown_id_carries_the_id():
    h = Harness()
    h.client(b"c1", P.CANCEL, {"id": "zz", "extra": 1})
    _, _, body = only(h.to_clients(h.take()))
    assert (body["id"], body["code"]) == ("zz", "BAD_REQUEST")


@pytest.mark.parametrize("value", [msgpack.ExtType(5, b"abc"), msgpack.Timestamp(1, 0)],
                         ids=["ext5", "timestamp"])
@pytest.mark.parametrize("where", ["params", "affinity"])
def test_extension_type_anywhere_is_bad_request_with_nil_id(value, where):
    # docs/protocol.md: the id is nil when the message could not be decoded, "an extension
    # type anywhere in it" included.
    h = Harness()
    body = {"id": 1, "deployment": "echo", "prompt": "p"}
    body[where] = {"max_tokens": value} if where == "params" else value
    h.core.on_client(b"c1", [P.CLIENT, P.SUBMIT, msgpack.packb(body)])
    msgs = h.take()
    _, command, reply = only(h.to_clients(msgs))
    assert (command, reply["code"]) == (P.ERROR, "BAD_REQUEST")
    assert reply["id"] is None
    assert h.core.requests == {}


def test_invalid_request_id_answered_with_nil_id():
    h = Harness()
    h.submit("x" * 129)
    h.submit("")
    bodies = [b for _, _, b in h.to_clients(h.take())]
    assert [(b["id"], b["code"]) for b in bodies] == [(None, "BAD_REQUEST"), (None, "BAD_REQUEST")]
    assert h.core.requests == {}


def test_duplicate_in_flight_id_is_refused_and_original_unharmed():
    h = Harness()
    h.submit(5)
    h.take()
    h.submit(5)
    _, command, body = only(h.to_clients(h.take()))
    # The error must not look like request 5's final reply: nil id, the id in details.
    assert command == P.ERROR
    assert body["code"] == "BAD_REQUEST"
    assert body["id"] is None
    assert body["details"]["id"] == 5
    assert len(h.core.requests) == 1
    h.ready("echo-0")
    rid = only(h.requests_sent(h.take()))[1]
    h.done("echo-0", rid)
    assert h.to_clients(h.take()) == [(b"c1", P.DONE, {"id": 5, "finish_reason": "stop", "chunks": 0})]
    # Once final, the id may be reused.
    h.submit(5)
    assert h.to_clients(h.take())[0][1] == P.ACCEPTED


# --- credits -----------------------------------------------------------------------------------


def test_credits_bound_dispatch_and_done_releases_one():
    h = Harness()
    h.ready("echo-0", credits=2)
    h.take()
    for i in range(5):
        h.submit(i, f"p{i}")
        assert h.outstanding("echo-0") <= 2
    msgs = h.take()
    assert [c for _, c, _ in h.to_clients(msgs)] == [P.ACCEPTED] * 5
    sent = h.requests_sent(msgs)
    assert [p for _, _, p in sent] == ["p0", "p1"]
    assert h.outstanding("echo-0") == 2
    assert len(h.core.deployments["echo"].queue) == 3

    running = [rid for _, rid, _ in sent]
    order = [p for _, _, p in sent]
    finished = 0
    while running:
        rid = running.pop(0)
        h.done("echo-0", rid)
        finished += 1
        msgs = h.take()
        assert [c for _, c, _ in h.to_clients(msgs)] == [P.DONE]
        new = h.requests_sent(msgs)
        remaining = 5 - finished
        assert len(new) == (1 if remaining >= 2 else 0)
        running += [rid for _, rid, _ in new]
        order += [p for _, _, p in new]
        assert h.outstanding("echo-0") == min(2, remaining)
        assert h.outstanding("echo-0") <= 2
    assert order == ["p0", "p1", "p2", "p3", "p4"]
    assert h.metrics()["completed"] == 5


def test_worker_with_zero_credits_or_loading_gets_nothing():
    h = Harness()
    h.ready("echo-0", credits=0)
    h.submit(1)
    assert h.requests_sent(h.take()) == []
    h.heartbeat("echo-0", credits=1, state="loading")
    assert h.requests_sent(h.take()) == []
    h.heartbeat("echo-0", credits=1, state="ready")
    assert len(h.requests_sent(h.take())) == 1
    assert h.outstanding("echo-0") == 1


def test_ready_while_loading_then_ready_heartbeat_dispatches():
    h = Harness()
    h.ready("echo-0", credits=3, state="loading")
    h.submit(1)
    h.submit(2)
    assert h.requests_sent(h.take()) == []
    h.heartbeat("echo-0", credits=3, state="ready")
    assert len(h.requests_sent(h.take())) == 2


# --- routing -----------------------------------------------------------------------------------


def test_least_outstanding_spreads_requests():
    h = Harness()
    h.ready("echo-0", credits=4)
    h.ready("echo-1", credits=4)
    h.take()
    for i in range(4):
        h.submit(i, f"p{i}")
    sent = h.requests_sent(h.take())
    assert [w for w, _, _ in sent] == ["echo-0", "echo-1", "echo-0", "echo-1"]
    # echo-0 finishes both; the next two go to echo-0, which now has fewer outstanding.
    for w, rid, _ in sent:
        if w == "echo-0":
            h.done("echo-0", rid)
    h.take()
    assert (h.outstanding("echo-0"), h.outstanding("echo-1")) == (0, 2)
    h.submit(10)
    h.submit(11)
    assert [w for w, _, _ in h.requests_sent(h.take())] == ["echo-0", "echo-0"]
    h.submit(12)
    # now 2 and 2: a tie, broken by who was given work least recently (echo-1)
    assert [w for w, _, _ in h.requests_sent(h.take())] == ["echo-1"]


def test_ties_rotate_across_idle_workers():
    h = Harness()
    h.ready("echo-0", credits=4)
    h.ready("echo-1", credits=4)
    h.take()
    targets = []
    for i in range(6):
        h.submit(i)
        w, rid, _ = only(h.requests_sent(h.take()))
        targets.append(w)
        h.done(w, rid)
        h.take()
    assert targets == ["echo-0", "echo-1"] * 3


def test_full_worker_is_skipped():
    h = Harness()
    h.ready("echo-0", credits=1)
    h.ready("echo-1", credits=3)
    h.take()
    for i in range(4):
        h.submit(i)
    assert [w for w, _, _ in h.requests_sent(h.take())] == ["echo-0", "echo-1", "echo-1", "echo-1"]
    assert len(h.core.deployments["echo"].queue) == 0


# --- priority ----------------------------------------------------------------------------------


def test_urgent_request_is_dispatched_first_and_fifo_within_level():
    h = Harness(priority_levels=3, default_priority=1)
    h.submit("a", "low-a", priority=2)
    h.submit("b", "low-b", priority=2)
    h.submit("c", "mid-c")              # default priority 1
    h.submit("d", "low-d", priority=2)
    h.submit("e", "urgent-e", priority=0)
    h.submit("f", "mid-f", priority=1)
    h.take()
    h.ready("echo-0", credits=1)
    order = []
    for _ in range(6):
        w, rid, prompt = only(h.requests_sent(h.take()))
        order.append(prompt)
        h.done(w, rid)
    assert order == ["urgent-e", "mid-c", "mid-f", "low-a", "low-b", "low-d"]
    assert h.requests_sent(h.take()) == []


# --- backpressure ------------------------------------------------------------------------------


def test_backpressure_when_full_and_eviction_by_more_urgent():
    h = Harness(queue_capacity=2, priority_levels=3, default_priority=1)
    h.submit(1, "one")
    h.submit(2, "two")
    assert [c for _, c, _ in h.to_clients(h.take())] == [P.ACCEPTED, P.ACCEPTED]

    h.submit(3, "three")  # same priority: rejected, nothing accepted
    msgs = h.take()
    client, command, body = only(h.to_clients(msgs))
    assert len(msgs) == 1
    assert command == P.ERROR
    assert body["id"] == 3 and body["code"] == "BACKPRESSURE"
    retry = body["details"]["retry_after_ms"]
    assert type(retry) is int and retry > 0
    assert h.metrics()["rejected_backpressure"] == 1
    assert len(h.core.deployments["echo"].queue) == 2
    assert (b"c1", 3) not in h.core.by_client

    h.submit(4, "four", priority=2)  # less urgent: rejected too
    _, _, body = only(h.to_clients(h.take()))
    assert (body["id"], body["code"]) == (4, "BACKPRESSURE")

    h.submit(5, "urgent", priority=0)  # strictly more urgent: accepted, evicts the newest at level 1 (id 2)
    msgs = h.to_clients(h.take())
    assert len(msgs) == 2
    assert (b"c1", P.ACCEPTED, {"id": 5, "epoch": h.core.epoch, "join": " "}) in msgs
    _, command, body = next(m for m in msgs if m[1] != P.ACCEPTED)
    assert command == P.ERROR
    assert body["id"] == 2 and body["code"] == "BACKPRESSURE"
    retry = body["details"]["retry_after_ms"]
    assert type(retry) is int and retry > 0
    assert h.metrics()["rejected_backpressure"] == 3
    assert len(h.core.deployments["echo"].queue) == 2

    # The evicted request is gone for good: cancelling it says nothing, a worker never sees it.
    h.cancel(2)
    assert h.take() == []
    h.ready("echo-0", credits=4)
    assert [p for _, _, p in h.requests_sent(h.take())] == ["urgent", "one"]


def test_equal_priority_never_evicts_even_at_top_level():
    h = Harness(queue_capacity=1, priority_levels=3)
    h.submit(1, priority=0)
    h.take()
    h.submit(2, priority=0)
    _, _, body = only(h.to_clients(h.take()))
    assert (body["id"], body["code"]) == (2, "BACKPRESSURE")


def test_running_requests_do_not_count_against_the_queue():
    h = Harness(queue_capacity=1)
    h.ready("echo-0", credits=2)
    for i in range(3):
        h.submit(i)
    assert [c for _, c, _ in h.to_clients(h.take())] == [P.ACCEPTED] * 3
    h.submit(3)
    _, _, body = only(h.to_clients(h.take()))
    assert body["code"] == "BACKPRESSURE"


# --- deadlines ---------------------------------------------------------------------------------


def test_deadline_longer_than_default_is_clamped():
    h = Harness(default_deadline_ms=1000)
    h.submit(1, deadline_ms=5000)
    h.take()
    h.advance(0.999)
    assert h.take() == []
    h.advance(0.002)
    _, _, body = only(h.to_clients(h.take()))
    assert (body["id"], body["code"]) == (1, "DEADLINE_EXCEEDED")
    assert "1000 ms" in body["message"]


def test_default_deadline_applies_without_deadline_ms():
    h = Harness(default_deadline_ms=300)
    h.submit(1)
    h.take()
    h.advance(0.299)
    assert h.take() == []
    h.advance(0.002)
    assert error_code(only(h.take())) == "DEADLINE_EXCEEDED"


def test_queued_request_expires():
    h = Harness(default_deadline_ms=10_000)
    h.submit(1, deadline_ms=200)
    h.submit(2)
    h.take()
    h.advance(0.199)
    assert h.take() == []
    h.advance(0.002)
    msg = only(h.take())
    assert msg[1] == b"c1"
    body = msg[3]
    assert (body["id"], body["code"]) == (1, "DEADLINE_EXCEEDED")
    assert "in the queue" in body["message"]
    assert h.metrics()["timed_out"] == 1
    assert len(h.core.deployments["echo"].queue) == 1
    # Nothing more for it, ever; the other request is dispatched normally.
    h.ready("echo-0")
    assert [rid for _, rid, _ in h.requests_sent(h.take())] == [h.core.by_client[(b"c1", 2)].rid]
    h.cancel(1)
    assert h.take() == []


def test_running_request_expires_cancel_sent_and_credit_held_until_worker_final():
    h = Harness(default_deadline_ms=10_000)
    h.ready("echo-0", credits=1)
    h.submit("a", deadline_ms=100)
    rid_a = only(h.requests_sent(h.take()))[1]
    h.chunk("echo-0", rid_a, "x")
    h.submit("b")
    h.take()
    assert h.outstanding("echo-0") == 1

    h.advance(0.101)
    msgs = h.take()
    assert len(msgs) == 2
    client_msg = [m for m in msgs if m[0] == "client"]
    worker_msg = [m for m in msgs if m[0] == "worker"]
    assert only(client_msg)[3]["code"] == "DEADLINE_EXCEEDED"
    assert only(client_msg)[3]["id"] == "a"
    assert "while running" in only(client_msg)[3]["message"]
    assert only(worker_msg) == ("worker", "echo-0", P.CANCEL, {"rid": rid_a})
    # The credit is still held: "b" must wait.
    assert h.outstanding("echo-0") == 1
    assert len(h.core.deployments["echo"].queue) == 1
    assert h.metrics()["in_flight"] == 0

    # Late output from the worker reaches nobody.
    h.chunk("echo-0", rid_a, "y")
    assert h.take() == []
    # The worker's own final releases the credit; "b" goes out; "a" gets no second final.
    h.werror("echo-0", rid_a, "CANCELLED", "cancelled")
    msgs = h.take()
    assert h.to_clients(msgs) == []
    (w, rid_b, _), = h.requests_sent(msgs)
    assert w == "echo-0" and rid_b != rid_a
    assert h.outstanding("echo-0") == 1
    assert rid_a not in h.core.requests
    assert h.metrics()["timed_out"] == 1


def test_expired_running_request_worker_done_is_not_forwarded():
    h = Harness(default_deadline_ms=10_000)
    h.ready("echo-0", credits=1)
    h.submit("a", deadline_ms=50)
    rid = only(h.requests_sent(h.take()))[1]
    h.advance(0.06)
    h.take()
    h.done("echo-0", rid)
    assert h.take() == []
    assert h.metrics()["completed"] == 0
    assert h.core.requests == {}


def test_deadline_of_finished_request_does_nothing():
    h = Harness(default_deadline_ms=1000)
    h.ready("echo-0")
    h.submit(1)
    rid = only(h.requests_sent(h.take()))[1]
    h.done("echo-0", rid)
    h.take()
    h.advance(2.0)
    assert h.take() == []


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_queued():
    h = Harness()
    h.submit(1)
    h.take()
    h.cancel(1)
    assert h.take() == [("client", b"c1", P.ERROR,
                         {"id": 1, "code": "CANCELLED", "message": "cancelled by the client"})]
    assert len(h.core.deployments["echo"].queue) == 0
    assert h.metrics()["cancelled"] == 1
    h.cancel(1)
    assert h.take() == []
    h.ready("echo-0")
    assert h.requests_sent(h.take()) == []
    assert h.core.requests == {}


def test_cancel_running():
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit(1)
    rid = only(h.requests_sent(h.take()))[1]
    h.chunk("echo-0", rid, "a")
    h.take()
    h.cancel(1)
    msgs = h.take()
    assert msgs == [
        ("worker", "echo-0", P.CANCEL, {"rid": rid}),
        ("client", b"c1", P.ERROR, {"id": 1, "code": "CANCELLED", "message": "cancelled by the client"}),
    ]
    h.cancel(1)
    assert h.take() == []
    assert h.outstanding("echo-0") == 1
    h.werror("echo-0", rid, "CANCELLED")
    assert h.take() == []
    assert h.outstanding("echo-0") == 0
    assert h.metrics()["cancelled"] == 1


def test_cancel_unknown_id_sends_nothing():
    h = Harness()
    h.ready("echo-0")
    h.submit(1)
    h.take()
    h.cancel(99)
    h.cancel("nope")
    h.cancel(1, client=b"other-client")  # same id, another connection
    assert h.take() == []
    assert len(h.core.requests) == 1


def test_cancel_after_done_sends_nothing():
    h = Harness()
    h.ready("echo-0")
    h.submit(1)
    rid = only(h.requests_sent(h.take()))[1]
    h.done("echo-0", rid)
    h.take()
    h.cancel(1)
    assert h.take() == []


# --- worker errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("code,expect,counter", [
    ("OUT_OF_MEMORY", "OUT_OF_MEMORY", "failed"),
    ("CONTEXT_POISONED", "CONTEXT_POISONED", "failed"),
    ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "timed_out"),
    ("BAD_REQUEST", "BAD_REQUEST", "bad_request"),
    ("CANCELLED", "CANCELLED", "cancelled"),
    ("NOT_A_CODE", "INTERNAL", "failed"),
])
def test_worker_error_forwarded(code, expect, counter):
    h = Harness()
    h.ready("echo-0")
    h.submit(1)
    rid = only(h.requests_sent(h.take()))[1]
    h.werror("echo-0", rid, code, "it broke")
    assert h.take() == [("client", b"c1", P.ERROR, {"id": 1, "code": expect, "message": "it broke"})]
    assert h.metrics()[counter] == 1
    assert h.outstanding("echo-0") == 0


def test_worker_message_for_unknown_rid_is_ignored():
    h = Harness()
    h.ready("echo-0")
    h.take()
    h.chunk("echo-0", 12345, "x")
    h.done("echo-0", 12345)
    assert h.take() == []


# --- worker lost -------------------------------------------------------------------------------


def test_worker_exit_requeues_unstarted_request_transparently():
    h = Harness()
    h.ready("echo-0", credits=1, pid=500)
    h.ready("echo-1", credits=1, pid=501)
    h.take()
    h.submit("A", "prompt-a")
    h.submit("B", "prompt-b")
    sent = h.requests_sent(h.take())
    assert [(w, p) for w, _, p in sent] == [("echo-0", "prompt-a"), ("echo-1", "prompt-b")]
    rid_a, rid_b = sent[0][1], sent[1][1]

    h.exited("echo-0", pid=999)  # wrong pid: an older process of that slot
    assert h.take() == []
    assert "echo-0" in h.core.workers and h.outstanding("echo-0") == 1

    h.exited("echo-0", pid=500)
    assert h.take() == []         # nothing to the client, nothing to dispatch to yet
    assert "echo-0" not in h.core.workers
    assert len(h.core.deployments["echo"].queue) == 1

    h.done("echo-1", rid_b)
    msgs = h.take()
    assert h.to_clients(msgs) == [(b"c1", P.DONE, {"id": "B", "finish_reason": "stop", "chunks": 0})]
    assert h.requests_sent(msgs) == [("echo-1", rid_a, "prompt-a")]
    h.chunk("echo-1", rid_a, "word")
    h.done("echo-1", rid_a)
    assert h.to_clients(h.take()) == [
        (b"c1", P.CHUNK, {"id": "A", "index": 0, "text": "word"}),
        (b"c1", P.DONE, {"id": "A", "finish_reason": "stop", "chunks": 1}),
    ]
    # Exactly one ACCEPTED and one final for A over the whole run.
    a_msgs = [c for kind, _, c, b in h.rec.log if kind == "client" and b.get("id") == "A"]
    assert a_msgs == [P.ACCEPTED, P.CHUNK, P.DONE]
    m = h.metrics()
    assert m["completed"] == 2 and m["failed"] == 0
    assert m["queue_ms"]["count"] == 2  # the redispatch is not a second queue sample


def test_worker_exit_after_chunks_is_worker_lost():
    h = Harness()
    h.ready("echo-0", credits=2, pid=42)
    h.submit(1)
    h.submit(2)
    sent = h.requests_sent(h.take())
    h.chunk("echo-0", sent[0][1], "part")
    h.take()
    h.exited("echo-0")
    msgs = h.take()
    client_msgs = h.to_clients(msgs)
    assert len(client_msgs) == 1
    _, command, body = client_msgs[0]
    assert command == P.ERROR and body["id"] == 1 and body["code"] == "WORKER_LOST"
    assert "echo-0" in body["message"]
    assert h.metrics()["failed"] == 1
    # Request 2 (nothing streamed) waits in the queue for the next worker.
    assert len(h.core.deployments["echo"].queue) == 1
    # A late message from the dead worker is answered with DISCONNECT only.
    h.done("echo-0", sent[0][1])
    assert h.take() == [("worker", "echo-0", P.DISCONNECT, {"reason": "not registered"})]
    h.ready("echo-0", credits=2, pid=43)
    assert h.requests_sent(h.take()) == [("echo-0", sent[1][1], "hello world")]


def test_second_worker_loss_is_worker_lost():
    assert MAX_DISPATCHES == 2
    h = Harness()
    h.ready("echo-0", credits=1)
    h.ready("echo-1", credits=1)
    h.take()
    h.submit("A")
    (w0, rid, _), = h.requests_sent(h.take())
    assert w0 == "echo-0"
    h.exited("echo-0")
    msgs = h.take()
    assert h.to_clients(msgs) == []
    assert h.requests_sent(msgs) == [("echo-1", rid, "hello world")]
    h.exited("echo-1")
    _, _, body = only(h.to_clients(h.take()))
    assert (body["id"], body["code"]) == ("A", "WORKER_LOST")
    h.ready("echo-2", credits=1)
    assert h.requests_sent(h.take()) == []
    assert h.core.requests == {}


def test_worker_re_register_loses_its_old_work():
    h = Harness()
    h.ready("echo-0", credits=2, pid=10)
    h.submit(1)
    h.submit(2)
    sent = h.requests_sent(h.take())
    h.chunk("echo-0", sent[1][1], "x")
    h.take()
    h.ready("echo-0", credits=2, pid=11)   # the worker reconnected: its old work is gone
    msgs = h.take()
    clients = h.to_clients(msgs)
    assert [(b["id"], b["code"]) for _, _, b in clients] == [(2, "WORKER_LOST")]
    assert h.requests_sent(msgs) == [("echo-0", sent[0][1], "hello world")]
    assert h.outstanding("echo-0") == 1


def test_done_request_of_lost_worker_is_simply_forgotten():
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit(1)
    rid = only(h.requests_sent(h.take()))[1]
    h.cancel(1)
    h.take()
    assert rid in h.core.requests  # held until the worker answers
    h.exited("echo-0")
    assert h.take() == []
    assert h.core.requests == {}


def test_a_worker_gets_requests_only_once_its_engine_attached_to_its_registration():
    h = Harness()
    h.submit(1)
    h.ready("echo-0", pid=7, attach=False)
    assert h.requests_sent(h.take()) == []
    h.attach("echo-0", 6)                  # an older registration's engine: not this one
    assert h.requests_sent(h.take()) == []
    h.attach("echo-0", 7)
    assert [wid for wid, _, _ in h.requests_sent(h.take())] == ["echo-0"]
    h.attach("echo-1", 3)                  # an engine attaching before its main thread registers
    h.ready("echo-1", pid=3, attach=False)
    assert h.core.workers["echo-1"].serving


def test_readiness_reported_to_supervisor():
    h = Harness()
    h.ready("echo-0")
    h.ready("echo-1")
    h.exited("echo-0")
    readiness = [b for kind, _, c, b in h.rec.log if kind == "supervisor" and c == P.READINESS]
    # (a registered worker is ready once its engine's socket has attached too)
    assert readiness == [{"deployments": {"echo": 0}, "workers": []},
                         {"deployments": {"echo": 1}, "workers": ["echo-0"]},
                         {"deployments": {"echo": 2}, "workers": ["echo-0", "echo-1"]},
                         {"deployments": {"echo": 1}, "workers": ["echo-1"]}]


# --- heartbeats --------------------------------------------------------------------------------


def test_chunks_of_several_requests_in_one_message_keep_their_order():
    h = Harness(max_concurrency=4)
    h.ready("echo-0", credits=4)
    h.submit("A", prompt="a")
    h.submit("B", prompt="b")
    (_, rid_a, _), (_, rid_b, _) = h.requests_sent(h.take())
    h.worker("echo-0", P.CHUNKS, chunks=[[rid_a, "a1"], [rid_b, "b1"], [rid_a, "a2", "length"],
                                         [rid_b, 7], ["nope"], [999999, "late"]])
    msgs = h.take()
    assert h.to_clients(msgs)[:3] == [
        (b"c1", P.CHUNK, {"id": "A", "index": 0, "text": "a1"}),
        (b"c1", P.CHUNK, {"id": "B", "index": 0, "text": "b1"}),
        (b"c1", P.DONE, {"id": "A", "finish_reason": "length", "index": 1, "text": "a2", "chunks": 2}),
    ]  # the well-formed entries are delivered, in order; the unknown rid is skipped
    # B's malformed chunk ends B: its output would otherwise have a silent gap. The worker still
    # holds B's slot until it answers the CANCEL; A's DONE freed A's.
    (_, _, error), = h.to_clients(msgs)[3:]
    assert (error["id"], error["code"]) == ("B", "INTERNAL") and "malformed" in error["message"]
    assert ("worker", "echo-0", P.CANCEL, {"rid": rid_b}) in msgs
    assert h.outstanding("echo-0") == 1
    h.worker("echo-0", P.CHUNKS, chunks="not a list")
    h.done("echo-0", rid_a, "length")  # late: A has ended
    h.worker("echo-0", P.ERROR, rid=rid_b, code="CANCELLED", message="cancelled")
    assert [m for m in h.take() if m[0] == "client"] == []
    assert h.outstanding("echo-0") == 0


def test_rebuild_stops_dispatch_until_the_worker_is_ready_again():
    h = Harness(max_concurrency=2, watchdog_s=5.0)
    h.ready("echo-0", credits=2)
    h.ready("echo-1", credits=2)
    h.take()
    h.submit("A")
    (running_on, rid, _), = h.requests_sent(h.take())
    asked = h.core.rebuild("echo")
    assert asked == {"echo-0": 0, "echo-1": 0}
    msgs = h.take()
    assert sorted((m[1], m[2]) for m in msgs if m[0] == "worker") == [("echo-0", P.REBUILD), ("echo-1", P.REBUILD)]
    assert {w.state for w in h.core.workers.values()} == {"rebuilding"}
    # Rebuilding workers get nothing: new requests wait in the queue.
    h.submit("B")
    assert h.requests_sent(h.take()) == []
    assert h.metrics()["queued"] == 1
    # The running request still finishes normally.
    h.done(running_on, rid)
    assert [c for _, c, _ in h.to_clients(h.take())] == [P.DONE]
    # A rebuild is not a hang, however long it takes: a request that crossed the REBUILD
    # on the wire waits in the worker with no output, past the watchdog.
    h.worker("echo-1", P.HEARTBEAT, state="ready", credits=2, in_flight=0)  # a heartbeat sent before REBUILD
    (crossed_on, crossed, _), = h.requests_sent(h.take())
    assert crossed_on == "echo-1"
    h.worker("echo-1", P.HEARTBEAT, state="rebuilding", credits=0, in_flight=1)
    h.clock.advance(20)
    h.worker("echo-0", P.HEARTBEAT, state="rebuilding", credits=0, in_flight=0)
    h.worker("echo-1", P.HEARTBEAT, state="rebuilding", credits=0, in_flight=1)
    h.core.tick()
    assert not [m for m in h.take() if m[2] == P.UNRESPONSIVE]
    assert set(h.core.workers) == {"echo-0", "echo-1"}
    # Back to ready with one more rebuild: the next request is dispatched there.
    h.worker("echo-0", P.HEARTBEAT, state="ready", credits=2, in_flight=0, rebuilds=1)
    h.submit("C")
    (w, _, _), = h.requests_sent(h.take())
    assert w == "echo-0" and h.core.workers["echo-0"].rebuilds == 1
    h.done("echo-1", crossed)
    assert [c for _, c, _ in h.to_clients(h.take())] == [P.DONE]


def test_rebuild_skips_loading_workers_and_unknown_deployment_raises():
    h = Harness()
    h.ready("echo-0", credits=2, state="loading")
    h.ready("echo-1", credits=2)
    h.take()
    assert h.core.rebuild("echo") == {"echo-1": 0}
    with pytest.raises(KeyError):
        h.core.rebuild("nope")


def test_failure_reported_before_exit_stays_in_status():
    h = Harness()
    h.ready("echo-0", credits=2)
    h.core.on_supervisor([P.SUPERVISOR, P.WORKERS, P.pack({"workers": [
        {"id": "echo-0", "deployment": "echo", "pid": h.pids["echo-0"], "state": "running", "restarts": 0,
         "last_exit": None}]})])
    h.worker("echo-0", P.HEARTBEAT, state="failed", credits=0, in_flight=0, failure="unrecoverable",
             reason="UnrecoverableError: weights file /x.safetensors: no such file")
    h.exited("echo-0", status=3)
    h.core.on_supervisor([P.SUPERVISOR, P.WORKERS, P.pack({"workers": [
        {"id": "echo-0", "deployment": "echo", "pid": 0, "state": "failed", "restarts": 0,
         "last_exit": "unrecoverable (status 3)"}]})])
    row, = h.core.status()["workers"]
    assert row["state"] == "failed" and "weights file /x.safetensors" in row["failure"]
    # A new registration starts clean.
    h.ready("echo-0", credits=2)
    h.core.on_supervisor([P.SUPERVISOR, P.WORKERS, P.pack({"workers": [
        {"id": "echo-0", "deployment": "echo", "pid": h.pids["echo-0"], "state": "running", "restarts": 0,
         "last_exit": None}]})])
    row, = h.core.status()["workers"]
    assert row["failure"] is None


def test_heartbeat_expiry_loses_worker_and_disconnects():
    h = Harness(broker={"heartbeat_interval_ms": 100, "heartbeat_liveness": 3})
    h.ready("echo-0", credits=1)
    h.ready("echo-1", credits=1)
    h.submit("A")
    (w, rid, _), = h.requests_sent(h.take())
    assert w == "echo-0"
    h.clock.advance(0.2)
    h.heartbeat("echo-1", credits=1)
    h.core.tick()
    msgs = h.take(heartbeats=True)
    assert sorted((m[1], m[2]) for m in msgs) == [("echo-0", P.HEARTBEAT), ("echo-1", P.HEARTBEAT)]
    assert "echo-0" in h.core.workers
    h.clock.advance(0.15)          # echo-0 silent for 0.35 s > 3 * 0.1 s
    h.heartbeat("echo-1", credits=1)
    h.core.tick()
    msgs = h.take(heartbeats=True)
    # The process may be alive but stuck: the supervisor is asked to kill it.
    unresponsive = only([m for m in msgs if m[2] == P.UNRESPONSIVE])
    assert unresponsive[3]["worker"] == "echo-0" and unresponsive[3]["pid"] == h.pids["echo-0"]
    assert unresponsive[3]["reason"].startswith("no message for ")
    # It is not invited back (no DISCONNECT), and its process may not register again.
    assert not [m for m in msgs if m[2] == P.DISCONNECT]
    assert ("worker", "echo-1", P.HEARTBEAT, {}) in msgs
    assert h.requests_sent(msgs) == [("echo-1", rid, "hello world")]
    assert h.to_clients(msgs) == []
    assert "echo-0" not in h.core.workers and "echo-1" in h.core.workers
    h.ready("echo-0", credits=1, pid=h.pids["echo-0"])
    assert "echo-0" not in h.core.workers
    h.ready("echo-0", credits=1, pid=h.pids["echo-0"] + 10)  # its replacement may
    assert "echo-0" in h.core.workers


def test_heartbeat_expiry_with_streamed_output_is_worker_lost():
    h = Harness(broker={"heartbeat_interval_ms": 100, "heartbeat_liveness": 2})
    h.ready("echo-0", credits=1)
    h.submit("A")
    rid = only(h.requests_sent(h.take()))[1]
    h.chunk("echo-0", rid, "a")
    h.take()
    h.advance(0.15)
    assert h.take() == []            # 0.15 s of silence is within 2 * 0.1 s
    h.advance(0.1)
    msgs = h.take()
    assert [(b["id"], b["code"]) for _, _, b in h.to_clients(msgs)] == [("A", "WORKER_LOST")]
    assert [m[2] for m in msgs if m[0] == "supervisor"] == [P.UNRESPONSIVE]


def test_any_worker_message_counts_as_heartbeat():
    h = Harness(broker={"heartbeat_interval_ms": 100, "heartbeat_liveness": 2})
    h.ready("echo-0", credits=1)
    h.submit("A")
    rid = only(h.requests_sent(h.take()))[1]
    for i in range(10):
        h.clock.advance(0.15)
        h.chunk("echo-0", rid, f"w{i}")
        h.core.tick()
    assert "echo-0" in h.core.workers
    assert all(m[2] != P.DISCONNECT for m in h.take())


def test_unknown_worker_heartbeat_gets_disconnect():
    h = Harness()
    h.heartbeat("echo-7")
    assert h.take() == [("worker", "echo-7", P.DISCONNECT, {"reason": "not registered"})]


def test_ready_for_unknown_deployment_gets_disconnect():
    h = Harness()
    h.worker("x-0", P.READY, deployment="nope", device="cpu", pid=1, state="ready", credits=2)
    assert h.take() == [("worker", "x-0", P.DISCONNECT, {"reason": "unknown deployment"})]
    assert h.core.workers == {}


def test_message_claiming_another_worker_is_ignored():
    h = Harness()
    h.ready("echo-0", credits=1)
    h.ready("echo-1", credits=1)
    h.submit("A")
    (w, rid, _), = h.requests_sent(h.take())
    assert w == "echo-0"
    # echo-1's connection sends a DONE for echo-0's request, claiming to be echo-0, and vice versa.
    h.worker("echo-0", P.DONE, identity="echo-1", rid=rid, finish_reason="stop")
    h.worker("echo-1", P.DONE, identity="echo-0", rid=rid, finish_reason="stop")
    h.worker("echo-9", P.READY, identity="echo-0", deployment="echo", device="cpu", pid=3, state="ready",
             credits=5)
    assert h.take() == []
    assert h.outstanding("echo-0") == 1
    assert "echo-9" not in h.core.workers
    assert h.core.workers["echo-0"].credits == 1


def test_malformed_worker_message_is_ignored():
    h = Harness()
    h.ready("echo-0")
    h.take()
    h.core.on_worker(b"echo-0", [P.CLIENT, P.DONE, P.pack({"worker": "echo-0"})])
    h.core.on_worker(b"echo-0", [P.WORKER, P.DONE])
    h.core.on_worker(b"echo-0", [P.WORKER, b"NOPE", P.pack({"worker": "echo-0"})])
    assert h.take() == []
    assert "echo-0" in h.core.workers


# --- drain -------------------------------------------------------------------------------------


def drained_count(h: Harness) -> int:
    return sum(1 for kind, _, c, _ in h.rec.log if kind == "supervisor" and c == P.DRAINED)


def test_drain_fails_queued_lets_running_finish_and_reports_drained_once():
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit("A")
    h.submit("B")
    h.submit("C", priority=0)
    rid_a = only(h.requests_sent(h.take()))[1]

    h.core.drain(5.0)
    msgs = h.take()
    assert sorted((b["id"], b["code"]) for _, _, b in h.to_clients(msgs)) == [
        ("B", "SHUTTING_DOWN"), ("C", "SHUTTING_DOWN")]
    assert drained_count(h) == 0
    assert len(h.core.deployments["echo"].queue) == 0

    h.submit("D")
    _, command, body = only(h.to_clients(h.take()))
    assert (command, body["id"], body["code"]) == (P.ERROR, "D", "SHUTTING_DOWN")
    assert drained_count(h) == 0

    h.chunk("echo-0", rid_a, "still")
    h.done("echo-0", rid_a)
    msgs = h.take()
    assert h.to_clients(msgs) == [(b"c1", P.CHUNK, {"id": "A", "index": 0, "text": "still"}),
                                  (b"c1", P.DONE, {"id": "A", "finish_reason": "stop", "chunks": 1})]
    assert drained_count(h) == 1
    assert h.requests_sent(msgs) == []
    h.advance(10.0)
    h.core.drain(1.0)
    assert drained_count(h) == 1


def test_drain_with_nothing_in_flight_reports_at_once():
    h = Harness()
    h.core.drain(5.0)
    assert drained_count(h) == 1
    h.core.drain(5.0)
    h.advance(6.0)
    assert drained_count(h) == 1


def test_drain_grace_expiry_fails_running_requests():
    h = Harness()
    h.ready("echo-0", credits=2)
    h.submit("A")
    h.submit("B")
    sent = h.requests_sent(h.take())
    h.core.drain(1.0)
    assert h.take() == []
    h.advance(0.5)
    assert h.take() == []
    assert drained_count(h) == 0
    h.advance(0.6)
    msgs = h.take()
    assert sorted((b["id"], b["code"]) for _, _, b in h.to_clients(msgs)) == [
        ("A", "SHUTTING_DOWN"), ("B", "SHUTTING_DOWN")]
    assert sorted(m[3]["rid"] for m in msgs if m[0] == "worker" and m[2] == P.CANCEL) == sorted(
        rid for _, rid, _ in sent)
    assert drained_count(h) == 1
    # The worker's late finals reach nobody and do not repeat DRAINED.
    for _, rid, _ in sent:
        h.werror("echo-0", rid, "CANCELLED")
    assert h.take() == []
    assert drained_count(h) == 1
    assert h.core.requests == {}


def test_worker_lost_during_drain_is_not_requeued():
    h = Harness()
    h.ready("echo-0", credits=1)
    h.ready("echo-1", credits=1)
    h.submit("A")
    h.take()
    h.core.drain(30.0)
    h.exited("echo-0")
    msgs = h.take()
    assert h.requests_sent(msgs) == []
    _, command, body = only(h.to_clients(msgs))
    assert command == P.ERROR and body["id"] == "A"
    assert body["code"] == "WORKER_LOST"
    assert drained_count(h) == 1


# --- client gone -------------------------------------------------------------------------------


def test_a_gone_client_has_its_requests_ended_and_their_finals_held_until_it_is_back():
    h = Harness(broker={"client_hold_s": 5.0}, default_deadline_ms=10_000)
    h.ready("echo-0", credits=1)
    h.submit("A", "a", client=b"gone")
    h.submit("B", "b", client=b"gone")
    h.submit("C", "c", client=b"stays")
    rid_a = only(h.requests_sent(h.take()))[1]
    h.rec.blocked[b"gone"] = GONE      # its connection was reset (say, after an oversize frame)
    h.chunk("echo-0", rid_a, "x")      # the broker learns it on the next reply it tries to send
    h.advance(0.0)
    msgs = h.take()
    assert h.to_clients(msgs) == []
    assert ("worker", "echo-0", P.CANCEL, {"rid": rid_a}) in msgs   # A stops; B leaves the queue
    assert len(h.core.deployments["echo"].queue) == 1 and h.metrics()["cancelled"] == 2
    h.done("echo-0", rid_a)            # the worker's own final for A frees its credit: C runs
    (_, rid_c, prompt), = h.requests_sent(h.take())
    assert prompt == "c"
    del h.rec.blocked[b"gone"]         # it reconnected under the same routing id
    h.advance(0.3)
    assert [(c, cmd, b["id"], b["code"]) for c, cmd, b in h.to_clients(h.take())] == [
        (b"gone", P.ERROR, "A", "CONNECTION_RESET"), (b"gone", P.ERROR, "B", "CONNECTION_RESET")]
    assert h.core.held == {}
    h.submit("D", "d", client=b"gone")  # and it is served again
    assert h.to_clients(h.take())[0][1] == P.ACCEPTED


def test_a_gone_client_that_does_not_come_back_is_forgotten_after_client_hold_s():
    h = Harness(broker={"client_hold_s": 2.0})
    h.ready("echo-0", credits=2)
    h.submit("A", client=b"gone")
    rid_a = only(h.requests_sent(h.take()))[1]
    h.rec.blocked[b"gone"] = GONE
    h.chunk("echo-0", rid_a, "x")
    h.advance(0.0)
    for _ in range(7):
        h.advance(0.25)
    assert b"gone" in h.core.held      # 1.75 s after: still held
    h.advance(0.5)
    assert h.core.held == {}
    assert h.to_clients(h.rec.log) == [(b"gone", P.ACCEPTED, {"id": "A", "epoch": h.core.epoch, "join": " "})]


def test_a_client_that_is_full_for_a_moment_gets_everything_in_order():
    h = Harness(broker={"client_send_hwm": 100}, max_concurrency=4)
    h.ready("echo-0", credits=4)
    h.submit("A", client=b"busy")
    h.submit("B", client=b"busy")
    (_, rid_a, _), (_, rid_b, _) = h.requests_sent(h.take())
    h.rec.blocked[b"busy"] = FULL      # ZeroMQ's queue for it is at client_send_hwm, for now
    h.chunk("echo-0", rid_a, "a0")
    h.done("echo-0", rid_b)
    h.submit("C", client=b"busy")      # still accepted: the connection is only backlogged
    h.advance(0.0)
    assert h.to_clients(h.take()) == []
    del h.rec.blocked[b"busy"]
    h.advance(0.01)
    got = [(cmd, b["id"]) for _, cmd, b in h.to_clients(h.take())]
    assert got == [(P.CHUNK, "A"), (P.DONE, "B"), (P.ACCEPTED, "C")]
    assert h.core.held == {} and h.metrics()["cancelled"] == 0


def test_a_slow_reader_gets_one_final_per_accepted_request_once_it_reads_again():
    h = Harness(broker={"client_send_hwm": 100}, max_concurrency=4)
    h.ready("echo-0", credits=4)
    h.submit("A", client=b"slow")
    h.submit("B", client=b"slow")
    h.submit("X", client=b"other")
    (_, rid_a, _), (_, rid_b, _), (_, rid_x, _) = h.requests_sent(h.take())
    h.rec.blocked[b"slow"] = FULL
    h.chunk("echo-0", rid_b, "b0")
    h.done("echo-0", rid_b)            # B's DONE waits behind B's chunk in the backlog
    for i in range(100):               # ... until the backlog passes client_send_hwm: a slow reader
        h.chunk("echo-0", rid_a, f"a{i}")
    h.chunk("echo-0", rid_x, "x1")
    h.advance(0.0)
    msgs = h.take()
    assert h.to_clients(msgs) == [(b"other", P.CHUNK, {"id": "X", "index": 0, "text": "x1"})]
    assert ("worker", "echo-0", P.CANCEL, {"rid": rid_a}) in msgs
    # While cut it is refused new work, and a PING is answered later, in order.
    h.submit("C", client=b"slow")
    h.client(b"slow", P.PING, {"id": "p"})
    assert h.to_clients(h.take()) == []
    h.advance(1.0)
    assert b"slow" in h.core.held      # still not reading: nothing owed is dropped
    del h.rec.blocked[b"slow"]
    h.advance(0.05)
    got = [(cmd, b.get("id"), b.get("code")) for _, cmd, b in h.to_clients(h.take())]
    # B's chunk was dropped, so its DONE became the cut's error; no chunk is delivered at all.
    assert got == [(P.ERROR, "B", "SLOW_READER"), (P.ERROR, "A", "SLOW_READER"),
                   (P.ERROR, "C", "SLOW_READER"), (P.PONG, "p", None)]
    h.submit("D", client=b"slow")
    assert h.to_clients(h.take())[0][1] == P.ACCEPTED


def test_a_slow_readers_accepted_is_held_with_its_final_and_other_replies_are_bounded():
    from inferd.broker.delivery import MAX_OTHERS
    h = Harness(broker={"client_send_hwm": 100})
    h.ready("echo-0", credits=2)
    h.take()
    h.rec.blocked[b"slow"] = FULL
    h.submit("A", client=b"slow")      # its ACCEPTED is the first message that does not fit
    for i in range(100 + MAX_OTHERS + 50):
        h.client(b"slow", P.PING, {"id": i})
    h.advance(0.0)
    assert h.core.held[b"slow"].cut
    del h.rec.blocked[b"slow"]
    h.advance(0.05)
    got = [(cmd, b.get("id")) for _, cmd, b in h.to_clients(h.take())]
    assert got[0] == (P.ACCEPTED, "A") and (P.ERROR, "A") in got
    pongs = [i for cmd, i in got if cmd == P.PONG]
    assert pongs == list(range(MAX_OTHERS))  # in order; the ones past MAX_OTHERS were dropped, and counted
    assert len(got) == 2 + MAX_OTHERS


# --- the invariant -----------------------------------------------------------------------------


@dataclass
class ReqState:
    client: bytes
    cid: Any
    accepted: bool = False
    final: str | None = None    # "DONE" or the ERROR code
    chunks: int = 0
    messages: int = 0
    abandoned: bool = False     # its client went away
    submitted_at: float = 0.0


@dataclass
class WorkerState:
    wid: str
    pid: int = 0
    credits: int = 0
    alive: bool = False
    registered: bool = False
    held: dict[int, bool] = field(default_factory=dict)  # rid -> CANCEL received
    generation: int = 0


class World:
    """Drives a BrokerCore at random and checks every message it sends against a model."""

    def __init__(self, seed: int, n_workers: int, accept_delay_ms: int):
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.rec = Recorder()
        self.capacity = 5
        self.accept_delay_s = accept_delay_ms / 1000
        self.config = parse({
            "broker": {"heartbeat_interval_ms": 100, "heartbeat_liveness": 3, "accept_delay_ms": accept_delay_ms},
            "deployment": [{"name": "echo", "runtime": "echo", "queue_capacity": self.capacity,
                            "priority_levels": 3, "default_priority": 1, "default_deadline_ms": 1500}],
        }, "<random>")
        self.core = BrokerCore(self.config, self.rec, clock=self.clock)
        self.cursor = 0
        self.workers = {f"echo-{i}": WorkerState(f"echo-{i}") for i in range(n_workers)}
        self.next_pid = 100
        self.clients = [b"client-0", b"client-1", b"client-2"]
        self.next_client = 3
        self.gone: set[bytes] = set()
        self.reqs: dict[tuple[bytes, Any], ReqState] = {}
        self.by_prompt: dict[str, tuple[bytes, Any]] = {}
        self.rid_key: dict[int, tuple[bytes, Any]] = {}
        self.dispatches: dict[int, int] = {}
        self.serial = 0
        self.draining = False
        self.drained = 0
        self.stats: dict[str, int] = {}
        for w in self.workers.values():
            self.start_worker(w)
        self.pump()

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    # --- checking what the broker sent --------------------------------------------------------

    def pump(self) -> list:
        self.core.flush()
        new = self.rec.log[self.cursor:]
        self.cursor = len(self.rec.log)
        self.unaccepted_dispatches: set[tuple[bytes, Any]] = set()
        for kind, target, command, body in new:
            if kind == "client":
                self.on_client_msg(target, command, body)
            elif kind == "worker":
                self.on_worker_msg(target, command, body)
            else:
                if command == P.DRAINED:
                    self.drained += 1
                    assert self.draining
                    assert self.drained == 1, "DRAINED sent twice"
                    pending = [k for k, s in self.reqs.items() if s.accepted and s.final is None and not s.abandoned]
                    assert pending == [], f"DRAINED with requests still pending: {pending}"
                elif command == P.LOAD:
                    assert body["workers"] == {wid: len(w.requests) for wid, w in self.core.workers.items()}
                elif command == P.UNRESPONSIVE:
                    assert body["worker"] not in self.core.workers, "UNRESPONSIVE for a worker still registered"
                    w = self.workers[body["worker"]]
                    assert body["pid"] == w.pid
                    w.registered = False
                    w.held.clear()
                    # Its main thread may still run and register again: that must be ignored.
                    before = len(self.rec.log)
                    self.send_worker(w.wid, P.READY, deployment="echo", device="cpu:0", pid=w.pid,
                                     runtime="echo", state="ready", credits=1, in_flight=0)
                    assert len(self.rec.log) == before and w.wid not in self.core.workers
                    w.alive = False  # and the supervisor kills it
                    self.count("unresponsive")
                else:
                    assert command == P.READINESS
        # The broker may send a REQUEST before the ACCEPTED, but within the same handler.
        assert not self.unaccepted_dispatches, f"dispatched, never accepted: {self.unaccepted_dispatches}"
        return new

    def on_client_msg(self, client: bytes, command: bytes, body: dict) -> None:
        assert client not in self.gone, f"message to a gone client: {command} {body}"
        key = (client, body["id"])
        st = self.reqs.get(key)
        assert st is not None, f"message for an unknown request {key}: {command} {body}"
        assert st.final is None, f"message after the final for {key}: {command} {body} (final was {st.final})"
        assert not st.abandoned
        st.messages += 1
        if command == P.ACCEPTED or "epoch" in body:  # an ACCEPTED, or a first reply that carries it
            assert st.messages == 1 and not st.accepted
            assert body["epoch"] == self.core.epoch and body["join"] == " "
            assert command == P.ACCEPTED or self.accept_delay_s, "acceptance folded in a reply with no delay"
            st.accepted = True
            self.unaccepted_dispatches.discard(key)
            self.count("accepted" if command == P.ACCEPTED else "accepted-in-reply")
        if command == P.ACCEPTED:
            pass
        elif command == P.CHUNK:
            assert st.accepted
            assert body["index"] == st.chunks
            st.chunks += 1
        elif command == P.DONE:
            assert st.accepted
            if "text" in body:  # the last chunk rides in DONE
                assert body["index"] == st.chunks
                st.chunks += 1
            assert body["chunks"] == st.chunks
            st.final = "DONE"
            self.count("DONE")
        elif command == P.ERROR:
            st.final = body["code"]
            if body["code"] == "BACKPRESSURE":
                retry = body["details"]["retry_after_ms"]
                assert type(retry) is int and retry > 0
            self.count(("accepted-" if st.accepted else "rejected-") + body["code"])
        else:
            raise AssertionError(f"unexpected client command {command}")

    def on_worker_msg(self, wid: str, command: bytes, body: dict) -> None:
        w = self.workers[wid]
        if command == P.REQUEST:
            assert w.alive and w.registered, f"REQUEST to {wid}, which is not registered"
            rid = body["rid"]
            assert rid not in w.held
            w.held[rid] = False
            assert len(w.held) <= w.credits, f"{wid} has {len(w.held)} outstanding with {w.credits} credits"
            key = self.by_prompt[body["prompt"]]
            assert self.rid_key.setdefault(rid, key) == key
            self.dispatches[rid] = self.dispatches.get(rid, 0) + 1
            assert self.dispatches[rid] <= MAX_DISPATCHES
            if self.dispatches[rid] == 2:
                self.count("redispatched")
            st = self.reqs[key]
            # (A gone client's request may still run: the broker learns that a client is gone only
            # when a reply to it fails.)
            assert st.final is None, f"dispatch of a finished request {key}"
            if not st.accepted and not self.accept_delay_s:
                self.unaccepted_dispatches.add(key)
            assert st.chunks == 0, "a request that streamed output was dispatched again"
            assert not self.draining or self.dispatches[rid] == 1
        elif command == P.CANCEL:
            assert body["rid"] in w.held, f"CANCEL to {wid} for rid {body['rid']} it does not hold"
            w.held[body["rid"]] = True
            self.count("cancel-to-worker")
        elif command == P.DISCONNECT:
            w.registered = False
            w.held.clear()
            self.count("disconnect")
        else:
            assert command == P.HEARTBEAT

    def check_state(self) -> None:
        for wid, w in self.workers.items():
            assert len(w.held) <= w.credits
            if w.registered:
                rec = self.core.workers[wid]
                assert rec.pid == w.pid
                assert worker_rids(rec) == set(w.held)
                assert len(worker_rids(rec)) <= rec.credits
            else:
                assert wid not in self.core.workers
        assert len(self.core.deployments["echo"].queue) <= self.capacity + sum(
            w.credits for w in self.workers.values()) + len(self.workers) * 3

    # --- worker actions -----------------------------------------------------------------------

    def send_worker(self, wid: str, command: bytes, claim: str | None = None, **body: Any) -> None:
        body["worker"] = claim or wid
        self.core.on_worker(wid.encode(), [P.WORKER, command, P.pack(body)])

    def start_worker(self, w: WorkerState) -> None:
        self.next_pid += 1
        w.pid = self.next_pid
        w.alive = True
        self.register(w)

    def register(self, w: WorkerState) -> None:
        w.credits = self.rng.randint(1, 3)
        w.held.clear()
        w.registered = True
        w.generation += 1
        # The engine's ATTACH and the main thread's READY come over two connections: either may be first.
        attach_first = self.rng.random() < 0.3
        if attach_first:
            self.attach(w)
        self.send_worker(w.wid, P.READY, deployment="echo", device="cpu:0", pid=w.pid, runtime="echo",
                         state="ready", credits=w.credits, in_flight=0, generation=w.generation)
        if not attach_first:
            self.attach(w)

    def attach(self, w: WorkerState) -> None:
        body = {"worker": w.wid, "generation": w.generation}
        self.core.on_worker((w.wid + P.ENGINE_SUFFIX).encode(), [P.WORKER, P.ATTACH, P.pack(body)])

    def live_workers(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.alive and w.registered]

    def busy_workers(self) -> list[WorkerState]:
        return [w for w in self.live_workers() if w.held]

    def worker_final(self, w: WorkerState, rid: int, kind: str) -> None:
        del w.held[rid]
        if kind == "done":
            text = f"t{self.rng.randrange(100)}" if self.rng.random() < 0.5 else None
            self.send_worker(w.wid, P.CHUNKS, chunks=[[rid, text, self.rng.choice(["stop", "length"])]])
        else:
            self.send_worker(w.wid, P.ERROR, rid=rid, code=kind, message="worker says no")

    # --- one random step ----------------------------------------------------------------------

    def submit(self, client: bytes | None = None) -> None:
        client = client or self.rng.choice(self.clients)
        self.serial += 1
        cid: Any = self.serial if self.serial % 2 else f"r{self.serial}"
        prompt = f"p{self.serial}"
        key = (client, cid)
        self.reqs[key] = st = ReqState(client, cid)
        self.by_prompt[prompt] = key
        body: dict[str, Any] = {"id": cid, "deployment": "echo", "prompt": prompt}
        invalid = self.rng.random() < 0.03
        if invalid:
            body["priority"] = 3
        elif self.rng.random() < 0.8:
            body["priority"] = self.rng.choice([0, 1, 1, 2, 2, 2])
        if self.rng.random() < 0.6:
            body["deadline_ms"] = self.rng.randint(20, 3000)
        queue_len = len(self.core.deployments["echo"].queue)
        self.core.on_client(client, [P.CLIENT, P.SUBMIT, P.pack(body)])
        self.pump()
        st.submitted_at = self.clock()
        # Answered at once: ACCEPTED, or a final ERROR; with a delay, an accepted request may instead
        # have its acceptance in a later reply (or its own ACCEPTED once the delay has passed).
        if self.accept_delay_s and st.messages == 0:
            return
        assert st.messages >= 1
        assert st.accepted or st.final is not None
        if self.draining:
            assert (st.accepted, st.final) == (False, "SHUTTING_DOWN")
        elif invalid:
            assert (st.accepted, st.final) == (False, "BAD_REQUEST")
        elif not st.accepted:
            assert st.final == "BACKPRESSURE"
            assert queue_len >= self.capacity

    def cancel(self) -> None:
        client = self.rng.choice(self.clients)
        mine = [k for k in self.reqs if k[0] == client]
        if mine and self.rng.random() < 0.85:
            key = self.rng.choice(mine[-12:])
        else:
            key = (client, f"unknown-{self.rng.randrange(1000)}")
        st = self.reqs.get(key)
        before = len(self.rec.log)
        was_final = st.final if st else None
        self.core.on_client(client, [P.CLIENT, P.CANCEL, P.pack({"id": key[1]})])
        self.pump()
        if st is None:
            assert len(self.rec.log) == before, "CANCEL of an unknown id was answered"
        elif was_final is not None or (not st.accepted and st.messages):
            assert st.final == was_final
            assert not any(m[0] == "client" for m in self.rec.log[before:])
        else:
            assert st.final == "CANCELLED"
            self.count("client-cancel")

    def step(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.28:
            self.submit()
        elif r < 0.34:
            self.cancel()
        elif r < 0.48:
            busy = self.busy_workers()
            if busy:
                w = rng.choice(busy)
                rid = rng.choice(list(w.held))
                self.send_worker(w.wid, P.CHUNKS, chunks=[[rid, f"t{rng.randrange(100)}"]])
                if rng.random() < 0.2:
                    self.worker_final(w, rid, "done")
        elif r < 0.60:
            busy = self.busy_workers()
            if busy:
                w = rng.choice(busy)
                # A worker answers CANCELs first, mostly.
                cancelled = [rid for rid, c in w.held.items() if c]
                rid = rng.choice(cancelled) if cancelled and rng.random() < 0.7 else rng.choice(list(w.held))
                kind = rng.choices(["done", "CANCELLED", "INTERNAL", "OUT_OF_MEMORY", "BOGUS"],
                                   [10, 2 if not w.held[rid] else 10, 1, 1, 1])[0]
                self.worker_final(w, rid, kind)
        elif r < 0.72:
            for w in self.workers.values():
                if w.alive and rng.random() < 0.6:
                    if w.registered:
                        self.send_worker(w.wid, P.HEARTBEAT, state="ready", credits=w.credits,
                                         in_flight=len(w.held))
                    else:
                        self.register(w)
                        self.count("re-ready-after-disconnect")
        elif r < 0.735:
            alive = [w for w in self.workers.values() if w.alive]
            if alive:
                w = rng.choice(alive)
                before = len(self.rec.log)
                self.core.on_worker_exited(w.wid, w.pid + 1000, -9)  # a stale pid: ignored
                assert len(self.rec.log) == before
                self.core.on_worker_exited(w.wid, w.pid, -9)
                w.alive = False
                w.registered = False
                w.held.clear()
                self.count("exit")
        elif r < 0.76:
            dead = [w for w in self.workers.values() if not w.alive]
            if dead:
                self.start_worker(rng.choice(dead))
                self.count("restart")
        elif r < 0.77:
            live = self.live_workers()
            if live:
                # A live worker registers again (it reconnected): its old work is dropped.
                self.register(rng.choice(live))
                self.count("re-register")
        elif r < 0.78:
            # A message from a worker the broker does not know: DISCONNECT and nothing else.
            unknown = [w for w in self.workers.values() if not w.registered]
            if unknown and self.rid_key:
                w = rng.choice(unknown)
                before = len(self.rec.log)
                self.send_worker(w.wid, P.CHUNKS, chunks=[[rng.choice(list(self.rid_key)), None, "stop"]])
                assert self.rec.log[before:] == [("worker", w.wid, P.DISCONNECT, {"reason": "not registered"})]
                if not w.alive:
                    self.rec.log.pop()  # a dead process hears nothing
                    self.cursor = len(self.rec.log)
        elif r < 0.79:
            busy = self.busy_workers()
            others = [w for w in self.workers.values() if w.registered]
            if busy and len(others) > 1:
                w = rng.choice(busy)
                liar = rng.choice([o for o in others if o is not w])
                before = len(self.rec.log)
                self.send_worker(liar.wid, P.CHUNKS, claim=w.wid, chunks=[[rng.choice(list(w.held)), None, "stop"]])
                assert len(self.rec.log) == before, "a message claiming another worker's id was acted on"
        elif r < 0.97:
            if rng.random() < 0.1:
                self.clock.advance(rng.uniform(0.2, 0.6))
            else:
                self.clock.advance(rng.uniform(0.0, 0.06))
            self.core.tick()
            self.pump()
            late = [k for k, st in self.reqs.items() if not st.messages and not st.abandoned
                    and k[0] not in self.gone and st.submitted_at + self.accept_delay_s <= self.clock()]
            assert not late, f"accepted, and no reply within accept_delay_ms: {late}"
        else:
            if rng.random() < 0.3:
                client = rng.choice(self.clients)
                for st in self.reqs.values():
                    if st.client == client and st.final is None:  # accepted (or its acceptance not yet heard)
                        st.abandoned = True
                self.rec.blocked[client] = GONE  # it never comes back: whatever it is owed stays held
                self.gone.add(client)
                self.clients.remove(client)
                self.clients.append(b"client-%d" % self.next_client)
                self.next_client += 1
                self.count("client-gone")
        self.pump()
        self.check_state()

    # --- ending -------------------------------------------------------------------------------

    def settle(self, until: float) -> None:
        """Keep the workers alive and tick until the clock passes ``until``."""
        while self.clock() < until:
            for w in self.workers.values():
                if w.alive and w.registered:
                    self.send_worker(w.wid, P.HEARTBEAT, state="ready", credits=w.credits, in_flight=len(w.held))
            self.pump()
            self.clock.advance(0.05)
            self.core.tick()
            self.pump()
            self.check_state()

    def finish_workers(self) -> None:
        """Workers answer everything they hold; nothing of it may reach a client."""
        for w in self.workers.values():
            if w.alive and w.registered:
                for rid in list(w.held):
                    before = len(self.rec.log)
                    self.worker_final(w, rid, "done")
                    new = self.pump()
                    assert [m for m in new if m[0] == "client"] == [], "a finished request was answered again"
                    del before
        self.check_state()

    def check_all_final(self) -> None:
        pending = [k for k, s in self.reqs.items() if s.accepted and s.final is None and not s.abandoned]
        assert pending == [], f"accepted requests without a final reply: {pending}"
        for st in self.reqs.values():
            # An abandoned request's acceptance may have been deferred, and never delivered.
            assert st.messages >= 1 or (st.abandoned and self.accept_delay_s)
            if st.abandoned:
                assert st.final is None
            else:
                assert st.final is not None


def run_world(seed: int, n_workers: int, steps: int, drain: bool, accept_delay_ms: int = 0) -> World:
    world = World(seed, n_workers, accept_delay_ms)
    for _ in range(steps):
        world.step()
    if drain:
        world.draining = True
        grace = world.rng.uniform(0.1, 1.0)
        world.core.drain(grace)
        world.pump()
        world.check_state()
        end = world.clock() + grace
        for _ in range(steps // 10):
            world.step()
        world.settle(max(end, world.clock()) + 0.2)
        assert world.drained == 1
    else:
        world.settle(world.clock() + 3.5)
    world.check_all_final()
    world.finish_workers()
    world.settle(world.clock() + 0.2)
    core = world.core
    assert core.requests == {}, core.requests
    assert core.by_client == {}
    assert len(core.deployments["echo"].queue) == 0
    assert all(not worker_rids(w) for w in core.workers.values())
    if drain:
        assert world.drained == 1
    else:
        assert world.drained == 0
    return world


def check_metrics(world: World) -> None:
    m = world.core.metrics()["echo"]
    finals: dict[str, int] = {}
    for st in world.reqs.values():
        if st.final is not None:
            finals[(st.final, st.accepted)] = finals.get((st.final, st.accepted), 0) + 1
    abandoned = sum(1 for st in world.reqs.values() if st.abandoned)
    # An abandoned request ends, unseen, by whatever came first: its cut when a reply to its gone
    # client failed (cancelled), its deadline, a lost worker. Each counter holds the finals seen
    # plus some of those, and together they hold all of them.
    seen = {
        "completed": finals.get(("DONE", True), 0),
        "cancelled": finals.get(("CANCELLED", True), 0),
        "timed_out": finals.get(("DEADLINE_EXCEEDED", True), 0),
        "failed": sum(finals.get((code, True), 0)
                      for code in ("WORKER_LOST", "SHUTTING_DOWN", "INTERNAL", "OUT_OF_MEMORY")),
        "rejected_backpressure": finals.get(("BACKPRESSURE", True), 0) + finals.get(("BACKPRESSURE", False), 0),
    }
    assert all(m[name] >= count for name, count in seen.items()), (m, seen)
    assert sum(m[name] - count for name, count in seen.items()) == abandoned
    assert m["queued"] == 0 and m["in_flight"] == 0


@pytest.mark.parametrize("seed,n_workers,drain,accept_delay_ms", [
    (1, 2, False, 0), (2, 3, False, 0), (3, 3, True, 0), (4, 2, True, 20), (5, 3, False, 20), (6, 3, True, 20),
    (7, 2, False, 20)])
def test_invariant_exactly_one_final_and_credits_respected(seed, n_workers, drain, accept_delay_ms):
    world = run_world(seed, n_workers, steps=4000, drain=drain, accept_delay_ms=accept_delay_ms)
    check_metrics(world)
    s = world.stats
    if accept_delay_ms:  # both ways of learning of an acceptance happened
        assert s.get("accepted-in-reply", 0) > 0, s
    # The run must have exercised the interesting paths, or it proves little.
    for what in ("accepted", "DONE", "client-cancel", "cancel-to-worker", "redispatched", "exit", "restart",
                 "unresponsive", "accepted-DEADLINE_EXCEEDED", "accepted-WORKER_LOST", "accepted-BACKPRESSURE",
                 "rejected-BACKPRESSURE", "rejected-BAD_REQUEST", "accepted-CANCELLED", "client-gone"):
        assert s.get(what, 0) > 0, (what, s)
    if drain:
        assert s.get("rejected-SHUTTING_DOWN", 0) + s.get("accepted-SHUTTING_DOWN", 0) > 0, s


def test_deadline_heap_stays_bounded_under_sustained_load():
    # Finished requests leave their deadline entries behind; without compaction the heap
    # would hold every request of the last default_deadline_ms, growing with throughput.
    h = Harness(default_deadline_ms=3_600_000)
    h.ready("echo-0", credits=4)
    h.take()
    for i in range(20_000):
        h.submit(i, "x")
        rid = next(m[3]["rid"] for m in h.take() if m[2] == P.REQUEST)
        h.done("echo-0", rid)
        h.take()
    assert h.metrics()["completed"] == 20_000
    assert len(h.core._deadlines) <= 2 * len(h.core.requests) + 1024 + 1
    # Compaction keeps what is still pending: a queued request still expires on time.
    h.submit("late", "x", deadline_ms=100)
    h.submit("later", "y", deadline_ms=100)
    h.submit("latest", "z", deadline_ms=100)
    h.submit("waiting", "w", deadline_ms=100)
    h.submit("queued", "q", deadline_ms=100)
    h.take()
    h.advance(0.2)
    codes = [m[3]["code"] for m in h.take() if m[0] == "client" and m[2] == P.ERROR]
    assert codes == ["DEADLINE_EXCEEDED"] * 5


def test_request_ids_of_two_broker_processes_do_not_meet():
    # A worker may still be winding down a dead broker's requests when the next broker
    # dispatches to it: their ids must not collide, or an old CANCELLED would end a new request.
    first, second = Harness(), Harness()
    rids = []
    for h in (first, second):
        h.ready("echo-0", credits=4)
        h.take()
        for i in range(3):
            h.submit(i)
        rids.append({rid for _, rid, _ in h.requests_sent(h.take())})
    assert len(rids[0]) == len(rids[1]) == 3
    assert not rids[0] & rids[1]
    assert min(rids[0] | rids[1]) >= 1 << 20


# --- reload, drain (inferd.broker.reconfigure) -------------------------------------------------


def reconfigure(h: Harness, *deployments: dict, grace_s: float = 5.0) -> None:
    config = parse({"broker": {"heartbeat_interval_ms": 60000, "heartbeat_liveness": 2},
                    "deployment": list(deployments)}, "<reload>")
    h.core.on_supervisor(P.encode(P.SUPERVISOR, P.CONFIG, {"config": config.to_dict(), "grace_s": grace_s}))


def test_reload_of_queue_settings_keeps_every_queued_request_in_order():
    h = Harness(priority_levels=3, queue_capacity=10)
    for i, priority in enumerate([2, 0, 1, 2, 0]):
        h.submit(f"r{i}", priority=priority)
    assert len(h.core.deployments["echo"].queue) == 5
    reconfigure(h, {"name": "echo", "runtime": "echo", "priority_levels": 2, "queue_capacity": 3,
                    "default_priority": 0, "routing": "round-robin"})
    dep = h.core.deployments["echo"]
    assert len(dep.queue) == 5 and dep.queue.capacity == 3 and dep.queue.levels == 2
    h.take()
    h.submit("late", priority=1)  # over the new capacity, and nothing less urgent to evict
    assert error_code(only(h.take())) == "BACKPRESSURE"
    h.ready("echo-0", credits=5)
    order = [prompt_id for _, _, prompt_id in
             [(m[1], m[3]["rid"], h.core.requests[m[3]["rid"]].cid) for m in h.take() if m[2] == P.REQUEST]]
    # Most urgent first, FIFO within a level; the old level 2 joined the new least urgent level, 1,
    # behind what was already there (old level 1 was the more urgent).
    assert order == ["r1", "r4", "r2", "r0", "r3"]


def test_a_removed_deployment_drains_then_is_unknown():
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit("running")
    h.submit("queued")
    (_, rid, _), = h.requests_sent(h.take())
    reconfigure(h, {"name": "other", "runtime": "echo"})
    h.submit("new")
    (kind, _, command, body), = h.take()
    assert body["code"] == "UNKNOWN_DEPLOYMENT" and "removed by a reload" in body["message"]
    assert "deployments: other" in body["message"]
    h.done("echo-0", rid)  # the running one finishes; the queued one goes to the same worker
    msgs = h.take()
    assert [m[1] for m in h.to_clients(msgs)] == [P.DONE]
    (_, rid2, _), = h.requests_sent(msgs)
    h.done("echo-0", rid2)
    h.advance(0.1)
    msgs = h.take()
    assert [m[1] for m in h.to_clients(msgs)] == [P.DONE]
    assert ("supervisor", None, P.REMOVED, {"deployment": "echo", "failed": 0}) in msgs
    assert "echo" not in h.core.retiring


def test_a_removed_deployment_fails_what_is_left_when_the_grace_ends():
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit("running")
    h.submit("queued")
    h.take()
    reconfigure(h, {"name": "other", "runtime": "echo"}, grace_s=2.0)
    h.advance(2.5)
    msgs = h.take()
    codes = sorted(m[3]["code"] for m in msgs if m[0] == "client")
    assert codes == ["UNAVAILABLE", "UNAVAILABLE"]
    assert ("supervisor", None, P.REMOVED, {"deployment": "echo", "failed": 2}) in msgs


def test_a_draining_worker_gets_no_new_request_and_is_reported_idle():
    h = Harness()
    for wid in ("echo-0", "echo-1"):
        h.ready(wid, credits=2)
    h.submit("a")
    (wid, rid, _), = h.requests_sent(h.take())
    h.core.on_supervisor(P.encode(P.SUPERVISOR, P.DRAIN_WORKER, {"worker": wid, "grace_s": 10.0}))
    assert not any(m[2] == P.WORKER_DRAINED for m in h.take())
    for i in range(3):
        h.submit(f"b{i}")
    assert {w for w, _, _ in h.requests_sent(h.take())} == {"echo-0", "echo-1"} - {wid}
    h.done(wid, rid)
    h.advance(0.1)
    assert ("supervisor", None, P.WORKER_DRAINED, {"worker": wid, "left": 0}) in h.take()
    h.core.on_worker_exited(wid, h.pids[wid], 0, expected="drained")
    assert h.metrics()["failed"] == 0


# --- chat messages, usage, finals by code (the gateway's needs) ---------------------------------


def test_messages_reach_the_worker_instead_of_a_prompt():
    h = Harness()
    h.ready()
    h.take()
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    h.client(b"c1", P.SUBMIT, {"id": 1, "deployment": "echo", "messages": chat})
    msgs = h.take()
    request = next(m[3] for m in msgs if m[2] == P.REQUEST)
    assert request["messages"] == chat and request["prompt"] == ""
    assert h.to_clients(msgs)[-1][1] == P.ACCEPTED


@pytest.mark.parametrize("body, reason", [
    ({}, "exactly one of 'prompt' and 'messages' is required"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
     "exactly one of 'prompt' and 'messages' is required"),
    ({"messages": []}, "messages must hold 1 to 4096 messages, got 0"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be a map with exactly the fields role and content"),
    ({"messages": [{"role": "king", "content": "x"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
])
def test_malformed_messages_are_bad_requests(body, reason):
    h = Harness()
    h.ready()
    h.take()
    h.client(b"c1", P.SUBMIT, {"id": 1, "deployment": "echo", **body})
    [(client, command, answer)] = h.to_clients(h.take())
    assert command == P.ERROR and answer["code"] == "BAD_REQUEST"
    assert answer["message"].startswith(f"SUBMIT: {reason}")


def test_a_runtime_without_chat_refuses_messages(monkeypatch):
    import dataclasses

    from inferd import runtimes

    # echo and torch both take chats (torch through its model's template): a runtime that does not.
    monkeypatch.setitem(runtimes.SPECS, "torch", dataclasses.replace(runtimes.SPECS["torch"], chat=False))
    h = Harness(runtime="torch")
    h.client(b"c1", P.SUBMIT, {"id": 1, "deployment": "echo", "messages": [{"role": "user", "content": "x"}]})
    [(_, command, answer)] = h.to_clients(h.take())
    assert command == P.ERROR and "takes a prompt, not messages" in answer["message"]


def test_usage_from_the_worker_is_forwarded_and_counted():
    h = Harness()
    h.ready()
    h.submit(1)
    h.submit(2)
    rids = [rid for _, rid, _ in h.requests_sent(h.take())]
    h.chunk("echo-0", rids[0], "a")
    h.done("echo-0", rids[0], usage={"prompt_tokens": 7, "completion_tokens": 1})
    h.chunk("echo-0", rids[1], "b")
    h.chunk("echo-0", rids[1], "c")
    h.done("echo-0", rids[1])  # no usage: the chunks count as generated tokens
    dones = [body for _, command, body in h.to_clients(h.take()) if command == P.DONE]
    assert dones[0]["usage"] == {"prompt_tokens": 7, "completion_tokens": 1}
    assert "usage" not in dones[1]
    m = h.metrics()
    assert (m["prompt_tokens"], m["generated_tokens"]) == (7, 1 + 2)


def test_finals_are_counted_by_code_and_chunk_gaps_measured():
    h = Harness(queue_capacity=1)
    h.ready(credits=1)
    h.submit(1)
    h.submit(2)
    h.submit(3)  # the queue (capacity 1) is full: BACKPRESSURE
    [(_, rid, _)] = h.requests_sent(h.take())
    h.chunk("echo-0", rid, "a")
    h.clock.advance(0.02)
    h.chunk("echo-0", rid, "b")
    h.done("echo-0", rid)
    h.cancel(2)
    m = h.metrics()
    assert m["finals"] == {"BACKPRESSURE": 1, "OK": 1, "CANCELLED": 1}
    assert m["inter_chunk_ms"]["count"] == 1 and m["inter_chunk_ms"]["max"] == pytest.approx(20.0)
    itl = m["histograms"]["inter_chunk_ms"]
    assert itl["count"] == 1 and itl["counts"][itl["le_ms"].index(25.0)] == 1 and itl["counts"][0] == 0


# --- malformed worker messages ------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("deployment", ["echo"]), ("deployment", {"a": 1}), ("deployment", 7),
    ("pid", "1234"), ("pid", 1.5), ("pid", [1]), ("pid", -1), ("pid", True),
    ("credits", -1), ("credits", "8"), ("credits", 1 << 40), ("state", "dancing"), ("state", ["ready"]),
    ("runner", [1, 2]), ("in_flight", {"x": 1}), ("resumes", -3), ("surprise", 1),
])
def test_a_malformed_ready_is_ignored_and_the_broker_keeps_serving(field, value):
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit("A")
    rid = only(h.requests_sent(h.take()))[1]
    body = {"worker": "echo-1", "deployment": "echo", "device": "cpu:0", "pid": 77, "runtime": "echo",
            "state": "ready", "credits": 2, "in_flight": 0, field: value}
    h.core.on_worker(b"echo-1", [P.WORKER, P.READY, P.pack(body)])
    assert "echo-1" not in h.core.workers
    h.done("echo-0", rid)
    assert [(cmd, b["id"]) for _, cmd, b in h.to_clients(h.take())] == [(P.DONE, "A")]


@pytest.mark.parametrize("rid", [[1], {"a": 1}, "7", 1.0, None, True])
@pytest.mark.parametrize("command", [P.DONE, P.ERROR])
def test_a_final_whose_rid_is_not_an_integer_is_ignored(command, rid):
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit("A")
    real = only(h.requests_sent(h.take()))[1]
    body = {"rid": rid, "finish_reason": "stop"} if command == P.DONE else {"rid": rid, "code": "INTERNAL"}
    h.worker("echo-0", command, **body)
    assert h.to_clients(h.take()) == []
    h.done("echo-0", real)
    assert [(cmd, b["id"]) for _, cmd, b in h.to_clients(h.take())] == [(P.DONE, "A")]


@pytest.mark.parametrize("entry", [[[1], "x"], [{"a": 1}, "x"], [None, "x"], "x", [1], [1, "x", "bogus"]])
def test_a_chunk_whose_rid_is_not_an_integer_is_skipped(entry):
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit("A")
    real = only(h.requests_sent(h.take()))[1]
    h.worker("echo-0", P.CHUNKS, chunks=[entry, [real, "ok"]])
    assert [(cmd, b["id"]) for _, cmd, b in h.to_clients(h.take())] == [(P.CHUNK, "A")]


@pytest.mark.parametrize("tail", [
    [None, 3],
    [None, "exploded"],
    [7, "stop"],
    ["x", "stop", {"prompt_tokens": 1}],
    ["x", "stop", {"prompt_tokens": 1, "completion_tokens": -1}],
    ["x", "stop", None, "extra"],
])
def test_a_malformed_end_for_a_real_request_ends_it_with_internal(tail):
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit("A")
    h.submit("B")
    rid = only(h.requests_sent(h.take()))[1]
    h.worker("echo-0", P.CHUNKS, chunks=[[rid, *tail]])
    msgs = h.take()
    (_, cmd, err), = h.to_clients(msgs)
    assert (cmd, err["id"], err["code"]) == (P.ERROR, "A", "INTERNAL")
    # The worker considers it finished: its credit goes to B at once.
    assert [p for _, _, p in h.requests_sent(msgs)] == ["hello world"]


def test_the_supervisors_malformed_worker_exited_is_logged_not_raised():
    h = Harness()
    h.ready("echo-0")
    for body in ({"worker": ["x"], "pid": 1, "status": 9}, {"worker": "echo-0", "pid": "1", "status": 9},
                 {"worker": "echo-0"}):
        h.core.on_supervisor([P.SUPERVISOR, P.WORKER_EXITED, P.pack(body)])
    assert "echo-0" in h.core.workers


@pytest.mark.parametrize("reason", [{"a": 1}, ["stop"], 3, None])
def test_a_chunk_whose_finish_reason_is_not_a_string_ends_its_request(reason):
    h = Harness()
    h.ready("echo-0", credits=1)
    h.submit("A")
    rid = only(h.requests_sent(h.take()))[1]
    h.worker("echo-0", P.CHUNKS, chunks=[[rid, "x", reason]])
    (_, cmd, body), = h.to_clients(h.take())
    assert (cmd, body["code"]) == (P.ERROR, "INTERNAL")


# --- protocol v2: deferred ACCEPTED, coalesced replies ------------------------------------------


def test_a_request_answered_within_the_accept_delay_has_its_acceptance_in_its_first_reply():
    h = Harness(broker={"accept_delay_ms": 20})
    h.ready("echo-0", credits=2)
    h.submit(1, "hi")
    rid = only(h.requests_sent(h.take()))[1]
    h.clock.advance(0.005)
    h.done("echo-0", rid, text="hi")
    h.advance(0.05)  # long past the delay: no ACCEPTED follows a request that was answered
    assert h.to_clients(h.take()) == [(b"c1", P.DONE, {"id": 1, "finish_reason": "stop", "index": 0, "text": "hi",
                                                       "chunks": 1, "epoch": h.core.epoch, "join": " "})]


def test_a_request_that_ended_costs_no_wake_up_at_its_stale_accept_delay_or_deadline():
    # Answered at once, its deferred-ACCEPTED and deadline entries are stale: the loop's next wake-up
    # is the heartbeat, not 20 ms later for nothing (one needless wake-up per request served).
    h = Harness(broker={"accept_delay_ms": 20}, default_deadline_ms=100)
    h.ready("echo-0", credits=2)
    h.submit(1, "hi")
    rid = only(h.requests_sent(h.take()))[1]
    assert h.core.next_timeout() == pytest.approx(0.020)
    h.done("echo-0", rid, text="hi")
    h.take()
    assert h.core.next_timeout() > 0.2  # the load report (250 ms), past both stale times


def test_a_request_not_answered_within_the_accept_delay_gets_its_own_accepted_once():
    h = Harness(broker={"accept_delay_ms": 20})
    h.ready("echo-0", credits=1)
    h.submit(1)
    h.submit(2)  # queued behind 1
    rid = only(h.requests_sent(h.take()))[1]
    h.advance(0.019)
    assert h.to_clients(h.take()) == []
    assert h.core.next_timeout() == pytest.approx(0.001)
    h.advance(0.001)
    assert h.to_clients(h.take()) == [(b"c1", P.ACCEPTED, {"id": cid, "epoch": h.core.epoch, "join": " "})
                                      for cid in (1, 2)]
    h.advance(0.05)
    assert h.to_clients(h.take()) == []
    h.chunk("echo-0", rid, "a")
    h.done("echo-0", rid)
    assert h.to_clients(h.take()) == [(b"c1", P.CHUNK, {"id": 1, "index": 0, "text": "a"}),
                                      (b"c1", P.DONE, {"id": 1, "finish_reason": "stop", "chunks": 1})]


def test_an_error_ending_an_unannounced_request_carries_its_acceptance():
    h = Harness(broker={"accept_delay_ms": 20})
    h.ready("echo-0", credits=1)
    h.submit(1)
    h.take()
    h.cancel(1)
    (_, command, body), = h.to_clients(h.take())
    assert command == P.ERROR and body["code"] == "CANCELLED"
    assert (body["epoch"], body["join"]) == (h.core.epoch, " ")
    h.advance(0.05)
    assert h.to_clients(h.take()) == []


def test_replies_bound_for_one_client_in_one_burst_leave_as_one_message():
    h = Harness(max_concurrency=8)
    h.ready("echo-0", credits=8)
    for cid in range(4):
        h.submit(cid, client=b"a")
    h.submit("x", client=b"b")
    h.take()
    assert h.rec.messages == [(b"a", 4), (b"b", 1)]  # the four ACCEPTEDs in one message
    rids = [rid for _, rid, _ in h.requests_sent(h.rec.log)]
    h.worker("echo-0", P.CHUNKS, chunks=[[rid, "w", "stop"] for rid in rids])
    replies = h.to_clients(h.take())
    assert [(c, cmd) for c, cmd, _ in replies] == [(b"a", P.DONE)] * 4 + [(b"b", P.DONE)]
    assert h.rec.messages[2:] == [(b"a", 4), (b"b", 1)]


def test_a_client_that_is_gone_when_a_coalesced_message_fails_has_its_done_with_text_turned_into_an_error():
    h = Harness(broker={"client_hold_s": 5.0})
    h.ready("echo-0", credits=2)
    h.submit("A", client=b"gone")
    h.submit("B", client=b"gone")
    (_, rid_a, _), (_, rid_b, _) = h.requests_sent(h.take())
    h.rec.blocked[b"gone"] = GONE
    h.chunk("echo-0", rid_a, "a0")
    h.done("echo-0", rid_a, text="a1")   # its last chunk rides in DONE, in the same message as a0
    h.done("echo-0", rid_b)              # B streamed nothing: its DONE is complete
    h.advance(0.0)
    del h.rec.blocked[b"gone"]
    h.advance(0.3)
    got = [(cmd, b["id"], b.get("code")) for _, cmd, b in h.to_clients(h.take())]
    assert got == [(P.ERROR, "A", "CONNECTION_RESET"), (P.DONE, "B", None)]
    assert h.core.held == {}


def test_a_message_to_a_client_carries_at_most_max_coalesced_replies():
    from inferd.broker.core import MAX_COALESCED
    h = Harness(queue_capacity=200)
    for cid in range(MAX_COALESCED + 6):
        h.submit(cid)
    replies = h.to_clients(h.take())
    assert [cmd for _, cmd, _ in replies] == [P.ACCEPTED] * (MAX_COALESCED + 6)
    assert [body["id"] for _, _, body in replies] == list(range(MAX_COALESCED + 6))  # in order
    assert h.rec.messages == [(b"c1", MAX_COALESCED), (b"c1", 6)]

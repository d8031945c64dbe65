"""End-to-end tests that speak the inferd client protocol raw, written from docs/protocol.md alone.

Nothing from the ``inferd`` package is imported here: only pyzmq and msgpack talk to the
daemon (the ``daemon``/``make_daemon`` fixtures start the real daemon as a subprocess).
The point is to prove that the document is enough to write a client, and that the broker
survives and answers malformed and oversize input as the document promises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.daemon import Daemon, echo_config

SIG = b"IFDC2"
FINALS = ("DONE", "ERROR")
RECV_TIMEOUT = 2.0


@dataclass
class Msg:
    command: str
    body: dict

    @property
    def id(self) -> Any:
        return self.body.get("id")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class RawClient:
    """A minimal client: one DEALER socket, three-frame requests, msgpack bodies; a reply message
    holds one or more replies, ``[IFDC2, [[command, body], ...]]``."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.backlog: list[Msg] = []  # messages read while waiting for something else
        self.wire: list[Msg] = []     # replies of a message read, not yet handed out
        self.messages = 0             # ZeroMQ messages received

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sending --------------------------------------------------------------------------------
    def send(self, command: str, body: Any) -> None:
        self.send_frames([SIG, command.encode("ascii"), pack(body)])

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def submit(self, rid: Any, prompt: str, deployment: str = "echo", **fields: Any) -> None:
        self.send("SUBMIT", {"id": rid, "deployment": deployment, "prompt": prompt, **fields})

    # -- receiving ------------------------------------------------------------------------------
    def _recv_wire(self, timeout: float) -> Msg | None:
        if self.wire:
            return self.wire.pop(0)
        if not self.poller.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        self.messages += 1
        assert len(frames) == 2, f"a reply message must be [signature, replies], got {frames!r}"
        assert frames[0] == SIG, f"bad reply signature {frames[0]!r}"
        replies = msgpack.unpackb(frames[1], raw=False)
        assert isinstance(replies, list) and 1 <= len(replies) <= 64, f"replies must be an array: {replies!r}"
        for command, body in replies:
            assert isinstance(command, str), f"a reply's command must be a string: {command!r}"
            assert isinstance(body, dict), f"reply body is not a map: {body!r}"
            assert all(isinstance(k, str) for k in body), f"reply body has non-string keys: {body!r}"
            self.wire.append(Msg(command, body))
        return self.wire.pop(0)

    def recv(self, timeout: float = RECV_TIMEOUT) -> Msg | None:
        """The next message (backlog first), or None after ``timeout`` seconds."""
        if self.backlog:
            return self.backlog.pop(0)
        return self._recv_wire(timeout)

    def expect(self, timeout: float = RECV_TIMEOUT) -> Msg:
        msg = self.recv(timeout)
        assert msg is not None, f"no reply within {timeout} s"
        return msg

    def until_final(self, rid: Any, timeout: float = 3.0) -> list[Msg]:
        """All messages for ``rid`` up to and including its final (DONE/ERROR); others are kept."""
        deadline = time.monotonic() + timeout
        got: list[Msg] = []
        kept: list[Msg] = []
        pending, self.backlog = self.backlog, []
        try:
            while True:
                if pending:
                    msg = pending.pop(0)
                else:
                    left = deadline - time.monotonic()
                    msg = self._recv_wire(max(left, 0)) if left > 0 else None
                    assert msg is not None, f"no final for id {rid!r} within {timeout} s; got {got}"
                if same_id(msg.id, rid):
                    got.append(msg)
                    if msg.command in FINALS:
                        return got
                else:
                    kept.append(msg)
        finally:
            self.backlog = kept + pending + self.backlog

    def quiet(self, duration: float = 0.3) -> list[Msg]:
        """Everything that arrives within ``duration`` seconds (the backlog included)."""
        got, self.backlog = self.backlog, []
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            msg = self._recv_wire(left)
            if msg is not None:
                got.append(msg)
        return got

    def ping(self, rid: Any = "ping", timeout: float = RECV_TIMEOUT) -> Msg:
        self.send("PING", {"id": rid})
        msgs = self.until_final_command(rid, "PONG", timeout)
        return msgs[-1]

    def until_final_command(self, rid: Any, command: str, timeout: float) -> list[Msg]:
        deadline = time.monotonic() + timeout
        got = []
        while True:
            msg = self.recv(max(deadline - time.monotonic(), 0))
            assert msg is not None, f"no {command} for {rid!r} within {timeout} s; got {got}"
            got.append(msg)
            if msg.command == command and same_id(msg.id, rid):
                return got


def same_id(a: Any, b: Any) -> bool:
    """Ids compare by msgpack type too: the int 7 and the str "7" are different ids."""
    return type(a) is type(b) and a == b


def check_accepted(msg: Msg, rid: Any) -> int:
    """Assert that ``msg`` is the first reply to an accepted request: an ACCEPTED, or a CHUNK, DONE
    or ERROR carrying ``epoch`` and ``join``. Returns the epoch."""
    assert same_id(msg.id, rid), msg
    if msg.command == "ACCEPTED":
        assert set(msg.body) == {"id", "epoch", "join"}, msg.body
    else:
        assert msg.command in ("CHUNK", "DONE", "ERROR"), msg
    assert type(msg.body["epoch"]) is int, msg
    assert msg.body["join"] == " ", msg
    return msg.body["epoch"]


def check_success(msgs: list[Msg], rid: Any, words: list[str], finish_reason: str = "stop") -> int:
    """Assert one full, successful exchange for ``rid``: its acceptance (an ACCEPTED, or in its first
    reply), CHUNKs 0..n-1, one DONE, which carries the last chunk's text when there is one.
    Returns the epoch."""
    assert msgs, f"nothing for {rid!r}"
    epoch = check_accepted(msgs[0], rid)
    if msgs[0].command == "ACCEPTED":
        msgs = msgs[1:]
    assert not any("epoch" in m.body for m in msgs[1:]), msgs
    *chunks, done = msgs
    assert [c.command for c in chunks] == ["CHUNK"] * len(chunks), msgs
    assert done.command == "DONE", msgs
    assert same_id(done.id, rid)
    texts = [c.body["text"] for c in chunks] + ([done.body["text"]] if "text" in done.body else [])
    assert [c.body["index"] for c in chunks] == list(range(len(chunks))), msgs
    if "text" in done.body:
        assert done.body["index"] == len(chunks), done
    assert texts == words, msgs
    for c in chunks:
        assert c.body.get("finish_reason") is None, c.body
    assert done.body["finish_reason"] == finish_reason
    assert done.body["chunks"] == len(texts)
    return epoch


def only_one(msgs: list[Msg]) -> Msg:
    assert len(msgs) == 1, msgs
    return msgs[0]


def check_error(msg: Msg, code: str, rid: Any = None, *, in_message: tuple[str, ...] = ()) -> None:
    assert msg.command == "ERROR", msg
    assert msg.body["code"] == code, msg
    assert same_id(msg.body.get("id"), rid), f"expected id {rid!r}, got {msg.body.get('id')!r}: {msg.body}"
    assert isinstance(msg.body["message"], str) and msg.body["message"], msg.body
    for word in in_message:
        assert word in msg.body["message"], f"{word!r} not in message {msg.body['message']!r}"


@pytest.fixture
def client(daemon):
    with RawClient(daemon.frontend) as c:
        yield c


# =============================================================================================
# Part 1: the protocol as documented
# =============================================================================================

def test_submit_streams_words_then_exactly_one_done(client):
    words = ["the", "quick", "brown", "fox", "jumps"]
    client.submit(1, " ".join(words))
    msgs = client.until_final(1)
    check_success(msgs, 1, words)
    # echo knows its last word is the last: it rides in DONE, one message fewer
    assert msgs[-1].body["text"] == "jumps"
    assert client.quiet(0.3) == []


def test_max_tokens_gives_length(client):
    client.submit("mt", "a b c d e f", params={"max_tokens": 2})
    msgs = client.until_final("mt")
    check_success(msgs, "mt", ["a", "b"], finish_reason="length")
    assert msgs[-1].body == {"id": "mt", "finish_reason": "length", "index": 1, "text": "b", "chunks": 2}
    assert client.quiet(0.2) == []


def test_pipelining_many_requests_on_one_socket(client):
    ids: list[Any] = []
    prompts: dict[Any, list[str]] = {}
    for i in range(50):
        rid: Any = i * 1000 + 3 if i % 2 == 0 else f"req-{i}"
        words = [f"w{i}x{k}" for k in range(1 + i % 6)]
        ids.append(rid)
        prompts[rid] = words
        client.submit(rid, " ".join(words))
    by_id: dict[Any, list[Msg]] = {rid: [] for rid in ids}
    finals = 0
    deadline = time.monotonic() + 5.0
    while finals < len(ids):
        msg = client.recv(max(deadline - time.monotonic(), 0))
        assert msg is not None, f"only {finals} of {len(ids)} finals arrived"
        key = next((r for r in ids if same_id(r, msg.id)), None)
        assert key is not None, f"reply for an id never sent: {msg}"
        by_id[key].append(msg)
        if msg.command in FINALS:
            finals += 1
    assert client.quiet(0.3) == []
    epochs = set()
    for rid in ids:
        msgs = by_id[rid]
        assert sum("epoch" in m.body for m in msgs) == 1, msgs  # one acceptance, however it came
        assert sum(m.command in FINALS for m in msgs) == 1, msgs
        assert msgs[-1].command in FINALS, msgs
        epochs.add(check_success(msgs, rid, prompts[rid]))
    assert len(epochs) == 1


def test_int_and_str_ids_are_different_ids(client):
    # "a string ... or an integer": 7 and "7" are distinct ids and may be in flight together
    client.submit(7, "int id", params={"delay_ms": 50})
    client.submit("7", "str id", params={"delay_ms": 50})
    int_msgs = client.until_final(7)
    str_msgs = client.until_final("7")
    check_success(int_msgs, 7, ["int", "id"])
    check_success(str_msgs, "7", ["str", "id"])
    assert client.quiet(0.2) == []


def test_id_limits(client):
    long_ok = "é" * 64  # 128 UTF-8 bytes
    for rid in (long_ok, 2**63 - 1, -(2**63), 0):
        client.submit(rid, "x")
        check_success(client.until_final(rid), rid, ["x"])
    for bad in ("", "é" * 64 + "x", True, 1.5, b"bytes-id"):
        client.submit(bad, "x")
        msg = client.expect()
        assert msg.command == "ERROR" and msg.body["code"] == "BAD_REQUEST", (bad, msg)
        assert "id" in msg.body["message"], msg.body
    assert client.quiet(0.2) == []


def test_ping_pong_epoch_matches_accepted(client):
    client.submit("e", "one")
    epoch = check_success(client.until_final("e"), "e", ["one"])
    client.send("PING", {"id": 42})
    pong = client.expect()
    assert pong.command == "PONG", pong
    assert set(pong.body) == {"id", "epoch", "version", "max_message_bytes", "in_flight"}, pong.body
    assert pong.body["id"] == 42 and type(pong.body["id"]) is int
    assert pong.body["epoch"] == epoch
    assert pong.body["max_message_bytes"] == 1 << 20 and pong.body["in_flight"] == []
    assert isinstance(pong.body["version"], str) and pong.body["version"]
    # id is optional on PING
    client.send("PING", {})
    pong = client.expect()
    assert pong.command == "PONG" and pong.body.get("id") is None and pong.body["epoch"] == epoch
    assert client.quiet(0.2) == []


def test_optional_fields_may_be_nil(client):
    client.submit("n", "x y", priority=None, deadline_ms=None, affinity=None, params=None)
    check_success(client.until_final("n"), "n", ["x", "y"])
    client.send("PING", {"id": None})
    pong = client.expect()
    assert pong.command == "PONG" and pong.body.get("id") is None, pong
    assert client.quiet(0.2) == []


def test_all_optional_fields_accepted(client):
    client.submit("all", "p q r", priority=0, deadline_ms=5000, affinity="conv-1", params={"max_tokens": 8})
    check_success(client.until_final("all"), "all", ["p", "q", "r"])


@pytest.mark.parametrize("deadline_ms", [0, -1, "soon"])
def test_bad_deadline(client, deadline_ms):
    client.submit("d", "x", deadline_ms=deadline_ms)
    check_error(client.expect(), "BAD_REQUEST", "d", in_message=("deadline_ms",))
    assert client.quiet(0.2) == []


def test_ids_are_per_connection(daemon):
    """Ids need only be unique per connection; a CANCEL touches only this connection's requests."""
    with RawClient(daemon.frontend) as a, RawClient(daemon.frontend) as b:
        a.submit("same", "from a a", params={"delay_ms": 50})
        b.submit("same", "from b", params={"delay_ms": 50})
        b.send("CANCEL", {"id": "other"})
        check_success(a.until_final("same"), "same", ["from", "a", "a"])
        check_success(b.until_final("same"), "same", ["from", "b"])
        a.submit("x", "one two three four", params={"delay_ms": 100})
        accepted = a.expect()
        check_accepted(accepted, "x")
        b.send("CANCEL", {"id": "x"})  # not b's request: nothing happens, no answer
        assert b.quiet(0.3) == []
        check_success([accepted] + a.until_final("x"), "x", ["one", "two", "three", "four"])
        assert a.quiet(0.2) == [] and b.quiet(0.1) == []


@pytest.mark.parametrize("command, body, rid, field", [
    ("PING", {"id": "pg", "extra": 1}, "pg", "extra"),
    ("CANCEL", {"id": "cn", "reason": "bored"}, "cn", "reason"),
])
def test_unknown_field_on_other_commands(client, command, body, rid, field):
    client.send(command, body)
    check_error(client.expect(), "BAD_REQUEST", rid, in_message=(field,))
    assert client.quiet(0.2) == []


def test_unknown_deployment(client):
    client.submit("u", "hello", deployment="nope")
    msg = client.expect()
    check_error(msg, "UNKNOWN_DEPLOYMENT", "u")
    assert "echo" in msg.body["details"]["deployments"]
    assert client.quiet(0.2) == []


def test_unknown_field_is_named(client):
    client.send("SUBMIT", {"id": "f", "deployment": "echo", "prompt": "x", "priorty": 1})
    check_error(client.expect(), "BAD_REQUEST", "f", in_message=("priorty",))
    assert client.quiet(0.2) == []


@pytest.mark.parametrize("params, name", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": "two"}, "max_tokens"),
    ({"temprature": 0.5}, "temprature"),
])
def test_bad_param_is_named(client, params, name):
    client.submit("p", "x y", params=params)
    check_error(client.expect(), "BAD_REQUEST", "p", in_message=(name,))
    assert client.quiet(0.2) == []


@pytest.mark.parametrize("priority", [-1, 1000, "high"])
def test_priority_out_of_range(client, priority):
    client.submit("pr", "x", priority=priority)
    check_error(client.expect(), "BAD_REQUEST", "pr", in_message=("priority",))
    assert client.quiet(0.2) == []


def test_duplicate_id_in_flight_is_rejected_and_first_completes(client):
    words = ["a", "b", "c", "d", "e"]
    client.submit("dup", " ".join(words), params={"delay_ms": 100})
    first = client.expect()
    check_accepted(first, "dup")
    client.submit("dup", "second request")
    # The rejection must not look like the first request's final: nil id, the id in details.
    # (The first request's chunks may arrive before it; until_final keeps them aside.)
    rejection = only_one(client.until_final(None))
    check_error(rejection, "BAD_REQUEST", None, in_message=("already in flight",))
    assert rejection.body["details"] == {"id": "dup"}
    check_success([first] + client.until_final("dup"), "dup", words)
    assert client.quiet(0.3) == []
    # once final, the id may be reused
    client.submit("dup", "again")
    check_success(client.until_final("dup"), "dup", ["again"])


def test_malformed_cancel_of_an_in_flight_request_is_not_its_final(client):
    client.submit("live", "a b c", params={"delay_ms": 100})
    accepted = client.expect()
    check_accepted(accepted, "live")
    client.send("CANCEL", {"id": "live", "force": True})
    msgs = client.until_final(None)
    check_error(msgs[-1], "BAD_REQUEST", None, in_message=("force",))
    assert msgs[-1].body["details"] == {"id": "live"}
    check_success([accepted] + client.until_final("live"), "live", ["a", "b", "c"])


def test_cancel_running_request(client):
    words = [f"w{i}" for i in range(40)]
    client.submit("c", " ".join(words), params={"delay_ms": 100})
    first_chunk = client.expect()
    check_accepted(first_chunk, "c")
    if first_chunk.command == "ACCEPTED":
        first_chunk = client.expect()
    assert first_chunk.command == "CHUNK" and first_chunk.body["index"] == 0, first_chunk
    client.send("CANCEL", {"id": "c"})
    msgs = client.until_final("c", timeout=2.0)
    final = msgs[-1]
    check_error(final, "CANCELLED", "c")
    assert all(m.command == "CHUNK" for m in msgs[:-1]), msgs
    assert len(msgs) - 1 < len(words) - 5, "cancel did not stop the stream"
    later = client.quiet(0.5)
    assert later == [], f"messages after the final: {later}"
    # cancelling it again (no longer in flight) gets no answer
    client.send("CANCEL", {"id": "c"})
    assert client.quiet(0.3) == []


def test_cancel_queued_request(make_daemon):
    # one worker that holds one request at a time: the second request waits in the queue
    daemon = make_daemon(echo_config(replicas=1, max_concurrency=1))
    with RawClient(daemon.frontend) as c:
        c.submit("run", "a b c d e f", params={"delay_ms": 100})
        c.submit("queued", "x y z")
        c.send("CANCEL", {"id": "queued"})
        msgs = c.until_final("queued")
        # accepted (its own ACCEPTED, or the acceptance carried by its final), then cancelled
        assert [m.command for m in msgs] in (["ACCEPTED", "ERROR"], ["ERROR"]), msgs
        check_accepted(msgs[0], "queued")
        check_error(msgs[-1], "CANCELLED", "queued")
        check_success(c.until_final("run"), "run", list("abcdef"))
        assert c.quiet(0.3) == []


def test_a_request_that_waits_gets_its_own_accepted_at_once(make_daemon):
    daemon = make_daemon(echo_config(replicas=1, max_concurrency=1))
    with RawClient(daemon.frontend) as c:
        c.submit("run", "a b c d e f", params={"delay_ms": 200})
        c.submit("queued", "x")
        started = time.monotonic()
        run = []
        while (msg := c.expect()).id != "queued":
            run.append(msg)
        assert msg.command == "ACCEPTED" and time.monotonic() - started < 0.5, msg
        check_accepted(msg, "queued")
        check_success(run + c.until_final("run", timeout=5.0), "run", list("abcdef"))
        check_success([msg] + c.until_final("queued", timeout=5.0), "queued", ["x"])


def test_replies_are_coalesced_into_few_messages(client):
    """Pipelined one-word requests: each gets one reply (a DONE that carries its acceptance and its
    word), and the broker packs replies bound for the same socket into shared messages."""
    replies = 0
    for i in range(200):
        client.submit(i, f"w{i}")
    for i in range(200):
        msgs = client.until_final(i)
        # (a request that waited in the queue longer than the broker's accept_delay_ms has its own ACCEPTED)
        assert [m.command for m in msgs] in (["DONE"], ["ACCEPTED", "DONE"]), msgs
        check_success(msgs, i, [f"w{i}"])
        replies += len(msgs)
    assert client.messages < replies / 2, (client.messages, replies)


def test_a_v1_client_is_told_that_the_broker_speaks_v2(client):
    """In v1's own framing, as its request's final reply, so that a v1 client reads it."""
    client.send_frames([b"IFDC1", b"SUBMIT", pack({"id": 1, "deployment": "echo", "prompt": "x"})])
    assert client.poller.poll(2000)
    signature, command, body = client.sock.recv_multipart()
    assert (signature, command) == (b"IFDC1", b"ERROR")
    check_error(Msg("ERROR", msgpack.unpackb(body)), "BAD_REQUEST", 1, in_message=("IFDC2", "v2"))
    client.send_frames([b"IFDC1", b"PING", b"\xc1"])  # no readable id: nil
    assert client.poller.poll(2000)
    signature, command, body = client.sock.recv_multipart()
    check_error(Msg("ERROR", msgpack.unpackb(body)), "BAD_REQUEST", None, in_message=("IFDC2",))
    assert client.quiet(0.2) == []


def test_cancel_unknown_id_gets_no_answer(client):
    client.send("CANCEL", {"id": "never-sent"})
    client.send("CANCEL", {"id": 12345})
    assert client.quiet(0.5) == []
    # and the socket still works
    client.submit(1, "still fine")
    check_success(client.until_final(1), 1, ["still", "fine"])


# =============================================================================================
# Part 2: malformed and oversize input
# =============================================================================================

MALFORMED = [
    # (name, frames, id the broker can read, words the message must contain)
    ("one frame", [SIG], None, ()),
    ("two frames", [SIG, b"PING"], None, ()),
    ("five frames", [SIG, b"SUBMIT", b"a", b"b", b"c"], None, ()),
    ("four frames", [SIG, b"PING", pack({}), b""], None, ()),
    ("wrong signature", [b"XXXX1", b"PING", pack({})], None, ()),
    ("unknown command", [SIG, b"FROB", pack({"id": "frob-1"})], "frob-1", ("FROB",)),
    ("not msgpack", [SIG, b"SUBMIT", b"\xc1\xff"], None, ()),
    ("empty body", [SIG, b"SUBMIT", b""], None, ()),
    ("list body", [SIG, b"SUBMIT", pack([1, 2, 3])], None, ()),
    ("int body", [SIG, b"PING", pack(5)], None, ()),
    ("int key", [SIG, b"SUBMIT", pack({1: "x"})], None, ()),
    ("bin key", [SIG, b"PING", pack({b"id": 3})], None, ()),
    ("ext type id", [SIG, b"PING", pack({"id": msgpack.ExtType(5, b"abc")})], None, ()),
    ("submit without id", [SIG, b"SUBMIT", pack({"deployment": "echo", "prompt": "x"})], None, ()),
    ("missing prompt", [SIG, b"SUBMIT", pack({"id": "mp", "deployment": "echo"})], "mp", ("prompt",)),
    ("prompt wrong type", [SIG, b"SUBMIT", pack({"id": "wt", "deployment": "echo", "prompt": 123})],
     "wt", ("prompt",)),
    ("prompt as bin", [SIG, b"SUBMIT", pack({"id": "pb", "deployment": "echo", "prompt": b"x"})],
     "pb", ("prompt",)),
    ("params not a map", [SIG, b"SUBMIT", pack({"id": "pm", "deployment": "echo", "prompt": "x",
                                                "params": [1]})], "pm", ("params",)),
    ("ext type in params", [SIG, b"SUBMIT", pack({"id": "ex", "deployment": "echo", "prompt": "x",
                                                  "params": {"max_tokens": msgpack.ExtType(1, b"a")}})],
     None, ()),
]


def check_malformed_reply(msg: Msg | None, name: str, rid: Any, words: tuple[str, ...]) -> None:
    assert msg is not None, f"{name}: no answer"
    assert msg.command == "ERROR", f"{name}: {msg}"
    assert msg.body["code"] == "BAD_REQUEST", f"{name}: {msg}"
    assert same_id(msg.body.get("id"), rid), f"{name}: expected id {rid!r}: {msg}"
    assert isinstance(msg.body["message"], str) and msg.body["message"], f"{name}: {msg}"
    for word in words:
        assert word in msg.body["message"], f"{name}: {word!r} not in {msg.body['message']!r}"


def test_malformed_messages_on_one_socket_then_a_fresh_one(daemon):
    with RawClient(daemon.frontend) as c:
        for name, frames, rid, words in MALFORMED:
            c.send_frames(frames)
            check_malformed_reply(c.recv(1.0), name, rid, words)
        assert c.quiet(0.3) == [], "more than one answer to a malformed message"
        c.submit("ok", "still works")
        check_success(c.until_final("ok"), "ok", ["still", "works"])
        assert c.quiet(0.2) == []
    with RawClient(daemon.frontend) as fresh:
        fresh.submit(2, "fresh socket")
        check_success(fresh.until_final(2), 2, ["fresh", "socket"])
    assert daemon.proc.poll() is None


@pytest.fixture(scope="module")
def shared_daemon():
    """One daemon for all the fresh-socket cases below: it must survive every one of them."""
    daemon = Daemon(echo_config()).start()
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("name, frames, rid, words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_message_on_fresh_socket(shared_daemon, name, frames, rid, words):
    assert shared_daemon.proc.poll() is None, shared_daemon.logs()
    with RawClient(shared_daemon.frontend) as c:
        c.send_frames(frames)
        check_malformed_reply(c.recv(1.0), name, rid, words)
        assert c.quiet(0.2) == []
        c.submit(3, "after that")
        check_success(c.until_final(3), 3, ["after", "that"])


def test_oversize_message_drops_connection_and_dealer_reconnects(make_daemon):
    daemon = make_daemon(echo_config(broker="max_message_bytes = 4096\n"))
    with RawClient(daemon.frontend) as big, RawClient(daemon.frontend) as other:
        # the other client has a request in flight while the oversize message arrives
        other_words = [f"o{i}" for i in range(6)]
        other.submit("o", " ".join(other_words), params={"delay_ms": 50})
        other_accepted = other.expect()
        check_accepted(other_accepted, "o")
        # a normal exchange first, so big's connection is known to be up
        big.submit("before", "small one")
        check_success(big.until_final("before"), "before", ["small", "one"])

        monitor = big.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        try:
            big.submit("huge", "word " * 2000)  # ~10 kB > 4096
            assert big.quiet(0.5) == [], "an oversize message must not be answered"
            # ZeroMQ dropped the connection (and the DEALER reconnected by itself)
            events = []
            while monitor.poll(1000 if len(events) < 2 else 0):
                events.append(recv_monitor_message(monitor)["event"])
            assert zmq.EVENT_DISCONNECTED in events, events
        finally:
            big.sock.disable_monitor()
            monitor.close(0)
        assert daemon.proc.poll() is None

        # the same DEALER reconnects by itself; ping until a PONG comes back
        pong = None
        deadline = time.monotonic() + 3.0
        n = 0
        while pong is None:
            assert time.monotonic() < deadline, "the DEALER never got through again"
            n += 1
            big.send("PING", {"id": f"retry-{n}"})
            for msg in big.quiet(0.2):
                assert msg.command == "PONG", f"unexpected reply after oversize: {msg}"
                pong = msg
        big.submit("after", "small again")
        msgs = big.until_final("after")
        # PONGs to earlier retries may still trickle in: only PONGs are allowed besides our request
        assert all(m.command == "PONG" for m in big.backlog), big.backlog
        check_success(msgs, "after", ["small", "again"])

        # the other client was unaffected
        rest = other.until_final("o")
        assert check_success([other_accepted] + rest, "o", other_words) == pong.body["epoch"]
        assert other.ping("op").body["epoch"] == pong.body["epoch"]
    with RawClient(daemon.frontend) as fresh:
        fresh.submit("f", "fresh")
        check_success(fresh.until_final("f"), "f", ["fresh"])
    assert daemon.proc.poll() is None


def test_the_documents_example_runs_as_printed(daemon, capsys):
    """docs/protocol.md's example, run as it is (its endpoint pointed at this daemon)."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    example = doc.split("## Example", 1)[1]
    code = re.findall(r"```python\n(.*?)```", example, re.S)[0]
    printed = re.findall(r"prints\n\n```\n(.*?)```", example, re.S)[0]
    code = code.replace("ipc:///run/inferd/frontend.sock", daemon.frontend)
    exec(compile(code, "docs/protocol.md", "exec"), {})
    got = capsys.readouterr().out.splitlines()
    expected = printed.splitlines()
    # The epoch is this broker's; the rest is as printed.
    assert [re.sub(r"'epoch': \d+", "'epoch': E", line) for line in got] == \
        [re.sub(r"'epoch': \d+", "'epoch': E", line) for line in expected]

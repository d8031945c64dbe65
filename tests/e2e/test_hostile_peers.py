"""The invariant under attack, end to end: every accepted request gets exactly one final reply, and no
peer can take a process down, whatever it sends or fails to read.

Each test plays an outside client or an outside worker written from docs/protocol.md: raw pyzmq and
msgpack, no inferd code on the sending side.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import time

import msgpack
import pytest
import zmq

from inferd import curve, errors
from inferd.client import Client
from tests.daemon import free_port, wait_for
from tests.e2e.test_inferctl import INFERCTL

SUBMIT_COMMANDS = (b"SUBMIT", b"CANCEL", b"PING")
WORKER_COMMANDS = (b"READY", b"HEARTBEAT", b"CHUNKS", b"ERROR")


def raw_socket(endpoint: str, routing_id: bytes | None = None, rcvhwm: int | None = None,
               identity: bytes | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)  # a broker that died must fail the test, not hang it
    if routing_id or identity:
        sock.setsockopt(zmq.ROUTING_ID, routing_id or identity)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(endpoint)
    return sock


def send(sock: zmq.Socket, command: bytes, body: dict, signature: bytes = b"IFDC2") -> None:
    sock.send_multipart([signature, command, msgpack.packb(body)])


_unread: dict[int, list[tuple[bytes, dict]]] = {}  # per socket: replies of a message read, not yet returned


def recv(sock: zmq.Socket, timeout_s: float) -> tuple[bytes, dict] | None:
    """The next reply: a broker message is [IFDC2, [[command, body], ...]]."""
    unread = _unread.setdefault(id(sock), [])
    if not unread:
        if not sock.poll(timeout_s * 1000):
            return None
        _, replies = sock.recv_multipart()
        unread.extend((command.encode(), body) for command, body in msgpack.unpackb(replies))
    return unread.pop(0)


def exchange(sock: zmq.Socket, cid, timeout_s: float = 5.0) -> tuple[list[bytes], list[str]]:
    """The commands of one request's replies up to its final, and the texts they carried. An ACCEPTED
    is left out: it comes only if the request waited longer than the broker's accept_delay_ms."""
    commands, texts = [], []
    while not commands or commands[-1] not in (b"DONE", b"ERROR"):
        command, body = recv(sock, timeout_s)
        if body.get("id") == cid and command != b"ACCEPTED":
            commands.append(command)
            if "text" in body:
                texts.append(body["text"])
    return commands, texts


def broker_identity(daemon) -> tuple[int, int]:
    """The broker's pid and restart count (the supervisor's part of the status arrives just after start)."""
    st = wait_for(lambda: (s := daemon.status())["daemon"].get("broker_restarts") is not None and s, 5)
    return st["broker"]["pid"], st["daemon"]["broker_restarts"]


# --- 1. fuzzing both endpoints -------------------------------------------------------------------


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 7, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e300, float("nan"), float("inf")])
    if kind == 4:
        return rng.choice(["", "echo", "ready", "echo-0", "fuzz-0", "stop", "length", "x" * rng.randrange(300)])
    if kind == 5:
        return os.urandom(rng.randrange(16))
    if kind == 6:
        return rng.choice(["INTERNAL", "CANCELLED", "BOGUS", "DEADLINE_EXCEEDED"])
    if kind == 7:
        return "\u00e9\u4e16\U0001f600" * rng.randrange(3)
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["id", "rid", "worker", "deployment", "chunks", "x", "pid"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def valid_client_message(rng: random.Random, n: int) -> tuple[bytes, dict]:
    choice = rng.randrange(3)
    if choice == 0:
        body = {"id": n, "deployment": "echo", "prompt": "fuzz me", "params": {"max_tokens": 2}}
        for key in ("priority", "deadline_ms", "affinity"):
            if rng.random() < 0.3:
                body[key] = {"priority": 1, "deadline_ms": 5000, "affinity": "a"}[key]
        return b"SUBMIT", body
    if choice == 1:
        return b"CANCEL", {"id": n - rng.randrange(3)}
    return b"PING", {"id": n}


def valid_worker_message(rng: random.Random, wid: str) -> tuple[bytes, dict]:
    load = {"worker": wid, "state": "ready", "credits": 2, "in_flight": 0, "resumes": 0, "rebuilds": 0,
            "runner": {}}
    choice = rng.randrange(5)
    if choice == 0:
        return b"READY", {**load, "deployment": "echo", "runtime": "echo", "device": "cpu:0", "pid": 4242}
    if choice == 1:
        return b"HEARTBEAT", load
    if choice == 2:
        return b"CHUNKS", {"worker": wid, "chunks": [[rng.randrange(2**40), "w"], [rng.randrange(2**40), "x", "stop"]]}
    if choice == 3:
        return b"CHUNKS", {"worker": wid, "chunks": [[rng.randrange(2**40), None, "length",
                                                      {"prompt_tokens": 1, "completion_tokens": 2}]]}
    return b"ERROR", {"worker": wid, "rid": rng.randrange(2**40), "id": None, "code": "INTERNAL", "message": "m"}


def mutate(rng: random.Random, command: bytes, body: dict, commands: tuple[bytes, ...],
           signature: bytes) -> list[bytes]:
    """A message a confused or hostile peer might send: valid, nearly valid, or garbage."""
    r = rng.random()
    if r < 0.15:
        return [signature, command, msgpack.packb(body)]
    if r < 0.55:  # one field of a valid message replaced, removed or added
        body = dict(body)
        key = rng.choice(list(body) + ["surprise"])
        if rng.random() < 0.2 and key in body:
            del body[key]
        else:
            body[key] = random_value(rng)
        try:
            data = msgpack.packb(body)
        except (OverflowError, ValueError):
            data = b"\xc1"
        return [signature, command, data]
    if r < 0.65:  # a valid body under another command
        return [signature, rng.choice(commands + (b"", b"NOPE", os.urandom(4))), msgpack.packb(body)]
    if r < 0.72:  # a body that is not a map, or not msgpack
        return [signature, command, rng.choice([msgpack.packb([1, 2]), msgpack.packb("s"), os.urandom(20), b"",
                                                msgpack.packb({1: 2}), msgpack.packb({"id": msgpack.ExtType(3, b"x")}),
                                                msgpack.packb({"id": msgpack.Timestamp(1)}, datetime=False)])]
    if r < 0.80:  # wrong frame counts, wrong signatures
        frames = [signature, command, msgpack.packb(body)]
        return rng.choice([frames[:1], frames[:2], frames + [b"extra"], [b"IFDX9"] + frames[1:], [b""] * 3])
    try:
        data = msgpack.packb({k: random_value(rng) for k in body})
    except (OverflowError, ValueError):
        data = b"\xc1"
    return [signature, command, data]


def drain(sock: zmq.Socket) -> int:
    n = 0
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
            n += 1
        except zmq.Again:
            return n


def test_fuzzing_the_client_and_worker_endpoints_changes_nothing(make_daemon):
    daemon = make_daemon(replicas=1)
    before = broker_identity(daemon)
    rng = random.Random(20261202)
    client = raw_socket(daemon.frontend, routing_id=b"fuzz-client")
    worker = raw_socket(f"ipc://{daemon.runtime_dir}/backend.sock", identity=b"fuzz-0")
    try:
        n_each = 20_000
        for n in range(n_each):
            client.send_multipart(mutate(rng, *valid_client_message(rng, n), SUBMIT_COMMANDS, b"IFDC2"))
            wid = "fuzz-0" if rng.random() < 0.9 else rng.choice(["echo-0", "other"])
            worker.send_multipart(mutate(rng, *valid_worker_message(rng, wid), WORKER_COMMANDS, b"IFDW2"))
            if n % 500 == 0:
                drain(client)
                drain(worker)
                assert daemon.proc.poll() is None
        # Everything sent has been handled once a PING sent after it is answered.
        send(client, b"PING", {"id": "last"})
        wait_for(lambda: any(m == (b"PONG", "last") for m in iter_replies(client)), 30, what="the last PONG")
    finally:
        client.close(0)
        worker.close(0)
    assert broker_identity(daemon) == before
    with daemon.client() as c:
        assert c.complete("echo", "still serving after the fuzz") == "still serving after the fuzz"
    assert "BUG" not in daemon.logs()


def iter_replies(sock: zmq.Socket):
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            replies = [(command.encode(), body.get("id")) for command, body in msgpack.unpackb(frames[-1])]
        except Exception:
            continue
        yield from replies


# --- 2. a client that stops reading ---------------------------------------------------------------


def test_a_client_that_stops_reading_gets_one_final_per_accepted_request_when_it_reads_again(make_daemon):
    daemon = make_daemon(replicas=1, broker="client_send_hwm = 100\n")
    pid_before = broker_identity(daemon)
    sock = raw_socket(daemon.frontend, routing_id=b"slow-reader", rcvhwm=10)
    sock.setsockopt(zmq.RCVBUF, 4096)
    words = " ".join(f"w{i}" for i in range(30_000))
    ids = [1, 2, 3]
    for cid in ids:
        send(sock, b"SUBMIT", {"id": cid, "deployment": "echo", "prompt": words})
    time.sleep(3.0)  # not reading: the broker's queue for this connection fills
    finals: dict[int, list[str]] = {cid: [] for cid in ids}
    indexes: dict[int, list[int]] = {cid: [] for cid in ids}
    accepted = []
    deadline = time.monotonic() + 60
    while any(not f for f in finals.values()):
        assert time.monotonic() < deadline, f"finals so far: {finals}"
        msg = recv(sock, 1.0)
        if msg is None:
            continue
        command, body = msg
        if "epoch" in body:  # an ACCEPTED, or a first reply that carries the acceptance
            accepted.append(body["id"])
        if command in (b"CHUNK", b"DONE") and "index" in body:
            assert not finals[body["id"]], "a chunk after the final"
            indexes[body["id"]].append(body["index"])
        if command in (b"DONE", b"ERROR"):
            finals[body["id"]].append(body.get("code", "DONE"))
    assert sorted(accepted) == ids
    assert recv(sock, 1.0) is None                       # and nothing after: one final each
    assert all(len(f) == 1 for f in finals.values())
    assert "SLOW_READER" in [f[0] for f in finals.values()]
    for cid in ids:                                       # what was delivered is a prefix, no gap
        assert indexes[cid] == list(range(len(indexes[cid])))
    # The connection is served again once it has read what it was owed.
    send(sock, b"SUBMIT", {"id": 9, "deployment": "echo", "prompt": "back again"})
    assert exchange(sock, 9) == ([b"CHUNK", b"DONE"], ["back", "again"])
    sock.close(0)
    assert broker_identity(daemon) == pid_before
    assert daemon.metrics()["echo"]["cancelled"] >= 1


def test_the_python_clients_read_everything_so_a_slow_consumer_is_never_a_slow_reader(make_daemon):
    daemon = make_daemon(replicas=1)  # client_send_hwm 10,000: a slow reader after 20,000 waiting replies
    words = " ".join(f"w{i}" for i in range(30_000))
    with daemon.client() as client:
        stream = client.generate("echo", words)
        first = next(stream)
        time.sleep(4.0)  # the caller is busy; ZeroMQ's own thread keeps reading for it
        rest = list(stream)
    assert [first.text] + [c.text for c in rest] == words.split()


# --- 3. a frame over max_message_bytes ----------------------------------------------------------------


def test_the_python_client_refuses_an_oversize_request_at_once(make_daemon):
    daemon = make_daemon(replicas=1, broker="max_message_bytes = 65536\n")
    with daemon.client() as client:
        started = time.monotonic()
        with pytest.raises(errors.MessageTooLarge) as info:
            client.generate("echo", "x" * 100_000)
        assert time.monotonic() - started < 2.0
        assert info.value.limit == 65536 and info.value.size > 100_000
        assert "65536" in str(info.value) and str(info.value.size) in str(info.value)
        assert client.complete("echo", "small is fine") == "small is fine"


def test_an_oversize_frame_resets_the_connection_and_its_requests_still_get_their_finals(make_daemon):
    daemon = make_daemon(replicas=1, broker="max_message_bytes = 65536\n")
    sock = raw_socket(daemon.frontend, routing_id=b"oversize-sender")
    # It streams a word every 20 ms, so the broker tries to send while the connection is down.
    send(sock, b"SUBMIT", {"id": "long", "deployment": "echo", "prompt": "w " * 200,
                           "params": {"delay_ms": 20}})
    assert "epoch" in recv(sock, 5.0)[1]  # accepted: its first reply (a CHUNK, or an ACCEPTED) says so
    send(sock, b"SUBMIT", {"id": "huge", "deployment": "echo", "prompt": "x" * 100_000})
    replies = []
    deadline = time.monotonic() + 15
    while not any(c == b"ERROR" and b.get("id") == "long" for c, b in replies):
        assert time.monotonic() < deadline, replies
        msg = recv(sock, 0.5)
        if msg:
            replies.append(msg)
    finals = [b for c, b in replies if c in (b"DONE", b"ERROR") and b.get("id") == "long"]
    assert [f.get("code") for f in finals] == ["CONNECTION_RESET"]
    indexes = [b["index"] for c, b in replies if "index" in b]
    assert indexes == list(range(len(indexes))) and len(indexes) < 200
    assert all(b.get("id") != "huge" for _, b in replies)  # the oversize message never reached the broker
    send(sock, b"SUBMIT", {"id": "after", "deployment": "echo", "prompt": "still here"})
    assert exchange(sock, "after") == ([b"CHUNK", b"DONE"], ["still", "here"])
    sock.close(0)


# --- 4. a second signal during a drain ------------------------------------------------------------------


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_a_drain_stops_within_a_second(make_daemon, second):
    daemon = make_daemon(replicas=2, daemon="drain_grace_s = 30\n")
    sock = raw_socket(daemon.frontend)
    for cid in range(4):
        send(sock, b"SUBMIT", {"id": cid, "deployment": "echo", "prompt": "slow " * 50,
                               "params": {"delay_ms": 500}})
    accepted = set()
    while len(accepted) < 4:  # accepted: an ACCEPTED, or the first word carrying it
        command, body = recv(sock, 5.0)
        if "epoch" in body:
            accepted.add(body["id"])
    daemon.signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    daemon.signal(second)
    assert daemon.wait(10) == 0
    assert time.monotonic() - started < 2.0
    finals = {}
    while (msg := recv(sock, 1.0)) is not None:
        command, body = msg
        if command in (b"DONE", b"ERROR"):
            assert body["id"] not in finals
            finals[body["id"]] = body.get("code")
    assert finals == {cid: "SHUTTING_DOWN" for cid in range(4)}
    assert "did not confirm the drain" not in daemon.logs()
    sock.close(0)


# --- 5. stale sockets --------------------------------------------------------------------------------


def test_a_clean_exit_removes_the_socket_files_and_sockets_are_0600(make_daemon):
    daemon = make_daemon(replicas=1)
    for name in ("frontend.sock", "backend.sock", "control.sock", "supervisor.sock"):
        assert stat.S_IMODE(os.stat(daemon.runtime_dir / name).st_mode) == 0o600, name
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert sorted(p.name for p in daemon.runtime_dir.iterdir() if p.name.endswith(".sock")) == []


def test_sockets_left_by_a_killed_daemon_are_told_from_a_live_one_at_once(make_daemon):
    daemon = make_daemon(replicas=1)
    st = daemon.status()
    pids = [st["broker"]["pid"], st["daemon"]["pid"]] + [w["pid"] for w in st["workers"]]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    daemon.wait(10)
    wait_for(lambda: all(not os.path.exists(f"/proc/{pid}") or
                         open(f"/proc/{pid}/stat").read().split()[2] == "Z" for pid in pids), 10)
    assert (daemon.runtime_dir / "frontend.sock").exists()  # left behind
    for args in (["generate", "echo", "hello"], ["status"], ["metrics"]):
        started = time.monotonic()
        result = subprocess.run([INFERCTL, "--runtime-dir", str(daemon.runtime_dir), "--timeout", "30", *args],
                                capture_output=True, text=True, timeout=30)
        assert time.monotonic() - started < 5.0
        assert result.returncode == 3, result
        assert len(result.stderr.strip().splitlines()) == 1 and "not running" in result.stderr
    with pytest.raises(errors.DaemonNotRunning):
        daemon.client()


# --- 6. a SUBMIT that gets no answer ---------------------------------------------------------------------


def test_a_submit_the_broker_never_answers_times_out_with_unavailable(make_daemon):
    daemon = make_daemon(replicas=1)
    broker_pid = daemon.status()["broker"]["pid"]
    os.kill(broker_pid, signal.SIGSTOP)  # the broker is there, and answers nothing
    try:
        with daemon.client(answer_timeout_s=1.0) as client:
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="no answer"):
                list(client.generate("echo", "anyone there"))
            assert 0.9 < time.monotonic() - started < 3.0
    finally:
        os.kill(broker_pid, signal.SIGCONT)


# --- 7. CURVE on a tcp frontend ------------------------------------------------------------------


@pytest.fixture
def curve_setup(tmp_path):
    keys = tmp_path / "keys"
    server_public, server_secret = curve.generate(keys / "server", "server")
    curve.generate(keys / "clients", "alice")
    _, bob_secret = curve.generate(keys / "others", "bob")
    alice_secret = keys / "clients" / "alice.key_secret"
    port = free_port()
    broker = (f'frontend = "tcp://127.0.0.1:{port}"\ncurve_secret_key = "{server_secret}"\n'
              f'curve_allowed_clients = "{keys / "clients"}"\n')
    return {"port": port, "broker": broker, "server_public": server_public, "alice": alice_secret,
            "bob": bob_secret, "keys": keys}


def test_a_curve_frontend_serves_allowed_keys_only(make_daemon, curve_setup):
    c = curve_setup
    daemon = make_daemon(replicas=1, broker=c["broker"])
    endpoint = f"tcp://127.0.0.1:{c['port']}"
    alice = curve.ClientKeys.load(c["server_public"], c["alice"])
    with Client(endpoint, curve_keys=alice) as client:
        assert client.complete("echo", "hello over curve") == "hello over curve"
    _, stranger_server = curve.generate(c["keys"] / "stranger", "stranger")
    refused = {
        "unknown client key": curve.ClientKeys.load(c["server_public"], c["bob"]),
        "wrong server key": curve.ClientKeys.load(stranger_server, c["alice"]),
        "plain client": None,
    }
    for what, keys in refused.items():
        with Client(endpoint, curve_keys=keys, answer_timeout_s=1.0) as client:
            try:
                list(client.generate("echo", "let me in"))
            except errors.Unavailable as exc:
                assert "no answer" in str(exc), (what, exc)
            else:
                pytest.fail(f"a client with {what} was served")
    with Client(endpoint, curve_keys=alice) as client:  # and the broker serves the allowed one still
        assert client.complete("echo", "still here") == "still here"
    secret = c["alice"].read_text()
    assert secret.split('secret-key = "')[1][:40] not in daemon.logs()
    result = subprocess.run([INFERCTL, "--endpoint", endpoint, "--server-key", str(c["server_public"]),
                             "--client-key", str(c["alice"]), "generate", "echo", "from inferctl"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "from inferctl", result


def test_curve_key_problems_and_a_plain_tcp_frontend_stop_the_daemon_with_78(make_daemon, curve_setup):
    c = curve_setup
    secret = c["keys"] / "server" / "server.key_secret"
    secret.chmod(0o644)
    daemon = make_daemon(replicas=1, broker=c["broker"], start=False).start(wait=False)
    assert daemon.wait(20) == 78
    assert "accessible to other users" in daemon.logs()
    plain = make_daemon(replicas=1, broker=f'frontend = "tcp://0.0.0.0:{c["port"]}"\n', start=False)
    plain.start(wait=False)
    assert plain.wait(20) == 78
    assert "expected CURVE" in plain.logs()

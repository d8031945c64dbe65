"""Unit tests for inferd.worker.link.EngineLink: the engine thread's own socket, against a real ROUTER."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from inferd import protocol as P
from inferd.errors import ErrorCode
from inferd.runtimes.base import Output
from inferd.worker.engine import ADMIT, CANCEL
from inferd.worker.link import EngineLink


@pytest.fixture
def broker(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/backend.sock"
    router.bind(endpoint)
    link = EngineLink(ctx, "echo-0", endpoint, 1 << 20)
    link.generation = 42
    yield router, link
    router.close(0)
    if link.sock is not None:
        link.sock.close(0)
    ctx.term()


def recv(router: zmq.Socket) -> tuple[bytes, bytes, dict]:
    assert router.poll(5000), "nothing from the engine's socket"
    identity, signature, command, body = router.recv_multipart()
    assert signature == P.WORKER
    return identity, command, P.unpack(body)


def test_open_attaches_with_the_registration_generation(broker):
    router, link = broker
    link.open()
    assert recv(router) == (b"echo-0+engine", P.ATTACH, {"worker": "echo-0", "generation": 42})


def test_requests_and_cancels_arrive_as_engine_commands(broker):
    router, link = broker
    link.open()
    recv(router)
    router.send_multipart([b"echo-0+engine", P.WORKER, P.REQUEST,
                           P.pack({"rid": 7, "prompt": "hi", "params": {"max_tokens": 1}, "deadline_ms": 5000})])
    router.send_multipart([b"echo-0+engine", P.WORKER, P.CANCEL, P.pack({"rid": 7})])
    router.send_multipart([b"echo-0+engine", P.WORKER, P.HEARTBEAT, P.pack({})])  # not for the engine: logged
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        got += link.poll(0.1)
    (kind, request), cancel = got
    assert kind == ADMIT and (request.rid, request.prompt, request.params) == (7, "hi", {"max_tokens": 1})
    assert 4.0 < request.deadline - time.monotonic() <= 5.0
    assert cancel == (CANCEL, 7)


def test_a_steps_outputs_leave_in_one_message_with_the_ends_folded_in_and_errors_after(broker):
    router, link = broker
    link.open()
    recv(router)
    link.emit([Output(1, "a"), Output(2, "b", "stop"), Output(3, None, "length", usage={"prompt_tokens": 2,
                                                                                        "completion_tokens": 1}),
               Output(4, None), Output(5, error=ErrorCode.OUT_OF_MEMORY, message="oom")])
    assert recv(router) == (b"echo-0+engine", P.CHUNKS, {"worker": "echo-0", "chunks": [
        [1, "a"], [2, "b", "stop"], [3, None, "length", {"prompt_tokens": 2, "completion_tokens": 1}]]})
    _, command, body = recv(router)
    assert (command, body["rid"], body["code"], body["id"]) == (P.ERROR, 5, "OUT_OF_MEMORY", None)


def test_a_wake_from_another_thread_ends_a_poll_at_once(broker):
    _, link = broker
    link.open()
    threading.Timer(0.05, link.wake).start()
    started = time.monotonic()
    assert list(link.poll(None)) == []
    assert time.monotonic() - started < 2.0

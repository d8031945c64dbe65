"""AsyncClient against a broker that misbehaves: silent, silent after accepting, alive but slow,
restarted. The broker here is a real ROUTER socket on TCP answering (or not) in protocol v2, in a
thread of the test; the client is the real AsyncClient. Its timeouts are kept by one sweep per client,
not by a timer per wait: these tests hold it to every promise of the client's docstring."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any, Callable

import pytest
import zmq

from inferd import errors, protocol as P
from inferd.client import SWEEP_S, AsyncClient
from tests.daemon import free_port, wait_for

Answer = Callable[[bytes, bytes, dict[str, Any]], list[tuple[bytes, dict[str, Any]]]]


class FakeBroker:
    """A ROUTER that records what it receives and sends what ``answer(identity, command, body)`` returns."""

    def __init__(self, answer: Answer):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.answer = answer
        self.received: list[tuple[bytes, dict[str, Any]]] = []
        self._pushed: queue.Queue[tuple[bytes, dict[str, Any]]] = queue.Queue()
        self._peer: bytes | None = None
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def push(self, reply: tuple[bytes, dict[str, Any]]) -> None:
        """Send ``reply`` unasked, to the client last heard from (from any thread)."""
        self._pushed.put(reply)

    def _run(self) -> None:
        while not self._stop.is_set():
            while self._peer is not None and not self._pushed.empty():
                self._sock.send_multipart([self._peer, *P.encode_replies(P.CLIENT, [self._pushed.get()])])
            if not self._sock.poll(5):
                continue
            identity, _signature, command, data = self._sock.recv_multipart()
            self._peer = identity
            body = P.unpack(data)
            self.received.append((command, body))
            replies = self.answer(identity, command, body)
            if replies:
                self._sock.send_multipart([identity, *P.encode_replies(P.CLIENT, replies)])

    def commands(self) -> list[bytes]:
        return [command for command, _ in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)


@pytest.fixture
def broker_with():
    made = []

    def make(answer: Answer) -> FakeBroker:
        made.append(FakeBroker(answer))
        return made[-1]

    yield make
    for broker in made:
        broker.close()


async def collect(client: AsyncClient, **kwargs: Any) -> list[str]:
    return [chunk.text async for chunk in client.generate("echo", "hi", **kwargs)]


def accepted(body: dict[str, Any]) -> list[tuple[bytes, dict[str, Any]]]:
    return [(P.ACCEPTED, {"id": body["id"], "epoch": 7, "join": " "})]


def fails_after(broker: FakeBroker, error: type[Exception], match: str | None = None,
                request: dict[str, Any] | None = None, **options: Any) -> float:
    """Run one request against ``broker`` until it raises ``error``; the seconds that took."""
    async def main() -> float:
        async with AsyncClient(broker.endpoint, **options) as client:
            started = time.monotonic()
            with pytest.raises(error, match=match):
                await collect(client, **(request or {}))
            return time.monotonic() - started

    return asyncio.run(main())


def test_a_broker_that_never_answers_gives_unavailable_after_the_answer_timeout(broker_with):
    broker = broker_with(lambda identity, command, body: [])
    elapsed = fails_after(broker, errors.Unavailable, "not accepted", answer_timeout_s=0.3)
    assert 0.3 <= elapsed < 0.3 + 4 * SWEEP_S + 0.5
    wait_for(lambda: len(broker.received) >= 2, 2.0)
    assert broker.commands() == [P.SUBMIT, P.CANCEL]  # the CANCEL in case it arrives later


def test_an_accepted_request_the_broker_forgets_pings_then_fails_with_lost_contact(broker_with):
    # PINGs unanswered
    broker = broker_with(lambda identity, command, body: accepted(body) if command == P.SUBMIT else [])
    elapsed = fails_after(broker, errors.Unavailable, "lost contact", answer_timeout_s=0.3, liveness_s=0.3)
    assert 0.6 <= elapsed < 0.6 + 4 * SWEEP_S + 0.5
    assert P.PING in broker.commands()


def test_a_slow_request_whose_broker_answers_pings_waits_for_its_chunks(broker_with):
    submitted: dict[str, Any] = {}

    def answer(identity, command, body):
        if command == P.SUBMIT:
            submitted.update(body, at=time.monotonic())
            return accepted(body)
        if command == P.PING:
            if time.monotonic() - submitted["at"] < 1.0:
                return [(P.PONG, {"id": body["id"], "epoch": 7, "in_flight": [submitted["id"]]})]
            return [(P.DONE, {"id": submitted["id"], "text": "late", "index": 0, "chunks": 0,
                              "finish_reason": "stop"})]
        return []

    broker = broker_with(answer)

    async def main() -> list[str]:
        async with AsyncClient(broker.endpoint, answer_timeout_s=0.3, liveness_s=0.2) as client:
            return await collect(client)

    assert asyncio.run(main()) == ["late"]
    assert broker.commands().count(P.PING) >= 3  # kept pinging every liveness_s while it waited


def test_a_pong_from_a_restarted_broker_fails_the_request(broker_with):
    def answer(identity, command, body):
        if command == P.SUBMIT:
            return accepted(body)
        if command == P.PING:
            return [(P.PONG, {"id": body["id"], "epoch": 8, "in_flight": []})]
        return []

    fails_after(broker_with(answer), errors.Unavailable, "restarted", answer_timeout_s=0.3, liveness_s=0.2)


def test_a_request_past_its_deadline_and_grace_gives_deadline_exceeded(broker_with):
    def answer(identity, command, body):
        if command == P.SUBMIT:
            return accepted(body)
        if command == P.PING:
            return [(P.PONG, {"id": body["id"], "epoch": 7, "in_flight": [1]})]
        return []

    elapsed = fails_after(broker_with(answer), errors.DeadlineExceeded, request={"deadline_ms": 200},
                          answer_timeout_s=5, liveness_s=0.2)
    assert 1.2 <= elapsed < 1.2 + 4 * SWEEP_S + 0.5  # the deadline, then the client's grace (1 s)


def test_chunks_arriving_steadily_need_no_ping(broker_with):
    broker = broker_with(lambda identity, command, body: accepted(body) if command == P.SUBMIT else [])

    async def main() -> list[str]:
        async with AsyncClient(broker.endpoint, answer_timeout_s=0.3, liveness_s=0.25) as client:
            task = asyncio.ensure_future(collect(client))
            while P.SUBMIT not in broker.commands():
                await asyncio.sleep(0.01)
            cid = broker.received[0][1]["id"]
            # A chunk every 0.1 s for 0.8 s: over three liveness periods, none of them silent.
            for index in range(8):
                await asyncio.sleep(0.1)
                broker.push((P.CHUNK, {"id": cid, "index": index, "text": str(index)}))
            broker.push((P.DONE, {"id": cid, "chunks": 8, "finish_reason": "stop"}))
            return await task

    assert asyncio.run(main()) == [str(i) for i in range(8)] + [""]
    assert P.PING not in broker.commands()

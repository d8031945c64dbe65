"""Serving through a real daemon with the Python clients: streaming, queueing, deadlines, cancel."""

from __future__ import annotations

import asyncio
import time

import pytest

from inferd import errors
from inferd.client import AsyncClient
from tests.daemon import echo_config, wait_for

WORDS = "the quick brown fox jumps over the lazy dog"


def test_streaming_and_finish_reasons(daemon):
    with daemon.client() as client:
        chunks = list(client.generate("echo", WORDS))
        assert " ".join(c.text for c in chunks) == WORDS
        assert [c.index for c in chunks] == list(range(9))
        assert [c.finish_reason for c in chunks] == [None] * 8 + ["stop"]

        short = list(client.generate("echo", WORDS, max_tokens=3))
        assert [c.text for c in short] == ["the", "quick", "brown"]
        assert short[-1].finish_reason == "length"

        assert client.complete("echo", "  spaced   out\twords ") == "spaced out words"
        empty = list(client.generate("echo", ""))
        assert [(c.text, c.finish_reason) for c in empty] == [("", "stop")]


def test_chunks_stream_as_they_are_produced(daemon):
    with daemon.client() as client:
        start = time.monotonic()
        arrivals = [time.monotonic() - start for _ in client.generate("echo", "a b c d", delay_ms=150)]
    # The chunks arrive one delay apart: streamed as produced, not buffered to the end.
    assert arrivals[-1] >= 0.44
    assert arrivals[1] - arrivals[0] >= 0.1 and arrivals[-1] - arrivals[0] >= 0.4


def test_many_requests_pipelined_over_one_socket(daemon):
    with daemon.client() as client:
        prompts = [f"request {i} " + " ".join(f"w{j}" for j in range(i % 7)) for i in range(200)]
        streams = [client.generate("echo", p) for p in prompts]  # all submitted before any is read
        for prompt, stream in zip(reversed(prompts), reversed(streams)):  # read out of order
            assert " ".join(c.text for c in stream) == prompt.strip()
            assert stream.finish_reason == "stop"
    metrics = daemon.metrics()["echo"]
    assert metrics["completed"] == 200
    assert metrics["queued"] == 0 and metrics["in_flight"] == 0


def test_urgent_requests_overtake_queued_ones(make_daemon):
    daemon = make_daemon(replicas=1, max_concurrency=1)
    order: list[str] = []

    async def run(client, name, priority, delay_ms=20):
        async for _ in client.generate("echo", "x y", priority=priority, delay_ms=delay_ms):
            pass
        order.append(name)

    async def main():
        async with AsyncClient(runtime_dir=daemon.runtime_dir) as client:
            blocker = asyncio.ensure_future(run(client, "blocker", 1, delay_ms=400))
            await asyncio.sleep(0.15)  # the blocker holds the only credit
            low = [asyncio.ensure_future(run(client, f"low{i}", 2)) for i in range(5)]
            await asyncio.sleep(0.05)
            urgent = asyncio.ensure_future(run(client, "urgent", 0))
            await asyncio.gather(blocker, urgent, *low)

    asyncio.run(main())
    assert order[0] == "blocker"
    assert order[1] == "urgent"
    assert order[2:] == [f"low{i}" for i in range(5)]  # FIFO within a level


def test_backpressure_when_full_and_eviction_by_urgent(make_daemon):
    daemon = make_daemon(replicas=1, max_concurrency=1, queue_capacity=2)
    with daemon.client() as client:
        blocker = client.generate("echo", "a b c", delay_ms=300)
        assert next(blocker).text == "a"  # running: the queue is empty again
        queued = [client.generate("echo", f"q{i}", priority=1) for i in range(2)]
        with pytest.raises(errors.Backpressure) as info:
            next(client.generate("echo", "one too many", priority=1))
        assert info.value.retry_after_ms > 0
        # Strictly more urgent: admitted, and the newest of the least urgent is evicted.
        urgent = client.generate("echo", "urgent", priority=0)
        with pytest.raises(errors.Backpressure, match="evicted"):
            list(queued[1])
        assert [c.text for c in urgent] == ["urgent"]
        assert [c.text for c in queued[0]] == ["q0"]
        assert [c.text for c in blocker] == ["b", "c"]
    assert daemon.metrics()["echo"]["rejected_backpressure"] == 2


def test_deadline_in_queue_and_while_running(make_daemon):
    daemon = make_daemon(replicas=1, max_concurrency=1, default_deadline_ms=800)
    with daemon.client() as client:
        blocker = client.generate("echo", "a b c d e f g h", delay_ms=200)  # runs ~1.4 s, past 800 ms
        waiting = client.generate("echo", "never", deadline_ms=300)
        start = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded, match="in the queue"):
            list(waiting)
        assert 0.25 < time.monotonic() - start < 1.2  # not before its deadline, and long before the blocker ends
        # The blocker asked for nothing, so the deployment default (800 ms) applies, even while streaming.
        got = []
        with pytest.raises(errors.DeadlineExceeded, match="while running"):
            for chunk in blocker:
                got.append(chunk.text)
        assert 2 <= len(got) < 8
        # A longer deadline than the default is clamped to it.
        with pytest.raises(errors.DeadlineExceeded):
            list(client.generate("echo", "a b c d e f g h", delay_ms=200, deadline_ms=60_000))
        # The worker stopped generating for them and serves the next request at once.
        assert client.complete("echo", "after") == "after"
    assert daemon.metrics()["echo"]["timed_out"] == 3


def test_cancel_running_and_queued(make_daemon):
    daemon = make_daemon(replicas=1, max_concurrency=1)
    with daemon.client() as client:
        running = client.generate("echo", " ".join(["w"] * 50), delay_ms=50)
        assert next(running).text == "w"
        queued = client.generate("echo", "queued")
        queued.cancel()
        with pytest.raises(errors.Cancelled):
            list(queued)
        running.cancel()
        with pytest.raises(errors.Cancelled):
            list(running)
        # Leaving a stream early (close) cancels it too, and frees the worker at once.
        abandoned = client.generate("echo", " ".join(["z"] * 50), delay_ms=50)
        next(abandoned)
        abandoned.close()
        start = time.monotonic()
        assert client.complete("echo", "next one") == "next one"
        assert time.monotonic() - start < 1.5  # not after the abandoned stream's 2.5 s
    wait_for(lambda: daemon.metrics()["echo"]["cancelled"] == 3, what="3 cancellations counted")
    assert daemon.status()["workers"][0]["in_flight"] == 0


def test_unknown_deployment_and_bad_params(daemon):
    with daemon.client() as client:
        with pytest.raises(errors.UnknownDeployment) as info:
            next(client.generate("nope", "x"))
        assert info.value.details["deployments"] == ["echo"]
        with pytest.raises(errors.BadRequest, match="max_tokens"):
            next(client.generate("echo", "x", max_tokens=-1))
        with pytest.raises(errors.BadRequest, match="temperature"):
            next(client.generate("echo", "x", temperature=0.5))
        with pytest.raises(errors.BadRequest, match="priority"):
            next(client.generate("echo", "x", priority=7))
        assert client.complete("echo", "still fine") == "still fine"


def test_async_client_concurrent_requests(daemon):
    async def main():
        async with AsyncClient(runtime_dir=daemon.runtime_dir) as client:
            pong = await client.ping()

            async def one(i):
                return [c.text async for c in client.generate("echo", f"a{i} b{i} c{i}", delay_ms=10)]

            results = await asyncio.gather(*(one(i) for i in range(40)))
            with pytest.raises(errors.UnknownDeployment):
                async for _ in client.generate("missing", "x"):
                    pass
            return pong, results

    pong, results = asyncio.run(main())
    assert isinstance(pong["epoch"], int)
    assert results == [[f"a{i}", f"b{i}", f"c{i}"] for i in range(40)]


def test_load_spreads_across_workers(make_daemon):
    daemon = make_daemon(replicas=2, max_concurrency=4)
    with daemon.client() as client:
        words = [f"w{i}" for i in range(12)]
        streams = [client.generate("echo", " ".join(words), delay_ms=100) for _ in range(8)]
        seen = wait_for(lambda: [w["in_flight"] for w in daemon.status()["workers"]] == [4, 4],
                        timeout=3, what="both workers to hold 4 requests")
        assert seen
        # Each runner reports its own load (echo: its active streams) through the heartbeats.
        wait_for(lambda: [w["runner"] for w in daemon.status()["workers"]] == [{"active": 4}] * 2,
                 timeout=3, what="the runners' load reports")
        for stream in streams:
            assert [c.text for c in stream] == words


def test_client_without_daemon_says_so(tmp_path):
    with pytest.raises(errors.DaemonNotRunning, match="not running"):
        from inferd.client import Client

        Client(runtime_dir=tmp_path)


def test_config_frontend_on_tcp(make_daemon):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = make_daemon(echo_config(broker=f'frontend = "tcp://127.0.0.1:{port}"\nallow_plain_tcp = true\n'))
    from inferd.client import Client

    with Client(f"tcp://127.0.0.1:{port}") as client:
        assert client.complete("echo", "over tcp") == "over tcp"
    assert not (daemon.runtime_dir / "frontend.sock").exists()


def test_a_step_of_large_chunks_stays_under_the_message_limit(make_daemon):
    # Six requests stepped together, each chunk a 900-character word: one CHUNKS message for
    # the step would pass the broker's 4 KiB limit, and ZeroMQ would drop the worker's connection.
    d = make_daemon(echo_config(replicas=1, broker="max_message_bytes = 4096\n",
                                deployment="", options=""))
    words = [" ".join(c * 900 for c in letters) for letters in ("abcd", "efgh", "ijkl", "mnop", "qrst", "uvwx")]

    async def main():
        async with AsyncClient(runtime_dir=d.runtime_dir) as client:
            async def run(prompt):
                return [c.text async for c in client.generate("echo", prompt)]
            return await asyncio.gather(*(run(w) for w in words))

    results = asyncio.run(main())
    assert [" ".join(r) for r in results] == words
    assert d.worker("echo-0")["restarts"] == 0
    assert "malformed" not in d.logs() and "re-registering" not in d.logs()

"""What the routing decision costs per request, next to the broker's own per-request time, in one run.

1. ``policy.choose(pool, affinity)`` for least-loaded, round-robin, sticky with a key (Zipf keys,
   s = 1.1 over 1,000 sessions) and sticky without one, with 8 and 64 ready workers. The pool holds
   the broker's own ``WorkerRecord`` objects (credits 64) and loads move as in the broker: each
   dispatch adds a request to the chosen worker and stamps its ``dispatch_seq``; once 64 requests
   are in flight, each dispatch is followed by the completion of a random one (service times vary).
2. The broker's per-request time: ``BrokerCore`` driven in-process through a no-op transport that
   only records REQUESTs, default (least-loaded) routing, 64 requests in flight, credits 64 per
   worker: a worker's CHUNKS with a chunk and the end (a DONE carrying the last text) for the oldest
   request, then a client's SUBMIT (decoded as the broker's loop hands it over; REQUEST, CHUNK and
   DONE go out, collected for the client until the batch's flush). Frames are encoded before each
   timed batch, so this is the core's logic and its decoding, without ZeroMQ or the encoding of
   replies: a lower bound of the broker process's ~300 us at 64 in flight (docs/benchmarks.md),
   which makes the fractions printed an upper bound.

Timing: ``time.perf_counter_ns`` around batches (100 choices; 64 requests through the broker),
divided by the batch size: the medians and p99s are of those per-batch means. A choice's batch also
does the dispatch and completion bookkeeping above, so the same loop is run alternately with a
trivial ``choose`` (returns ``pool[0]``) and its median is subtracted: the figures are the cost of
``choose`` above a bare Python call.

Usage: ``python bench/bench_routing.py [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import deque
from typing import Any, Callable

from inferd import protocol as P
from inferd.broker.core import BrokerCore, WorkerRecord
from inferd.config import parse
from inferd.routing import LeastLoaded, RoundRobin, Sticky

BATCH = 100
IN_FLIGHT = 64
CREDITS = 64
WORKERS = (8, 64)
DOCS_BROKER_US = 300.0  # docs/benchmarks.md: the broker process's CPU time per request, 64 in flight
POLICIES: dict[str, tuple[Callable[[], Any], bool]] = {  # name: (factory, requests carry a key)
    "least-loaded": (LeastLoaded, False),
    "round-robin": (RoundRobin, False),
    "sticky, key": (Sticky, True),
    "sticky, no key": (Sticky, False),
}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def zipf_keys(count: int, rng: random.Random, sessions: int = 1000, s: float = 1.1) -> list[str]:
    weights = [1 / (rank + 1) ** s for rank in range(sessions)]
    return rng.choices([f"session-{i}" for i in range(sessions)], weights=weights, k=count)


def worker_pool(n: int) -> list[WorkerRecord]:
    """Ready workers, sorted by id, as the broker hands them to a policy."""
    pool = [WorkerRecord(id=f"echo-{i}", deployment=None, pid=0, device="cpu", credits=CREDITS,
                         state="ready", last_seen=0.0, attached=True) for i in range(n)]
    for w in pool:
        w.recount()
    return sorted(pool, key=lambda w: w.id)


class Dispatching:
    """A pool under load: choices as the broker makes them, with its dispatch and completion bookkeeping."""

    def __init__(self, choose: Callable, pool: list[WorkerRecord], keys: list[str | None], seed: int):
        self.choose, self.pool, self.keys = choose, pool, keys
        self.rng = random.Random(seed)
        self.in_flight: list[tuple[WorkerRecord, int]] = []
        self.seq = 0
        self.at = 0

    def batch(self) -> float:
        """Nanoseconds per choice, averaged over one batch."""
        choose, pool, in_flight, randrange = self.choose, self.pool, self.in_flight, self.rng.randrange
        keys, at, seq = self.keys, self.at, self.seq
        start = time.perf_counter_ns()
        for i in range(at, at + BATCH):
            w = choose(pool, keys[i])
            seq += 1
            w.dispatch_seq = seq
            w.requests[seq] = None
            w.recount()
            in_flight.append((w, seq))
            if len(in_flight) > IN_FLIGHT:
                j = randrange(len(in_flight))
                in_flight[j], in_flight[-1] = in_flight[-1], in_flight[j]
                done, rid = in_flight.pop()
                done.release(rid)
        elapsed = time.perf_counter_ns() - start
        self.at, self.seq = (at + BATCH) % (len(keys) - BATCH), seq
        return elapsed / BATCH


def bench_choose(name: str, workers: int, batches: int, seed: int = 1) -> dict[str, float]:
    factory, keyed = POLICIES[name]
    policy = factory()
    pool = worker_pool(workers)
    for w in pool:
        policy.join(w.id)
    keys: list[str | None] = zipf_keys(50_000, random.Random(seed)) if keyed else [None] * 50_000
    measured = Dispatching(policy.choose, pool, keys, seed)
    baseline = Dispatching(lambda pool, affinity: pool[0], worker_pool(workers), keys, seed)
    for _ in range(batches // 10):  # warm up, and fill the pool to 64 in flight
        measured.batch(), baseline.batch()
    runs, bases = [], []
    for _ in range(batches):
        runs.append(measured.batch())
        bases.append(baseline.batch())
    base = statistics.median(bases)
    per_call = [(ns - base) / 1000 for ns in runs]
    return {"median_us": statistics.median(per_call), "p99_us": p99(per_call), "bookkeeping_us": base / 1000}


class RequestRecorder:
    """A no-op transport that only notes each REQUEST's worker and rid (the bench must answer them)."""

    def __init__(self) -> None:
        self.dispatched: deque[tuple[str, int]] = deque()

    def to_client(self, client: bytes, replies: list[tuple[bytes, dict]]) -> None:
        pass

    def to_worker(self, worker: str, command: bytes, body: dict) -> None:
        if command == P.REQUEST:
            self.dispatched.append((worker, body["rid"]))

    def to_supervisor(self, command: bytes, body: dict) -> None:
        pass


def bench_broker(workers: int, batches: int) -> dict[str, float]:
    """Microseconds per request through BrokerCore (SUBMIT, REQUEST, CHUNK, DONE), 64 in flight."""
    config = parse({"broker": {"heartbeat_interval_ms": 60_000},
                    "deployment": [{"name": "echo", "runtime": "echo", "replicas": workers,
                                    "max_concurrency": CREDITS}]}, "<bench>")
    transport = RequestRecorder()
    core = BrokerCore(config, transport)
    assert type(core.deployments["echo"].router) is LeastLoaded
    for i in range(workers):
        wid = f"echo-{i}"
        core.on_worker(wid.encode(), [P.WORKER, P.READY, P.pack({
            "worker": wid, "deployment": "echo", "device": "cpu", "pid": 1000 + i, "runtime": "echo",
            "state": "ready", "credits": CREDITS, "in_flight": 0, "generation": 1})])
        core.on_worker((wid + P.ENGINE_SUFFIX).encode(), [P.WORKER, P.ATTACH, P.pack({"worker": wid,
                                                                                      "generation": 1})])
    client, cid = b"bench", 0

    def submits(count: int) -> list[list[bytes]]:
        nonlocal cid
        cid += count
        return [[P.CLIENT, P.SUBMIT, P.pack({"id": c, "deployment": "echo", "prompt": "hello"})]
                for c in range(cid - count, cid)]

    for frames in submits(IN_FLIGHT):
        core.on_client(client, frames)
    per_request = []
    for b in range(batches + batches // 10):
        answers = []
        for _ in range(IN_FLIGHT):  # the oldest 64: all dispatched before this batch
            wid, rid = transport.dispatched.popleft()
            answers.append(((wid + P.ENGINE_SUFFIX).encode(), [P.WORKER, P.CHUNKS, P.pack(
                {"worker": wid, "chunks": [[rid, "hello"], [rid, "world", "stop"]]})]))
        new = submits(IN_FLIGHT)
        on_worker, on_client = core.on_worker, core.on_client
        start = time.perf_counter_ns()
        for (identity, chunks), submit in zip(answers, new):
            on_worker(identity, chunks)
            on_client(client, submit)
        core.flush()
        elapsed = time.perf_counter_ns() - start
        if b >= batches // 10:  # after the warm-up
            per_request.append(elapsed / IN_FLIGHT / 1000)
    completed = core.metrics()["echo"]["completed"]
    assert completed == (batches + batches // 10) * IN_FLIGHT and len(transport.dispatched) == IN_FLIGHT, completed
    return {"median_us": statistics.median(per_request), "p99_us": p99(per_request)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a check that it works; the figures are noisy")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    args = parser.parse_args()
    batches = 200 if args.quick else 2000
    broker_batches = 50 if args.quick else 400
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.2f}; {batches} batches of {BATCH} choices, "
          f"{broker_batches} batches of {IN_FLIGHT} requests through the broker")

    broker = {n: bench_broker(n, broker_batches) for n in WORKERS}
    rows = []
    for name in POLICIES:
        for n in WORKERS:
            row = {"policy": name, "workers": n, **bench_choose(name, n, batches)}
            row["fraction"] = row["median_us"] / broker[n]["median_us"]
            row["fraction_of_docs_300us"] = row["median_us"] / DOCS_BROKER_US
            rows.append(row)

    print("\nbroker, in-process core, per request (64 in flight, least-loaded):")
    for n in WORKERS:
        print(f"  {n:2d} workers: median {broker[n]['median_us']:.1f} us, p99 {broker[n]['p99_us']:.1f} us")
    print(f"\n| policy | workers | median µs | p99 µs | fraction of the broker's per-request time "
          f"| of ~{DOCS_BROKER_US:.0f} µs (docs) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['policy']} | {r['workers']} | {r['median_us']:.2f} | {r['p99_us']:.2f} "
              f"| {r['fraction']:.1%} of {broker[r['workers']]['median_us']:.1f} | {r['fraction_of_docs_300us']:.1%} |")
    print("\n(bookkeeping subtracted per choice: "
          + ", ".join(f"{r['policy']}/{r['workers']} {r['bookkeeping_us']:.2f}" for r in rows) + " µs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "python": platform.python_version(),
                       "load_average": os.getloadavg()[0], "broker": broker, "choose": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the remote runtime costs: 256 streams through one remote worker vs the same streams read directly.

The upstream is tests/fake_upstream.py in a process of its own, streaming
one word per event with ``--itl-ms`` (20) between events, so the physical
limit is the upstream's pace: ``concurrency / itl`` tokens/s (12,800 at 256
streams and 20 ms). Two clients read the same streams, alternately, in one run:

* **reference**: a plain aiohttp client in this process, ``concurrency``
  streams at once, parsing the SSE events as any OpenAI client must;
* **inferd**: a real daemon with one remote worker (``max_concurrency`` =
  ``concurrency``), read through :class:`~inferd.client.AsyncClient`.

Each is a closed loop: every one of ``concurrency`` users runs a request of
``--tokens`` tokens, then the next, for ``--seconds``. Per run: tokens/s
(chunks received / wall time), and CPU milliseconds per 1000 tokens of every
process at work: the upstream's, the reference client's; inferd's worker (all
threads, and by thread), its broker and its client. On a machine of few cores
they all share, the sum of these is what bounds tokens/s; the worker's figure
is the one that load on the machine does not change much. Runs alternate, each
pair is printed side by side with its ratio, and the summary takes medians.
Target: inferd's tokens/s >= 0.9x the reference's.

Usage: ``python bench/bench_remote.py [--quick] [--concurrency 256] [--itl-ms 20] [--tokens 100]
[--seconds 10] [--repeats 3] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench_core import machine  # bench/ is sys.path[0] as a script
from bench_recovery import Daemon
from bench_torch import thread_cpu

from inferd.client import AsyncClient
from inferd.runtimes.remote.sse import SSEParser

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.9

CONFIG = """
[daemon]
log_level = "warning"
[[deployment]]
name = "cloud"
runtime = "remote"
max_concurrency = {concurrency}
queue_capacity = {queue}
default_deadline_ms = 600000
[deployment.options]
base_url = "{base_url}"
model = "fake-model"
api = "completions"
"""


def start_upstream(itl_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--itl-ms", str(itl_ms)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    return sum(thread_cpu(pid).values())


async def closed_loop(concurrency: int, seconds: float, one_request) -> tuple[int, float]:
    """Run ``one_request`` back to back on ``concurrency`` users for ``seconds``; (tokens, wall s)."""
    stop = time.monotonic() + seconds
    counts = [0] * concurrency

    async def user(i: int) -> None:
        while time.monotonic() < stop:
            counts[i] += await one_request()

    started = time.monotonic()
    await asyncio.gather(*(user(i) for i in range(concurrency)))
    return sum(counts), time.monotonic() - started


async def reference_run(base_url: str, upstream: int, prompt: str, tokens: int, concurrency: int,
                        seconds: float) -> dict:
    # The body inferd's worker sends, usage included: the upstream does the same work for both.
    body = json.dumps({"model": "fake-model", "prompt": prompt, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one() -> int:
            got = 0
            parser = SSEParser()
            async with session.post(base_url + "/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                async for data in resp.content.iter_any():
                    for event in parser.feed(data):
                        if event.data == "[DONE]":
                            break
                        choices = json.loads(event.data)["choices"]
                        if choices and choices[0]["text"]:
                            got += 1
            assert got == tokens, got
            return got

        cpu, upstream0 = own_cpu(), process_cpu(upstream)
        count, wall = await closed_loop(concurrency, seconds, one)
        cpu, upstream1 = own_cpu() - cpu, process_cpu(upstream)
    per_1k = 1e6 / count
    return {"tokens": count, "wall_s": wall, "tokens_per_s": count / wall, "client_cpu_ms_per_1k": cpu * per_1k,
            "upstream_cpu_ms_per_1k": (upstream1 - upstream0) * per_1k}


async def inferd_run(daemon: Daemon, upstream: int, prompt: str, tokens: int, concurrency: int,
                     seconds: float) -> dict:
    broker, worker = daemon.children[0], daemon.children[1]
    async with AsyncClient(runtime_dir=daemon.runtime_dir, answer_timeout_s=30, liveness_s=60) as client:
        async def one() -> int:
            got = 0
            async for chunk in client.generate("cloud", prompt):
                got += bool(chunk.text)
            assert got == tokens, got
            return got

        client0, worker0, broker0, upstream0 = own_cpu(), thread_cpu(worker), process_cpu(broker), process_cpu(upstream)
        count, wall = await closed_loop(concurrency, seconds, one)
        client1, worker1, broker1, upstream1 = own_cpu(), thread_cpu(worker), process_cpu(broker), process_cpu(upstream)
    per_1k = 1e6 / count
    threads = {role: (worker1.get(role, 0.0) - worker0.get(role, 0.0)) * per_1k for role in worker1}
    return {"tokens": count, "wall_s": wall, "tokens_per_s": count / wall,
            "worker_cpu_ms_per_1k": sum(threads.values()),
            # main: messaging to the broker; zmq: ZeroMQ's I/O thread; other: the engine and the HTTP loop
            **{f"worker_{role}_cpu_ms_per_1k": v for role, v in sorted(threads.items())},
            "broker_cpu_ms_per_1k": (broker1 - broker0) * per_1k, "client_cpu_ms_per_1k": (client1 - client0) * per_1k,
            "upstream_cpu_ms_per_1k": (upstream1 - upstream0) * per_1k}


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a check that it works, noisy figures")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--itl-ms", type=float, default=20)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per request")
    parser.add_argument("--seconds", type=float, default=10, help="length of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeats = 4, 1
    prompt = " ".join(f"w{i}" for i in range(args.tokens))
    limit = args.concurrency * 1000 / args.itl_ms
    upstream, base_url = start_upstream(args.itl_ms)
    workdir = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    daemon = Daemon(workdir, "remote", CONFIG.format(concurrency=args.concurrency, queue=4 * args.concurrency,
                                                     base_url=base_url))
    results: dict[str, list[dict]] = {"reference": [], "inferd": []}
    try:
        daemon.start()
        print(f"{args.concurrency} streams of {args.tokens} tokens, {args.itl_ms:g} ms between tokens: "
              f"the upstream's pace is {limit:,.0f} tokens/s; load average {os.getloadavg()[0]:.2f}", flush=True)
        reference = functools.partial(reference_run, base_url, upstream.pid, prompt, args.tokens, args.concurrency)
        through = functools.partial(inferd_run, daemon, upstream.pid, prompt, args.tokens, args.concurrency)
        asyncio.run(through(1.0))     # warm both paths
        asyncio.run(reference(1.0))
        for i in range(args.repeats):
            ref = asyncio.run(reference(args.seconds))
            inf = asyncio.run(through(args.seconds))
            results["reference"].append(ref)
            results["inferd"].append(inf)
            print(f"  run {i + 1}: reference {ref['tokens_per_s']:,.0f} tokens/s | inferd {inf['tokens_per_s']:,.0f} "
                  f"tokens/s | ratio {inf['tokens_per_s'] / ref['tokens_per_s']:.3f} (load {os.getloadavg()[0]:.2f})",
                  flush=True)
    finally:
        daemon.stop()
        upstream.terminate()
        upstream.wait()
    ref, inf = median(results["reference"], "tokens_per_s"), median(results["inferd"], "tokens_per_s")
    cpu = {side: {key.removesuffix("_cpu_ms_per_1k"): median(results[side], key) for key in results[side][0]
                  if key.endswith("_cpu_ms_per_1k")} for side in results}
    summary = {
        "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": results,
        "upstream_limit_tokens_per_s": limit, "loadavg_at_end": os.getloadavg()[0],
        "reference_tokens_per_s": ref, "inferd_tokens_per_s": inf, "ratio": inf / ref,
        "cpu_ms_per_1k_tokens": cpu,
    }
    print(f"\nmedians over {args.repeats} run(s) each (load average now {os.getloadavg()[0]:.2f}):")
    print(f"  tokens/s:  reference (plain aiohttp) {ref:,.0f} | inferd (one remote worker) {inf:,.0f}")
    ref_cpu, inf_cpu = cpu["reference"], cpu["inferd"]
    print(f"  CPU ms per 1000 tokens, reference: client {ref_cpu['client']:.1f} + upstream {ref_cpu['upstream']:.1f}"
          f" = {ref_cpu['client'] + ref_cpu['upstream']:.1f}")
    threads = ", ".join(f"{k.removeprefix('worker_')} {v:.1f}" for k, v in inf_cpu.items() if k.startswith("worker_"))
    total = inf_cpu["worker"] + inf_cpu["broker"] + inf_cpu["client"] + inf_cpu["upstream"]
    print(f"  CPU ms per 1000 tokens, inferd: worker {inf_cpu['worker']:.1f} ({threads}) + broker "
          f"{inf_cpu['broker']:.1f} + client {inf_cpu['client']:.1f} + upstream {inf_cpu['upstream']:.1f} "
          f"= {total:.1f}")
    verdict = "met" if inf / ref >= TARGET else "MISSED"
    print(f"  ratio {inf / ref:.3f} (target >= {TARGET}: {verdict}); upstream pace {limit:,.0f} tokens/s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

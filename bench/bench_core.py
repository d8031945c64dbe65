"""What inferd's serving path costs, next to a bare ZeroMQ forwarding loop, measured in one run.

Started side by side, and driven one at a time, figure by figure, so that drift
in a busy machine hits all alike:

* ``bare loop``: ``reference_loop.py``'s forwarder and a worker sending one
  reply per request (one per word when streaming): the physical limit of a
  Python broker, and the reference of every ratio;
* ``v1 loop``: the same forwarder, its worker answering with protocol v1's
  messages (ACCEPTED, a CHUNK per word, DONE): what the message count cost;
* ``inferd raw``: inferd (supervisor, broker, one echo worker,
  ``max_concurrency`` 64) driven by the same raw DEALER client;
* ``inferd Client`` and ``inferd AsyncClient``: inferd driven by its own clients.

Measured: round trip of a one-word prompt with 1 in flight (p50, p99);
throughput with 64 one-word requests in flight (req/s); streaming, 16 requests
of 64 words in flight (chunks/s); the CPU time per request of each process
(client, broker, worker: /proc/PID/stat over the throughput run); and the
resident memory of inferd's supervisor and broker after the load. The echo
runtime does no work, so the ratios price inferd itself.
Usage: ``python bench/bench_core.py [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import msgpack
import zmq

from inferd import errors
from inferd.client import AsyncClient, Client
from inferd.ctl import control_call

SIGNATURE = b"IFDC2"
SIGNATURE_V1 = b"IFDC1"
PING_PROMPT = "ping"
STREAM_WORDS = 64
STREAM_PROMPT = " ".join(f"w{i}" for i in range(STREAM_WORDS))
IN_FLIGHT = 64
STREAM_IN_FLIGHT = 16
REPLY_TIMEOUT_MS = 10_000
READY_TIMEOUT_S = 30.0
# Heartbeats are left at their defaults: their cost is part of what is measured.
INFERD_CONFIG = """\
[daemon]
log_level = "warning"

[[deployment]]
name = "echo"
runtime = "echo"
replicas = 1
max_concurrency = {max_concurrency}
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Settings:
    round_trips: int   # sequential requests for the latency figures
    pipelined: int     # one-word requests, IN_FLIGHT outstanding
    streams: int       # STREAM_WORDS-word requests, STREAM_IN_FLIGHT outstanding
    warmup: int        # requests per system before anything is measured
    rounds: int        # each phase this many times over all systems, interleaved; medians reported


QUICK = Settings(round_trips=500, pipelined=5_000, streams=200, warmup=200, rounds=1)
FULL = Settings(round_trips=2_000, pipelined=10_000, streams=1_000, warmup=1_000, rounds=3)


# --- processes ------------------------------------------------------------------------------

def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    """Start a process in its own session, so that stopping it can take its whole group."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def cpu_s(pid: int | str) -> float:
    """User plus system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    """VmRSS of a live process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Loop:
    """reference_loop.py's forwarder, with its one-reply worker (``bare``) or its v1 worker."""

    def __init__(self, workdir: Path, name: str, worker: str, protocol: int):
        self.name = name
        self.worker = worker
        self.protocol = protocol
        self.workdir = workdir
        self.endpoint = f"ipc://{workdir}/{worker}-frontend.sock"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        script = str(Path(__file__).with_name("reference_loop.py"))
        backend = f"ipc://{self.workdir}/{self.worker}-backend.sock"
        log = self.workdir / f"{self.worker}.log"
        self.procs = [spawn([sys.executable, script, "forwarder", self.endpoint, backend], log),
                      spawn([sys.executable, script, self.worker, backend], log)]

    def pids(self) -> dict[str, int]:
        return {"broker": self.procs[0].pid, "worker": self.procs[1].pid}

    def memory(self) -> dict[str, float]:
        return {"broker_rss_mb": rss_mb(self.procs[0].pid)}

    def stop(self) -> None:
        for proc in self.procs:
            kill_group(proc.pid)
            proc.wait()


class Inferd:
    """A real daemon, ``python -m inferd``, on a private runtime dir, one echo worker."""

    protocol = 2

    def __init__(self, workdir: Path):
        self.name = "inferd"
        self.home = workdir / "inferd"
        self.runtime_dir = self.home / "run"
        self.endpoint = f"ipc://{self.runtime_dir}/frontend.sock"
        self.proc: subprocess.Popen | None = None
        self.children: list[int] = []

    def start(self) -> None:
        self.home.mkdir()
        config = self.home / "inferd.toml"
        config.write_text(INFERD_CONFIG.format(max_concurrency=IN_FLIGHT))
        self.proc = spawn([sys.executable, "-m", "inferd", "--config", str(config),
                           "--runtime-dir", str(self.runtime_dir)], self.home / "inferd.log")
        status = self._wait_ready()
        self.children = [status["broker"]["pid"]] + [w["pid"] for w in status["workers"]]

    ready_timeout_s = READY_TIMEOUT_S   # a daemon whose model loads for long waits longer

    def _wait_ready(self) -> dict:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.home}/inferd.log")
            with contextlib.suppress(errors.InferdError):
                status = control_call(self.runtime_dir, b"STATUS", 2.0)
                workers = status["workers"]
                if workers and all(w["state"] == "ready" for w in workers):
                    return status
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {self.ready_timeout_s:g} s; see {self.home}/inferd.log")

    def pids(self) -> dict[str, int]:
        return {"broker": self.children[0], "worker": self.children[1]}

    def memory(self) -> dict[str, float]:
        return {"supervisor_rss_mb": rss_mb(self.proc.pid), "broker_rss_mb": rss_mb(self.children[0])}

    def stop(self) -> None:
        """SIGINT is the daemon's fast stop, which reaps its children; if it hangs, kill them all.

        Until the supervisor has been waited for, its unreaped children keep their pids, so
        killing them by pid cannot hit an unrelated process.
        """
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            for pid in (self.proc.pid, *self.children):  # each leads its own session
                kill_group(pid)
            self.proc.wait()


System = Loop | Inferd


# --- the drivers ----------------------------------------------------------------------------
# Each drives one system: ``round_trips`` (latency samples, us) and ``pipelined`` (seconds and
# chunks for ``total`` requests, ``in_flight`` outstanding, a new one sent as each ends).

class RawDriver:
    """A raw DEALER speaking the client protocol (v2, or v1 for the v1 loop): the same code drives
    the loops and inferd."""

    def __init__(self, system: System, name: str):
        self.name = name
        self.system = system
        self.endpoint = system.endpoint
        self.v1 = system.protocol == 1
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
        self.sock.connect(self.endpoint)
        self._ids = itertools.count()

    def close(self) -> None:
        self.sock.close(0)

    def submit(self, prompt: str) -> None:
        body = {"id": next(self._ids), "deployment": "echo", "prompt": prompt}
        self.sock.send_multipart([SIGNATURE_V1 if self.v1 else SIGNATURE, b"SUBMIT", msgpack.packb(body)])

    def replies(self) -> list[bytes]:
        """The commands of the next message's replies: ``[IFDC2, [[command, body], ...]]``, decoded
        whole, or v1's ``[IFDC1, command, body]``, its body left undecoded (a v2 DONE carries the last
        word: echo always knows it is the last)."""
        try:
            frames = self.sock.recv_multipart()
        except zmq.Again:
            raise TimeoutError(f"no reply from {self.endpoint} in {REPLY_TIMEOUT_MS} ms") from None
        commands = [frames[1]] if self.v1 else [command.encode() for command, _ in msgpack.unpackb(frames[1])]
        if b"ERROR" in commands:
            raise RuntimeError(f"{self.endpoint} answered ERROR {frames}")
        return commands

    def round_trips(self, n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter_ns()
            self.submit(PING_PROMPT)
            while b"DONE" not in self.replies():
                pass
            samples.append((time.perf_counter_ns() - start) / 1000)
        return samples

    def pipelined(self, total: int, in_flight: int, prompt: str) -> tuple[float, int]:
        start = time.perf_counter()
        for _ in range(min(in_flight, total)):
            self.submit(prompt)
        sent, done, chunks = min(in_flight, total), 0, 0
        last_in_done = 0 if self.v1 else 1
        while done < total:
            for command in self.replies():
                if command == b"CHUNK":
                    chunks += 1
                elif command == b"DONE":
                    done += 1
                    chunks += last_in_done
                    if sent < total:
                        self.submit(prompt)
                        sent += 1
        elapsed = time.perf_counter() - start
        if chunks != total * len(prompt.split()):
            raise RuntimeError(f"{self.endpoint}: {chunks} chunks for {total} requests of {prompt!r}")
        return elapsed, chunks


class ClientDriver:
    """inferd's blocking Client: a window of streams, the oldest read to its end, then another sent."""

    def __init__(self, system: Inferd, name: str):
        self.name = name
        self.system = system
        self.client = Client(system.endpoint)

    def close(self) -> None:
        self.client.close()

    def round_trips(self, n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter_ns()
            for _chunk in self.client.generate("echo", PING_PROMPT):
                pass
            samples.append((time.perf_counter_ns() - start) / 1000)
        return samples

    def pipelined(self, total: int, in_flight: int, prompt: str) -> tuple[float, int]:
        start = time.perf_counter()
        window = collections.deque(self.client.generate("echo", prompt) for _ in range(min(in_flight, total)))
        sent, chunks = len(window), 0
        while window:
            chunks += sum(1 for _ in window.popleft())
            if sent < total:
                window.append(self.client.generate("echo", prompt))
                sent += 1
        return time.perf_counter() - start, chunks


class AsyncDriver:
    """inferd's AsyncClient: ``in_flight`` coroutines, each running requests one after another."""

    def __init__(self, system: Inferd, name: str):
        self.name = name
        self.system = system
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._open(system.endpoint))

    @staticmethod
    async def _open(endpoint: str) -> AsyncClient:
        return AsyncClient(endpoint)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()

    async def _one(self, prompt: str) -> int:
        n = 0
        async for _chunk in self.client.generate("echo", prompt):
            n += 1
        return n

    def round_trips(self, n: int) -> list[float]:
        async def go() -> list[float]:
            samples = []
            for _ in range(n):
                start = time.perf_counter_ns()
                await self._one(PING_PROMPT)
                samples.append((time.perf_counter_ns() - start) / 1000)
            return samples
        return self.loop.run_until_complete(go())

    def pipelined(self, total: int, in_flight: int, prompt: str) -> tuple[float, int]:
        left = [total]

        async def lane() -> int:
            chunks = 0
            while left[0] > 0:
                left[0] -= 1
                chunks += await self._one(prompt)
            return chunks

        async def go() -> int:
            return sum(await asyncio.gather(*(lane() for _ in range(min(in_flight, total)))))
        start = time.perf_counter()
        chunks = self.loop.run_until_complete(go())
        return time.perf_counter() - start, chunks


Driver = RawDriver | ClientDriver | AsyncDriver


# --- measurements ---------------------------------------------------------------------------

def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def warm_up(driver: Driver, s: Settings) -> None:
    driver.round_trips(s.warmup)
    driver.pipelined(s.warmup, IN_FLIGHT, PING_PROMPT)
    driver.pipelined(max(1, s.warmup // 10), STREAM_IN_FLIGHT, STREAM_PROMPT)


def latency(driver: Driver, s: Settings) -> dict[str, float]:
    samples = driver.round_trips(s.round_trips)
    return {"p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99)}


def throughput(driver: Driver, s: Settings) -> dict[str, float]:
    """Requests per second, and each process's CPU time per request over the run."""
    pids = {"client": "self", **driver.system.pids()}
    before = {role: cpu_s(pid) for role, pid in pids.items()}
    elapsed, _ = driver.pipelined(s.pipelined, IN_FLIGHT, PING_PROMPT)
    cpu = {f"{role}_cpu_us": (cpu_s(pid) - before[role]) / s.pipelined * 1e6 for role, pid in pids.items()}
    return {"req_per_s": s.pipelined / elapsed, **cpu}


def streaming(driver: Driver, s: Settings) -> dict[str, float]:
    elapsed, chunks = driver.pipelined(s.streams, STREAM_IN_FLIGHT, STREAM_PROMPT)
    if chunks != s.streams * STREAM_WORDS:
        raise RuntimeError(f"{driver.name}: {chunks} chunks for {s.streams} streams of {STREAM_WORDS} words")
    return {"chunks_per_s": chunks / elapsed}


PHASES: tuple[Callable[[Driver, Settings], dict[str, float]], ...] = (latency, throughput, streaming)


def run(drivers: list[Driver], s: Settings) -> dict[str, dict[str, float]]:
    """Each phase on every driver in turn, ``rounds`` times (a burst of load from elsewhere on a
    shared machine then hits one round, not one system), the median of each figure; then memory
    once all the load has passed."""
    for driver in drivers:
        warm_up(driver, s)
    samples: dict[str, dict[str, list[float]]] = {driver.name: collections.defaultdict(list) for driver in drivers}
    for phase in PHASES:
        for _ in range(s.rounds):
            for driver in drivers:
                for key, value in phase(driver, s).items():
                    samples[driver.name][key].append(value)
    results = {name: {key: statistics.median(values) for key, values in figures.items()}
               for name, figures in samples.items()}
    for driver in drivers:
        results[driver.name].update(driver.system.memory())
    return results


# --- report ---------------------------------------------------------------------------------

BARE = "bare loop"
ROWS = (  # (key, label, digits)
    ("p50_us", "round trip p50, 1 in flight (us)", 0),
    ("p99_us", "round trip p99, 1 in flight (us)", 0),
    ("req_per_s", f"throughput, {IN_FLIGHT} in flight (req/s)", 0),
    ("chunks_per_s", f"{STREAM_WORDS}-word streams, {STREAM_IN_FLIGHT} in flight (chunks/s)", 0),
    ("client_cpu_us", "CPU per request: client (us)", 1),
    ("broker_cpu_us", "CPU per request: broker (us)", 1),
    ("worker_cpu_us", "CPU per request: worker (us)", 1),
    ("broker_rss_mb", "broker RSS after load (MB)", 1),
    ("supervisor_rss_mb", "supervisor RSS after load (MB)", 1),
)
# The targets (issue #10): (system, key, test on the ratio to the bare loop, or on the value).
TARGETS = (
    ("inferd raw", "p50_us", "ratio <= 1.5", lambda value, ratio: ratio <= 1.5),
    ("inferd raw", "req_per_s", "ratio >= 0.7", lambda value, ratio: ratio >= 0.7),
    ("inferd AsyncClient", "req_per_s", "ratio >= 0.5", lambda value, ratio: ratio >= 0.5),
    ("inferd raw", "broker_rss_mb", "< 60 MB", lambda value, ratio: value < 60),
    ("inferd raw", "supervisor_rss_mb", "< 60 MB", lambda value, ratio: value < 60),
)


def table(results: dict[str, dict[str, float]]) -> str:
    """Metrics down, systems across; each figure with its ratio to the bare loop."""
    names = list(results)
    bare = results[BARE]

    def cell(name: str, key: str, digits: int) -> str:
        value = results[name].get(key)
        if value is None:
            return "-"
        text = f"{value:,.{digits}f}"
        base = bare.get(key)
        return text if name == BARE or not base else f"{text} ({value / base:.2f}x)"

    lines = [["metric", *names]] + [[label, *(cell(n, key, digits) for n in names)] for key, label, digits in ROWS]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def verdicts(results: dict[str, dict[str, float]]) -> list[dict]:
    out = []
    for name, key, target, met in TARGETS:
        value = results[name][key]
        ratio = value / results[BARE][key] if key in results[BARE] else None
        out.append({"system": name, "metric": key, "value": value, "ratio": ratio, "target": target,
                    "met": met(value, ratio)})
    return out


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)),
            "loadavg_at_start": os.getloadavg()[0]}


# --- main -----------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: a check that it works, noisy figures")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    settings = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup below
    info = machine()
    print(f"machine: {info['nproc']} cpus ({info['cpu']}), python {info['python']}, pyzmq {info['pyzmq']} "
          f"(libzmq {info['libzmq']}), msgpack {info['msgpack']}, load average {info['loadavg_at_start']:.2f}")
    print(f"settings: {'quick' if args.quick else 'full'} {asdict(settings)}; one-word prompt {PING_PROMPT!r}; "
          f"inferd echo deployment, 1 worker, max_concurrency {IN_FLIGHT}, default heartbeats")
    workdir = Path(tempfile.mkdtemp(prefix="inferd-bench-"))
    bare, v1, ours = Loop(workdir, BARE, "worker", 2), Loop(workdir, "v1 loop", "worker-v1", 1), Inferd(workdir)
    keep_logs = False
    try:
        with contextlib.ExitStack() as stack:
            for system in (bare, v1, ours):
                stack.callback(system.stop)
                system.start()
            drivers: list[Driver] = [RawDriver(bare, BARE), RawDriver(v1, "v1 loop"), RawDriver(ours, "inferd raw"),
                                     ClientDriver(ours, "inferd Client"), AsyncDriver(ours, "inferd AsyncClient")]
            for driver in drivers:
                stack.callback(driver.close)
            results = run(drivers, settings)
    except Exception:
        keep_logs = True
        print(f"failed; logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if not keep_logs:
            shutil.rmtree(workdir)
    info["loadavg_at_end"] = os.getloadavg()[0]
    print()
    print(table(results))
    print()
    checks = verdicts(results)
    for c in checks:
        ratio = "" if c["ratio"] is None else f" ({c['ratio']:.2f}x the bare loop)"
        print(f"{c['system']} {c['metric']} {c['value']:,.1f}{ratio}: target {c['target']}: "
              f"{'ok' if c['met'] else 'MISSED'}")
    print(f"load average at the end: {info['loadavg_at_end']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "settings": asdict(settings), "results": results,
                                         "targets": checks}, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

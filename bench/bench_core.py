"""What inferd's serving path costs, next to a minimal ZeroMQ forwarder, measured in one run.

inferd (supervisor, broker, echo workers) and the reference of
``reference_loop.py`` (a frame-forwarding loop and an echo worker) are started
side by side and driven by the same raw DEALER client, one system at a time,
metric by metric, so that drift in a busy machine hits both alike. Measured:

1. round trip, 1 request in flight: SUBMIT of a one-word prompt to DONE (p50, p99);
2. throughput, 64 one-word requests in flight on one socket (req/s);
3. streaming, 16 requests of 64 words (64 CHUNKs each) in flight (chunks/s);
4. resident memory of inferd's supervisor and broker after the load.

The echo runtime does no work, so the ratios price inferd itself: validation,
queueing, credits, bookkeeping and the extra hop through the worker's engine
thread. Usage: ``python bench/bench_core.py [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
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
from inferd.ctl import control_call

SIGNATURE = b"IFDC1"
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
replicas = {replicas}
max_concurrency = {max_concurrency}
"""


@dataclass(frozen=True)
class Settings:
    round_trips: int   # sequential requests for the latency figures
    pipelined: int     # one-word requests, IN_FLIGHT outstanding
    streams: int       # STREAM_WORDS-word requests, STREAM_IN_FLIGHT outstanding
    warmup: int        # requests per system before anything is measured


QUICK = Settings(round_trips=500, pipelined=2_000, streams=200, warmup=200)
FULL = Settings(round_trips=5_000, pipelined=20_000, streams=2_000, warmup=1_000)


# --- processes ------------------------------------------------------------------------------

def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    """Start a process in its own session, so that stopping it can take its whole group."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def rss_mb(pid: int) -> float:
    """VmRSS of a live process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Reference:
    """The forwarder and echo worker of reference_loop.py."""

    def __init__(self, workdir: Path):
        self.name = "reference"
        self.workdir = workdir
        self.endpoint = f"ipc://{workdir}/ref-frontend.sock"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        script = str(Path(__file__).with_name("reference_loop.py"))
        backend = f"ipc://{self.workdir}/ref-backend.sock"
        log = self.workdir / "reference.log"
        self.procs = [spawn([sys.executable, script, "forwarder", self.endpoint, backend], log),
                      spawn([sys.executable, script, "worker", backend], log)]

    def memory(self) -> dict[str, float]:
        return {"broker_rss_mb": rss_mb(self.procs[0].pid)}

    def stop(self) -> None:
        for proc in self.procs:
            kill_group(proc.pid)
            proc.wait()


class Inferd:
    """A real daemon, ``python -m inferd``, on a private runtime dir."""

    def __init__(self, workdir: Path, replicas: int):
        self.name = f"inferd x{replicas}"
        self.replicas = replicas
        self.home = workdir / f"inferd-{replicas}"
        self.runtime_dir = self.home / "run"
        self.endpoint = f"ipc://{self.runtime_dir}/frontend.sock"
        self.proc: subprocess.Popen | None = None
        self.children: list[int] = []

    def start(self) -> None:
        self.home.mkdir()
        config = self.home / "inferd.toml"
        config.write_text(INFERD_CONFIG.format(replicas=self.replicas, max_concurrency=IN_FLIGHT))
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
                if len(workers) == self.replicas and all(w["state"] == "ready" for w in workers):
                    return status
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {self.ready_timeout_s:g} s; see {self.home}/inferd.log")

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


System = Reference | Inferd


# --- the client -----------------------------------------------------------------------------

class ProtocolClient:
    """A raw DEALER speaking the client protocol: the same code drives every system."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
        self.sock.connect(endpoint)
        self._ids = itertools.count()

    def close(self) -> None:
        self.sock.close(0)

    def submit(self, prompt: str) -> None:
        body = {"id": next(self._ids), "deployment": "echo", "prompt": prompt}
        self.sock.send_multipart([SIGNATURE, b"SUBMIT", msgpack.packb(body)])

    def reply(self) -> bytes:
        """The next reply's command. Bodies are left undecoded: both systems would pay for it alike."""
        try:
            _signature, command, body = self.sock.recv_multipart()
        except zmq.Again:
            raise TimeoutError(f"no reply from {self.endpoint} in {REPLY_TIMEOUT_MS} ms") from None
        if command == b"ERROR":
            raise RuntimeError(f"{self.endpoint} answered ERROR {msgpack.unpackb(body)}")
        return command

    def round_trips(self, n: int) -> list[float]:
        """Microseconds from SUBMIT to DONE for ``n`` requests, one at a time."""
        samples = []
        for _ in range(n):
            start = time.perf_counter_ns()
            self.submit(PING_PROMPT)
            while self.reply() != b"DONE":
                pass
            samples.append((time.perf_counter_ns() - start) / 1000)
        return samples

    def pipelined(self, total: int, in_flight: int, prompt: str) -> tuple[float, int]:
        """Seconds and chunks for ``total`` requests, a new one sent as each finishes."""
        start = time.perf_counter()
        for _ in range(min(in_flight, total)):
            self.submit(prompt)
        sent, done, chunks = min(in_flight, total), 0, 0
        while done < total:
            command = self.reply()
            if command == b"CHUNK":
                chunks += 1
            elif command == b"DONE":
                done += 1
                if sent < total:
                    self.submit(prompt)
                    sent += 1
        elapsed = time.perf_counter() - start
        if chunks != total * len(prompt.split()):
            raise RuntimeError(f"{self.endpoint}: {chunks} chunks for {total} requests of {prompt!r}")
        return elapsed, chunks


# --- measurements ---------------------------------------------------------------------------

def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def warm_up(client: ProtocolClient, s: Settings) -> None:
    client.round_trips(s.warmup)
    client.pipelined(s.warmup, IN_FLIGHT, PING_PROMPT)
    client.pipelined(max(1, s.warmup // 10), STREAM_IN_FLIGHT, STREAM_PROMPT)


def latency(client: ProtocolClient, s: Settings) -> dict[str, float]:
    samples = client.round_trips(s.round_trips)
    return {"p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99)}


def throughput(client: ProtocolClient, s: Settings) -> dict[str, float]:
    elapsed, _ = client.pipelined(s.pipelined, IN_FLIGHT, PING_PROMPT)
    return {"req_per_s": s.pipelined / elapsed}


def streaming(client: ProtocolClient, s: Settings) -> dict[str, float]:
    elapsed, chunks = client.pipelined(s.streams, STREAM_IN_FLIGHT, STREAM_PROMPT)
    return {"chunks_per_s": chunks / elapsed}


PHASES: tuple[Callable[[ProtocolClient, Settings], dict[str, float]], ...] = (latency, throughput, streaming)


def run(systems: list[System], s: Settings) -> dict[str, dict[str, float]]:
    """Each phase on every system in turn, then memory once all the load has passed."""
    clients = {system.name: ProtocolClient(system.endpoint) for system in systems}
    try:
        for client in clients.values():
            warm_up(client, s)
        results: dict[str, dict[str, float]] = {system.name: {} for system in systems}
        for phase in PHASES:
            for name, client in clients.items():
                results[name].update(phase(client, s))
        for system in systems:
            results[system.name].update(system.memory())
        return results
    finally:
        for client in clients.values():
            client.close()


# --- report ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    key: str
    label: str
    target: str = ""
    met: Callable[[float, float | None], bool] | None = None  # (inferd's value, ratio) -> target met


ROWS = (
    Row("p50_us", "round trip p50, 1 in flight (us)", "ratio <= 1.5", lambda v, r: r <= 1.5),
    Row("p99_us", "round trip p99, 1 in flight (us)"),
    Row("req_per_s", f"throughput, {IN_FLIGHT} in flight (req/s)", "ratio >= 0.7", lambda v, r: r >= 0.7),
    Row("chunks_per_s", f"{STREAM_WORDS}-word streams, {STREAM_IN_FLIGHT} in flight (chunks/s)",
        "ratio >= 0.7", lambda v, r: r >= 0.7),
    Row("supervisor_rss_mb", "supervisor RSS after load (MB)", "< 60 MB", lambda v, r: v < 60),
    Row("broker_rss_mb", "broker RSS after load (MB)", "< 60 MB", lambda v, r: v < 60),
)


def compare(ours: dict[str, float], ref: dict[str, float]) -> list[dict]:
    """One entry per row: both values, the ratio inferd/reference, and whether the target is met."""
    out = []
    for row in ROWS:
        value, base = ours[row.key], ref.get(row.key)
        ratio = value / base if base else None
        out.append({"metric": row.key, "inferd": value, "reference": base, "ratio": ratio,
                    "target": row.target or None, "met": row.met(value, ratio) if row.met else None})
    return out


def table(name: str, comparison: list[dict]) -> str:
    def fmt(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:,.{digits}f}" if v < 100 else f"{v:,.0f}"

    verdict = {True: "ok", False: "MISSED", None: ""}
    lines = [("metric", name, "reference", "ratio", "target", "")]
    lines += [(row.label, fmt(c["inferd"]), fmt(c["reference"]), fmt(c["ratio"], 3), row.target, verdict[c["met"]])
              for row, c in zip(ROWS, comparison)]
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) if i < 4 else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in lines)


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
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="inferd replica counts to run")
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
          f"inferd echo deployment, replicas {args.replicas}, max_concurrency {IN_FLIGHT}, default heartbeats")
    workdir = Path(tempfile.mkdtemp(prefix="inferd-bench-"))
    systems: list[System] = [Reference(workdir)] + [Inferd(workdir, n) for n in args.replicas]
    keep_logs = False
    try:
        with contextlib.ExitStack() as stack:
            for system in systems:
                stack.callback(system.stop)
                system.start()
            results = run(systems, settings)
    except Exception:
        keep_logs = True
        print(f"failed; logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if not keep_logs:
            shutil.rmtree(workdir)

    comparisons = {s.name: compare(results[s.name], results["reference"]) for s in systems[1:]}
    for name, comparison in comparisons.items():
        print()
        print(table(name, comparison))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "settings": {**asdict(settings), "replicas": args.replicas},
                                         "results": results, "comparisons": comparisons}, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

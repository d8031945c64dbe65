"""The HTTP gateway against LitServe and Ray Serve echo servers, and against inferd's own ZeroMQ path.

One run, one client. inferd and LitServe run side by side and alternate, five
rounds per figure, so that the drift of a busy machine hits both alike; Ray
Serve runs alone afterwards (an idle Ray cluster takes CPU from whoever runs
beside it):

* inferd: a daemon with one echo worker and its gateway (POST /v1/completions);
* the floor: ``http_floor.py``, a bare aiohttp server answering the same requests itself, which
  is what the gateway's HTTP server alone costs on this machine (run beside inferd);
* LitServe and Ray Serve: the echo servers of ``bench/peers/``, run by a
  separate virtual environment that this script creates and fills with pip
  (``--peers-venv``, default ``bench/.peers-venv``): never inferd's
  dependencies.

Load, the same bytes-level HTTP/1.1 keep-alive client for every server:
64 connections, each a closed loop of requests for ``--seconds`` after a
warm-up, non-streaming (a one-word prompt) and streaming (an 8-word prompt,
one SSE event per word). Figures: requests/s, and p50 and p99 of the
request's time (send to last byte). Beside them, inferd's ZeroMQ client path
(a raw DEALER, the same prompts, 64 requests in flight) in the same daemon,
in the same alternation: its ratio to LitServe is the core path's figure
against the Python servers (issue 10 asks for 20x; Ray Serve, measured
alone afterwards, is compared across the two phases).

Round trip with one request in flight, HTTP (a blocking socket) against the
ZeroMQ client path (a blocking DEALER): the gateway's added p50.

Usage: ``python bench/bench_gateway.py [--quick] [--seconds S] [--json FILE] [--no-peers]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(__file__).resolve().parent / "peers"
PEER_PACKAGES = ["litserve", "ray[serve]"]
CONNECTIONS = 64
ROUNDS = 5             # inferd and LitServe alternate this many times per figure
ROUND_WARMUP_S = 0.3   # connections opened and a few requests before each round counts
STREAM_PROMPT = "one two three four five six seven eight"
INFERD_CONFIG = """\
[daemon]
log_level = "warning"

[gateway]
port = {port}

[[deployment]]
name = "echo"
runtime = "echo"
replicas = 1
max_concurrency = 64
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


class System:
    """A server under test: its two requests, and how to start and stop it."""

    def __init__(self, name: str, port: int, plain: bytes, stream: bytes, endpoint: str | None = None):
        self.name, self.port, self.plain, self.stream = name, port, plain, stream
        self.endpoint = endpoint  # a ZeroMQ path: plain and stream are then prompts, sent by a raw DEALER
        self.procs: list[subprocess.Popen] = []

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # Whatever the server forked into its session (Ray's raylet and workers) goes too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- the HTTP client ------------------------------------------------------------------------------

async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response: {head[:200]!r}")
    lower = head.lower()
    marker = lower.find(b"content-length:")
    if marker >= 0:
        end = lower.index(b"\r\n", marker)
        return await reader.readexactly(int(head[marker + 15:end]))
    parts = []
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])


async def _connection(port: int, request: bytes, expect: bytes, until: float, record_from: float,
                      latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            start = time.perf_counter()
            if start >= until:
                return
            writer.write(request)
            body = await _read_response(reader)
            end = time.perf_counter()
            if expect not in body:
                raise RuntimeError(f"unexpected body: {body[:200]!r}")
            if start >= record_from:
                latencies.append(end - start)
    finally:
        writer.close()


def http_latencies(port: int, request: bytes, expect: bytes, seconds: float, warmup: float) -> list[float]:
    latencies: list[float] = []

    async def run() -> None:
        now = time.perf_counter()
        await asyncio.gather(*(_connection(port, request, expect, now + warmup + seconds, now + warmup, latencies)
                               for _ in range(CONNECTIONS)))

    asyncio.run(run())
    return latencies


def http_serial(port: int, request: bytes, expect: bytes, count: int) -> dict:
    """One request in flight on one blocking socket: the latency floor."""
    latencies = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = sock.makefile("rb")
        for i in range(count + count // 10):
            start = time.perf_counter()
            sock.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += reader.readline()
            length = head.lower().split(b"content-length:")
            if len(length) > 1:
                body = reader.read(int(length[1].split(b"\r\n")[0]))
            else:
                body = b""
                while True:
                    size = int(reader.readline()[:-2], 16)
                    if size == 0:
                        reader.readline()
                        break
                    body += reader.read(size + 2)[:-2]
            if expect not in body:
                raise RuntimeError(f"unexpected body: {body[:200]!r}")
            if i >= count // 10:  # the first tenth warms up
                latencies.append(time.perf_counter() - start)
    return summarize(latencies, None)


# --- the ZeroMQ client path -----------------------------------------------------------------------

def _submit(sock: zmq.Socket, rid: int, prompt: str) -> None:
    sock.send_multipart([b"IFDC2", b"SUBMIT", msgpack.packb({"id": rid, "deployment": "echo", "prompt": prompt})])


def _finals(frames: list[bytes]) -> list[tuple[str, dict]]:
    """The finals (DONE, ERROR) among the replies of one message: [IFDC2, [[command, body], ...]]."""
    return [(command, body) for command, body in msgpack.unpackb(frames[1]) if command in ("DONE", "ERROR")]


def zmq_latencies(endpoint: str, prompt: str, seconds: float, warmup: float, in_flight: int) -> list[float]:
    """``in_flight`` requests pipelined on one DEALER, each replaced by a new one at its DONE."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    started: dict[int, float] = {}
    latencies = []
    now = time.perf_counter()
    record_from, until = now + warmup, now + warmup + seconds
    for rid in range(in_flight):
        started[rid] = time.perf_counter()
        _submit(sock, rid, prompt)
    next_id = in_flight
    try:
        while started:
            if not sock.poll(10_000):
                raise RuntimeError("no answer from inferd in 10 s")
            for command, body in _finals(sock.recv_multipart()):
                rid = body["id"]
                if command == "ERROR":
                    raise RuntimeError(f"inferd answered {body}")
                end = time.perf_counter()
                begun = started.pop(rid)
                if begun >= record_from:
                    latencies.append(end - begun)
                if end < until:
                    started[next_id] = time.perf_counter()
                    _submit(sock, next_id, prompt)
                    next_id += 1
    finally:
        sock.close(0)
    return latencies


def zmq_serial(endpoint: str, prompt: str, count: int) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    latencies = []
    try:
        for rid in range(count + count // 10):
            start = time.perf_counter()
            _submit(sock, rid, prompt)
            while not _finals(sock.recv_multipart()):
                pass
            if rid >= count // 10:
                latencies.append(time.perf_counter() - start)
    finally:
        sock.close(0)
    return summarize(latencies, None)


def summarize(latencies: list[float], seconds: float | None) -> dict:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    out = {"requests": len(ordered), "p50_us": round(pick(0.50)), "p99_us": round(pick(0.99))}
    if seconds:
        out["req_s"] = round(len(ordered) / seconds)
    return out


# --- starting the systems -------------------------------------------------------------------------

def wait_http(port: int, request: bytes, expect: bytes, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            http_serial(port, request, expect, 1)
            return
        except (OSError, RuntimeError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer on port {port} within {timeout:g} s") from None
            time.sleep(0.25)


def start_inferd(home: Path) -> tuple[System, str]:
    port = free_port()
    config = home / "inferd.toml"
    config.write_text(INFERD_CONFIG.format(port=port))
    run_dir = home / "run"
    system = System("inferd gateway", port,
                    http_request("/v1/completions", {"model": "echo", "prompt": "ping"}),
                    http_request("/v1/completions", {"model": "echo", "prompt": STREAM_PROMPT, "stream": True}))
    log = open(home / "inferd.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "inferd", "--config", str(config), "--runtime-dir", str(run_dir)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    system.procs.append(proc)
    wait_http(port, system.plain, b"ping", proc, 30)
    return system, f"ipc://{run_dir}/frontend.sock"


def start_floor(home: Path) -> System:
    """``http_floor.py``: the same requests answered by a bare aiohttp server, inferd's interpreter."""
    port = free_port()
    system = System("aiohttp alone (the floor)", port,
                    http_request("/v1/completions", {"model": "echo", "prompt": "ping"}),
                    http_request("/v1/completions", {"model": "echo", "prompt": STREAM_PROMPT, "stream": True}))
    log = open(home / "floor.log", "ab")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "http_floor.py"), str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    system.procs.append(proc)
    wait_http(port, system.plain, b"ping", proc, 30)
    return system


def ensure_peers(venv_dir: Path) -> tuple[Path | None, str]:
    """The peers' interpreter, creating and filling their venv if needed; or None and why not."""
    python = venv_dir / "bin" / "python"
    check = [str(python), "-c", "import litserve, ray.serve"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, "already installed"
    print(f"installing {', '.join(PEER_PACKAGES)} into {venv_dir} (a separate venv) ...", flush=True)
    venv.create(venv_dir, with_pip=True)
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], capture_output=True,
                            text=True)
    if result.returncode != 0 or subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"pip install failed: {result.stderr.strip()[-500:]}"
    return python, "installed now"


def start_peer(name: str, python: Path, home: Path) -> System:
    port = free_port()
    if name == "litserve":
        system = System("LitServe", port, http_request("/predict", {"prompt": "ping"}),
                        http_request("/stream", {"prompt": STREAM_PROMPT}))
        script = PEERS_DIR / "litserve_echo.py"
    else:
        system = System("Ray Serve", port, http_request("/", {"prompt": "ping"}),
                        http_request("/", {"prompt": STREAM_PROMPT, "stream": True}))
        script = PEERS_DIR / "ray_echo.py"
    log = open(home / f"{name}.log", "ab")
    proc = subprocess.Popen([str(python), str(script), str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=home)
    system.procs.append(proc)
    try:
        wait_http(port, system.plain, b"ping", proc, 180)
    except Exception:
        system.stop()
        raise
    return system


def _start_or_say(name: str, python: Path, home: Path, results: dict) -> System | None:
    try:
        return start_peer(name, python, home)
    except Exception as exc:
        print(f"{name} not measured: {exc}", flush=True)
        results[name] = {"error": str(exc)}
        return None


def _latencies(system: System, kind: str, expect: bytes, seconds: float, warmup: float) -> list[float]:
    if system.endpoint:
        return zmq_latencies(system.endpoint, getattr(system, kind), seconds, warmup, CONNECTIONS)
    return http_latencies(system.port, getattr(system, kind), expect, seconds, warmup)


def measure(systems: list[System], seconds: float, warmup: float, rounds: int) -> dict[str, dict]:
    """Each system in turn, ``rounds`` times ``seconds / rounds`` per figure, so that the drift of a
    busy machine hits them alike; the figures are over all rounds."""
    out: dict[str, dict] = {s.name: {} for s in systems}
    for kind, expect in (("plain", b"ping"), ("stream", b"eight")):
        latencies: dict[str, list[float]] = {s.name: [] for s in systems}
        for system in systems:
            _latencies(system, kind, expect, 0, warmup)
        for _ in range(rounds):
            for system in systems:
                latencies[system.name] += _latencies(system, kind, expect, seconds / rounds, ROUND_WARMUP_S)
        for system in systems:
            out[system.name][kind] = summarize(latencies[system.name], seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per figure: a check that it works")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per figure")
    parser.add_argument("--serial", type=int, default=3000, help="round trips with one request in flight")
    parser.add_argument("--peers-venv", type=Path, default=Path(__file__).resolve().parent / ".peers-venv")
    parser.add_argument("--no-peers", action="store_true", help="measure inferd only")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    seconds, warmup, serial = (2.0, 1.0, 300) if args.quick else (args.seconds, 2.0, args.serial)

    home = Path(tempfile.mkdtemp(prefix="ifd-bench-gw-"))
    results: dict = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0], "seconds": seconds,
                     "connections": CONNECTIONS}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {CONNECTIONS} connections, "
          f"{seconds:g} s per figure after {warmup:g} s of warm-up; logs in {home}", flush=True)
    running: list[System] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        system, endpoint = start_inferd(home)
        running.append(system)
        results["serial"] = {"http_us": http_serial(system.port, system.plain, b"ping", serial),
                             "zmq_us": zmq_serial(endpoint, "ping", serial)}
        python, how = (None, "not asked for (--no-peers)") if args.no_peers else ensure_peers(args.peers_venv)
        results["peers_venv"] = how
        if python is None:
            print(f"peers not measured: {how}", flush=True)
        # The floor and LitServe run beside inferd and they alternate; Ray Serve runs alone afterwards
        # (an idle Ray cluster takes CPU from whoever runs beside it).
        floor = start_floor(home)
        running.append(floor)
        litserve = _start_or_say("litserve", python, home, results) if python else None
        if litserve:
            running.append(litserve)
        zmq_path = System("inferd ZeroMQ client path", 0, "ping", STREAM_PROMPT, endpoint=endpoint)
        alongside = [floor, *([litserve] if litserve else [])]
        figures = measure([system, zmq_path, *alongside], seconds, warmup, ROUNDS)
        results["inferd"] = figures[system.name]
        results["inferd_zmq"] = figures[zmq_path.name]
        results["floor"] = figures[floor.name]
        for done in [*alongside, system]:
            done.stop()
            running.remove(done)
        if litserve:
            results["litserve"] = figures[litserve.name]
        ray = _start_or_say("ray", python, home, results) if python else None
        if ray:
            running.append(ray)
            results["ray"] = measure([ray], seconds, warmup, 1)[ray.name]
            ray.stop()
            running.remove(ray)
    finally:
        for system in running:
            system.stop()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if any("error" in v for v in results.values() if isinstance(v, dict)):
        print(f"logs kept in {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)


def report(r: dict) -> None:
    rows = [("inferd gateway (HTTP)", r["inferd"]), ("inferd ZeroMQ client path", r["inferd_zmq"])]
    rows += [(name, r[key]) for key, name in (("floor", "aiohttp alone (the floor)"), ("litserve", "LitServe"),
                                              ("ray", "Ray Serve"))
             if key in r and "error" not in r[key]]
    print(f"\n{'system':28} {'plain req/s':>12} {'p50 µs':>8} {'p99 µs':>8}   {'stream req/s':>12} {'p50 µs':>8} "
          f"{'p99 µs':>8}")
    for name, m in rows:
        p, s = m["plain"], m["stream"]
        print(f"{name:28} {p['req_s']:>12,} {p['p50_us']:>8,} {p['p99_us']:>8,}   {s['req_s']:>12,} "
              f"{s['p50_us']:>8,} {s['p99_us']:>8,}")
    ser = r["serial"]
    added = ser["http_us"]["p50_us"] - ser["zmq_us"]["p50_us"]
    print(f"\none request in flight: HTTP p50 {ser['http_us']['p50_us']} µs (p99 {ser['http_us']['p99_us']}), "
          f"ZeroMQ p50 {ser['zmq_us']['p50_us']} µs (p99 {ser['zmq_us']['p99_us']}): the gateway adds {added} µs "
          f"(target <= 300)")
    for kind in ("plain", "stream"):
        gw, zq = r["inferd"][kind], r["inferd_zmq"][kind]
        print(f"64 in flight, {kind}: gateway p50 {gw['p50_us']} µs vs ZeroMQ path {zq['p50_us']} µs "
              f"(+{gw['p50_us'] - zq['p50_us']} µs); req/s {gw['req_s'] / zq['req_s']:.2f}x the ZeroMQ path")
    for kind in ("plain", "stream"):
        gw, fl = r["inferd"][kind], r["floor"][kind]
        print(f"vs aiohttp alone, {kind}: {gw['req_s'] / fl['req_s']:.2f}x its req/s, "
              f"p50 +{gw['p50_us'] - fl['p50_us']} µs")
    if "litserve" in r and "error" not in r["litserve"]:
        for kind in ("plain", "stream"):
            gw, ls = r["inferd"][kind], r["litserve"][kind]
            print(f"vs LitServe, {kind}: {gw['req_s'] / ls['req_s']:.2f}x its req/s (target >= 5), "
                  f"p50 {gw['p50_us'] / ls['p50_us']:.2f}x its p50 (target <= 0.5)")
    for key, name in (("litserve", "LitServe"), ("ray", "Ray Serve")):
        if key in r and "error" not in r[key]:
            zq, peer = r["inferd_zmq"]["plain"], r[key]["plain"]
            print(f"ZeroMQ client path vs {name}, plain: {zq['req_s'] / peer['req_s']:.1f}x its req/s "
                  f"(the core path's target >= 20)")


if __name__ == "__main__":
    main()

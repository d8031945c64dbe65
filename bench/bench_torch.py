"""What continuous batching buys on the torch runtime, and what serving costs beside the bare model.

A real daemon serves the built-in ``tiny`` model (default dimensions, seed 0,
float32; one deployment, one replica) twice: with batching
(``max_batch_size = max_concurrency = 32``) and without (``max_batch_size = 1``),
the config otherwise the same. One asyncio :class:`~inferd.client.AsyncClient`
drives 1, 8 and 32 concurrent streams; each stream submits greedy requests of
``max_tokens`` tokens one after the other (a closed loop), on prompts of
similar length, and timestamps every chunk as it arrives. Per run:

* aggregate tokens/s: tokens of all requests / (first SUBMIT to last chunk);
* time to first token (SUBMIT to first chunk) p50 and p99, over the run's requests;
* inter-token latency p50: the gaps between consecutive chunks of a request.

Tokens are counted as chunks: the byte-level model gives one chunk per token
unless a token ends mid-character, and each request is checked to end with
finish_reason "length" after exactly ``max_tokens`` chunks.

Beside the daemon, in a separate process once the daemon has stopped (the
machine has 2 cores: nothing may compete), the same model and the same
requests run in-process: a plain loop (prefill each prompt into a slot, then
decode steps over the whole slot table, greedy argmax, one host copy per
step) and a ``TorchRunner`` driven with ``admit``/``step`` as the worker's
engine thread does, with no messaging. Targets: at the highest concurrency,
batching >= 4x the unbatched tokens/s, and the batched daemon >= 0.9x the
in-process loop. CPU time per token of the client, the broker and the
worker's threads is printed so that a missed target can be traced.

Usage: ``python bench/bench_torch.py [--quick] [--max-tokens N] [--concurrency 1 8 32]
[--repeats N] [--device cpu|cuda] [--cpu-threads N] [--json FILE] [--keep-logs]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_core import machine, percentile  # bench/ is sys.path[0] as a script
from bench_recovery import Daemon

from inferd.client import AsyncClient

DEPLOYMENT = "tiny"
BATCH = 32                  # max_batch_size and max_concurrency of the batched daemon
STATUS_SETTLE_S = 0.6       # > heartbeat_interval_ms: the runner's step counters reach the broker in heartbeats
BATCHING_TARGET = 4.0
OVERHEAD_TARGET = 0.9

CONFIG = """\
[daemon]
log_level = "info"

[[deployment]]
name = "{name}"
runtime = "torch"
replicas = 1
max_concurrency = {max_concurrency}
queue_capacity = 1024
default_deadline_ms = 600000

[deployment.options]
model = "tiny"
seed = 0
dtype = "float32"
max_batch_size = {max_batch_size}
max_batch_delay_ms = 2
{extra_options}"""

# Prompts of similar length (45 to 50 bytes, so 46 to 51 tokens with BOS), all different.
SUBJECTS = ("a red robot", "an old ship", "the city", "a small cat", "two rivers", "the winter",
            "a lost key", "the market", "a tall tree", "the harbour", "an echo", "the library")


def prompts(n: int) -> list[str]:
    return [f"Request {i:03d}: write a short story about {SUBJECTS[i % len(SUBJECTS)]}." for i in range(n)]


@dataclass(frozen=True)
class Settings:
    max_tokens: int
    concurrency: tuple[int, ...]
    repeats: int
    min_requests: int      # per run, at least this many requests ...
    min_per_stream: int    # ... and at least this many per stream
    warmup_tokens: int
    inprocess_unbatched: int  # requests for the in-process max_batch_size = 1 figures (a rate: fewer suffice)

    def per_stream(self, concurrency: int) -> int:
        return max(self.min_per_stream, math.ceil(self.min_requests / concurrency))


# --- the daemon -----------------------------------------------------------------------------

class TorchDaemon(Daemon):
    """bench_recovery's daemon (bench_core's process handling, a config of our own) serving the tiny model."""

    def __init__(self, workdir: Path, tag: str, max_batch_size: int, max_concurrency: int,
                 cpu_threads: int | None = None, config: str | None = None):
        super().__init__(workdir, tag, config or CONFIG.format(
            name=DEPLOYMENT, max_concurrency=max_concurrency, max_batch_size=max_batch_size,
            extra_options=f"cpu_threads = {cpu_threads}\n" if cpu_threads else ""))

    def worker(self) -> dict:
        return self.status()["workers"][0]

    def cpu_total(self) -> float:
        """CPU seconds so far of the supervisor, the broker and the worker, all threads."""
        return sum(sum(thread_cpu(pid).values()) for pid in (self.proc.pid, *self.children))

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: broker (all its threads), worker main thread (messaging), worker
        ZeroMQ I/O threads, worker's other threads (the engine thread and torch's pool), supervisor."""
        broker, worker = self.children[0], self.children[1]
        w = thread_cpu(worker)
        return {"broker": sum(thread_cpu(broker).values()), "worker_main": w.get("main", 0.0),
                "worker_zmq": w.get("zmq", 0.0), "worker_compute": w.get("other", 0.0),
                "supervisor": sum(thread_cpu(self.proc.pid).values())}


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a live process's threads (schedstat, ns), by role: main, zmq, other."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # the thread ended meanwhile
        role = "main" if int(task.name) == pid else "zmq" if comm.startswith("ZMQbg") else "other"
        out[role] = out.get(role, 0.0) + ns / 1e9
    return out


# --- the client -----------------------------------------------------------------------------

@dataclass
class RequestRecord:
    submitted: float
    chunks: list[float]            # perf_counter at each chunk's arrival
    finish_reason: str | None
    last_index: int


async def run_streams(client: AsyncClient, concurrency: int, per_stream: int, max_tokens: int,
                      texts: list[Any], deployment: str = DEPLOYMENT, **params: Any) -> list[RequestRecord]:
    """``concurrency`` streams, each ``per_stream`` requests one after the other."""
    records: list[RequestRecord] = []

    async def stream(k: int) -> None:
        for j in range(per_stream):
            prompt = texts[(k * per_stream + j) % len(texts)]
            stamps: list[float] = []
            last = None
            submitted = time.perf_counter()
            async for chunk in client.generate(deployment, prompt, max_tokens=max_tokens, temperature=0.0, **params):
                stamps.append(time.perf_counter())
                last = chunk
            records.append(RequestRecord(submitted, stamps, last.finish_reason if last else None,
                                         last.index if last else -1))

    await asyncio.gather(*(stream(k) for k in range(concurrency)))
    return records


@dataclass
class RunFigures:
    requests: int
    tokens: int
    chunks: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    bad: int                       # requests not ending with "length" after max_tokens chunks
    steps: int = 0                 # runner steps during the run (from the worker's heartbeats)
    other_cores: float = 0.0       # CPU of processes other than the benchmark's during the run, in cores
    cpu_us_per_token: dict[str, float] = field(default_factory=dict)


def figures(records: list[RequestRecord], max_tokens: int) -> RunFigures:
    start = min(r.submitted for r in records)
    end = max(r.chunks[-1] for r in records if r.chunks)
    chunks = sum(len(r.chunks) for r in records)
    bad = sum(1 for r in records if r.finish_reason != "length" or len(r.chunks) != max_tokens
              or r.last_index != max_tokens - 1)
    tokens = sum(max_tokens if r.finish_reason == "length" else len(r.chunks) for r in records)
    ttft = [(r.chunks[0] - r.submitted) * 1000 for r in records if r.chunks]
    itl = [(b - a) * 1000 for r in records for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    return RunFigures(len(records), tokens, chunks, end - start, tokens / (end - start),
                      percentile(ttft, 50), percentile(ttft, 99),
                      percentile(itl, 50) if itl else 0.0, percentile(itl, 99) if itl else 0.0, bad)


async def measure_daemon(daemon: TorchDaemon, s: Settings, device: str, texts: list[Any] | None = None,
                         deployment: str = DEPLOYMENT, **params: Any) -> dict[int, RunFigures]:
    """Warm-up, then one run per concurrency, with CPU and step counts around each."""
    texts = texts or prompts(256)
    report = daemon.worker()["runner"]
    if not str(report.get("device", "")).startswith(device):
        raise RuntimeError(f"{daemon.name}: the worker runs on {report.get('device')!r}, not {device!r} "
                           "(the daemon places on a GPU when NVML finds one, else on the CPU)")
    capacity = report["slots"]
    out: dict[int, RunFigures] = {}
    async with AsyncClient(daemon.endpoint, liveness_s=60.0) as client:
        # Warm-up: a full batch (or two requests) of short requests, through every path the runs take.
        n = max(2, capacity)
        await run_streams(client, n, 1, s.warmup_tokens, texts[-n:], deployment, **params)
        time.sleep(STATUS_SETTLE_S)
        steps1 = daemon.worker()["runner"]["steps"]
        for c in s.concurrency:
            steps0 = steps1  # the worker has been idle since
            cpu0, client0, busy0, ours0 = daemon.cpu(), time.process_time(), machine_busy_s(), daemon.cpu_total()
            wall0 = time.perf_counter()
            records = await run_streams(client, c, s.per_stream(c), s.max_tokens, texts, deployment, **params)
            client_s = time.process_time() - client0
            cpu1, busy1, ours1 = daemon.cpu(), machine_busy_s(), daemon.cpu_total()
            wall = time.perf_counter() - wall0
            time.sleep(STATUS_SETTLE_S)
            steps1 = daemon.worker()["runner"]["steps"]
            run = figures(records, s.max_tokens)
            run.steps = steps1 - steps0
            run.other_cores = max(0.0, (busy1 - busy0) - (ours1 - ours0) - client_s) / wall
            spent = {k: cpu1[k] - cpu0[k] for k in cpu0}
            spent["client"] = client_s
            run.cpu_us_per_token = {k: v * 1e6 / run.tokens for k, v in spent.items()}
            out[c] = run
    return out


# --- in-process, in a subprocess ----------------------------------------------------------------

def inprocess_main(spec: dict[str, Any]) -> None:
    """The same model and requests with no daemon: a plain loop, and a TorchRunner.

    Prints one JSON object: for each case, tokens/s, seconds, CPU seconds and steps."""
    import torch

    from inferd.devices import Device
    from inferd.models.tiny import build
    from inferd.runtimes.base import RunRequest
    from inferd.runtimes.torch_runtime import TorchRunner

    device = torch.device("cuda", 0) if spec["device"] == "cuda" else torch.device("cpu")
    max_tokens = spec["max_tokens"]
    texts = prompts(256)
    results: dict[str, Any] = {"threads": torch.get_num_threads()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model = build(device=device, dtype=torch.float32, seed=0)
    tok = model.tokenizer

    def plain(slots: int, concurrency: int, n: int, texts: list[str]) -> dict[str, float]:
        """Waves of min(concurrency, slots) requests (equal lengths: a wave ends together, and
        a closed loop of clients refills the batch with the next wave)."""
        cache = model.new_cache(slots)
        tokens = torch.zeros(slots, dtype=torch.long, device=device)
        positions = torch.zeros(slots, dtype=torch.long, device=device)
        wave = min(concurrency, slots)
        sync()
        t0, c0, b0 = time.perf_counter(), time.process_time(), machine_busy_s()
        produced = steps = 0
        for first in range(0, n, wave):
            batch = texts[first:first + wave]
            rows = []
            for slot, text in enumerate(batch):
                ids = tok.encode(text)
                rows.append(model.prefill(torch.tensor(ids, device=device), cache, slot))
                positions[slot] = len(ids)
            tokens[:len(batch)] = torch.stack(rows).argmax(-1)
            host = tokens[:len(batch)].tolist()  # the first tokens reach the host: streamed
            produced += len(host)
            steps += 1
            for _ in range(max_tokens - 1):
                logits = model.decode(tokens, positions, cache)
                tokens = logits.argmax(-1)
                positions[:len(batch)] += 1  # idle slots keep theirs, as in the runner
                host = tokens[:len(batch)].tolist()
                produced += len(host)
                steps += 1
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        return {"tokens": produced, "wall_s": wall, "tokens_per_s": produced / wall, "cpu_s": cpu, "steps": steps,
                "other_cores": max(0.0, machine_busy_s() - b0 - cpu) / wall}

    def runner(slots: int, concurrency: int, n: int, texts: list[str]) -> dict[str, float]:
        """A TorchRunner as the worker's engine thread drives it, ``concurrency`` requests kept in."""
        devices = (Device("gpu:0", "cuda", "GPU"),) if device.type == "cuda" else (Device("cpu:0", "cpu", "CPU"),)
        r = TorchRunner({"model": "tiny", "seed": 0, "dtype": "float32", "max_batch_size": slots,
                         "max_batch_delay_ms": 2}, devices, slots)
        r.load()
        r.warmup()
        sync()
        t0, c0, b0 = time.perf_counter(), time.process_time(), machine_busy_s()
        admitted = done = produced = chunks = steps = 0
        bad = 0
        while done < n:
            while admitted < n and admitted - done < concurrency:
                r.admit(RunRequest(admitted, texts[admitted], {"max_tokens": max_tokens, "temperature": 0.0}))
                admitted += 1
            wait = r.next_step_in()
            if wait:
                time.sleep(wait)
            steps += 1
            for out in r.step():
                produced += 1
                chunks += out.text is not None
                if out.final:
                    done += 1
                    bad += out.finish_reason != "length"
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        r.close()
        return {"tokens": produced, "chunks": chunks, "wall_s": wall, "tokens_per_s": produced / wall, "cpu_s": cpu,
                "steps": steps, "bad": bad, "other_cores": max(0.0, machine_busy_s() - b0 - cpu) / wall}

    # Warm-up: allocator growth and kernel selection, for both batch shapes.
    for slots in {spec["batch"], 1}:
        plain(slots, slots, slots, texts[-slots:])
    for case in spec["cases"]:
        if device.type == "cpu":  # as the worker does: options.cpu_threads, else all cores but one
            torch.set_num_threads(case.get("threads") or spec["cpu_threads"])
        fn = plain if case["kind"] == "plain" else runner
        results[case["name"]] = fn(case["slots"], case["concurrency"], case["requests"], texts)
    print(json.dumps(results))


def measure_inprocess(s: Settings, device: str, batch: int, workdir: Path, cpu_threads: int | None) -> dict[str, Any]:
    """The in-process figures, in a fresh interpreter (nothing else running)."""
    top = max(s.concurrency)
    cases = []
    for kind in ("plain", "runner"):
        cases.append({"name": f"{kind}_batched", "kind": kind, "slots": batch, "concurrency": top,
                      "requests": top * s.per_stream(top)})
        cases.append({"name": f"{kind}_unbatched", "kind": kind, "slots": 1, "concurrency": 1,
                      "requests": s.inprocess_unbatched})
    # The same plain loop given every core, which the worker does not take by default.
    cases.append({**cases[0], "name": "plain_batched_all_cores", "threads": len(os.sched_getaffinity(0))})
    from inferd.runtimes.torch_runtime import default_cpu_threads

    spec = {"device": device, "max_tokens": s.max_tokens, "batch": batch, "cases": cases,
            "cpu_threads": cpu_threads or default_cpu_threads()}
    log = workdir / "inprocess.log"
    with open(log, "ab") as err:
        proc = subprocess.run([sys.executable, __file__, "--inprocess", json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the in-process run failed ({proc.returncode}); see {log}")
    return json.loads(proc.stdout)


# --- report ---------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values)


def fmt(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}" if abs(v) < 100 else f"{v:,.0f}"


def render(rows: list[list[str]], right_from: int = 1) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i >= right_from else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows)


def summarize(runs: list[RunFigures]) -> dict[str, Any]:
    """Medians of the per-run figures."""
    keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "wall_s")
    out: dict[str, Any] = {k: median([getattr(r, k) for r in runs]) for k in keys}
    out["requests"] = runs[0].requests
    out["tokens"] = runs[0].tokens
    out["bad"] = sum(r.bad for r in runs)
    out["ms_per_step"] = median([r.wall_s * 1000 / r.steps for r in runs if r.steps] or [0.0])
    out["tokens_per_step"] = median([r.tokens / r.steps for r in runs if r.steps] or [0.0])
    out["other_cores"] = median([r.other_cores for r in runs])
    out["cpu_us_per_token"] = {k: median([r.cpu_us_per_token[k] for r in runs]) for k in runs[0].cpu_us_per_token}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast check that it works: noisy figures")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 64; 16 with --quick)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="concurrent client streams (default 1 8 32)")
    parser.add_argument("--repeats", type=int, help="runs of each configuration; medians are reported "
                                                    "(default 3; 1 with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model runs; the daemon places on a GPU when NVML finds one")
    parser.add_argument("--cpu-threads", type=int, metavar="N",
                        help="torch threads on a CPU device (the worker's options.cpu_threads, and the in-process "
                             "loop's); default: the runtime's, all cores but one")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs and print where")
    parser.add_argument("--inprocess", help=argparse.SUPPRESS)  # internal: the in-process subprocess
    args = parser.parse_args(argv)
    if args.inprocess is None:
        quick = args.quick
        max_tokens = args.max_tokens or (16 if quick else 64)
        if not 1 <= max_tokens <= 200:  # the tiny model's context is 256 tokens; prompts take up to 51
            parser.error("--max-tokens must be between 1 and 200")
        concurrency = tuple(sorted(set(args.concurrency or (1, 8, 32))))
        if concurrency[0] < 1:
            parser.error("--concurrency values must be >= 1")
        args.settings = Settings(max_tokens=max_tokens, concurrency=concurrency,
                                 repeats=args.repeats or (1 if quick else 3),
                                 min_requests=4 if quick else 8, min_per_stream=1 if quick else 2,
                                 warmup_tokens=min(16, max_tokens), inprocess_unbatched=4 if quick else 8)
    return args


def main() -> None:
    args = parse_args()
    if args.inprocess is not None:
        return inprocess_main(json.loads(args.inprocess))
    s: Settings = args.settings
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup below
    info = machine()
    print(f"machine: {info['nproc']} cpus ({info['cpu']}), python {info['python']}, pyzmq {info['pyzmq']} "
          f"(libzmq {info['libzmq']}), load average {info['loadavg_at_start']:.2f}")
    lengths = [len(p) + 1 for p in prompts(256)]
    print(f"settings: {'quick' if args.quick else 'full'}, device {args.device}, tiny model (seed 0, float32), "
          f"max_tokens {s.max_tokens} greedy, prompts of {min(lengths)}-{max(lengths)} tokens, concurrency "
          f"{list(s.concurrency)}, requests per stream {[s.per_stream(c) for c in s.concurrency]}, "
          f"repeats {s.repeats} (medians)")
    configs = {"batched": (BATCH, BATCH), "unbatched": (1, BATCH)}  # (max_batch_size, max_concurrency)
    workdir = Path(tempfile.mkdtemp(prefix="inferd-bench-torch-"))
    daemon_runs: dict[str, dict[int, list[RunFigures]]] = {k: {c: [] for c in s.concurrency} for k in configs}
    inproc_runs: list[dict[str, Any]] = []
    keep = args.keep_logs
    started = time.monotonic()
    try:
        for rep in range(s.repeats):
            for name, (max_batch, max_conc) in configs.items():
                daemon = TorchDaemon(workdir, f"{name}-{rep}", max_batch, max_conc, args.cpu_threads)
                try:
                    t0 = time.monotonic()
                    daemon.start()
                    up = time.monotonic() - t0
                    runs = asyncio.run(measure_daemon(daemon, s, args.device))
                finally:
                    daemon.stop()
                for c, run in runs.items():
                    daemon_runs[name][c].append(run)
                print(f"  repeat {rep + 1}/{s.repeats} {name:9}: ready in {up:.1f} s; tokens/s "
                      + ", ".join(f"c{c} {run.tokens_per_s:,.0f}" for c, run in runs.items()), flush=True)
            inproc = measure_inprocess(s, args.device, BATCH, workdir, args.cpu_threads)
            inproc_runs.append(inproc)
            print(f"  repeat {rep + 1}/{s.repeats} in-process: tokens/s "
                  + ", ".join(f"{k} {v['tokens_per_s']:,.0f}" for k, v in inproc.items() if isinstance(v, dict)),
                  flush=True)
    except BaseException:
        keep = True
        print(f"failed; logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started

    summary = {name: {c: summarize(runs) for c, runs in per_c.items()} for name, per_c in daemon_runs.items()}
    inproc_cases = [k for k, v in inproc_runs[0].items() if isinstance(v, dict)]
    inproc = {k: {f: median([r[k][f] for r in inproc_runs]) for f in ("tokens_per_s", "wall_s", "cpu_s", "steps")}
              for k in inproc_cases}
    for k in inproc:
        inproc[k]["other_cores"] = median([r[k]["other_cores"] for r in inproc_runs])
        inproc[k]["ms_per_step"] = median([r[k]["wall_s"] * 1000 / r[k]["steps"] for r in inproc_runs])
        inproc[k]["cpu_us_per_token"] = median([r[k]["cpu_s"] * 1e6 / r[k]["tokens"] for r in inproc_runs])

    print()
    print(f"daemon, tiny on {args.device}, max_tokens {s.max_tokens}, medians of {s.repeats} run(s):")
    rows = [["max_batch_size", "streams", "requests", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
             "ITL p99 ms", "ms/step", "tokens/step"]]
    for name, (max_batch, _) in configs.items():
        for c in s.concurrency:
            f = summary[name][c]
            rows.append([str(max_batch), str(c), str(f["requests"]), fmt(f["tokens_per_s"]), fmt(f["ttft_p50_ms"]),
                         fmt(f["ttft_p99_ms"]), fmt(f["itl_p50_ms"], 2), fmt(f["itl_p99_ms"], 2),
                         fmt(f["ms_per_step"], 2), fmt(f["tokens_per_step"])])
    print(render(rows))
    bad = sum(summary[n][c]["bad"] for n in configs for c in s.concurrency)
    total = sum(summary[n][c]["requests"] * s.repeats for n in configs for c in s.concurrency)
    print(f"check: {total - bad} of {total} requests ended with finish_reason 'length' after exactly "
          f"{s.max_tokens} chunks" + ("" if not bad else f"; {bad} did not (tokens counted as chunks for those)"))

    print()
    print("CPU per token (us), medians; worker_compute is the worker's engine thread and torch's threads; "
          "cores busy = total x tokens/s;\nother procs: cores used by processes outside the benchmark "
          "meanwhile (the machine is not idle if > 0):")
    roles = ("client", "broker", "worker_main", "worker_zmq", "worker_compute", "supervisor")
    rows = [["max_batch_size", "streams", *roles, "total", "cores busy", "other procs"]]
    for name, (max_batch, _) in configs.items():
        for c in s.concurrency:
            f = summary[name][c]
            cpu = f["cpu_us_per_token"]
            total_us = sum(cpu[r] for r in roles)
            rows.append([str(max_batch), str(c), *(fmt(cpu[r]) for r in roles), fmt(total_us),
                         f"{total_us * f['tokens_per_s'] / 1e6:.2f}", f"{f['other_cores']:.2f}"])
    for k in inproc_cases:
        rows.append([f"in-process {k.replace('_', ' ')}", "", "", "", "", "", fmt(inproc[k]["cpu_us_per_token"]), "",
                     fmt(inproc[k]["cpu_us_per_token"]),
                     f"{inproc[k]['cpu_us_per_token'] * inproc[k]['tokens_per_s'] / 1e6:.2f}",
                     f"{inproc[k]['other_cores']:.2f}"])
    print(render(rows))
    noisy = max([f["other_cores"] for per_c in summary.values() for f in per_c.values()]
                + [v["other_cores"] for v in inproc.values()])
    if noisy > 0.2:
        print(f"WARNING: other processes used up to {noisy:.2f} cores during the runs (median per configuration): "
              "torch's threads share the cores with them, so the figures are not those of an idle machine")

    top = max(s.concurrency)
    batched, unbatched = summary["batched"][top], summary["unbatched"][top]
    ratio_batching = batched["tokens_per_s"] / unbatched["tokens_per_s"]
    plain_b, runner_b = inproc["plain_batched"], inproc["runner_batched"]
    plain_u, runner_u = inproc["plain_unbatched"], inproc["runner_unbatched"]
    ratio_overhead = batched["tokens_per_s"] / plain_b["tokens_per_s"]
    print()
    print(f"in-process, same model and requests, no daemon (medians of {s.repeats}):")
    rows = [["loop", "slots", "streams", "tokens/s", "ms/step"]]
    for k, slots, streams in (("plain_batched", BATCH, top), ("runner_batched", BATCH, top),
                              ("plain_unbatched", 1, 1), ("runner_unbatched", 1, 1),
                              ("plain_batched_all_cores", BATCH, top)):
        rows.append([k.replace("_", " "), str(slots), str(streams), fmt(inproc[k]["tokens_per_s"]),
                     fmt(inproc[k]["ms_per_step"], 2)])
    print(render(rows))
    print()

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(f"batching at {top} streams: {batched['tokens_per_s']:,.0f} / {unbatched['tokens_per_s']:,.0f} tokens/s "
          f"= {ratio_batching:.2f}x (target >= {BATCHING_TARGET:g}x: {verdict(ratio_batching >= BATCHING_TARGET)})")
    print(f"serving overhead, batched, {top} streams: daemon {batched['tokens_per_s']:,.0f} / in-process plain loop "
          f"{plain_b['tokens_per_s']:,.0f} tokens/s = {ratio_overhead:.2f}x "
          f"(target >= {OVERHEAD_TARGET:g}x: {verdict(ratio_overhead >= OVERHEAD_TARGET)})")
    print(f"  daemon / in-process TorchRunner {runner_b['tokens_per_s']:,.0f} tokens/s = "
          f"{batched['tokens_per_s'] / runner_b['tokens_per_s']:.2f}x; TorchRunner / plain loop = "
          f"{runner_b['tokens_per_s'] / plain_b['tokens_per_s']:.2f}x")
    print(f"  unbatched, {top} streams: daemon {unbatched['tokens_per_s']:,.0f} / plain loop "
          f"{plain_u['tokens_per_s']:,.0f} = {unbatched['tokens_per_s'] / plain_u['tokens_per_s']:.2f}x, "
          f"/ TorchRunner {runner_u['tokens_per_s']:,.0f} = "
          f"{unbatched['tokens_per_s'] / runner_u['tokens_per_s']:.2f}x")
    all_cores = inproc["plain_batched_all_cores"]["tokens_per_s"]
    print(f"  against the plain loop on all {len(os.sched_getaffinity(0))} cores ({all_cores:,.0f} tokens/s, "
          f"with nothing else to run): {batched['tokens_per_s'] / all_cores:.2f}x")
    print(f"total time {elapsed:.0f} s")

    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "settings": {**asdict(s), "device": args.device, "batch": BATCH},
            "daemon": {name: {str(c): f for c, f in per_c.items()} for name, per_c in summary.items()},
            "daemon_runs": {name: {str(c): [asdict(r) for r in runs] for c, runs in per_c.items()}
                            for name, per_c in daemon_runs.items()},
            "inprocess": inproc, "inprocess_runs": inproc_runs,
            "ratios": {"batching": ratio_batching, "overhead_vs_plain": ratio_overhead,
                       "overhead_vs_runner": batched["tokens_per_s"] / runner_b["tokens_per_s"]},
        }, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

"""How fast inferd serves again after a poisoned worker and after a killed broker, measured on real daemons.

1. Poisoned worker. An echo deployment, 1 replica, ``fault_injection = true``,
   default restart backoff (``restart_backoff_min_ms = 100``, jitter 0.2). A
   request with ``fault = "poison"`` makes the worker report CONTEXT_POISONED
   and exit with status 4; the supervisor restarts it after the backoff. The
   clock starts when the client receives that CONTEXT_POISONED error (the
   worker exits right after sending it) and stops when a request submitted at
   that moment completes: while no worker is registered it waits in the
   broker's queue, so its DONE comes as soon as the replacement can serve.
   Target: median <= 1 s plus the runtime's own load time ("runner loaded in
   X s" in the replacement's log; ~0 for echo).

   The backoff doubles for every restart of a worker that has not stayed up
   ``restart_backoff_reset_s`` (default 60 s). To measure the delay an isolated
   poisoning gets (0.10-0.12 s) without waiting a minute per run, the daemon
   runs with ``restart_backoff_reset_s = 1`` and each run starts once the
   replacement has been up longer than that; every other backoff setting is
   the default. The delay each run actually got is read from the
   supervisor's log and printed.

2. Killed broker. An echo deployment, 1 replica, all defaults. The broker is
   SIGKILLed (pid from STATUS) and the clock runs until a request completes,
   each attempt on a new Client with short timeouts (answer and liveness
   0.25 s, deadline 1 s), retried at once on any error. Target: median and
   max <= 2 s. The daemon gives up (exit 70) on a 4th broker death within
   60 s, so a fresh daemon is started for every 3 kills; the broker's backoff
   doubles within those 3 (about 0.1, 0.2, 0.4 s), so the figures are also
   given per kill of the series.

Each recovery is broken down from the daemon's log lines (millisecond wall
clock timestamps from the supervisor, broker and worker): exit seen by the
supervisor, backoff, interpreter start and imports, load or bind,
registration, the request itself. Reference figures: ``python -c pass`` and
``python -c "import inferd.worker.process"`` (and the broker's module), and
``-X importtime`` self time per top-level package.

Usage: ``python bench/bench_recovery.py [--quick] [--json FILE] [--keep-logs]``
(run it as a script: it imports ``bench_core`` from its own directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from bench_core import Inferd, machine, percentile, spawn  # bench/ is sys.path[0] when run as a script

from inferd import errors
from inferd.client import Client
from inferd.config import DaemonConfig
from inferd.ctl import control_call

WORKER_TARGET_S = 1.0        # plus the replacement's load time
BROKER_TARGET_S = 2.0
BROKER_KILLS_PER_DAEMON = 3  # inferd.daemon.BROKER_LIMITS: a 4th death within 60 s ends the daemon
BACKOFF_RESET_S = 1.0        # restart_backoff_reset_s for the worker runs (default 60)
# Quiet time before each measured failure (beyond what the backoff reset needs), drawn at random so that
# failures do not fall at a fixed phase of the 500 ms heartbeats or of ZeroMQ's reconnect timers.
SETTLE_S = (0.5, 1.0)
GIVE_UP_S = 30.0             # a recovery slower than this fails the benchmark
PROBE = "serving again"
POISON_DEADLINE_MS = 10_000
WORKER_PROBE_DEADLINE_MS = 20_000
BROKER_ATTEMPT = {"answer_timeout_s": 0.25, "liveness_s": 0.25}
BROKER_DEADLINE_MS = 1_000

WORKER_CONFIG = f"""\
[daemon]
log_level = "info"
restart_backoff_reset_s = {BACKOFF_RESET_S}
escalation_max = 1000

[[deployment]]
name = "echo"
runtime = "echo"
replicas = 1
max_restarts = 1000

[deployment.options]
fault_injection = true
"""

BROKER_CONFIG = """\
[daemon]
log_level = "info"

[[deployment]]
name = "echo"
runtime = "echo"
replicas = 1
"""


@dataclass(frozen=True)
class Settings:
    worker_runs: int     # poisonings, one daemon
    broker_runs: int     # broker kills, a fresh daemon every BROKER_KILLS_PER_DAEMON
    reference_runs: int  # interpreter start-ups per reference figure


QUICK = Settings(worker_runs=5, broker_runs=5, reference_runs=3)
FULL = Settings(worker_runs=20, broker_runs=15, reference_runs=10)


# --- the daemon -----------------------------------------------------------------------------

class Daemon(Inferd):
    """bench_core's daemon (own session, SIGINT then SIGKILL on stop) with a config of our own."""

    def __init__(self, workdir: Path, tag: str, config_text: str):
        super().__init__(workdir)
        self.name = f"inferd ({tag})"
        self.home = workdir / tag
        self.runtime_dir = self.home / "run"
        self.endpoint = f"ipc://{self.runtime_dir}/frontend.sock"
        self.config_text = config_text

    @property
    def log_path(self) -> Path:
        return self.home / "inferd.log"

    def start(self) -> None:
        self.home.mkdir()
        config = self.home / "inferd.toml"
        config.write_text(self.config_text)
        self.proc = spawn([sys.executable, "-m", "inferd", "--config", str(config),
                           "--runtime-dir", str(self.runtime_dir)], self.log_path)
        self._refresh_children(self._wait_ready())

    def status(self) -> dict:
        return control_call(self.runtime_dir, b"STATUS", 2.0)

    def wait_serving(self, not_pid: int = 0) -> dict:
        """STATUS once the broker is up and the worker (a process other than ``not_pid``) is ready."""
        deadline = time.monotonic() + GIVE_UP_S
        while time.monotonic() < deadline:
            with contextlib.suppress(errors.InferdError):
                st = self.status()
                if st["ready"] and all(w["state"] == "ready" and w["pid"] != not_pid for w in st["workers"]):
                    self._refresh_children(st)
                    return st
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not serving after {GIVE_UP_S:g} s; see {self.log_path}")

    def _refresh_children(self, st: dict) -> None:
        self.children = [st["broker"]["pid"]] + [w["pid"] for w in st["workers"]]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):  # today's pids, for the SIGKILL fallback
                self._refresh_children(self.status())
        super().stop()


# --- the daemon's log -----------------------------------------------------------------------

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+)\s+inferd\[(.+?):(\d+)\] (.*)$")


@dataclass(frozen=True)
class LogLine:
    t: float      # wall clock, s (logging's asctime: local time, ms, truncated)
    role: str     # supervisor, broker, worker echo-0
    pid: int
    text: str


def read_log(path: Path) -> list[LogLine]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        m = LINE.match(raw)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append(LogLine(t, m.group(3), int(m.group(4)), m.group(5)))
    return lines


def find(lines: list[LogLine], after: float, role: str | None, pattern: str, pid: int | None = None
         ) -> tuple[LogLine, re.Match] | None:
    """The first line at or after ``after`` (wall clock) from ``role`` (and ``pid``) matching ``pattern``."""
    rx = re.compile(pattern)
    for line in lines:
        if line.t < after or (role and line.role != role) or (pid is not None and line.pid != pid):
            continue
        m = rx.search(line.text)
        if m:
            return line, m
    return None


def until_served(attempt: Callable[[], str], t0: float) -> tuple[str, int, list[str]]:
    """Retry ``attempt`` until a request completes; its text, the attempts and the failures seen."""
    attempts, failures = 0, []
    while True:
        attempts += 1
        try:
            return attempt(), attempts, failures
        except errors.InferdError as exc:
            failures.append(type(exc).__name__)
            if time.perf_counter() - t0 > GIVE_UP_S:
                raise


# --- 1. poisoned worker ---------------------------------------------------------------------

def poison_once(daemon: Daemon, client: Client) -> dict[str, Any]:
    before = daemon.wait_serving()
    old_pid = before["workers"][0]["pid"]
    sent_wall = time.time()
    try:
        list(client.generate("echo", "x", fault="poison", deadline_ms=POISON_DEADLINE_MS))
        raise RuntimeError("the poisoned request completed; is fault_injection on?")
    except errors.ContextPoisoned:
        t0, wall0 = time.perf_counter(), time.time()   # the start point: the client has the error
    # One request, normally: it waits in the queue until the replacement serves.
    text, attempts, failures = until_served(lambda: client.complete("echo", PROBE,
                                                                     deadline_ms=WORKER_PROBE_DEADLINE_MS), t0)
    total = time.perf_counter() - t0
    done_wall = time.time()
    if text != PROBE:
        raise RuntimeError(f"the replacement answered {text!r}")
    return {"old_pid": old_pid, "sent_wall": sent_wall, "wall0": wall0, "done_wall": done_wall,
            "total_s": total, "attempts": attempts, "failures": failures}


def worker_breakdown(lines: list[LogLine], run: dict[str, Any]) -> None:
    """Add the log's milestones to ``run``: seconds from the start point (the client's error)."""
    w0, old = run["wall0"], run["old_pid"]
    reaped = find(lines, run["sent_wall"] - 0.01, "supervisor",
                  rf"^echo-0 \(pid {old}\) .*restarting in ([\d.]+) s")
    if reaped is None:
        raise RuntimeError(f"no restart of pid {old} in the supervisor's log")
    started = find(lines, reaped[0].t, "supervisor", r"^started echo-0 \(pid (\d+)\)")
    new = int(started[1].group(1))
    main = find(lines, started[0].t, "worker echo-0", r"^worker echo-0 starting", new)
    loaded = find(lines, started[0].t, "worker echo-0", r"^runner loaded in ([\d.]+) s", new)
    registered = find(lines, started[0].t, "broker", rf"^worker echo-0 registered: .* pid={new} state=(\w+)")
    serving = max(loaded[0].t, registered[0].t)  # READY goes out before the load; a HEARTBEAT says ready
    run.update({
        "new_pid": new, "backoff_delay_s": float(reaped[1].group(1)), "load_s": float(loaded[1].group(1)),
        "registered_state": registered[1].group(1),
        "at": {"reaped": reaped[0].t - w0, "spawned": started[0].t - w0, "worker_main": main[0].t - w0,
               "loaded": loaded[0].t - w0, "registered": registered[0].t - w0,
               "done": run["done_wall"] - w0},
        "phases": {"reap": reaped[0].t - w0, "backoff": started[0].t - reaped[0].t,
                   "interpreter": main[0].t - started[0].t, "setup_load": loaded[0].t - main[0].t,
                   "serve": run["done_wall"] - serving},
    })


def measure_worker(workdir: Path, stack: contextlib.ExitStack, s: Settings, log: Callable[[str], None]
                   ) -> list[dict[str, Any]]:
    daemon = Daemon(workdir, "worker", WORKER_CONFIG)
    stack.callback(daemon.stop)
    daemon.start()
    runs = []
    with Client(runtime_dir=daemon.runtime_dir) as client:
        for _ in range(20):
            client.complete("echo", "warm up")
        for i in range(s.worker_runs):
            time.sleep(BACKOFF_RESET_S + random.uniform(*SETTLE_S))  # the replacement outlives the reset
            run = poison_once(daemon, client)
            runs.append(run)
            log(f"  poisoning {i + 1}/{s.worker_runs}: serving again after {run['total_s'] * 1000:.0f} ms")
    daemon.wait_serving()
    lines = read_log(daemon.log_path)
    for run in runs:
        worker_breakdown(lines, run)
    daemon.stop()
    return runs


# --- 2. killed broker -----------------------------------------------------------------------

def kill_broker_once(daemon: Daemon, ordinal: int) -> dict[str, Any]:
    st = daemon.wait_serving()
    pid = st["broker"]["pid"]
    t0, wall0 = time.perf_counter(), time.time()
    os.kill(pid, signal.SIGKILL)

    def attempt() -> str:
        with Client(runtime_dir=daemon.runtime_dir, **BROKER_ATTEMPT) as client:
            return client.complete("echo", PROBE, deadline_ms=BROKER_DEADLINE_MS)

    text, attempts, failures = until_served(attempt, t0)
    total = time.perf_counter() - t0
    done_wall = time.time()
    if text != PROBE:
        raise RuntimeError(f"the broker answered {text!r}")
    return {"ordinal": ordinal, "old_pid": pid, "wall0": wall0, "done_wall": done_wall, "total_s": total,
            "attempts": attempts, "failures": failures}


def broker_breakdown(lines: list[LogLine], run: dict[str, Any]) -> None:
    w0, old = run["wall0"], run["old_pid"]
    reaped = find(lines, w0 - 0.01, "supervisor", rf"^broker \(pid {old}\) .*restarting in ([\d.]+) s")
    if reaped is None:
        raise RuntimeError(f"no restart of the broker (pid {old}) in the supervisor's log")
    started = find(lines, reaped[0].t, "supervisor", r"^started broker \(pid (\d+)\)")
    new = int(started[1].group(1))
    bound = find(lines, started[0].t, "broker", r"^broker ready", new)
    registered = find(lines, bound[0].t, "broker", r"^worker echo-0 registered: .* state=(\w+)", new)
    run.update({
        "new_pid": new, "backoff_delay_s": float(reaped[1].group(1)),
        "at": {"reaped": reaped[0].t - w0, "spawned": started[0].t - w0, "broker_ready": bound[0].t - w0,
               "worker_registered": registered[0].t - w0, "done": run["done_wall"] - w0},
        "phases": {"reap": reaped[0].t - w0, "backoff": started[0].t - reaped[0].t,
                   "interpreter": bound[0].t - started[0].t, "reregister": registered[0].t - bound[0].t,
                   "serve": run["done_wall"] - registered[0].t},
    })


def measure_broker(workdir: Path, stack: contextlib.ExitStack, s: Settings, log: Callable[[str], None]
                   ) -> list[dict[str, Any]]:
    runs = []
    for d in range(math.ceil(s.broker_runs / BROKER_KILLS_PER_DAEMON)):
        daemon = Daemon(workdir, f"broker-{d}", BROKER_CONFIG)
        stack.callback(daemon.stop)
        daemon.start()
        with Client(runtime_dir=daemon.runtime_dir) as client:
            for _ in range(20):
                client.complete("echo", "warm up")
        series = []
        for k in range(min(BROKER_KILLS_PER_DAEMON, s.broker_runs - len(runs))):
            time.sleep(random.uniform(*SETTLE_S))
            run = kill_broker_once(daemon, k + 1)
            series.append(run)
            runs.append(run)
            log(f"  broker kill {len(runs)}/{s.broker_runs} (#{k + 1} of daemon {d + 1}): "
                f"serving again after {run['total_s'] * 1000:.0f} ms, {run['attempts']} attempt(s)")
        daemon.wait_serving()
        lines = read_log(daemon.log_path)
        for run in series:
            broker_breakdown(lines, run)
        daemon.stop()
    return runs


# --- reference figures ----------------------------------------------------------------------

def startup_s(code: str, n: int, env: dict[str, str] | None = None) -> float:
    """Median wall time of ``python -c CODE``, the interpreter of this benchmark and the daemon."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, stdin=subprocess.DEVNULL, env=env)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def import_self_ms(module: str, n: int, top: int = 8) -> dict[str, float]:
    """``-X importtime`` self time summed per top-level package (median over ``n`` runs), largest first."""
    per_run: list[dict[str, float]] = []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], check=True,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL).stderr
        totals: dict[str, float] = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[0].startswith("import time:") and parts[0].split(":")[1].strip().isdigit():
                package = parts[2].strip().split(".")[0]
                totals[package] = totals.get(package, 0.0) + int(parts[0].split(":")[1]) / 1000
        per_run.append(totals)
    packages = {p for run in per_run for p in run}
    medians = {p: statistics.median(run.get(p, 0.0) for run in per_run) for p in packages}
    ranked = sorted(medians.items(), key=lambda kv: -kv[1])
    return {"total": sum(medians.values()), **dict(ranked[:top])}


def references(s: Settings, workdir: Path) -> dict[str, Any]:
    ref = {
        "python_c_pass_s": startup_s("pass", s.reference_runs),
        "import_worker_s": startup_s("import inferd.worker.process", s.reference_runs),
        "import_broker_s": startup_s("import inferd.broker.process", s.reference_runs),
        "worker_import_self_ms": import_self_ms("inferd.worker.process", min(3, s.reference_runs)),
        "dont_write_bytecode": sys.dont_write_bytecode,
    }
    if sys.dont_write_bytecode:
        # The daemon's children inherit PYTHONDONTWRITEBYTECODE: with no __pycache__ they compile inferd's
        # modules at every start. The same import with a bytecode cache (private, so the tree stays clean):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
        startup_s("import inferd.worker.process", 1, env)  # fill the cache
        ref["import_worker_cached_s"] = startup_s("import inferd.worker.process", s.reference_runs, env)
    return ref


# --- report ---------------------------------------------------------------------------------

def summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "median": statistics.median(samples), "p90": percentile(samples, 90),
            "min": min(samples), "max": max(samples)}


def table(rows: list[tuple[str, dict[str, float] | None, str, bool | None]]) -> str:
    """Rows of (label, summary in seconds or None for a heading, target, met); figures in ms."""
    verdict = {True: "ok", False: "MISSED", None: ""}
    cells = [("", "median", "p90", "min", "max", "target", "")]
    for label, sm, target, met in rows:
        if sm is None:
            cells.append((label, "", "", "", "", "", ""))
        else:
            cells.append((label, *(f"{sm[k] * 1000:,.0f}" for k in ("median", "p90", "min", "max")),
                          target, verdict[met]))
    widths = [max(len(c[i]) for c in cells) for i in range(7)]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 5, 6) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(cell, widths))).rstrip() for cell in cells)


def phase_rows(runs: list[dict[str, Any]], labels: dict[str, str]) -> list:
    return [(f"  {label}", summary([r["phases"][key] for r in runs]), "", None) for key, label in labels.items()]


WORKER_PHASES = {
    "reap": "old worker reaped by the supervisor (from the client's error)",
    "backoff": "restart backoff (reaped -> replacement spawned)",
    "interpreter": "interpreter start + imports (spawned -> worker main logs)",
    "setup_load": "worker setup + runner load (-> 'runner loaded')",
    "serve": "ready, registered, request dispatched and done",
}
BROKER_PHASES = {
    "reap": "old broker reaped by the supervisor (from the kill)",
    "backoff": "restart backoff (reaped -> new broker spawned)",
    "interpreter": "interpreter start + imports + bind (-> 'broker ready')",
    "reregister": "worker reconnects and registers again",
    "serve": "request reaches the broker, dispatched and done",
}


def report_worker(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    total = summary([r["total_s"] for r in runs])
    load = summary([r["load_s"] for r in runs])
    delays = summary([r["backoff_delay_s"] for r in runs])
    limit = WORKER_TARGET_S + load["median"]
    met = total["median"] <= limit
    rows = [("poisoned worker -> replacement serves (first DONE)", total,
             f"median <= {WORKER_TARGET_S:g} s + load = {limit * 1000:,.0f}", met),
            ("replacement's runner load ('runner loaded in')", load, "", None),
            ("replacement loaded, from the client's error", summary([r["at"]["loaded"] for r in runs]), "", None),
            ("where the time goes (log timestamps, ms resolution):", None, "", None),
            *phase_rows(runs, WORKER_PHASES),
            ("  backoff delay the supervisor chose ('restarting in')", delays, "", None)]
    extra = sum(r["attempts"] - 1 for r in runs)
    notes = (f"start point: the client receives CONTEXT_POISONED; one request submitted then, waited for "
             f"({extra} retries in all)")
    return notes + "\n" + table(rows), {"total_s": total, "load_s": load, "backoff_delay_s": delays,
                                        "phases_s": {k: summary([r["phases"][k] for r in runs]) for k in WORKER_PHASES},
                                        "target_s": limit, "met": met}


def report_broker(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    total = summary([r["total_s"] for r in runs])
    met = total["median"] <= BROKER_TARGET_S and total["max"] <= BROKER_TARGET_S
    rows = [("broker SIGKILLed -> a request completes", total,
             f"median and max <= {BROKER_TARGET_S * 1000:,.0f}", met)]
    by_ordinal = {}
    for k in range(1, BROKER_KILLS_PER_DAEMON + 1):
        mine = [r for r in runs if r["ordinal"] == k]
        if mine:
            by_ordinal[k] = summary([r["total_s"] for r in mine])
            delay = statistics.median(r["backoff_delay_s"] for r in mine)
            rows.append((f"  kill #{k} of a daemon (backoff ~{delay:.2f} s)", by_ordinal[k], "", None))
    rows += [("where the time goes (log timestamps, ms resolution):", None, "", None),
             *phase_rows(runs, BROKER_PHASES)]
    attempts = summary([float(r["attempts"]) for r in runs])
    kinds = sorted({f for r in runs for f in r["failures"]})
    notes = (f"start point: os.kill(SIGKILL); attempts per recovery: median {attempts['median']:g}, "
             f"max {attempts['max']:g}{' (failed attempts: ' + ', '.join(kinds) + ')' if kinds else ''}")
    return notes + "\n" + table(rows), {
        "total_s": total, "by_kill_ordinal_s": by_ordinal,
        "phases_s": {k: summary([r["phases"][k] for r in runs]) for k in BROKER_PHASES},
        "target_s": BROKER_TARGET_S, "met": met}


def report_references(ref: dict[str, Any]) -> str:
    packages = ", ".join(f"{p} {ms:.0f}" for p, ms in ref["worker_import_self_ms"].items() if p != "total")
    cached = ""
    if ref["dont_write_bytecode"]:
        cached = (f"\nPYTHONDONTWRITEBYTECODE is set, and the daemon's children inherit it: inferd's modules are "
                  f"compiled at every start; with a bytecode cache the worker's import takes "
                  f"{ref['import_worker_cached_s'] * 1000:.0f} ms")
    return (f"reference (median wall time): python -c pass {ref['python_c_pass_s'] * 1000:.0f} ms; "
            f"python -c 'import inferd.worker.process' {ref['import_worker_s'] * 1000:.0f} ms; "
            f"python -c 'import inferd.broker.process' {ref['import_broker_s'] * 1000:.0f} ms\n"
            f"import self time for inferd.worker.process by package (-X importtime, ms): "
            f"total {ref['worker_import_self_ms']['total']:.0f}: {packages}{cached}")


# --- main -----------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 poisonings and 5 broker kills: noisy figures")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures and every run to FILE")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs and print where")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    settings = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup below
    info = machine()
    defaults = DaemonConfig()
    print(f"machine: {info['nproc']} cpus ({info['cpu']}), python {info['python']}, pyzmq {info['pyzmq']} "
          f"(libzmq {info['libzmq']}), load average {info['loadavg_at_start']:.2f}")
    print(f"settings: {'quick' if args.quick else 'full'} {asdict(settings)}; echo runtime, 1 replica, default "
          f"heartbeats; restart_backoff_min_ms = {defaults.restart_backoff_min_ms} (default), "
          f"jitter {defaults.restart_backoff_jitter:g} (default), restart_backoff_reset_s = {BACKOFF_RESET_S:g} "
          f"for the worker runs (default {defaults.restart_backoff_reset_s:g}); a fresh daemon every "
          f"{BROKER_KILLS_PER_DAEMON} broker kills", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="inferd-bench-recovery-"))
    keep_logs = args.keep_logs
    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        with contextlib.ExitStack() as stack:
            say("reference start-up times...")
            ref = references(settings, workdir)
            say(f"poisoned worker, {settings.worker_runs} runs...")
            worker_runs = measure_worker(workdir, stack, settings, say)
            say(f"killed broker, {settings.broker_runs} runs...")
            broker_runs = measure_broker(workdir, stack, settings, say)
    except Exception:
        keep_logs = True
        print(f"failed; logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if keep_logs:
            print(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    worker_text, worker_summary = report_worker(worker_runs)
    broker_text, broker_summary = report_broker(broker_runs)
    print()
    print(report_references(ref))
    print()
    print(f"1. poisoned worker, {len(worker_runs)} runs (figures in ms)")
    print(worker_text)
    print()
    print(f"2. killed broker, {len(broker_runs)} runs, {BROKER_KILLS_PER_DAEMON} per daemon (figures in ms)")
    print(broker_text)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "settings": asdict(settings),
            "config": {"worker": WORKER_CONFIG, "broker": BROKER_CONFIG},
            "references": ref, "worker": {"summary": worker_summary, "runs": worker_runs},
            "broker": {"summary": broker_summary, "runs": broker_runs},
            "loadavg_at_end": os.getloadavg()[0]}, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

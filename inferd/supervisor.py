"""The supervisor: the process systemd starts. It owns the children, nothing else.

One master loop, as in gunicorn's arbiter: signal handlers only append the
signal to a list and write to a wake-up pipe; the loop polls that pipe and the
link socket to the broker, then acts: reap exited children, ask the restart
policy, start what is due, and walk the shutdown sequence.

It binds only the link socket its broker connects to. It never imports torch
and never touches CUDA: it discovers devices through NVML and pins each worker
by putting CUDA_VISIBLE_DEVICES into the worker's environment before exec.

Shutdown:

* SIGTERM drains: the broker stops accepting, fails what is queued with
  SHUTTING_DOWN, and has ``drain_grace_s`` to finish what is in flight. Then
  the children get SIGTERM, then SIGKILL after ``stop_timeout_s``. Exit 0.
* SIGINT stops fast: the same with no grace.
* A second SIGTERM or SIGINT during a shutdown stops at once: the broker
  answers what is in flight with SHUTTING_DOWN, the workers are killed, and
  the supervisor exits within about a second.

On exit the ipc socket files are removed, so none misleads a client.

SIGHUP reloads the config (``inferd.live``): only the difference is applied.

Under systemd (``inferd.sdnotify``) the loop reports READY=1 once every
deployment serves, a one-line STATUS=, RELOADING=1 around a reload,
EXTEND_TIMEOUT_USEC while workers are still loading, and WATCHDOG=1 at half of
WatchdogSec: a wedged loop stops sending it, and systemd kills and restarts
the daemon.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from inferd import __version__, exitcodes, protocol as P, zmqio
from inferd.config import Config
from inferd.devices import DeviceSource, DeviceStats, cuda_visible_devices
from inferd.failures import Failure, describe_exit, from_exit_status
from inferd.live import LiveChanges
from inferd.paths import Endpoints, private_umask, remove_sockets
from inferd.placement import DeviceKey, PlacementError, Planner, WorkerPlan, on_node
from inferd.proc import PARENT_ENV, SPEC_ENV
from inferd.restart import FAIL, RESTART_AFTER, SHUTDOWN, SupervisionPolicy
from inferd.sdnotify import Notifier

log = logging.getLogger("inferd.supervisor")

BROKER = "broker"
GATEWAY = "gateway"
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# How long the broker may take to confirm a drain beyond the grace period
# before the supervisor stops waiting for it.
DRAIN_SLACK_S = 5.0
# While workers load (start-up, a reload), systemd's timeout is pushed this far ahead, every
# EXTEND_EVERY_S: a loop that stops extending it lets the timeout fire soon after.
EXTEND_BY_S = 10.0
EXTEND_EVERY_S = 2.0
# After a second SIGTERM or SIGINT, how long children may take to exit before SIGKILL.
FAST_STOP_S = 1.0


@dataclass(eq=False)
class Child:
    name: str
    module: str
    spec: dict[str, Any]
    plan: WorkerPlan | None = None      # workers only: where it runs, placed again at each restart
    proc: subprocess.Popen | None = None
    state: str = "stopped"
    restarts: int = 0
    restart_at: float | None = None
    last_exit: str | None = None
    started_at: float = field(default=0.0)
    killed_for: str | None = None     # why the supervisor SIGKILLed it (hung, silent)
    operator_restart: bool = False    # inferctl restart: respawn at once, outside the policy
    retire: str | None = None         # why the supervisor is stopping it on purpose (a drain, a reload)
    restart_reasons: Counter = field(default_factory=Counter)  # failure kind (or "operator") -> restarts

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def row(self) -> dict[str, Any]:
        assert self.plan is not None
        return {"id": self.name, "deployment": self.plan.deployment, "replica": self.plan.replica,
                "node": self.plan.node, "device": self.plan.device_ids, "placed_by": self.plan.why,
                "pid": self.pid or 0, "state": self.state, "restarts": self.restarts, "last_exit": self.last_exit,
                "restart_reasons": dict(self.restart_reasons),
                "restart_in_s": round(max(0.0, self.restart_at - time.monotonic()), 2)
                if self.restart_at is not None else None}


class Supervisor(LiveChanges):
    def __init__(self, config: Config, endpoints: Endpoints, source: DeviceSource, planner: Planner,
                 plans: list[WorkerPlan], policy: SupervisionPolicy):
        self.config = config
        self.endpoints = endpoints
        self.source = source
        self.planner = planner
        self.policy = policy
        self.stats: dict[DeviceKey, DeviceStats] = self._sample()
        self.worker_load: dict[str, int] = {}     # worker id -> outstanding requests (from the broker)
        self.queued: dict[str, int] = {}          # deployment -> queued requests (from the broker)
        self.next_poll = 0.0
        self.notifier = Notifier()
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.ready_ids: set[str] = set()   # workers the broker reports ready
        self.ready_counts: dict[str, int] = {}  # deployment -> ready workers (from the broker)
        self.signals: list[int] = []
        self.phase = "running"          # running -> draining -> stopping
        self.phase_deadline = float("inf")
        self.broker_peer: bytes | None = None
        self.all_ready_once = False
        self.exit_status = exitcodes.OK

        base = {"config": config.to_dict(), "runtime_dir": str(endpoints.runtime_dir),
                "frontend": config.broker.frontend}
        self.broker = Child(BROKER, "inferd.broker", base)
        # The HTTP gateway, when configured: a client of the broker, supervised like it.
        self.gateway = Child(GATEWAY, "inferd.gateway", base) if config.gateway is not None else None
        self.workers = [Child(p.id, "inferd.worker", {**base, "worker": p.id, "deployment": p.deployment}, plan=p)
                        for p in plans]
        self.ctx = zmq.Context()
        self.link = self.ctx.socket(zmq.ROUTER)
        self.link.setsockopt(zmq.LINGER, 0)
        self.link.setsockopt(zmq.ROUTER_HANDOVER, 1)
        with private_umask():
            self.link.bind(endpoints.supervisor)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.next_watchdog = time.monotonic() if self.notifier.watchdog_s else float("inf")
        self.next_extend = time.monotonic() if self.notifier.enabled else float("inf")
        self._init_live()

    # --- signals: record only -------------------------------------------------------------

    def _record(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, self._record)

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        log.info("inferd %s starting: runtime dir %s, config %s", __version__, self.endpoints.runtime_dir,
                 self.config.path)
        log.info("devices: %s", self.source.note)
        for dev in self.source.devices:
            log.info("device %s: %s%s", dev.id, dev.name, " (CPU device: no GPU)" if dev.kind == "cpu" else
                     f" {dev.uuid}, {dev.memory_total / 2**30:.1f} GiB, compute capability "
                     f"{dev.compute_capability[0]}.{dev.compute_capability[1]}")
        for plan in (c.plan for c in self.workers):
            log.info("placed %s on %s (%s)", plan.id, plan.device_ids, plan.why)
        self._spawn(self.broker)
        if self.gateway is not None:
            self._spawn(self.gateway)
        for child in self.workers:
            self._spawn(child)
        self.notifier.notify(status="starting workers")
        poller = zmq.Poller()
        poller.register(self.link, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            timeout = min(1.0, max(0.0, self._next_timer() - time.monotonic()))
            for sock, _ in poller.poll(zmqio.poll_ms(timeout)):
                if sock is self.link:
                    self._read_link()
                else:
                    os.read(self._wake_r, 512)
            self._handle_signals()
            self._reap()
            self._run_timers()
            self.run_deferred()
            if self.phase == "stopping" and not self._alive():
                break
        log.info("inferd stopped (exit status %d)", self.exit_status)
        self.link.close(0)
        self.ctx.term()
        remove_sockets(self.endpoints)
        return self.exit_status

    def _next_timer(self) -> float:
        times = [c.restart_at for c in self._children() if c.restart_at is not None]
        return min([self.phase_deadline, self.next_poll, self.next_watchdog, self.next_extend, *times])

    def _children(self) -> list[Child]:
        return [self.broker, *([self.gateway] if self.gateway else []), *self.workers]

    def _alive(self) -> list[Child]:
        return [c for c in self._children() if c.proc is not None]

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGCHLD:
                continue  # _reap runs after every wake-up
            if sig == signal.SIGHUP:
                log.info("SIGHUP: reloading %s", self.config.path)
                self.reload()
            elif sig == signal.SIGUSR2:
                self._wedge()
            elif self.phase != "running":
                log.warning("%s during shutdown: stopping now", signal.Signals(sig).name)
                self._stop_now()
            else:
                grace = self.config.daemon.drain_grace_s if sig == signal.SIGTERM else 0.0
                log.info("%s: draining (grace %.1f s)", signal.Signals(sig).name, grace)
                self._begin_drain(grace)

    def _wedge(self) -> None:
        """Fault injection (test-only): stop the main loop for good, as a bug might, so that
        systemd's watchdog is seen to kill and restart the daemon."""
        if not self.config.daemon.fault_injection:
            log.warning("SIGUSR2 ignored: it wedges the main loop only with [daemon] fault_injection = true")
            return
        log.critical("fault injection: the main loop wedges now (no more WATCHDOG=1)")
        while True:
            time.sleep(3600)

    # --- shutdown -------------------------------------------------------------------------

    def _begin_drain(self, grace: float) -> None:
        self.phase = "draining"
        self.notifier.notify(stopping="1", status="draining")
        self.next_extend = 0.0  # at once: the stop timeout now follows drain_grace_s
        self._publish()
        if self.broker_peer is None or self.broker.proc is None:
            self._begin_stop()
            return
        self._to_broker(P.DRAIN, {"grace_s": grace})
        self.phase_deadline = time.monotonic() + grace + DRAIN_SLACK_S

    def _begin_stop(self) -> None:
        self.phase = "stopping"
        self.phase_deadline = time.monotonic() + self.config.daemon.stop_timeout_s
        for child in self._children():
            child.restart_at = None
        self._stop_children(signal.SIGTERM)

    def _stop_now(self) -> None:
        """A second signal: no more grace. The broker answers what is in flight with SHUTTING_DOWN
        (the DRAIN reaches it before any WORKER_EXITED, and its own SIGTERM path does the same),
        the workers are killed, and whatever still lives after FAST_STOP_S is killed too."""
        self._to_broker(P.DRAIN, {"grace_s": 0.0})
        self.phase = "stopping"
        self.phase_deadline = time.monotonic() + FAST_STOP_S
        for child in self._children():
            child.restart_at = None
            if child.proc is not None:
                try:
                    child.proc.send_signal(signal.SIGTERM if child is self.broker else signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _stop_children(self, sig: int) -> None:
        for child in self._alive():
            try:
                child.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _run_timers(self) -> None:
        now = time.monotonic()
        if now >= self.next_watchdog:  # from this loop only: a wedged loop stops it
            self.notifier.notify(watchdog="1")
            self.next_watchdog = now + self.notifier.watchdog_s
        if now >= self.next_extend:
            self.next_extend = now + EXTEND_EVERY_S
            loading = any(c.proc is not None and c.name not in self.ready_ids for c in self.workers)
            starting = not self.all_ready_once and now - self.started_mono < self.config.daemon.start_timeout_s
            # A drain and the stop after it are bounded by drain_grace_s and stop_timeout_s: the
            # stop timeout follows them, whatever TimeoutStopSec says.
            stopping = self.phase != "running" and now < self.phase_deadline < float("inf")
            if stopping or (self.phase == "running" and loading and (starting or self.reload_state == "applying")):
                self.notifier.extend_timeout(EXTEND_BY_S)
        if now >= self.next_poll:
            self.next_poll = now + self.config.devices.poll_interval_ms / 1000
            self.stats = self._sample()
            self._publish()
        if now >= self.phase_deadline:
            if self.phase == "draining":
                log.warning("the broker did not confirm the drain in time; stopping anyway")
                self._begin_stop()
            elif self.phase == "stopping":
                log.warning("children still alive after %.1f s; sending SIGKILL", self.config.daemon.stop_timeout_s)
                self._stop_children(signal.SIGKILL)
                self.phase_deadline = float("inf")
        if self.phase != "running":
            return
        for child in self._children():
            if child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                if child.operator_restart:  # asked for, not a failure: not counted
                    child.operator_restart = False
                else:
                    child.restarts += 1
                if child.plan is not None:
                    self._place_again(child)
                self._spawn(child)

    # --- placement --------------------------------------------------------------------------

    def _sample(self) -> dict[DeviceKey, DeviceStats]:
        return on_node(self.config.node.name, self.source.stats())

    def device_load(self, exclude: Child | None = None) -> dict[DeviceKey, float]:
        """Queue depth + active streams per device: each worker's outstanding requests, plus
        its share of its deployment's queue, on each of its devices."""
        load: dict[DeviceKey, float] = {}
        for child in self.workers:
            if child is exclude:
                continue
            replicas = max(1, sum(1 for c in self.workers if c.plan.deployment == child.plan.deployment))
            share = self.worker_load.get(child.name, 0) + self.queued.get(child.plan.deployment, 0) / replicas
            for device in child.plan.devices:
                key = (child.plan.node, device.id)
                load[key] = load.get(key, 0.0) + share
        return load

    def _place_again(self, child: Child) -> None:
        """A restarting replica is placed by its deployment's policy with today's stats and load."""
        try:
            dep = self.config.deployment(child.plan.deployment)
        except KeyError:  # removed by a reload: it stays where it was
            return
        placed = Counter((c.plan.node, d.id) for c in self.workers if c is not child for d in c.plan.devices)
        try:
            plan = self.planner.place_again(dep, child.plan, self.stats, self.device_load(exclude=child), placed)
        except PlacementError as exc:
            log.error("cannot place %s again: %s; it stays on %s", child.name, exc, child.plan.device_ids)
            return
        if plan.devices != child.plan.devices:
            log.info("moving %s from %s to %s (%s)", child.name, child.plan.device_ids, plan.device_ids, plan.why)
        child.plan = plan

    # --- children -------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        # Pinned before the interpreter starts: a worker to its devices, the broker to none.
        env["CUDA_VISIBLE_DEVICES"] = ""
        if child.plan is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(list(child.plan.devices))
            child.spec["devices"] = [d.to_dict() for d in child.plan.devices]
        # Children import the very package this supervisor runs, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        env[SPEC_ENV] = json.dumps(child.spec)
        env[PARENT_ENV] = str(os.getpid())
        # A session of its own: a terminal's Ctrl-C or `kill -- -PGID` reaches only the
        # supervisor, which then stops the children in order (drain first).
        child.proc = subprocess.Popen([sys.executable, "-m", child.module], env=env, stdin=subprocess.DEVNULL,
                                      close_fds=True, start_new_session=True)
        child.state = "running"
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)%s", child.name, child.proc.pid,
                 f" on {child.plan.device_ids}" if child.plan else "")
        if child.plan is not None or child is self.gateway:
            self._publish()

    def _reap(self) -> None:
        for child in self._children():
            if child.proc is None:
                continue
            status = child.proc.poll()  # waitpid(pid, WNOHANG): no zombies
            if status is None:
                continue
            pid = child.proc.pid
            child.proc = None
            now = time.monotonic()
            # A child we killed because it hung is an unknown failure, whatever its signal says.
            failure = Failure.UNKNOWN if child.killed_for else from_exit_status(status)
            child.last_exit = f"killed: {child.killed_for}" if child.killed_for else describe_exit(status)
            child.killed_for = None
            expected = (child.retire or ("an operator restart" if child.operator_restart else None)
                        if self.phase == "running" else "shutdown")
            self.ready_ids.discard(child.name)
            if child is self.broker:
                self.broker_peer = None
            elif child.plan is not None:
                self._to_broker(P.WORKER_EXITED, {"worker": child.name, "pid": pid, "status": status,
                                                  "expected": expected})
            if self.phase != "running":
                log.info("%s (pid %d) %s", child.name, pid, child.last_exit)
                child.state = "stopped"
            elif child.operator_restart:
                log.info("%s (pid %d) stopped for an operator restart", child.name, pid)
                child.last_exit = "stopped for an operator restart"
                child.restart_reasons["operator"] += 1
                child.state, child.restart_at = "restarting", now
            elif child.retire:
                log.info("%s (pid %d) stopped: %s", child.name, pid, child.retire)
                child.state, child.last_exit = "stopped", f"stopped: {child.retire}"
                self.expected_exit(child)
            else:
                self._decide(child, pid, failure, now)
            if child.plan is not None or child is self.gateway:
                self._publish()

    def _decide(self, child: Child, pid: int, failure: Failure, now: float) -> None:
        decision = self.policy.on_exit(child.name, failure, now - child.started_at, now)
        if decision.action == RESTART_AFTER:
            log.warning("%s (pid %d) %s: %s, restarting in %.2f s", child.name, pid, child.last_exit,
                        decision.directive.value, decision.delay_s)
            child.state, child.restart_at = "restarting", now + decision.delay_s
            child.restart_reasons[failure.value] += 1
        elif decision.action == FAIL and child is self.gateway:
            # Serving over ZeroMQ goes on: an HTTP port that cannot be bound must not stop the GPUs.
            log.error("gateway (pid %d) %s: %s; it stays down, HTTP is not served", pid, child.last_exit,
                      decision.reason)
            child.state = "failed"
        elif decision.action == FAIL and child is not self.broker:
            log.error("%s (pid %d) %s: %s; it stays down until `inferctl restart %s`", child.name, pid,
                      child.last_exit, decision.reason, child.name)
            child.state = "failed"
            child.last_exit = f"{child.last_exit}; {decision.reason}"
            self.start_failed(child, child.last_exit)
        else:  # the daemon-wide intensity is spent, or the broker keeps dying: systemd takes over
            why = decision.reason if decision.action == SHUTDOWN else f"the broker {decision.reason}"
            log.critical("%s (pid %d) %s; giving up: %s", child.name, pid, child.last_exit, why)
            child.state = "failed"
            self.exit_status = exitcodes.ESCALATED
            self._begin_drain(0.0)

    # --- the link to the broker -----------------------------------------------------------

    def _read_link(self) -> None:
        while True:
            try:
                frames = self.link.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            peer, rest = frames[0], frames[1:]
            try:
                command, body = P.decode(P.SUPERVISOR, rest, frozenset({
                    P.HELLO, P.READINESS, P.DRAINED, P.UNRESPONSIVE, P.RESTART, P.LOAD, P.OPERATOR,
                    P.WORKER_DRAINED, P.REMOVED}))
            except P.ProtocolError as exc:
                log.error("malformed message on the supervisor link: %s", exc.reason)
                continue
            if command == P.HELLO:
                self.broker_peer = peer
                log.info("broker up (pid %s)", body.get("pid"))
                self._publish()
                self.broker_restarted()
                if self.phase == "draining":  # a broker restarted mid-drain has nothing in flight
                    self._begin_stop()
            elif command == P.READINESS:
                ready = body.get("workers")
                if isinstance(ready, list):
                    self.ready_ids = {str(w) for w in ready}
                    self.on_worker_ready(sorted(self.ready_ids))
                self._on_readiness(body.get("deployments", {}))
            elif command == P.DRAINED and self.phase == "draining":
                failed = body.get("failed") or 0
                if failed:
                    log.warning("drain grace ran out: %d request(s) failed with SHUTTING_DOWN", failed)
                else:
                    log.info("drain complete")
                self._begin_stop()
            elif command == P.WORKER_DRAINED:
                self.on_worker_drained(str(body.get("worker")))
            elif command == P.REMOVED:
                self.on_deployment_removed(str(body.get("deployment")))
            elif command == P.OPERATOR:
                self._operator(body)
            elif command == P.LOAD:
                self.worker_load = body.get("workers", {})
                self.queued = body.get("queued", {})
            elif command == P.UNRESPONSIVE:
                self._kill_unresponsive(str(body.get("worker")), body.get("pid"), str(body.get("reason", "")))
            elif command == P.RESTART:
                ok, message = self._operator_restart(str(body.get("worker")))
                self._to_broker(P.RESTARTED, {"token": body.get("token"), "ok": ok, "message": message})

    def _worker(self, name: str) -> Child | None:
        return next((c for c in self.workers if c.name == name), None)

    def _kill_unresponsive(self, name: str, pid: Any, reason: str) -> None:
        child = self._worker(name)
        if child is None or child.proc is None or child.pid != pid:
            return  # already gone, or already replaced
        log.warning("%s (pid %d) is unresponsive (%s): killing it", name, pid, reason)
        child.killed_for = reason
        child.proc.kill()

    def _operator_restart(self, name: str) -> tuple[bool, str]:
        """``inferctl restart``: a fresh retry window, and the worker started again now."""
        child = self._worker(name)
        if child is None:
            return False, f"no worker named {name!r}; known: {', '.join(c.name for c in self.workers)}"
        if self.phase != "running":
            return False, "inferd is shutting down"
        was = child.state
        self.policy.clear(name)
        log.info("operator restart of %s (was %s)", name, was)
        if child.proc is None:  # asked for: not counted as a restart after a failure
            child.restart_reasons["operator"] += 1
            child.state, child.restart_at, child.operator_restart = "restarting", time.monotonic(), True
        else:
            child.operator_restart = True
            child.proc.terminate()
        return True, f"restarting {name} (was {was})"

    def _operator(self, body: dict[str, Any]) -> None:
        """An operator command relayed by the broker (inferctl reload, scale, drain): act, then answer."""
        command, details, result = body.get("command"), {}, {}
        if command == "RELOAD":
            ok, message, extra = self.reload(body.get("config"))
            (result if ok else details).update(extra)
        elif command == "SCALE":
            ok, message = self.scale(str(body.get("deployment")), int(body.get("replicas", 0)))
        elif command == "DRAIN_WORKERS":
            ok, message = self.drain_target(str(body.get("target")), str(body.get("then") or "stop"))
        else:
            ok, message = False, f"unknown operator command {command!r}"
        self._to_broker(P.ANSWER, {"token": body.get("token"), "ok": ok, "message": message,
                                   "details": details, "result": result})

    def _on_readiness(self, ready: dict[str, int]) -> None:
        self.ready_counts = {name: count for name, count in ready.items()}
        if all(ready.values()) and not self.all_ready_once:
            self.all_ready_once = True
            log.info("%s", self._status_line())
            self.notifier.notify(ready="1", status=self._status_line())
        else:
            self.notifier.notify(status=self._status_line())

    def _status_line(self) -> str:
        """systemd's STATUS=: one line, what `systemctl status` shows."""
        counts = self.ready_counts
        summary = ", ".join(f"{d.name} {counts.get(d.name, 0)}/{d.replicas}" for d in self.config.deployments)
        if self.reload_state == "applying":
            return f"reloading ({self.reload_note}); ready: {summary}"
        state = "serving" if self.all_ready_once and all(counts.get(d.name) for d in self.config.deployments) \
            else "starting" if not self.all_ready_once else "degraded"
        return f"{state}: {summary}"

    def _to_broker(self, command: bytes, body: dict[str, Any]) -> None:
        if self.broker_peer is None:
            return
        try:
            self.link.send_multipart([self.broker_peer, *P.encode(P.SUPERVISOR, command, body)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the broker is gone; its HELLO after the restart resends the table

    def _publish(self) -> None:
        """Send the broker the process table that ``inferctl status`` shows."""
        self._to_broker(P.WORKERS, {
            "daemon": {"pid": os.getpid(), "version": __version__, "config": self.config.path,
                       "runtime_dir": str(self.endpoints.runtime_dir), "state": self.phase,
                       "started_at": self.started, "devices": self.source.note, "node": self.config.node.name,
                       "broker_restarts": self.broker.restarts, "gateway": self._gateway_row(),
                       "reload": {"generation": self.reload_generation, "state": self.reload_state,
                                  "note": self.reload_note, "pending": self.transitions.pending()}},
            "devices": self._device_rows(),
            "workers": [c.row() for c in self.workers],
        })

    def _gateway_row(self) -> dict[str, Any] | None:
        if self.gateway is None:
            return None
        gw = self.config.gateway
        return {"url": f"http://{gw.host}:{gw.port}", "pid": self.gateway.pid or 0, "state": self.gateway.state,
                "restarts": self.gateway.restarts, "last_exit": self.gateway.last_exit}

    def _device_rows(self) -> list[dict[str, Any]]:
        load = self.device_load()
        node = self.config.node.name
        rows = []
        for device in self.source.devices:
            stats = self.stats.get((node, device.id))
            rows.append({**device.to_dict(), "node": self.config.node.name,
                         "memory_free": stats.memory_free if stats else None,
                         "utilization": stats.utilization if stats else None,
                         "load": round(load.get((node, device.id), 0.0), 2),
                         "workers": [c.name for c in self.workers if device in c.plan.devices]})
        return rows

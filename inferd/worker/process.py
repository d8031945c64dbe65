"""The worker process: one device context, one runner, one DEALER to the broker.

The supervisor pins the device by setting CUDA_VISIBLE_DEVICES in this
process's environment before the interpreter starts, so nothing here can
initialize CUDA on the wrong device. The runtime's module (and so torch, for
the torch runtime) is imported only after that, in :func:`main`.

The main thread registers and heartbeats (READY, HEARTBEAT, and REBUILD and
DISCONNECT from the broker); the engine thread (:mod:`inferd.worker.engine`)
runs the model and owns the data path on its own socket
(:mod:`inferd.worker.link`). When the broker goes silent or says DISCONNECT,
the worker drops what it was doing (the broker has already answered those
requests, or is gone), reconnects and registers again, under a new
registration ``generation`` that the engine's socket confirms with ATTACH.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from inferd import exitcodes, protocol as P, runtimes, zmqio
from inferd.config import Config
from inferd.devices import Device, cuda_visible_devices
from inferd.failures import EXIT_STATUS
from inferd.paths import Endpoints
from inferd.proc import child_signals, child_spec, die_with_parent, setup_logging
from inferd.worker.engine import Engine
from inferd.worker.link import RECONNECT_MS, EngineLink

log = logging.getLogger("inferd.worker")


class Worker:
    def __init__(self, worker_id: str, config: Config, deployment: str, devices: tuple[Device, ...],
                 endpoints: Endpoints):
        self.id = worker_id
        self.deployment = config.deployment(deployment)
        self.devices = devices
        self.endpoint = endpoints.backend
        self.max_bytes = config.broker.max_message_bytes
        self.hb_interval = config.broker.heartbeat_interval_ms / 1000
        self.hb_expiry = self.hb_interval * config.broker.heartbeat_liveness
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.stopping = False
        # This process's registrations: a random start, so that no two processes' overlap.
        self.generation = random.randrange(1 << 40)

        wake_endpoint = f"inproc://wake-{id(self)}"
        self.wake_rx = self.ctx.socket(zmq.PAIR)
        self.wake_rx.bind(wake_endpoint)
        self._wake_tx = self.ctx.socket(zmq.PAIR)  # used by the engine thread only
        self._wake_tx.connect(wake_endpoint)
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

        spec = runtimes.SPECS[self.deployment.runtime]
        runner = spec.load_runner_class()(self.deployment.options, devices, self.deployment.max_concurrency)
        self.capacity = runner.capacity  # the credits this worker offers when ready
        self.link = EngineLink(self.ctx, worker_id, self.endpoint, self.max_bytes)
        self.link.generation = self.generation
        self.engine = Engine(runner, self._wake, self.link)

    def _wake(self) -> None:
        try:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is already pending

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    # --- connection ------------------------------------------------------------------------

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
        # A restarted broker is back in ~0.2 s: retry the ipc connect every 20 ms, not ZeroMQ's
        # default 100 ms (+ up to 100 ms of jitter), which was a third of the broker's recovery.
        self.sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        self.sock.connect(self.endpoint)
        self.broker_seen = time.monotonic()
        self._reported_state = self.engine.state
        self.send(P.READY, {"deployment": self.deployment.name, "runtime": self.deployment.runtime,
                            "device": ",".join(d.id for d in self.devices) or "-", "pid": os.getpid(),
                            "generation": self.generation, **self._load()})

    def reconnect(self, why: str) -> None:
        log.warning("re-registering with the broker: %s", why)
        # The engine drops its requests (they belong to a broker that has let them go) and
        # reconnects its socket, attaching it to the new registration.
        self.generation += 1
        self.link.generation = self.generation
        self.engine.reset()
        self.connect()

    def send(self, command: bytes, body: dict[str, Any]) -> None:
        body["worker"] = self.id
        zmqio.send(self.sock, P.encode(P.WORKER, command, body))
        if command in (P.READY, P.HEARTBEAT):  # the messages that carry _load()
            self.last_report = time.monotonic()

    def _load(self) -> dict[str, Any]:
        ready = self.engine.state == "ready"
        report = self.engine.report
        progress = self.engine.runner.progress  # a long load's phase, set by the engine thread
        if progress and not ready:
            report = {**report, "progress": progress}
        return {"state": self.engine.state, "credits": self.capacity if ready else 0,
                "in_flight": self.engine.in_flight, "resumes": self.engine.resumes, "rebuilds": self.engine.rebuilds,
                "runner": report}

    # --- loop ------------------------------------------------------------------------------

    def run(self) -> int:
        child_signals(self._on_term, self._sig_w)
        self.connect()
        self.engine.start()
        poller = zmq.Poller()
        poller.register(self.wake_rx, zmq.POLLIN)
        poller.register(self._sig_r, zmq.POLLIN)
        sock = None
        while not self.stopping:
            if sock is not self.sock:  # (re)connected: poll the new socket
                if sock is not None:
                    poller.unregister(sock)
                sock = self.sock
                poller.register(sock, zmq.POLLIN)
            # A HEARTBEAT every interval even while chunks flow: it carries the load report
            # (credits, runner load, resumes), which a busy worker must keep sending.
            timeout = max(0.0, self.last_report + self.hb_interval - time.monotonic())
            for ready, _ in poller.poll(zmqio.poll_ms(timeout)):
                if ready is sock:
                    self._from_broker()
                elif ready is self.wake_rx:
                    self._drain_wakeups()
                else:
                    os.read(self._sig_r, 512)
            if self.engine.failure is not None:
                return self._exit_failed()
            now = time.monotonic()
            if now - self.broker_seen > self.hb_expiry:
                self.reconnect(f"no word from the broker for {now - self.broker_seen:.1f} s")
            elif now - self.last_report >= self.hb_interval or self.engine.state != self._reported_state:
                self._reported_state = self.engine.state
                self.send(P.HEARTBEAT, self._load())
        self.engine.stop()
        return 0

    def _exit_failed(self) -> int:
        """Report the engine's failure in band, flush, and return its exit status.

        The engine thread has sent the failed requests' errors on its socket; a last
        HEARTBEAT with the failure goes out too. Nothing here touches the device.
        """
        self._drain_wakeups()
        failure = self.engine.failure
        log.error("worker %s stops: %s (%s)", self.id, failure.value, self.engine.failure_message)
        self.send(P.HEARTBEAT, {**self._load(), "failure": failure.value, "reason": self.engine.failure_message})
        # The engine thread has returned, so closing its wake socket here is safe; terminating
        # the context waits (up to the linger) until the messages above are delivered.
        self.ctx.destroy(linger=1000)
        return EXIT_STATUS[failure]

    def _from_broker(self) -> None:
        while True:
            try:
                frames = zmqio.recv(self.sock, zmqio.DONTWAIT)
            except zmq.Again:
                return
            self.broker_seen = time.monotonic()
            try:
                command, body = P.decode(P.WORKER, frames, frozenset({P.HEARTBEAT, P.DISCONNECT, P.REBUILD}))
            except P.ProtocolError as exc:
                log.error("malformed message from the broker: %s", exc.reason)
                continue
            if command == P.REBUILD:
                self.engine.rebuild()
            elif command == P.DISCONNECT:
                return self.reconnect(f"the broker said DISCONNECT ({body.get('reason', '')})")

    def _drain_wakeups(self) -> None:
        """The engine changed state (or failed): the loop reports it."""
        while True:
            try:
                self.wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                break


def main() -> None:
    spec = child_spec()
    config = Config.from_dict(spec["config"])
    setup_logging(f"worker {spec['worker']}", config.daemon.log_level)
    die_with_parent()
    devices = tuple(Device.from_dict(d) for d in spec["devices"])
    visible, expected = os.environ.get("CUDA_VISIBLE_DEVICES"), cuda_visible_devices(list(devices))
    if visible != expected:
        log.error("CUDA_VISIBLE_DEVICES is %r, expected %r; refusing to run on the wrong device", visible, expected)
        sys.exit(exitcodes.WORKER_UNRECOVERABLE)
    os.environ["HF_HUB_OFFLINE"] = "1"  # a worker never contacts a model hub, whatever it loads
    os.environ["TQDM_DISABLE"] = "1"    # no progress bars in the log: a load reports its phases instead
    deployment = config.deployment(spec["deployment"])
    runtime = runtimes.SPECS[deployment.runtime]
    missing = runtime.missing_modules(deployment.options)
    if missing:  # it would fail the same way after every restart
        log.error("the %s runtime needs %s, not installed (%s)", runtime.name, ", ".join(missing),
                  runtime.install_hints(missing))
        sys.exit(exitcodes.WORKER_UNRECOVERABLE)
    pinned = ("no device (remote runtime)" if not devices else
              "CPU device, no GPU visible" if expected == "" else f"GPU {expected}")
    log.info("worker %s starting: deployment=%s devices=%s (%s)", spec["worker"], spec["deployment"],
             ",".join(d.id for d in devices) or "-", pinned)
    worker = Worker(spec["worker"], config, spec["deployment"], devices,
                    Endpoints.for_dir(Path(spec["runtime_dir"]), spec.get("frontend")))
    code = worker.run()
    logging.shutdown()
    os._exit(code)  # do not wait on the engine thread: a runner may be mid-step

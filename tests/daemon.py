"""A real inferd, started as a subprocess on a private runtime dir, for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

from inferd import protocol as P
from inferd.client import Client
from inferd.ctl import control_call

ECHO = """
[[deployment]]
name = "echo"
runtime = "echo"
replicas = {replicas}
queue_capacity = {queue_capacity}
max_concurrency = {max_concurrency}
default_deadline_ms = {default_deadline_ms}
"""


def echo_config(replicas: int = 2, queue_capacity: int = 1024, max_concurrency: int = 8,
                default_deadline_ms: int = 60_000, daemon: str = "", broker: str = "", deployment: str = "",
                options: str = "", extra: str = "") -> str:
    """A config with one echo deployment; the string arguments add TOML lines to their section
    (``options`` to the deployment's [deployment.options], e.g. ``fault_injection = true``)."""
    daemon, broker = textwrap.dedent(daemon), textwrap.dedent(broker)
    # Fast restarts and heartbeats, unless the test says otherwise.
    for key, value, section in (("restart_backoff_min_ms", "50", "daemon"), ("heartbeat_interval_ms", "200", "broker"),
                                ("heartbeat_liveness", "4", "broker")):
        if section == "daemon" and key not in daemon:
            daemon += f"{key} = {value}\n"
        elif section == "broker" and key not in broker:
            broker += f"{key} = {value}\n"
    return "\n".join([
        "[daemon]\nlog_level = \"info\"\n" + daemon,
        "[broker]\n" + broker,
        ECHO.format(replicas=replicas, queue_capacity=queue_capacity, max_concurrency=max_concurrency,
                    default_deadline_ms=default_deadline_ms) + textwrap.dedent(deployment),
        "[deployment.options]\n" + textwrap.dedent(options) if options else "",
        textwrap.dedent(extra),
    ])


def free_port() -> int:
    """A TCP port free on loopback now (tests never use fixed ports: other daemons run beside them)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


class Daemon:
    def __init__(self, config_text: str, runtime_dir: Path | None = None):
        self.home = Path(tempfile.mkdtemp(prefix="ifd-", dir="/tmp"))
        self.runtime_dir = runtime_dir or self.home / "run"
        self.config_path = self.home / "inferd.toml"
        self.config_path.write_text(config_text)
        self.log_path = self.home / "inferd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Daemon":
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("INFERD_RUNTIME_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inferd", "--config", str(self.config_path), "--runtime-dir",
             str(self.runtime_dir)], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> dict:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"inferd exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                st = self.status()
            except Exception:
                return None
            return st if st["ready"] and all(w["state"] == "ready" for w in st["workers"]) else None

        return wait_for(ready, timeout, what="inferd to be ready")

    def status(self) -> dict:
        return control_call(self.runtime_dir, P.STATUS, 2.0)

    def metrics(self) -> dict:
        return control_call(self.runtime_dir, P.METRICS, 2.0)

    def worker(self, worker_id: str) -> dict:
        return next(w for w in self.status()["workers"] if w["id"] == worker_id)

    def client(self, **kwargs: Any) -> Client:
        return Client(runtime_dir=self.runtime_dir, **kwargs)

    @property
    def frontend(self) -> str:
        return f"ipc://{self.runtime_dir}/frontend.sock"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)

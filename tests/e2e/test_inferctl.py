"""Every inferctl command, run as the installed console script, as an operator would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

INFERCTL = shutil.which("inferctl", path=str(Path(sys.executable).parent)) or "inferctl"


def inferctl(runtime_dir, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([INFERCTL, "--runtime-dir", str(runtime_dir), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_status_table_and_json(daemon):
    table = inferctl(daemon.runtime_dir, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("inferd ") and "READY" in lines[0]
    assert "CPU device(s)" in table.stdout
    assert any(line.split()[:3] == ["echo", "echo", "healthy"] for line in lines)
    workers = [line.split() for line in lines if line.startswith("echo-")]
    assert [w[0] for w in workers] == ["echo-0", "echo-1"]
    assert all(w[1:3] == ["echo", "cpu:0"] and w[4] == "ready" and w[5] == "0" and w[6] == "8" for w in workers)

    st = json.loads(inferctl(daemon.runtime_dir, "status", "--json").stdout)
    assert st["ready"] is True
    assert st["deployments"]["echo"] == {"state": "healthy", "runtime": "echo", "replicas": 2, "ready": 2,
                                         "routing": "least-loaded", "problems": [],
                                         "queued": 0, "in_flight": 0}
    assert st["daemon"]["pid"] == daemon.proc.pid
    assert {w["id"]: w["state"] for w in st["workers"]} == {"echo-0": "ready", "echo-1": "ready"}
    assert all(isinstance(w["pid"], int) and w["pid"] > 0 for w in st["workers"])


def test_generate_streams_text(daemon):
    out = inferctl(daemon.runtime_dir, "generate", "echo", "hello brave new world")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello brave new world\n"
    out = inferctl(daemon.runtime_dir, "generate", "echo", "a b c d", "--max-tokens", "2", "--priority", "0",
                   "--deadline-ms", "5000", "-p", "delay_ms=10")
    assert out.stdout == "a b\n"


@pytest.mark.parametrize("args, code, message", [
    (["generate", "nope", "x"], 1, "inferctl: UNKNOWN_DEPLOYMENT: no deployment named 'nope'"),
    (["generate", "echo", "x", "-p", "bogus=1"], 1, "inferctl: BAD_REQUEST: SUBMIT: params.bogus: unknown"),
    (["generate", "echo", "x", "-p", "novalue"], 2, "expected KEY=VALUE"),
])
def test_generate_errors_are_one_line(daemon, args, code, message):
    out = inferctl(daemon.runtime_dir, *args)
    assert out.returncode == code
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_metrics_table_and_json(daemon):
    with daemon.client() as client:
        for i in range(5):
            client.complete("echo", f"req {i}")
    m = json.loads(inferctl(daemon.runtime_dir, "metrics", "--json").stdout)["echo"]
    assert m["completed"] == 5 and m["queued"] == 0 and m["in_flight"] == 0
    for name in ("failed", "rejected_backpressure", "timed_out", "cancelled"):
        assert m[name] == 0
    for dist in ("queue_ms", "first_chunk_ms", "latency_ms"):
        assert m[dist]["count"] == 5 and m[dist]["p50"] <= m[dist]["p99"] <= m[dist]["max"]
    table = inferctl(daemon.runtime_dir, "metrics").stdout.splitlines()
    assert table[0].split()[:4] == ["DEPLOYMENT", "QUEUED", "IN_FLIGHT", "COMPLETED"]
    assert table[1].split()[:4] == ["echo", "0", "0", "5"]
    assert any(line.split()[:3] == ["echo", "latency_ms", "5"] for line in table)


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["metrics"], ["generate", "echo", "x"]])
def test_every_command_says_when_no_daemon_runs(tmp_path, args):
    out = inferctl(tmp_path / "nothing-here", *args)
    assert out.returncode == 3
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert "inferd is not running" in out.stderr
    assert "Traceback" not in out.stderr


def test_stale_sockets_of_a_dead_daemon(daemon):
    run = daemon.runtime_dir
    daemon.proc.kill()  # SIGKILL: the socket files stay behind, the lock does not
    daemon.proc.wait()
    out = inferctl(run, "status", timeout=10)
    assert out.returncode == 3
    assert "inferd is not running" in out.stderr

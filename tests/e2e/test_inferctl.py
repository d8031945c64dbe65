"""Every inferctl command, run as the installed console script, as an operator would."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import wait_for

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
    (["generate", "nope", "x"], 1, "inferctl: UNKNOWN_DEPLOYMENT: no deployment named 'nope'; deployments: echo"),
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


def test_generate_reads_the_prompt_from_stdin_or_a_file(daemon, tmp_path):
    for args in (["-"], []):
        out = subprocess.run([INFERCTL, "--runtime-dir", str(daemon.runtime_dir), "generate", "echo", *args],
                             input="from stdin\n", capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and out.stdout == "from stdin\n", out.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("from a\nfile")
    out = inferctl(daemon.runtime_dir, "generate", "echo", "--prompt-file", str(prompt))
    assert out.returncode == 0 and out.stdout == "from a file\n", out.stderr
    out = inferctl(daemon.runtime_dir, "generate", "echo", "--prompt-file", str(tmp_path / "missing"))
    assert out.returncode == 1 and "cannot read the prompt from" in out.stderr


def test_help_lists_runtime_params_and_every_runtime_dir_fallback():
    out = subprocess.run([INFERCTL, "generate", "--help"], capture_output=True, text=True, timeout=20).stdout
    assert "echo: delay_ms (an integer between 0 and 10000); max_tokens" in out
    assert "torch: ignore_eos (true or false); max_tokens" in out
    assert "temperature (a number between 0 (greedy) and 100)" in out
    assert not re.search(r"\bfault\b", out)  # test-only, and refused unless a config turns it on
    out = subprocess.run([INFERCTL, "--help"], capture_output=True, text=True, timeout=20).stdout
    flat = " ".join(out.split())
    assert ("Default: $INFERD_RUNTIME_DIR, else /run/inferd for root, else $XDG_RUNTIME_DIR/inferd, else "
            "/tmp/inferd-$UID.") in flat


def test_client_takes_params_as_a_dict_or_keywords(daemon):
    with daemon.client() as client:
        assert client.complete("echo", "a b c", params={"max_tokens": 2}) == "a b"
        assert client.complete("echo", "a b c", params={"max_tokens": 2}, delay_ms=1) == "a b"
        with pytest.raises(TypeError, match="max_tokens given both in params= and as keywords"):
            client.generate("echo", "a", params={"max_tokens": 2}, max_tokens=3)


def test_operator_restart_is_not_a_lost_worker_nor_a_failure(daemon):
    pid = daemon.worker("echo-0")["pid"]
    out = inferctl(daemon.runtime_dir, "restart", "echo-0")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: (w := daemon.worker("echo-0"))["state"] == "ready" and w["pid"] != pid, timeout=10,
             what="echo-0 restarted")
    assert daemon.worker("echo-0")["restarts"] == 0
    assert daemon.worker("echo-0")["last_exit"] == "stopped for an operator restart"
    logs = daemon.logs()
    assert f"worker echo-0 (pid {pid}) stopped: an operator restart" in logs and " lost:" not in logs


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

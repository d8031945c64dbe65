"""Placement and routing on the real daemon: CPU devices, spreading, sticky sessions, inferctl views."""

from __future__ import annotations

import json
import subprocess
import sys

from inferd import exitcodes
from tests.daemon import echo_config, wait_for
from tests.e2e.test_inferctl import inferctl

TWO_CPUS = "[devices]\ncpu_devices = 2\n"


def test_two_cpu_devices_four_replicas_are_placed_two_and_two_and_load_spreads(make_daemon):
    daemon = make_daemon(echo_config(replicas=4, max_concurrency=2, extra=TWO_CPUS))
    st = daemon.status()
    assert {w["id"]: w["device"] for w in st["workers"]} == {
        "echo-0": "cpu:0", "echo-1": "cpu:1", "echo-2": "cpu:0", "echo-3": "cpu:1"}
    assert [d["id"] for d in st["devices"]] == ["cpu:0", "cpu:1"]
    assert [sorted(d["workers"]) for d in st["devices"]] == [["echo-0", "echo-2"], ["echo-1", "echo-3"]]
    with daemon.client() as client:
        streams = [client.generate("echo", "a b c d", delay_ms=200) for _ in range(8)]
        busy = wait_for(lambda: (s := daemon.status()) and all(w["in_flight"] == 2 for w in s["workers"]) and s,
                        timeout=3, what="every worker holding 2 requests")
        assert [w["in_flight"] for w in busy["workers"]] == [2, 2, 2, 2]
        # The supervisor samples the broker's per-worker load every poll_interval_ms.
        loads = wait_for(lambda: (d := [x["load"] for x in daemon.status()["devices"]]) == [4.0, 4.0] and d,
                         timeout=3, what="both devices loaded 4")
        assert loads == [4.0, 4.0]
        for stream in streams:
            assert [c.text for c in stream] == ["a", "b", "c", "d"]


def test_sticky_sessions_stay_on_one_worker(make_daemon):
    daemon = make_daemon(echo_config(replicas=3, max_concurrency=4, deployment='routing = "sticky"\n'
                                                                                "sticky_epsilon = 3.0\n"))
    with daemon.client() as client:
        streams = [client.generate("echo", "a b c", delay_ms=300, affinity="conversation-42") for _ in range(3)]
        busy = wait_for(lambda: sorted(w["in_flight"] for w in daemon.status()["workers"]) == [0, 0, 3],
                        timeout=3, what="the three requests of one session on one worker")
        assert busy
        for stream in streams:
            assert [c.text for c in stream] == ["a", "b", "c"]
    assert daemon.status()["deployments"]["echo"]["routing"] == "sticky"


def test_inferctl_devices_and_placement(make_daemon):
    daemon = make_daemon(echo_config(replicas=2, extra=TWO_CPUS))
    out = inferctl(daemon.runtime_dir, "devices")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "no GPU" in lines[0] and "2 CPU device(s)" in lines[0]
    rows = [line.split() for line in lines if line.startswith("cpu:")]
    assert [r[0] for r in rows] == ["cpu:0", "cpu:1"]
    assert all(r[1:4] == ["CPU", "(no", "GPU)"] for r in rows)
    devices = json.loads(inferctl(daemon.runtime_dir, "devices", "--json").stdout)
    assert [(d["id"], d["kind"], d["workers"]) for d in devices] == [("cpu:0", "cpu", ["echo-0"]),
                                                                        ("cpu:1", "cpu", ["echo-1"])]
    assert all(d["memory_free"] > 0 and d["utilization"] is None for d in devices)

    plan = json.loads(inferctl(daemon.runtime_dir, "placement", "--json").stdout)
    assert [(p["id"], p["device"]) for p in plan] == [("echo-0", "cpu:0"), ("echo-1", "cpu:1")]
    assert all(p["placed_by"].startswith("least-loaded") for p in plan)
    table = inferctl(daemon.runtime_dir, "placement").stdout
    assert "echo-1  echo" in table and "cpu:1" in table


def test_placement_dry_run_and_typed_errors(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(echo_config(replicas=3, extra=TWO_CPUS, deployment='placement = "round-robin"\n'))
    out = inferctl(tmp_path / "no-daemon", "placement", "--config", str(good))
    assert out.returncode == 0, out.stderr
    assert [line.split()[:4] for line in out.stdout.splitlines()[2:]] == [
        ["echo-0", "echo", line_node(out), "cpu:0"], ["echo-1", "echo", line_node(out), "cpu:1"],
        ["echo-2", "echo", line_node(out), "cpu:0"]]
    bad = tmp_path / "bad.toml"
    bad.write_text(echo_config(replicas=1, deployment='gpus_per_replica = 3\n'))
    out = inferctl(tmp_path / "no-daemon", "placement", "--config", str(bad))
    assert out.returncode == exitcodes.CONFIG == 78  # like `inferd --check`
    assert out.stderr.strip() == ("inferctl: NotEnoughGpus: deployment 'echo' needs 3 device(s) per replica; "
                                  f"the largest node, {line_node(out, bad=True)}, has 1")
    # The daemon refuses the same config at start, with the same message, and the config status.
    proc = subprocess.run([sys.executable, "-m", "inferd", "--config", str(bad), "--runtime-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == exitcodes.CONFIG
    assert "NotEnoughGpus: deployment 'echo' needs 3 device(s) per replica" in proc.stderr


def line_node(out, bad: bool = False) -> str:
    import os

    return os.uname().nodename

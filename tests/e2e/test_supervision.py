"""Supervision on the real daemon: every failure kind, injected through the echo runtime's faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from inferd import errors, exitcodes
from tests.daemon import echo_config, wait_for
from tests.e2e.test_inferctl import inferctl

FAULTS = "fault_injection = true\n"


def faulty(replicas: int = 1, deployment: str = "", daemon: str = "", options: str = FAULTS, **kw) -> str:
    return echo_config(replicas=replicas, deployment=deployment, daemon=daemon, options=options, **kw)


def ready_again(daemon, worker: str, restarts: int, timeout: float = 10) -> dict:
    return wait_for(lambda: (w := daemon.worker(worker))["state"] == "ready" and w["restarts"] == restarts and w,
                    timeout=timeout, what=f"{worker} ready after {restarts} restart(s)")


def test_faults_are_refused_unless_the_config_enables_them(daemon, tmp_path):
    with daemon.client() as client:
        # Not offered at all while fault injection is off: unknown, and not in the known list.
        with pytest.raises(errors.BadRequest, match=r"params\.fault: unknown; known: delay_ms, max_tokens$"):
            next(client.generate("echo", "x", fault="poison"))
        assert client.complete("echo", "still serving") == "still serving"
    assert all(w["restarts"] == 0 for w in daemon.status()["workers"])
    bad = tmp_path / "bad.toml"
    bad.write_text(echo_config(options='load_fault = "unrecoverable"\n'))
    out = subprocess.run([sys.executable, "-m", "inferd", "--config", str(bad), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == exitcodes.CONFIG
    assert "options.load_fault: not enabled for this deployment (options.fault_injection is not true)" in out.stderr


def test_poisoned_worker_is_restarted_and_serves_again(make_daemon):
    daemon = make_daemon(faulty())
    before = daemon.worker("echo-0")
    with daemon.client() as client:
        with pytest.raises(errors.ContextPoisoned, match="illegal memory access"):
            list(client.generate("echo", "a b c", fault="poison"))
        after = ready_again(daemon, "echo-0", restarts=1)
        assert after["pid"] != before["pid"]
        assert after["last_exit"] == "context poisoned (status 4)"
        assert client.complete("echo", "serving again") == "serving again"
    assert "the device context is poisoned" in daemon.logs()
    assert "context poisoned (status 4): restart, restarting in" in daemon.logs()


def test_poisoning_past_the_window_fails_the_worker_until_an_operator_restart(make_daemon):
    daemon = make_daemon(faulty(deployment="max_restarts = 3\nrestart_window_s = 60\n"))
    with daemon.client() as client:
        for restarts in (1, 2, 3):
            with pytest.raises(errors.ContextPoisoned):
                list(client.generate("echo", "x", fault="poison"))
            ready_again(daemon, "echo-0", restarts)
        with pytest.raises(errors.ContextPoisoned):
            list(client.generate("echo", "x", fault="poison"))
        failed = wait_for(lambda: (w := daemon.worker("echo-0"))["state"] == "failed" and w, what="echo-0 failed")
        assert failed["restarts"] == 3
        assert failed["last_exit"] == "context poisoned (status 4); restarted 3 times within 60 s"
        st = daemon.status()
        assert st["deployments"]["echo"]["state"] == "failed" and st["ready"] is False
        start = time.monotonic()
        with pytest.raises(errors.Unavailable, match="no worker left"):
            next(client.generate("echo", "x"))
        assert time.monotonic() - start < 1  # at once, not after waiting in the queue

        out = inferctl(daemon.runtime_dir, "restart", "echo-0")
        assert out.returncode == 0 and "restarting echo-0 (was failed)" in out.stdout
        ready_again(daemon, "echo-0", restarts=3)  # an operator restart is not counted
        assert client.complete("echo", "back in service") == "back in service"
        # The window was cleared: three more poisonings are restarted again.
        with pytest.raises(errors.ContextPoisoned):
            list(client.generate("echo", "x", fault="poison"))
        ready_again(daemon, "echo-0", restarts=4)
    assert daemon.status()["deployments"]["echo"]["state"] == "healthy"


def test_inferctl_restart_of_a_running_worker_and_of_an_unknown_one(daemon):
    pid = daemon.worker("echo-1")["pid"]
    out = inferctl(daemon.runtime_dir, "restart", "echo-1")
    assert out.returncode == 0 and "restarting echo-1 (was running)" in out.stdout
    again = wait_for(lambda: (w := daemon.worker("echo-1"))["state"] == "ready" and w["pid"] != pid and w)
    # Asked for, not a failure: not counted among the restarts, and said so.
    assert again["restarts"] == 0 and again["last_exit"] == "stopped for an operator restart"
    out = inferctl(daemon.runtime_dir, "restart", "nope-7")
    assert out.returncode == 1 and "no worker named 'nope-7'" in out.stderr


def test_out_of_memory_resumes_without_a_restart(make_daemon):
    daemon = make_daemon(faulty(max_concurrency=4))
    pid = daemon.worker("echo-0")["pid"]
    with daemon.client() as client:
        bystander = client.generate("echo", " ".join(["w"] * 30), delay_ms=100)
        next(bystander)
        with pytest.raises(errors.OutOfMemory):
            list(client.generate("echo", "x", fault="oom"))
        # The batch that ran out of memory failed; the worker carried on with later work.
        with pytest.raises(errors.OutOfMemory):
            list(bystander)
        assert client.complete("echo", "after the oom") == "after the oom"
    worker = wait_for(lambda: (w := daemon.worker("echo-0"))["resumes"] == 1 and w, what="the resume reported")
    assert (worker["pid"], worker["restarts"], worker["state"]) == (pid, 0, "ready")


def test_unrecoverable_load_stops_without_looping(make_daemon):
    daemon = make_daemon(faulty(replicas=2, options=FAULTS + 'load_fault = "unrecoverable"\n'), start=False)
    daemon.start(wait=False)
    wait_for(lambda: _states(daemon) == ["failed", "failed"], timeout=15, what="both workers failed")
    time.sleep(1.0)  # long enough for several restarts, had there been any
    st = daemon.status()
    assert [w["restarts"] for w in st["workers"]] == [0, 0]
    assert all(w["last_exit"] == "unrecoverable (status 3); unrecoverable: not restarted" for w in st["workers"])
    assert st["deployments"]["echo"]["state"] == "failed" and st["ready"] is False
    assert daemon.logs().count("started echo-0") == 1
    with daemon.client() as client, pytest.raises(errors.Unavailable):
        next(client.generate("echo", "x"))
    assert daemon.proc.poll() is None  # one deployment failing does not take the daemon down


def test_escalations_past_the_daemon_wide_intensity_exit_non_zero(make_daemon):
    daemon = make_daemon(faulty(replicas=2, deployment="max_restarts = 100\n",
                                daemon="escalation_max = 2\nescalation_window_s = 60\n"))
    st = daemon.status()
    pids = [st["broker"]["pid"]] + [w["pid"] for w in st["workers"]]
    for kills in (1, 2):  # a death by an outside signal is an unknown failure: Escalate
        victim = daemon.worker("echo-0")["pid"]
        os.kill(victim, signal.SIGKILL)
        pids.append(ready_again(daemon, "echo-0", restarts=kills)["pid"])
    os.kill(daemon.worker("echo-1")["pid"], signal.SIGKILL)  # the third, across children: one too many
    assert daemon.wait(15) == exitcodes.ESCALATED == 70
    assert "more than 2 escalations within 60 s across all children" in daemon.logs()
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=5, what="children gone")


def test_a_request_that_crashes_workers_is_retried_once_then_fails(make_daemon):
    daemon = make_daemon(faulty(replicas=2))
    with daemon.client() as client:
        # It crashes its worker before streaming anything: sent to the other worker once, which crashes too.
        with pytest.raises(errors.WorkerLost, match="killed by SIGSEGV"):
            list(client.generate("echo", "x", fault="crash"))
        for worker in ("echo-0", "echo-1"):
            assert ready_again(daemon, worker, restarts=1)["last_exit"] == "killed by SIGSEGV"
        assert client.complete("echo", "serving") == "serving"


def test_hung_worker_is_killed(make_daemon):
    daemon = make_daemon(faulty(deployment="watchdog_s = 1.0\n"))
    with daemon.client() as client:
        start = time.monotonic()
        # It hangs before streaming anything: re-dispatched once, hangs again, then WORKER_LOST.
        with pytest.raises(errors.WorkerLost, match="hung: no progress"):
            list(client.generate("echo", "x", fault="hang"))
        assert time.monotonic() - start < 8
        worker = ready_again(daemon, "echo-0", restarts=2)
        assert worker["last_exit"].startswith("killed: hung: no progress for")
        assert client.complete("echo", "unstuck") == "unstuck"
    assert "is unresponsive (hung: no progress" in daemon.logs()


def test_runtime_error_is_escalated_and_restarted(make_daemon):
    daemon = make_daemon(faulty())
    with daemon.client() as client:
        with pytest.raises(errors.Internal, match="injected fault: error"):
            list(client.generate("echo", "x", fault="error"))
        worker = ready_again(daemon, "echo-0", restarts=1)
        assert worker["last_exit"] == "exited with status 1"
        assert client.complete("echo", "fine") == "fine"


def test_status_shows_a_restarting_worker(make_daemon):
    daemon = make_daemon(faulty(daemon="restart_backoff_min_ms = 3000\n"))
    with daemon.client() as client, pytest.raises(errors.ContextPoisoned):
        list(client.generate("echo", "x", fault="poison"))
    st = wait_for(lambda: (s := daemon.status())["workers"][0]["state"] == "restarting" and s)
    assert st["deployments"]["echo"]["state"] == "unavailable" and st["ready"] is False
    assert 2.0 < st["workers"][0]["restart_in_s"] <= 3.6
    table = inferctl(daemon.runtime_dir, "status").stdout
    assert "restarting in" in table and "context poisoned (status 4)" in table and "NOT READY" in table


def _states(daemon) -> list[str]:
    try:
        return [w["state"] for w in daemon.status()["workers"]]
    except errors.InferdError:
        return []

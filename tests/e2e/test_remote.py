"""Remote deployments through a real daemon, streaming from a real HTTP upstream (tests/fake_upstream.py):
serving, secrecy of the key, a killed worker, an upstream outage and its recovery, egress placement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from inferd import errors
from tests.daemon import free_port, wait_for
from tests.fake_upstream import FakeUpstream

KEY = "sk-e2e-secret-4242424242"
WORDS = "alpha beta gamma delta epsilon zeta eta theta"


def remote_config(upstream: FakeUpstream, options: str = "", max_concurrency: int = 8, deployment: str = "",
                  node: str = "", gateway_port: int | None = None) -> str:
    gateway = f"[gateway]\nport = {gateway_port}\napi_keys_env = \"INFERD_TEST_NO_KEYS\"\n" if gateway_port else ""
    return gateway + f"""
[daemon]
log_level = "debug"
restart_backoff_min_ms = 50
[broker]
heartbeat_interval_ms = 200
heartbeat_liveness = 4
[node]
{node}
[[deployment]]
name = "cloud"
runtime = "remote"
max_concurrency = {max_concurrency}
{deployment}
[deployment.options]
base_url = "{upstream.base_url}"
model = "fake-model"
api_key_env = "INFERD_TEST_KEY"
max_retries = 1
backoff_base_ms = 20
backoff_cap_ms = 100
cooldown_ms = 300
probe_interval_ms = 200
connect_timeout_ms = 500
{options}
"""


@pytest.fixture
def remote_daemon(make_daemon, upstream, monkeypatch):
    monkeypatch.setenv("INFERD_TEST_KEY", KEY)  # the daemon inherits it; its workers read it
    return make_daemon(remote_config(upstream))


def test_streams_through_inferd_with_params_and_the_key(remote_daemon, upstream):
    with remote_daemon.client() as client:
        stream = client.generate("cloud", WORDS, max_tokens=5, temperature=0.0)
        assert "".join(c.text for c in stream) == "alpha beta gamma delta epsilon"
        assert stream.finish_reason == "length"
        assert stream.usage == {"prompt_tokens": 8, "completion_tokens": 5}   # the upstream's, through DONE
        assert client.complete("cloud", WORDS) == WORDS
        with pytest.raises(errors.BadRequest, match="delay_ms: unknown"):
            client.complete("cloud", WORDS, delay_ms=5)
    call = upstream.completion_calls()[0]
    assert call.body["max_tokens"] == 5 and call.body["temperature"] == 0.0 and call.body["model"] == "fake-model"
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    status = remote_daemon.status()
    worker = status["workers"][0]
    assert worker["device"] == "-" and worker["placed_by"].startswith("remote runtime: node")
    assert status["deployments"]["cloud"]["state"] == "healthy"
    # The worker reports its upstream figures with its heartbeats (a fraction of a second behind).
    wait_for(lambda: remote_daemon.metrics()["cloud"].get("upstream", {}).get("cloud-0", {}).get("status")
             == {"200": 2}, 5, what="the upstream figures")
    # The worker runs without torch: nothing of it is mapped into the process.
    maps = open(f"/proc/{worker['pid']}/maps").read()
    assert "torch" not in maps


def test_the_key_never_appears_in_status_metrics_logs_or_errors(make_daemon, monkeypatch):
    strict = FakeUpstream(api_key="sk-another-key").start()  # refuses ours, and echoes it back
    try:
        monkeypatch.setenv("INFERD_TEST_KEY", KEY)
        daemon = make_daemon(remote_config(strict))
        with daemon.client() as client:
            with pytest.raises(errors.UpstreamAuth) as info:
                client.complete("cloud", WORDS)
        assert KEY not in str(info.value) and KEY not in json.dumps(info.value.details)
        assert KEY in strict.completion_calls()[0].headers["Authorization"]
        status = wait_for(lambda: (s := daemon.status())["deployments"]["cloud"]["state"] == "degraded" and s, 5)
        assert "authentication failed (401)" in status["deployments"]["cloud"]["problems"][0]
        assert status["workers"][0]["restarts"] == 0
        inferctl = os.path.join(os.path.dirname(sys.executable), "inferctl")
        shown = subprocess.run([inferctl, "--runtime-dir", str(daemon.runtime_dir), "status"], capture_output=True,
                               text=True, env=dict(os.environ, INFERD_TEST_KEY=""))
        assert "cloud degraded" in shown.stdout and "authentication failed" in shown.stdout
        for text in (json.dumps(status), json.dumps(daemon.metrics()), daemon.logs(), daemon.config_path.read_text(),
                     shown.stdout):
            assert KEY not in text
    finally:
        strict.stop()


def test_killing_the_remote_worker_mid_stream_gives_finals_and_a_restart(make_daemon, monkeypatch):
    slow = FakeUpstream(itl_ms=100).start()
    try:
        monkeypatch.setenv("INFERD_TEST_KEY", KEY)
        daemon = make_daemon(remote_config(slow))
        pid = daemon.worker("cloud-0")["pid"]
        with daemon.client() as client:
            streams = [client.generate("cloud", " ".join(["w"] * 100)) for _ in range(3)]
            for stream in streams:
                next(iter(stream))                        # each has streamed a chunk
            os.kill(pid, signal.SIGKILL)
            for stream in streams:                        # and each gets its final: WORKER_LOST
                with pytest.raises(errors.WorkerLost):
                    for _ in stream:
                        pass
            wait_for(lambda: all(c.disconnected for c in slow.completion_calls()), 5,
                     what="the upstream to see every connection closed")
            worker = wait_for(lambda: (w := daemon.worker("cloud-0"))["state"] == "ready" and w["pid"] != pid and w,
                              15, what="the worker to be restarted")
            assert worker["restarts"] == 1
            assert client.complete("cloud", "back again") == "back again"
    finally:
        slow.stop()


def test_upstream_down_and_back_no_restart_storm_typed_errors_recovery(make_daemon, upstream, monkeypatch):
    monkeypatch.setenv("INFERD_TEST_KEY", KEY)
    monkeypatch.delenv("INFERD_TEST_NO_KEYS", raising=False)
    port = free_port()
    remote_daemon = make_daemon(remote_config(upstream, gateway_port=port))

    def ready() -> tuple[int, dict]:
        try:
            reply = urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5)
        except urllib.error.HTTPError as exc:
            reply = exc
        return reply.status, json.loads(reply.read())

    pid = remote_daemon.worker("cloud-0")["pid"]
    with remote_daemon.client() as client:
        assert client.complete("cloud", WORDS) == WORDS
        upstream.down()
        failures = []
        for _ in range(8):
            with pytest.raises(errors.UpstreamError) as info:
                client.complete("cloud", WORDS)
            failures.append(info.value)
        assert all(e.details["kind"] == "connection" for e in failures)
        status = wait_for(lambda: (s := remote_daemon.status())["deployments"]["cloud"]["state"] == "degraded" and s,
                          5, what="the deployment to show degraded")
        assert status["ready"]                            # degraded, still serving what it can
        code, body = wait_for(lambda: (r := ready())[1]["deployments"]["cloud"]["state"] == "degraded" and r, 5,
                              what="/ready to show the deployment degraded")
        assert code == 200 and "failure(s) in a row" in body["deployments"]["cloud"]["problems"][0]
        worker = status["workers"][0]
        assert (worker["pid"], worker["restarts"], worker["state"]) == (pid, 0, "ready")
        upstream.up()
        wait_for(lambda: remote_daemon.status()["deployments"]["cloud"]["state"] == "healthy", 10,
                 what="the deployment to recover by itself")
        assert ready()[1]["deployments"]["cloud"]["state"] == "healthy"
        assert client.complete("cloud", WORDS) == WORDS
    final = remote_daemon.worker("cloud-0")
    assert (final["pid"], final["restarts"]) == (pid, 0)
    wait_for(lambda: remote_daemon.metrics()["cloud"]["upstream"]["cloud-0"]["errors"]["connection"] >= 8, 5)
    assert remote_daemon.metrics()["cloud"]["failed"] == 8


def test_the_deadline_bounds_the_upstream_exchange(remote_daemon, upstream):
    upstream.fault("slow_first_byte", delay_ms=3000)
    with remote_daemon.client() as client:
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            client.complete("cloud", WORDS, deadline_ms=400)
        assert time.monotonic() - started < 2
    wait_for(lambda: upstream.completion_calls()[0].disconnected, 5, what="the upstream call to be dropped")


def test_cancel_closes_the_upstream_stream(make_daemon, monkeypatch):
    slow = FakeUpstream(itl_ms=100).start()
    try:
        monkeypatch.setenv("INFERD_TEST_KEY", KEY)
        daemon = make_daemon(remote_config(slow))
        with daemon.client() as client:
            stream = client.generate("cloud", " ".join(["w"] * 100))
            next(iter(stream))
            stream.cancel()
            call = slow.completion_calls()[0]
            wait_for(lambda: call.disconnected, 3, what="the upstream to see the connection closed")
            assert not call.completed and call.chunks < 20
    finally:
        slow.stop()


def test_no_egress_node_is_a_typed_placement_error(make_daemon, upstream, monkeypatch):
    monkeypatch.setenv("INFERD_TEST_KEY", KEY)
    daemon = make_daemon(remote_config(upstream, node="egress = false"), start=False)
    daemon.start(wait=False)
    assert daemon.wait(15) != 0
    assert "needs a node with network egress" in daemon.logs()

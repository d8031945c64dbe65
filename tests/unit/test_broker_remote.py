"""The broker's side of remote deployments: an unhealthy upstream degrades the deployment, upstream
figures reach METRICS, upstream errors reach the client typed and with their details."""

from __future__ import annotations

from inferd import protocol as P
from tests.unit.test_broker_core import Harness

PROBLEM = "http://up/v1: 3 failure(s) in a row, last: connection refused"


def heartbeat(h: Harness, wid: str, runner: dict) -> None:
    h.worker(wid, P.HEARTBEAT, state="ready", credits=2, in_flight=0, runner=runner)


def test_an_unhealthy_upstream_degrades_the_deployment_until_it_recovers():
    h = Harness()
    h.ready("echo-0")
    assert h.core.status()["deployments"]["echo"]["state"] == "healthy"
    heartbeat(h, "echo-0", {"health": "degraded", "problem": PROBLEM})
    status = h.core.status()
    dep = status["deployments"]["echo"]
    assert dep["state"] == "degraded" and dep["problems"] == [f"echo-0: {PROBLEM}"]
    assert status["ready"]  # degraded still serves: its requests get typed errors, not silence
    heartbeat(h, "echo-0", {"health": "ok", "problem": ""})
    dep = h.core.status()["deployments"]["echo"]
    assert (dep["state"], dep["problems"]) == ("healthy", [])


def test_upstream_figures_reach_metrics_per_worker():
    h = Harness()
    h.ready("echo-0")
    assert "upstream" not in h.metrics()
    figures = {"attempts": 3, "retries": 1, "status": {"200": 2, "503": 1}}
    heartbeat(h, "echo-0", {"health": "ok", "upstream": figures})
    assert h.metrics()["upstream"] == {"echo-0": figures}


def test_an_upstream_error_reaches_the_client_with_its_details():
    h = Harness()
    h.ready("echo-0")
    h.take()
    h.submit(1)
    rid = h.requests_sent(h.take())[0][1]
    details = {"upstream": "http://up/v1", "kind": "status", "status": 503, "attempts": 3}
    h.worker("echo-0", P.ERROR, rid=rid, code="UPSTREAM_ERROR", message="upstream answered 503", details=details)
    (client, command, body), = h.to_clients(h.take())
    assert command == P.ERROR
    assert (body["code"], body["details"]) == ("UPSTREAM_ERROR", details)
    assert h.metrics()["failed"] == 1


def test_the_watchdog_leaves_a_remote_worker_waiting_on_its_provider_alone():
    slow = {"broker": {"heartbeat_interval_ms": 1000, "heartbeat_liveness": 100}, "watchdog_s": 5.0}
    for runtime, options, hung in (("echo", {}, True),
                                   ("remote", {"base_url": "http://up/v1", "model": "m"}, False)):
        h = Harness(runtime=runtime, options=options, **slow)
        h.ready("echo-0")
        h.submit(1)
        for _ in range(10):                      # 10 s of heartbeats and no output at all
            h.advance(1.0)
            h.heartbeat("echo-0")
        unresponsive = [m for m in h.take() if m[2] == P.UNRESPONSIVE]
        assert bool(unresponsive) is hung, runtime

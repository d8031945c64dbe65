"""Live reload, scale and drain on a real daemon: under load, nothing accepted is left without its one final."""

from __future__ import annotations

import re
import signal
import threading
import time

import msgpack
import zmq

from inferd import exitcodes
from tests.daemon import echo_config, wait_for
from tests.e2e.test_chaos import SIG, ChaosClient, Req
from tests.e2e.test_inferctl import inferctl

DEADLINE_MS = 30_000


def deployment(name: str, replicas: int = 1, extra: str = "", options: str = "") -> str:
    return (f'[[deployment]]\nname = "{name}"\nruntime = "echo"\nreplicas = {replicas}\n{extra}'
            + (f"[deployment.options]\n{options}" if options else ""))


BEFORE = echo_config(replicas=2, daemon="drain_grace_s = 20\n") + "\n" + "\n".join([
    deployment("gone"), deployment("rolled", options="fault_injection = true\n"), deployment("scaled")])
# Every kind of change at once: broker keys of echo, a removed deployment, a new one, a roll, a scale.
AFTER = echo_config(replicas=2, daemon="drain_grace_s = 20\n", queue_capacity=512,
                    deployment='priority_levels = 2\ndefault_priority = 0\nrouting = "round-robin"\n') + "\n" + \
    "\n".join([deployment("fresh"), deployment("rolled", options="fault_injection = true\nload_delay_ms = 300\n"),
               deployment("scaled", replicas=3)])
TARGETS = ("echo", "gone", "rolled", "scaled", "fresh")


class LoadClient(ChaosClient):
    """test_chaos's raw client (every message checked, finals counted), over several deployments."""

    def _submit(self, sock: zmq.Socket) -> None:
        rid, self.next_id = self.next_id, self.next_id + 1
        words = [f"c{self.n}r{rid}w{i}" for i in range(self.rng.randint(3, 6))]
        req = Req(self.n, rid, words, time.monotonic(), DEADLINE_MS)
        req.deployment = TARGETS[(rid + self.n) % len(TARGETS)]
        self.reqs[rid] = req
        self.open.add(rid)
        sock.send_multipart([SIG, b"SUBMIT", msgpack.packb({
            "id": rid, "deployment": req.deployment, "prompt": " ".join(words), "params": {"delay_ms": 60}},
            use_bin_type=True)])


def test_reload_under_load_changes_every_kind_of_key_and_loses_nothing(make_daemon):
    daemon = make_daemon(BEFORE)
    before = {w["id"]: w["pid"] for w in daemon.status()["workers"]}
    stop = threading.Event()
    clients = [LoadClient(n, daemon.frontend, stop) for n in range(3)]
    for c in clients:
        c.start()
    time.sleep(1.5)
    daemon.config_path.write_text(AFTER)
    out = inferctl(daemon.runtime_dir, "reload", timeout=60)
    assert out.returncode == 0, out.stderr + daemon.logs()
    assert "start fresh; drain and remove gone; echo: broker settings" in out.stdout and "reload 1: done" in out.stdout
    time.sleep(1.5)  # load goes on over the new config
    stop.set()
    for c in clients:
        c.join(60)
    reqs = [r for c in clients for r in c.reqs.values()]
    assert not [c.crash for c in clients if c.crash]
    assert not [v for c in clients for v in c.violations]
    assert all(r.finals == 1 for r in reqs), [r.describe() for r in reqs if r.finals != 1][:5]
    accepted = [r for r in reqs if r.accepted]
    assert all(r.final == "DONE" for r in accepted), [r.describe() for r in accepted if r.final != "DONE"][:5]
    refused = {(r.deployment, r.final) for r in reqs if not r.accepted}
    assert refused <= {("gone", "REJECTED:UNKNOWN_DEPLOYMENT"), ("fresh", "REJECTED:UNKNOWN_DEPLOYMENT")}
    for name in ("echo", "rolled", "scaled", "gone", "fresh"):  # each had load, before or after
        assert any(r.deployment == name and r.final == "DONE" for r in accepted), name

    st = daemon.status()
    assert set(st["deployments"]) == {"echo", "fresh", "rolled", "scaled"}
    assert st["deployments"]["echo"]["routing"] == "round-robin"
    assert st["deployments"]["scaled"]["ready"] == 3 and st["deployments"]["fresh"]["ready"] == 1
    workers = {w["id"]: w for w in st["workers"]}
    assert not any(w.startswith("gone-") for w in workers)
    assert {w: workers[w]["pid"] for w in ("echo-0", "echo-1", "scaled-0")} == \
        {w: before[w] for w in ("echo-0", "echo-1", "scaled-0")}  # untouched by the reload
    rolled = [w for w in workers if w.startswith("rolled-")]
    assert len(rolled) == 1 and workers[rolled[0]]["pid"] != before["rolled-0"]
    logs = daemon.logs()
    # The roll: the new worker was ready before the old one was drained.
    new_ready = re.search(rf"inferd\[worker {rolled[0]}:\d+\] ready in", logs).start()
    assert new_ready < logs.index("draining worker rolled-0")
    assert "worker rolled-0 (pid" in logs and " lost:" not in logs
    assert "deployment gone removed" in logs and "reload 1 complete" in logs


def test_bad_reload_is_refused_and_the_old_config_keeps_serving(make_daemon, tmp_path):
    daemon = make_daemon(echo_config(replicas=1))
    bad = tmp_path / "bad.toml"
    bad.write_text(echo_config(replicas=1, deployment="replcias = 2\n"))
    out = inferctl(daemon.runtime_dir, "reload", "--config", str(bad))
    assert out.returncode == exitcodes.CONFIG, out
    assert f"bad config: {bad}: deployment[0] (echo).replcias: unknown key" in out.stderr
    unplaceable = tmp_path / "unplaceable.toml"
    unplaceable.write_text(echo_config(replicas=1, deployment="gpus_per_replica = 4\n"))
    out = inferctl(daemon.runtime_dir, "reload", "--config", str(unplaceable))
    assert out.returncode == exitcodes.CONFIG and "cannot place: NotEnoughGpus" in out.stderr
    fixed = tmp_path / "run-dir.toml"
    fixed.write_text(echo_config(replicas=1, daemon=f'runtime_dir = "{tmp_path}"\n'))
    out = inferctl(daemon.runtime_dir, "reload", "--config", str(fixed))
    assert out.returncode == exitcodes.CONFIG and "daemon.runtime_dir: cannot change on reload" in out.stderr
    with daemon.client() as client:
        assert client.complete("echo", "still serving") == "still serving"
    assert daemon.status()["daemon"]["config"] == str(daemon.config_path)
    shown = inferctl(daemon.runtime_dir, "status").stdout  # the last refusal, and why
    assert "reload 0: refused: bad config: " in shown and "daemon.runtime_dir: cannot change on reload" in shown
    # SIGHUP reloads the file the daemon runs; a good one now.
    daemon.config_path.write_text(echo_config(replicas=2))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: daemon.status()["deployments"]["echo"]["ready"] == 2, timeout=15, what="the SIGHUP reload")


def test_scale_lasts_until_the_next_reload(make_daemon):
    daemon = make_daemon(echo_config(replicas=1))
    out = inferctl(daemon.runtime_dir, "scale", "echo", "3")
    assert out.returncode == 0 and "lasts until the next reload or restart" in out.stdout, out
    wait_for(lambda: daemon.status()["deployments"]["echo"]["ready"] == 3, timeout=15, what="3 workers")
    assert daemon.status()["deployments"]["echo"]["replicas"] == 3
    out = inferctl(daemon.runtime_dir, "scale", "nope", "2")
    assert out.returncode == 1 and "no deployment named 'nope'; deployments: echo" in out.stderr
    assert inferctl(daemon.runtime_dir, "reload").returncode == 0  # back to the file's replicas = 1
    st = daemon.status()
    assert st["deployments"]["echo"]["ready"] == 1 and [w["id"] for w in st["workers"]] == ["echo-0"]


def test_drain_a_worker_then_restart_it(make_daemon):
    daemon = make_daemon(echo_config(replicas=2))
    with daemon.client() as client:
        words = [f"w{i}" for i in range(40)]  # 4 s of streaming: still running when the drain lands
        stream = client.generate("echo", " ".join(words), delay_ms=100)
        assert next(stream).text == "w0"
        busy = next(w["id"] for w in daemon.status()["workers"] if w["in_flight"])
        out = inferctl(daemon.runtime_dir, "drain", busy)
        assert out.returncode == 0 and f"draining {busy}" in out.stdout, out
        wait_for(lambda: daemon.worker(busy)["state"] == "draining", timeout=10, what="draining")
        for _ in range(4):  # new work goes to the other worker meanwhile
            assert client.complete("echo", "elsewhere") == "elsewhere"
        assert [c.text for c in stream] == words[1:]  # the drained worker finished its request
    wait_for(lambda: daemon.worker(busy)["state"] == "drained", timeout=10, what="drained, stopped")
    assert daemon.worker(busy)["pid"] == 0
    time.sleep(0.5)
    assert daemon.worker(busy)["state"] == "drained"  # it stays stopped
    assert inferctl(daemon.runtime_dir, "restart", busy).returncode == 0
    wait_for(lambda: daemon.worker(busy)["state"] == "ready", timeout=10, what="restarted")
    other = next(w["id"] for w in daemon.status()["workers"] if w["id"] != busy)
    pid = daemon.worker(other)["pid"]
    assert inferctl(daemon.runtime_dir, "drain", "--restart", other).returncode == 0
    wait_for(lambda: (w := daemon.worker(other))["state"] == "ready" and w["pid"] != pid, timeout=10,
             what="drained and started again")
    assert daemon.worker(other)["restarts"] == 0  # asked for, not a failure
    assert " lost:" not in daemon.logs()
    out = inferctl(daemon.runtime_dir, "drain", "nope")
    assert out.returncode == 1 and "no worker or deployment named 'nope'" in out.stderr

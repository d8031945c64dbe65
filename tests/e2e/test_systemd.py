"""inferd under a real systemd: the unit `inferd install-service` writes, started, reloaded, stopped,
restarted on escalation and on a watchdog timeout. Skips, saying why, where systemd cannot boot."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inferd import errors, protocol as P
from inferd.client import Client
from inferd.ctl import control_call
from inferd.service import GUIDE, render_unit
from tests.daemon import echo_config, wait_for
from tests.systemd import Systemd, Unavailable

INFERD = str(Path(sys.executable).parent / "inferd")
INFERCTL = str(Path(sys.executable).parent / "inferctl")
UNIT = "inferd.service"
CONFIG = "/etc/inferd/inferd.toml"
DROP_IN = "/etc/systemd/system/inferd.service.d/test.conf"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit as written for this environment; verify also checks that ExecStart exists."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / UNIT
    unit.write_text(render_unit(user="root", group="root", config=CONFIG))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # not even a warning
    text = unit.read_text()
    assert f"ExecStart={INFERD} --config {CONFIG} --runtime-dir ${{RUNTIME_DIRECTORY}}" in text
    for line in ("Type=notify", "User=root", "RuntimeDirectory=inferd", "ProtectSystem=strict", "StateDirectory=inferd",
                 "PrivateTmp=yes", "NoNewPrivileges=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
                 "ProtectKernelLogs=yes", "DevicePolicy=closed", "DeviceAllow=char-nvidia-frontend rw",
                 "DeviceAllow=char-nvidia-uvm rw", "DeviceAllow=char-nvidiactl rw", "DeviceAllow=char-nvidia-caps rw",
                 "RestartPreventExitStatus=78", "WatchdogSec=30",
                 f"ExecReload={INFERCTL} --runtime-dir ${{RUNTIME_DIRECTORY}} reload"):
        assert f"\n{line}\n" in text, line
    assert "\nPrivateDevices=" not in text
    assert f"Documentation=file://{GUIDE}\n" in text and GUIDE.is_file()


@pytest.fixture(scope="module")
def systemd():
    try:
        sd = Systemd().boot()
    except Unavailable as exc:
        pytest.skip(f"no systemd here: {exc}")
    if any(Path(p).resolve().is_relative_to("/tmp") for p in (sys.prefix, __file__)):
        sd.close()
        pytest.skip("this checkout is under /tmp, which the unit's PrivateTmp= hides from the service")
    try:
        sd.install_args = ["install-service"]
        out = sd.run(INFERD, *sd.install_args)
        assert out.returncode == 0, out.stdout + out.stderr
        sd.install_output = out.stdout
        if "cannot run" in out.stderr:  # an environment the inferd user cannot read (e.g. under /root)
            print(f"the inferd user cannot run this environment ({out.stderr.strip()}); the service runs as root")
            sd.install_args += ["--user", "root"]
            out = sd.run(INFERD, *sd.install_args)
            assert out.returncode == 0, out.stdout + out.stderr
        yield sd
    finally:
        sd.run("systemctl", "stop", UNIT)  # PrivateTmp's directory lies in this machine's /tmp: let systemd remove it
        sd.close()


class Service:
    """The installed inferd unit inside the namespace."""

    def __init__(self, sd: Systemd):
        self.sd = sd
        self.run_dir = sd.path("/run/inferd")
        self.since = sd.cursor()  # this test's journal only

    def configure(self, text: str) -> None:
        self.sd.path(CONFIG).write_text(text)

    def drop_in(self, text: str) -> None:
        path = self.sd.path(DROP_IN)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("[Service]\n" + text)
        assert self.sd.run("systemctl", "daemon-reload").returncode == 0

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.sd.run("systemctl", *args, UNIT, timeout=timeout)

    def show(self, *props: str) -> dict[str, str]:
        return self.sd.show(UNIT, *props)

    def status(self) -> dict:
        return control_call(self.run_dir, P.STATUS, 3.0)

    def client(self) -> Client:
        return Client(runtime_dir=self.run_dir)

    def journal(self) -> str:
        return self.sd.journal(UNIT, after=self.since)


@pytest.fixture
def service(systemd):
    svc = Service(systemd)
    svc.configure(echo_config(replicas=2, options="fault_injection = true\n"))
    yield svc
    svc.ctl("stop")
    svc.ctl("reset-failed")
    systemd.path(DROP_IN).unlink(missing_ok=True)
    systemd.run("systemctl", "daemon-reload")


def test_install_service_puts_the_unit_config_and_user_in_place(systemd):
    out = systemd.install_output
    assert "put the default config at /etc/inferd/inferd.toml" in out or "kept the config" in out
    assert "next: systemctl enable --now inferd" in out
    unit = systemd.path("/etc/systemd/system/inferd.service").read_text()
    assert f"ExecStart={INFERD} --config {CONFIG}" in unit
    verify = systemd.run("systemd-analyze", "verify", "/etc/systemd/system/inferd.service")
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    assert systemd.run("id", "inferd").returncode == 0  # the system user exists (in the namespace only)
    again = systemd.run(INFERD, *systemd.install_args)  # idempotent: the config in place is kept
    assert "kept the config already at /etc/inferd/inferd.toml" in again.stdout


def test_start_returns_once_serving_and_status_is_one_line(service):
    started = time.monotonic()
    out = service.ctl("start")
    assert out.returncode == 0, out.stderr + service.ctl("status").stdout
    # Type=notify: by the time `systemctl start` returns, every deployment serves (READY=1 comes
    # with the first ready worker of each).
    st = service.status()
    assert st["ready"] and st["deployments"]["echo"]["ready"] >= 1, st
    with service.client() as client:
        assert client.complete("echo", "served at once") == "served at once"
    # READY=1 came with the first ready worker of each deployment; STATUS= follows the rest.
    wait_for(lambda: service.show("StatusText")["StatusText"] == "serving: echo 2/2", timeout=10, what="STATUS=")
    assert 'Status: "serving: echo 2/2"' in service.ctl("status").stdout
    journal = service.journal()
    assert "inferd[supervisor:" in journal and "broker ready" in journal and "inferd[worker echo-0:" in journal
    assert time.monotonic() - started < 30


def test_reload_applies_a_changed_config(service):
    assert service.ctl("start").returncode == 0
    pid = service.show("MainPID")["MainPID"]
    service.configure(echo_config(replicas=3, options="fault_injection = true\n",
                                  extra='[[deployment]]\nname = "echo2"\nruntime = "echo"\n'))
    out = service.ctl("reload")
    assert out.returncode == 0, out.stderr
    # READY=1 after RELOADING=1 only once applied: the new deployment and the third worker serve now.
    st = service.status()
    assert st["deployments"]["echo"]["ready"] == 3 and st["deployments"]["echo2"]["ready"] == 1, st
    with service.client() as client:
        assert client.complete("echo2", "new deployment") == "new deployment"
    assert service.show("MainPID")["MainPID"] == pid
    assert service.show("StatusText")["StatusText"] == "serving: echo 3/3, echo2 1/1"
    # A bad config is refused: `systemctl reload` fails, nothing changes and the journal says why.
    service.configure(echo_config(replicas=1, deployment="replcias = 4\n"))
    assert service.ctl("reload").returncode != 0
    journal = service.journal()
    assert "reload refused" in journal and "deployment[0] (echo).replcias: unknown key" in journal
    assert service.status()["deployments"]["echo"]["ready"] == 3
    assert service.show("ActiveState")["ActiveState"] == "active"


def test_sighup_reload_is_seen_by_systemd_as_reloading_until_applied(service):
    service.configure(echo_config(replicas=1, options="fault_injection = true\n"))
    assert service.ctl("start").returncode == 0
    old = service.status()["workers"][0]["pid"]
    # A changed option rolls the worker, and the new one takes 3 s to load.
    service.configure(echo_config(replicas=1, options="fault_injection = true\nload_delay_ms = 3000\n"))
    service.sd.run("systemctl", "kill", "--kill-who=main", "-s", "SIGHUP", UNIT)  # no ExecReload involved
    # RELOADING=1 (with MONOTONIC_USEC) puts the unit in "reloading", READY=1 ends it once applied.
    wait_for(lambda: service.show("SubState")["SubState"] == "reload", timeout=5, what="systemd to see RELOADING=1")
    assert service.show("StatusText")["StatusText"].startswith("reloading (echo: roll workers (options))")
    with service.client() as client:  # the old worker serves meanwhile
        assert client.complete("echo", "during the roll") == "during the roll"
    wait_for(lambda: service.show("SubState")["SubState"] == "running", timeout=20, what="READY=1 after the reload")
    workers = service.status()["workers"]
    assert len(workers) == 1 and workers[0]["pid"] != old and workers[0]["state"] == "ready"
    assert service.show("StatusText")["StatusText"] == "serving: echo 1/1"


def test_stop_drains_every_accepted_request(service):
    # The requests take about 2 s: past TimeoutStopSec=1, which the drain extends (EXTEND_TIMEOUT_USEC).
    service.drop_in("TimeoutStopSec=1\n")
    assert service.ctl("start").returncode == 0
    results: dict[int, str] = {}

    def one(i: int) -> None:
        with service.client() as client:
            try:
                results[i] = client.complete("echo", " ".join(f"w{j}" for j in range(10)), delay_ms=200)
            except errors.InferdError as exc:
                results[i] = exc.code.value

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    wait_for(lambda: service.status()["deployments"]["echo"]["in_flight"] >= 12, timeout=10, what="in flight")
    out = service.ctl("stop")
    assert out.returncode == 0
    for t in threads:
        t.join(30)
    assert results == {i: " ".join(f"w{j}" for j in range(10)) for i in range(12)}
    props = service.show("ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    journal = service.journal()
    assert "drain complete" in journal and "inferd stopped (exit status 0)" in journal


def test_bad_config_exits_78_and_is_not_restarted(service):
    service.configure('[[deployment]]\nname = "x"\nruntime = "nope"\n')
    out = service.ctl("start")
    assert out.returncode != 0
    time.sleep(3)  # past RestartSec=2: a restart would have happened by now
    props = service.show("ActiveState", "ExecMainStatus", "NRestarts", "Result")
    assert props == {"ActiveState": "failed", "ExecMainStatus": "78", "NRestarts": "0", "Result": "exit-code"}
    assert "deployment[0] (x).runtime: expected one of" in service.journal()


def test_escalation_exits_70_and_systemd_restarts_it(service):
    service.configure(echo_config(replicas=1, options="fault_injection = true\n",
                                  daemon="escalation_max = 1\nescalation_window_s = 60\n"))
    assert service.ctl("start").returncode == 0
    first = service.show("MainPID")["MainPID"]
    # Its worker crashes; the broker dispatches the request once more (nothing was streamed) to the
    # restarted worker, which crashes too: two unknown failures, past escalation_max = 1.
    with service.client() as client:
        with pytest.raises(errors.InferdError):
            client.complete("echo", "x", fault="crash")
    wait_for(lambda: "code=exited, status=70" in service.journal(), timeout=20, what="exit 70")
    assert "giving up: more than 1 escalations within 60 s" in service.journal()
    wait_for(lambda: service.show("NRestarts")["NRestarts"] == "1" and service.show("ActiveState")["ActiveState"]
             == "active", timeout=30, what="systemd to restart inferd")
    assert service.show("MainPID")["MainPID"] != first
    wait_for(lambda: (s := _status(service)) and s["ready"], timeout=15, what="serving again")


def test_watchdog_kills_and_restarts_a_wedged_supervisor(service):
    service.drop_in("WatchdogSec=3\n")
    service.configure(echo_config(replicas=1, daemon="fault_injection = true\n"))
    assert service.ctl("start").returncode == 0
    first = service.show("MainPID")["MainPID"]
    time.sleep(4)  # longer than WatchdogSec: WATCHDOG=1 keeps it alive
    assert service.show("MainPID", "NRestarts") == {"MainPID": first, "NRestarts": "0"}
    service.sd.run("systemctl", "kill", "--kill-who=main", "-s", "SIGUSR2", UNIT)  # fault injection: wedge
    wait_for(lambda: "Watchdog timeout" in service.journal(), timeout=15, what="the watchdog to fire")
    wait_for(lambda: service.show("NRestarts")["NRestarts"] == "1" and service.show("ActiveState")["ActiveState"]
             == "active", timeout=30, what="systemd to restart inferd")
    assert service.show("MainPID")["MainPID"] != first
    assert "fault injection: the main loop wedges now" in service.journal()


def test_long_model_load_extends_the_start_timeout(service):
    service.drop_in("TimeoutStartSec=3\n")
    service.configure(echo_config(replicas=1, options="fault_injection = true\nload_delay_ms = 7000\n"))
    started = time.monotonic()
    out = service.ctl("start")
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr + service.journal()
    assert took > 6, took  # the load took 7 s, past TimeoutStartSec=3: EXTEND_TIMEOUT_USEC held it off
    assert service.show("ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}


def _status(service: Service) -> dict | None:
    try:
        return service.status()
    except Exception:
        return None


def test_uninstall_service_removes_the_unit_and_keeps_the_config(systemd):
    out = systemd.run(INFERD, "uninstall-service")
    assert out.returncode == 0, out.stderr
    assert "removed /etc/systemd/system/inferd.service" in out.stdout
    assert "kept /etc/inferd (remove it with --purge)" in out.stdout
    assert not systemd.path("/etc/systemd/system/inferd.service").exists()
    assert systemd.path(CONFIG).exists()
    assert "could not be found" in systemd.run("systemctl", "status", UNIT).stderr

"""inferd under a real supervisord, configured like etc/supervisord.conf."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from inferd.ctl import control_call
from inferd import protocol as P
from inferd.client import Client
from tests.daemon import echo_config, wait_for

BIN = Path(sys.executable).parent
SUPERVISORD = shutil.which("supervisord", path=str(BIN))
pytestmark = pytest.mark.skipif(SUPERVISORD is None, reason="supervisor is not installed (pip install '.[test]')")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def supervised(request):
    home = Path(tempfile.mkdtemp(prefix="ifd-sv-", dir="/tmp"))
    (home / "inferd.toml").write_text(getattr(request, "param", None) or echo_config(replicas=1))
    shipped = configparser.RawConfigParser()
    shipped.read(REPO / "etc" / "supervisord.conf")
    # The shipped file with this test's paths: same program settings, private sockets and logs.
    shipped["supervisord"].update(logfile=str(home / "supervisord.log"), pidfile=str(home / "supervisord.pid"))
    shipped["unix_http_server"]["file"] = str(home / "supervisor.sock")
    shipped["supervisorctl"]["serverurl"] = f"unix://{home / 'supervisor.sock'}"
    program = shipped["program:inferd"]
    program["command"] = f"{sys.executable} -m inferd --config {home / 'inferd.toml'} --runtime-dir {home / 'run'}"
    program["stdout_logfile"] = str(home / "inferd.log")
    conf = home / "supervisord.conf"
    with open(conf, "w") as fh:
        shipped.write(fh)
    proc = subprocess.Popen([SUPERVISORD, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ctl(*args: str) -> str:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), *args], capture_output=True,
                              text=True, timeout=60).stdout

    yield home, ctl
    ctl("shutdown")
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(home, ignore_errors=True)


def test_supervisord_runs_and_stops_inferd_cleanly(supervised):
    home, ctl = supervised
    run = home / "run"
    wait_for(lambda: "RUNNING" in ctl("status", "inferd"), timeout=20, what="supervisord to report RUNNING")
    st = wait_for(lambda: (s := _status(run)) and s["ready"] and s, timeout=20, what="inferd ready")
    pids = [st["broker"]["pid"]] + [w["pid"] for w in st["workers"]]
    with Client(runtime_dir=run) as client:
        assert client.complete("echo", "under supervisord") == "under supervisord"
    ctl("stop", "inferd")
    assert "STOPPED" in ctl("status", "inferd")  # exit 0 after the drain: an expected exit
    log = (home / "inferd.log").read_text()
    assert "drain complete" in log and "inferd stopped" in log
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


@pytest.mark.parametrize("supervised", ['[[deployment]]\nname = "x"\nruntime = "nope"\n'], indirect=True)
def test_supervisord_does_not_loop_on_a_bad_config(supervised):
    home, ctl = supervised
    wait_for(lambda: "FATAL" in ctl("status", "inferd"), timeout=40, what="supervisord to give up")
    log = (home / "inferd.log").read_text()
    # One start plus startretries (3) retries, each refused with the config error, and no more.
    assert log.count("deployment[0] (x).runtime: expected one of") == 4


def _status(run: Path):
    try:
        return control_call(run, P.STATUS, 1.0)
    except Exception:
        return None

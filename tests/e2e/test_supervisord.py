"""inferd under a real supervisord, run on the shipped etc/supervisord.conf exactly as its header says."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from inferd import protocol as P
from inferd.client import Client
from inferd.ctl import control_call
from tests.daemon import wait_for

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
SHIPPED = REPO / "etc" / "supervisord.conf"
pytestmark = pytest.mark.skipif(not (VENV / "bin" / "supervisord").exists(),
                                reason="no .venv with supervisor in this checkout (the README's test command makes one)")


class Supervisord:
    """`.venv/bin/supervisord -c etc/supervisord.conf` from a checkout root, as the file's header says."""

    def __init__(self, root: Path, run_dir: Path):
        self.root = root
        self.lines: list[str] = []
        # The daemon's runtime dir is the one thing set from outside (as an operator may): tests on
        # this machine must not share /run/inferd.
        env = dict(os.environ, INFERD_RUNTIME_DIR=str(run_dir))
        # A pipe, not a file: supervisord reopens /dev/stdout for each log, which on a file would
        # start writing at its beginning again.
        self.proc = subprocess.Popen([str(root / ".venv/bin/supervisord"), "-c", "etc/supervisord.conf"], cwd=root,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace")
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def ctl(self, *args: str) -> str:
        return subprocess.run([str(self.root / ".venv/bin/supervisorctl"), "-c", "etc/supervisord.conf", *args],
                              cwd=self.root, capture_output=True, text=True, timeout=90).stdout

    def output(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ctl("shutdown")
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reader.join(10)


@pytest.fixture
def home():
    path = Path(tempfile.mkdtemp(prefix="ifd-sv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_shipped_supervisord_conf_runs_and_stops_inferd_cleanly(home):
    run = home / "run"
    sv = Supervisord(REPO, run)  # this checkout, its .venv, the shipped file and etc/inferd.toml as they are
    try:
        wait_for(lambda: "RUNNING" in sv.ctl("status", "inferd"), timeout=30, what="supervisord to report RUNNING")
        # Serving, not fully loaded: smol's model takes a minute to load, and test_hf covers it. Stopping
        # while it loads is part of stopping cleanly.
        st = wait_for(lambda: (s := _status(run)) and s["deployments"].get("echo", {}).get("ready") and s,
                      timeout=60, what="inferd serving echo")
        assert set(st["deployments"]) == {"echo", "tiny", "smol"}  # the default config
        pids = [st["broker"]["pid"]] + [w["pid"] for w in st["workers"]]
        with Client(runtime_dir=run) as client:
            assert client.complete("echo", "under supervisord") == "under supervisord"
        assert "stopped" in sv.ctl("stop", "inferd")
        assert "STOPPED" in sv.ctl("status", "inferd")  # exit 0 after the drain: an expected exit
        out = sv.output()
        assert f"config {REPO}/etc/inferd.toml" in out.replace("/etc/../", "/")
        assert "drain complete" in out and "inferd stopped (exit status 0)" in out
        assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    finally:
        sv.close()


def test_supervisord_does_not_loop_on_a_bad_config(home):
    # A checkout whose etc/inferd.toml is bad: the shipped file byte for byte, the same .venv.
    (home / "etc").mkdir()
    shutil.copyfile(SHIPPED, home / "etc" / "supervisord.conf")
    (home / "etc" / "inferd.toml").write_text('[[deployment]]\nname = "x"\nruntime = "nope"\n')
    # Its .venv holds the control socket and pid file: one of its own, running the real one's bin.
    (home / ".venv").mkdir()
    (home / ".venv" / "bin").symlink_to(VENV / "bin")
    sv = Supervisord(home, home / "run")
    try:
        wait_for(lambda: "FATAL" in sv.ctl("status", "inferd"), timeout=60, what="supervisord to give up")
        # One start plus startretries (3) retries, each refused with the config error, and no more
        # (the output is read from a pipe by a thread: it may trail supervisord's state a little).
        refusals = lambda: sv.output().count("deployment[0] (x).runtime: expected one of")  # noqa: E731
        wait_for(lambda: refusals() >= 4, timeout=10, what="four refusals in the output")
        time.sleep(1)
        assert refusals() == 4
    finally:
        sv.close()


def _status(run: Path):
    try:
        return control_call(run, P.STATUS, 1.0)
    except Exception:
        return None

"""A real systemd, booted as PID 1 of a private PID and mount namespace, for the service tests.

Inside it systemctl, journalctl and sd_notify work for real. Nothing of this
machine boots or changes:

* the distribution's unit directory is hidden behind a private, minimal one
  (journald and empty targets), so none of its units start. This matters:
  among them is systemd-tmpfiles-setup, which would empty this machine's real
  /tmp, checkouts included;
* /run is a private tmpfs; /etc and /var are overlays whose writes land in it,
  so installing the unit, the config and the system user, and the state and
  journal directories, touch only the namespace;
* the rest of the filesystem (this checkout, its .venv) is the machine's own.

Killing the namespace's PID 1 ends every process in it. Where systemd cannot
boot (not root, no unshare, no overlayfs, a container that forbids it) the
fixture raises :class:`Unavailable` with the reason, and tests skip with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
UNITS = "/usr/lib/systemd/system"

BOOT = r"""
set -e
mount -t tmpfs -o mode=755 tmpfs /run
w=/run/inferd-tests
mkdir -p $w/units $w/etc-system $w/etc/upper $w/etc/work $w/var/upper $w/var/work /run/systemd/system
mount -t overlay overlay -o lowerdir=/etc,upperdir=$w/etc/upper,workdir=$w/etc/work /etc
mount -t overlay overlay -o lowerdir=/var,upperdir=$w/var/upper,workdir=$w/var/work /var
for t in default sysinit basic shutdown multi-user network network-online sockets timers paths slices \
         local-fs local-fs-pre remote-fs umount final emergency rescue graphical nss-lookup time-sync; do
  printf '[Unit]\nDescription=%s (inferd tests)\n' "$t" > $w/units/$t.target
done
for f in systemd-journald.service systemd-journald.socket systemd-journald-dev-log.socket; do
  [ -f "$UNITS/$f" ] && cp "$UNITS/$f" $w/units/
done
mkdir -p $w/units/sockets.target.wants $w/units/sysinit.target.wants
ln -sf ../systemd-journald.socket $w/units/sockets.target.wants/
ln -sf ../systemd-journald-dev-log.socket $w/units/sockets.target.wants/
ln -sf ../systemd-journald.service $w/units/sysinit.target.wants/
# The safety rule: the distribution's units (and the machine's enabled ones) stay hidden.
mount --bind $w/units "$UNITS"
mount --bind $w/etc-system /etc/systemd/system
export container=other
# Its own messages ("Main process exited", "Watchdog timeout") go to the journal, as on a real system.
exec /lib/systemd/systemd --system --unit=default.target --log-target=journal --show-status=no
"""


class Unavailable(Exception):
    """systemd cannot boot here; the message says why."""


class Systemd:
    def __init__(self, boot_s: float = 30.0):
        self.boot_s = boot_s
        self.pid1: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="inferd-systemd-", suffix=".log")

    def boot(self) -> "Systemd":
        if os.geteuid() != 0:
            raise Unavailable("booting systemd in a namespace needs root")
        for tool in ("unshare", "nsenter", "systemctl", "journalctl"):
            if shutil.which(tool) is None:
                raise Unavailable(f"{tool} is not installed")
        if not os.access(SYSTEMD, os.X_OK):
            raise Unavailable(f"{SYSTEMD} is not installed")
        if "overlay" not in Path("/proc/filesystems").read_text():
            raise Unavailable("the kernel has no overlayfs (the namespace's /etc and /var are overlays)")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private",
             "/bin/bash", "-c", BOOT], env={**os.environ, "UNITS": UNITS}, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.boot_s
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.pid1 is None:
                self.pid1 = self._find_pid1()
            if self.pid1 is not None:
                state = self.run("systemctl", "is-system-running", timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            time.sleep(0.1)
        tail = Path(self._log.name).read_text(errors="replace").strip().splitlines()[-5:]
        self.close()
        raise Unavailable(f"systemd did not boot within {self.boot_s:g} s (state: {state or 'none'}): "
                          + " | ".join(tail))

    def _find_pid1(self) -> int | None:
        """The namespace's systemd: the child of unshare (which forked it into the new PID namespace)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if comm == "systemd" and int(fields[1]) == self.proc.pid:
                return int(entry.name)
        return None

    def run(self, *args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the namespace (its mounts, its systemd)."""
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "--wd=/", *args], capture_output=True,
                              text=True, timeout=timeout, input=input)

    def path(self, path: str) -> Path:
        """A path of the namespace, reachable from here through /proc/PID/root."""
        return Path(f"/proc/{self.pid1}/root") / path.lstrip("/")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str | None:
        """The journal's position now (None while it is empty): :meth:`journal` after it shows
        only what was logged since."""
        out = self.run("journalctl", "-n", "1", "--show-cursor", "--no-pager", "-o", "cat").stdout
        lines = [line for line in out.splitlines() if line.startswith("-- cursor: ")]
        return lines[-1][len("-- cursor: "):].strip() if lines else None

    def journal(self, unit: str, after: str | None = None) -> str:
        since = [f"--after-cursor={after}"] if after else []
        return self.run("journalctl", "-u", unit, *since, "--no-pager", "-o", "cat").stdout

    def close(self) -> None:
        if self.pid1 is not None:
            try:
                os.kill(self.pid1, 9)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._log.close()

"""systemd's notify protocol (Type=notify), in pure Python.

A datagram on $NOTIFY_SOCKET; a leading '@' means the abstract namespace.
Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same in a
terminal, under supervisord or under systemd.

The supervisor is the only process that speaks it: the variables are taken
out of the environment here, so no child inherits them. With ``WatchdogSec=``
systemd sets WATCHDOG_USEC (and WATCHDOG_PID): the main loop must then send
WATCHDOG=1 more often than that; :attr:`Notifier.watchdog_s` is half of it.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self) -> None:
        addr = os.environ.pop("NOTIFY_SOCKET", "")  # children must not inherit it
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        self._addr = addr or None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if addr else None
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Half of systemd's limit, as sd_watchdog_enabled(3) advises; None without a watchdog.
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine and self._sock else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str) -> None:
        if self._sock is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._addr)
        except OSError:
            pass  # systemd went away or never listened; nothing useful to do

    def reloading(self, status: str) -> None:
        """RELOADING=1 with MONOTONIC_USEC: without it `systemctl reload` may never return."""
        self.notify(reloading="1", monotonic_usec=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000),
                    status=status)

    def extend_timeout(self, seconds: float) -> None:
        """Push systemd's start (or reload, or stop) timeout to ``seconds`` from now."""
        self.notify(extend_timeout_usec=str(int(seconds * 1e6)))

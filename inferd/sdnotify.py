"""systemd's notify protocol (Type=notify), in pure Python.

A datagram on $NOTIFY_SOCKET; a leading '@' means the abstract namespace.
Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same in a
terminal, under supervisord or under systemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self) -> None:
        addr = os.environ.pop("NOTIFY_SOCKET", "")  # children must not inherit it
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        self._addr = addr or None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if addr else None

    def notify(self, **fields: str) -> None:
        if self._sock is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._addr)
        except OSError:
            pass  # systemd went away or never listened; nothing useful to do

"""The runtime directory: where the ipc sockets live, and who owns it.

ZeroMQ's ipc bind silently replaces an existing socket path, so a second
daemon started on the same directory would steal the first one's clients.
The supervisor therefore holds an exclusive ``flock`` on ``inferd.lock`` for
its whole life; a second daemon fails to take it and refuses to start. The
lock dies with the process, so a crashed daemon never blocks its successor.

The directory is created 0700 and every socket is bound under umask 177 (files
0600), so no socket file is ever reachable by other users. A clean exit
removes the socket files; a killed daemon leaves them, and clients tell that
from a live daemon by the lock (:func:`daemon_alive`), not by the files.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IPC_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the NUL


class RuntimeDirError(Exception):
    pass


class RuntimeDirBusy(RuntimeDirError):
    def __init__(self, path: Path, pid: str):
        super().__init__(f"another inferd (pid {pid or 'unknown'}) is already serving {path}")
        self.pid = pid


def default_runtime_dir() -> Path:
    """Where clients look, and where the daemon binds when nothing else is said."""
    env = os.environ.get("INFERD_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/inferd")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "inferd"
    return Path(f"/tmp/inferd-{os.geteuid()}")


@dataclass(frozen=True)
class Endpoints:
    runtime_dir: Path
    frontend: str
    backend: str
    control: str
    supervisor: str

    @classmethod
    def for_dir(cls, runtime_dir: Path, frontend: str | None = None) -> "Endpoints":
        def ipc(name: str) -> str:
            return f"ipc://{runtime_dir / name}"

        return cls(runtime_dir, frontend or ipc("frontend.sock"), ipc("backend.sock"), ipc("control.sock"),
                   ipc("supervisor.sock"))

    def ipc_paths(self) -> list[str]:
        return [e[len("ipc://"):] for e in (self.frontend, self.backend, self.control, self.supervisor)
                if e.startswith("ipc://")]


def prepare(runtime_dir: Path, endpoints: Endpoints) -> None:
    """Create the directory private to this user and check the socket paths fit."""
    for path in endpoints.ipc_paths():
        if len(path.encode()) > IPC_PATH_MAX:
            raise RuntimeDirError(f"socket path {path} is longer than {IPC_PATH_MAX} bytes; "
                                  f"choose a shorter --runtime-dir")
    try:
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if runtime_dir.stat().st_uid == os.geteuid():
            runtime_dir.chmod(0o700)
    except OSError as exc:
        raise RuntimeDirError(f"cannot create runtime dir {runtime_dir}: {exc.strerror}") from None
    mode = runtime_dir.stat().st_mode & 0o777
    if mode & 0o007:
        raise RuntimeDirError(f"runtime dir {runtime_dir} is accessible to other users (mode {mode:o})")


def lock(runtime_dir: Path) -> int:
    """Take the daemon lock; returns the fd, which must stay open. Raises RuntimeDirBusy."""
    path = runtime_dir / "inferd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RuntimeDirBusy(runtime_dir, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def daemon_alive(runtime_dir: Path) -> bool | None:
    """Whether a daemon holds ``runtime_dir``'s lock: True/False, or None when it cannot be checked.

    Socket files outlive a daemon that was killed, and connecting to one that
    nobody listens on makes ZeroMQ retry silently for ever; the lock cannot lie.
    """
    try:
        fd = os.open(runtime_dir / "inferd.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_sockets(endpoints: Endpoints) -> None:
    """Remove the ipc socket files of a daemon that has stopped, so none is left to mislead a client."""
    for path in endpoints.ipc_paths():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@contextmanager
def private_umask() -> Iterator[None]:
    """Bind sockets inside this block so their files are created 0600 (ZeroMQ creates them 0777 & ~umask)."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)

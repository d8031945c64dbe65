"""CURVE keys for a tcp:// frontend (ZeroMQ RFC 26, clients allowed through ZAP, RFC 27).

An ipc frontend is guarded by file permissions; a tcp one by nothing but
this. The broker holds a server key pair and serves only the clients whose
public keys are in a directory the operator controls; the traffic is
encrypted. Keys are files in ZeroMQ's own certificate format (``zmq.auth``):
``NAME.key`` holds a public key, ``NAME.key_secret`` the pair. A secret key is
read from its file and handed to libzmq, never logged, never put in the
config that the supervisor passes to its children, never sent anywhere; a
secret key file that others may read is refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85


class CurveKeyError(Exception):
    """A key file that is missing, unreadable, malformed or readable by others."""


def load_public(path: str | os.PathLike) -> bytes:
    """A public key from a ``.key`` or ``.key_secret`` file, or given inline as 40 Z85 characters."""
    text = str(path)
    if len(text) == 40 and not os.path.exists(text):
        try:
            zmq.utils.z85.decode(text)
        except Exception:
            raise CurveKeyError(f"{text!r} is neither a key file nor a Z85 public key") from None
        return text.encode()
    public, _ = _load(Path(text))
    return public


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """The (public, secret) pair from a ``.key_secret`` file that only its owner can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CurveKeyError(f"secret key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CurveKeyError(f"secret key file {path} is accessible to other users (mode {mode & 0o777:o}); "
                            f"chmod 600 it")
    public, secret = _load(path)
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (a .key file is the public half; use the .key_secret)")
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except OSError as exc:
        raise CurveKeyError(f"key file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # zmq.auth raises ValueError or ZMQError on a malformed file
        raise CurveKeyError(f"key file {path} is not a ZeroMQ certificate: {exc}") from None


def allowed_clients(directory: str | os.PathLike) -> list[Path]:
    """The public key files in ``directory``; raises CurveKeyError if there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CurveKeyError(f"allowed clients directory {directory}: not a directory")
    keys = sorted(directory.glob("*.key"))
    for key in keys:
        _load(key)
    if not keys:
        raise CurveKeyError(f"allowed clients directory {directory} holds no public key (*.key) file")
    return keys


def generate(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (directory / f"{name}{suffix}").exists():
            raise CurveKeyError(f"{directory / (name + suffix)} exists; not overwriting a key")
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs to reach a CURVE frontend: the server's public key and its own pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: str | os.PathLike, client_key: str | os.PathLike) -> "ClientKeys":
        public, secret = load_secret(client_key)
        return cls(load_public(server_key), public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def __repr__(self) -> str:  # never print a secret key
        return f"ClientKeys(server_public={self.server_public.decode()}, public={self.public.decode()})"


def serve(ctx: zmq.Context, sock: zmq.Socket, secret_key: str, clients_dir: str):
    """Make ``sock`` a CURVE server admitting only ``clients_dir``'s keys; returns the running authenticator.

    The authenticator answers ZAP requests from a thread of its own; stop it before
    terminating the context.
    """
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = load_secret(secret_key)
    allowed_clients(clients_dir)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(clients_dir))
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return auth

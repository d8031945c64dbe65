"""Typed error codes shared by the wire protocol and the Python client.

Errors cross process boundaries as a code, a human message and optional
details, never as a traceback. On the client side each code maps to an
exception class under :class:`InferdError`, so callers can catch exactly the
failures they know how to handle (``except Backpressure: sleep(e.retry_after)``).
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_DEPLOYMENT = "UNKNOWN_DEPLOYMENT"
    BACKPRESSURE = "BACKPRESSURE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    CONTEXT_POISONED = "CONTEXT_POISONED"
    UNAVAILABLE = "UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    SLOW_READER = "SLOW_READER"
    CONNECTION_RESET = "CONNECTION_RESET"
    INTERNAL = "INTERNAL"
    # A remote deployment's provider (inferd/runtimes/remote): it refused our credentials, or
    # it failed (5xx, a timeout, a dropped or malformed stream) after any retries.
    UPSTREAM_AUTH = "UPSTREAM_AUTH"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"


class InferdError(Exception):
    """Base of every error inferd reports. ``code`` is an :class:`ErrorCode`."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class BadRequest(InferdError):
    code = ErrorCode.BAD_REQUEST


class UnknownDeployment(InferdError):
    code = ErrorCode.UNKNOWN_DEPLOYMENT


class Backpressure(InferdError):
    """The deployment's queue is full. ``retry_after_ms`` is the broker's hint."""

    code = ErrorCode.BACKPRESSURE

    @property
    def retry_after_ms(self) -> int | None:
        return self.details.get("retry_after_ms")


class DeadlineExceeded(InferdError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(InferdError):
    code = ErrorCode.CANCELLED


class WorkerLost(InferdError):
    code = ErrorCode.WORKER_LOST


class OutOfMemory(InferdError):
    code = ErrorCode.OUT_OF_MEMORY


class ContextPoisoned(InferdError):
    code = ErrorCode.CONTEXT_POISONED


class Unavailable(InferdError):
    code = ErrorCode.UNAVAILABLE


class DaemonNotRunning(Unavailable):
    """Raised on the client side when no daemon serves the runtime dir; never sent on the wire."""


class ShuttingDown(InferdError):
    code = ErrorCode.SHUTTING_DOWN


class SlowReader(InferdError):
    """The connection read its replies too slowly; the broker stopped its requests."""

    code = ErrorCode.SLOW_READER


class ConnectionReset(InferdError):
    """The connection was reset while the request was in flight (e.g. after an oversize message)."""

    code = ErrorCode.CONNECTION_RESET


class MessageTooLarge(BadRequest):
    """Raised on the client side, before sending, for a message over the daemon's max_message_bytes.

    Never sent on the wire: ZeroMQ would drop the connection instead of delivering it."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the request is {size} bytes, over the daemon's max_message_bytes of {limit}",
                         {"size": size, "limit": limit})
        self.size = size
        self.limit = limit


class Internal(InferdError):
    code = ErrorCode.INTERNAL


class UpstreamAuth(InferdError):
    """The remote provider answered 401 or 403: the deployment's key (``api_key_env``) is wrong."""

    code = ErrorCode.UPSTREAM_AUTH


class UpstreamError(InferdError):
    """The remote provider failed. ``details`` names the upstream, its ``status`` and the ``kind``."""

    code = ErrorCode.UPSTREAM_ERROR


_BY_CODE: dict[str, type[InferdError]] = {
    cls.code.value: cls
    for cls in (
        BadRequest, UnknownDeployment, Backpressure, DeadlineExceeded, Cancelled, WorkerLost,
        OutOfMemory, ContextPoisoned, Unavailable, ShuttingDown, SlowReader, ConnectionReset, Internal,
        UpstreamAuth, UpstreamError,
    )
}


def from_wire(code: str, message: str, details: dict[str, Any] | None = None) -> InferdError:
    """Build the exception for an ERROR body; an unknown code becomes Internal."""
    cls = _BY_CODE.get(code, Internal)
    err = cls(message, details)
    if cls is Internal and code != ErrorCode.INTERNAL.value:
        err.details.setdefault("code", code)
    return err

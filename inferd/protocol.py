"""The inferd wire protocol: frame layout, command names and the msgpack codec.

Every message on every inferd socket is three ZeroMQ frames after any ROUTER
routing id::

    [channel signature, command, msgpack body]

The signature names the channel and its version (``IFDC1``: client v1), so a
peer that connects to the wrong socket, or speaks another version, gets a
clear BAD_REQUEST instead of undefined behaviour. ``docs/protocol.md`` is the
normative description; this module is its single implementation, shared by
the broker, the workers, the supervisor, the client and ``inferctl``.

Decoding is strict and never raises anything but :class:`ProtocolError`, so a
process loop can turn any malformed input into an answer and carry on.
"""

from __future__ import annotations

from typing import Any

import msgpack

from inferd.errors import ErrorCode

# Channel signatures (frame 0).
CLIENT = b"IFDC1"      # clients <-> broker frontend
WORKER = b"IFDW1"      # workers <-> broker backend
CONTROL = b"IFDA1"     # inferctl <-> broker control endpoint
SUPERVISOR = b"IFDS1"  # broker <-> supervisor link

# Client -> broker.
SUBMIT = b"SUBMIT"
CANCEL = b"CANCEL"
PING = b"PING"
# Broker -> client.
ACCEPTED = b"ACCEPTED"
CHUNK = b"CHUNK"
DONE = b"DONE"
ERROR = b"ERROR"
PONG = b"PONG"

# Worker -> broker (plus DONE, ERROR).
READY = b"READY"
HEARTBEAT = b"HEARTBEAT"
CHUNKS = b"CHUNKS"            # the chunks of one or more requests, in order
# Broker -> worker (plus CANCEL, HEARTBEAT).
REQUEST = b"REQUEST"
DISCONNECT = b"DISCONNECT"
REBUILD = b"REBUILD"          # also inferctl -> broker: rebuild a deployment's model sessions

# inferctl -> broker control endpoint; answered with OK or ERROR.
STATUS = b"STATUS"
METRICS = b"METRICS"
OK = b"OK"

# Broker <-> supervisor link.
HELLO = b"HELLO"              # broker -> supervisor: I am up (and after a restart)
WORKERS = b"WORKERS"          # supervisor -> broker: the process table
WORKER_EXITED = b"WORKER_EXITED"
DRAIN = b"DRAIN"              # supervisor -> broker: stop accepting, finish in-flight
DRAINED = b"DRAINED"          # broker -> supervisor: nothing left in flight
READINESS = b"READINESS"      # broker -> supervisor: deployments with a ready worker
UNRESPONSIVE = b"UNRESPONSIVE"  # broker -> supervisor: silent or hung worker; kill it
LOAD = b"LOAD"                # broker -> supervisor: outstanding per worker, queued per deployment
RESTART = b"RESTART"          # inferctl -> broker -> supervisor: restart a worker, clear its window
RESTARTED = b"RESTARTED"      # supervisor -> broker: the answer to RESTART
# Live reload, scale and drain (docs/protocol.md, "Reload, scale and drain").
RELOAD = b"RELOAD"            # inferctl -> broker: reload the config (forwarded to the supervisor as OPERATOR)
SCALE = b"SCALE"              # inferctl -> broker: run N workers of a deployment until the next reload
DRAIN_WORKERS = b"DRAIN_WORKERS"  # inferctl -> broker: drain a worker or every worker of a deployment
OPERATOR = b"OPERATOR"        # broker -> supervisor: an operator command (RELOAD, SCALE, DRAIN_WORKERS), with a token
ANSWER = b"ANSWER"            # supervisor -> broker: the answer to OPERATOR
CONFIG = b"CONFIG"            # supervisor -> broker: a reloaded config to apply in place
DRAIN_WORKER = b"DRAIN_WORKER"  # supervisor -> broker: stop dispatching to a worker; say when it is idle
WORKER_DRAINED = b"WORKER_DRAINED"  # broker -> supervisor: that worker has nothing in flight
REMOVED = b"REMOVED"          # broker -> supervisor: a deployment removed by a reload has drained

CLIENT_COMMANDS = frozenset({SUBMIT, CANCEL, PING})
WORKER_COMMANDS = frozenset({READY, HEARTBEAT, CHUNKS, DONE, ERROR})
CONTROL_COMMANDS = frozenset({STATUS, METRICS, RESTART, REBUILD, RELOAD, SCALE, DRAIN_WORKERS})

# Finish reasons carried by DONE (and by the last CHUNK when the runtime knows it is last).
FINISH_STOP = "stop"          # the output ended on its own (end of text, a stop string)
FINISH_LENGTH = "length"      # max_tokens reached


class ProtocolError(Exception):
    """A message that does not follow the protocol; ``reason`` is safe to send back."""

    def __init__(self, reason: str, request_id: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _plain_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """msgpack's hook for every map: string keys only, and no timestamps.

    ``strict_map_key`` still admits binary keys, and the timestamp extension
    (type -1) is decoded natively without reaching ``ext_hook``.
    """
    for key, value in pairs:
        if type(key) is not str:
            raise ValueError(f"map keys must be strings, got {type(key).__name__}")
        _no_timestamp(value)
    return dict(pairs)


def _no_timestamp(value: Any) -> None:
    # Maps inside lists went through _plain_map already; only lists need walking.
    if type(value) is msgpack.Timestamp:
        raise ValueError("msgpack extension type -1 (timestamp) is not allowed")
    if type(value) is list:
        for item in value:
            _no_timestamp(item)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode a msgpack body that must be a map with string keys and no extension types."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext,
                               object_pairs_hook=_plain_map)
    except Exception as exc:  # msgpack raises a zoo of types; all mean "malformed".
        detail = f": {exc}" if str(exc) else ""
        raise ProtocolError(f"body is not valid msgpack ({type(exc).__name__}{detail})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"body must be a msgpack map, got {type(body).__name__}")
    return body


def encode(signature: bytes, command: bytes, body: dict[str, Any]) -> list[bytes]:
    return [signature, command, pack(body)]


def decode(signature: bytes, frames: list[bytes], commands: frozenset[bytes]) -> tuple[bytes, dict[str, Any]]:
    """Split ``[signature, command, body]`` (routing id already removed)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames [signature, command, body], got {len(frames)}")
    sig, command, data = frames
    if sig != signature:
        raise ProtocolError(
            f"unsupported protocol signature {sig[:16]!r}; this endpoint speaks {signature.decode()}"
        )
    body = unpack(data)
    if command not in commands:
        raise ProtocolError(f"unknown command {command[:32]!r}", body.get("id"))
    return command, body


def error_body(request_id: Any, code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> dict:
    body: dict[str, Any] = {"id": request_id, "code": code.value, "message": message}
    if details:
        body["details"] = details
    return body


# --- field validation -------------------------------------------------------------------------

MAX_ID_BYTES = 128


def valid_request_id(value: Any) -> bool:
    """Client request ids are strings (at most 128 bytes) or 64-bit integers."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, str):
        return 0 < len(value.encode()) <= MAX_ID_BYTES
    return False


def check_fields(body: dict[str, Any], spec: dict[str, tuple[type | tuple[type, ...], bool]], what: str) -> None:
    """Check ``body`` against ``{field: (types, required)}``; unknown fields are errors.

    Strictness catches typos such as ``priorty`` that would otherwise be
    silently ignored and leave the caller wondering why nothing changed.
    """
    request_id = body.get("id")
    for name in body:
        if name not in spec:
            raise ProtocolError(f"{what}: unknown field {name!r}", request_id)
    for name, (types, required) in spec.items():
        if name not in body or body[name] is None:
            if required:
                raise ProtocolError(f"{what}: missing field {name!r}", request_id)
            continue
        value = body[name]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ProtocolError(f"{what}: field {name!r} must be {_type_names(types)}, got bool", request_id)
        if not isinstance(value, types):
            raise ProtocolError(
                f"{what}: field {name!r} must be {_type_names(types)}, got {type(value).__name__}", request_id
            )


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "a map", list: "an array", bool: "a boolean"}
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in seq)


SUBMIT_FIELDS = {
    "id": ((int, str), True),
    "deployment": (str, True),
    "prompt": (str, False),       # exactly one of prompt and messages
    "messages": (list, False),
    "priority": (int, False),
    "deadline_ms": (int, False),
    "affinity": (str, False),
    "params": (dict, False),
}
CANCEL_FIELDS = {"id": ((int, str), True)}
MAX_MESSAGES = 4096
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer")


def message_problem(messages: list) -> str | None:
    """Why a SUBMIT's ``messages`` is malformed, or None: 1 to 4096 maps ``{role, content}`` of strings."""
    if not 1 <= len(messages) <= MAX_MESSAGES:
        return f"must hold 1 to {MAX_MESSAGES} messages, got {len(messages)}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            return f"[{i}] must be a map with exactly the fields role and content"
        if message["role"] not in MESSAGE_ROLES:
            return f"[{i}].role must be one of {', '.join(MESSAGE_ROLES)}"
        if not isinstance(message["content"], str):
            return f"[{i}].content must be a string"
    return None
PING_FIELDS = {"id": ((int, str), False)}

# --- worker messages ----------------------------------------------------------------------------
# The broker checks these exactly as it checks a client's: a worker is another process, and a bug
# or a stray peer on the backend socket must not be able to take the broker (and every request in
# flight) down with an unhashable deployment name or a rid that is a map.

WORKER_STATES = frozenset({"loading", "warming", "ready", "rebuilding", "poisoned", "failed"})
FINISH_REASONS = frozenset({FINISH_STOP, FINISH_LENGTH})
MAX_CREDITS = 1 << 20

_LOAD_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "worker": (str, True),
    "state": (str, True),
    "credits": (int, True),
    "in_flight": (int, False),
    "resumes": (int, False),
    "rebuilds": (int, False),
    "runner": (dict, False),
}
WORKER_FIELDS: dict[bytes, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    READY: {**_LOAD_FIELDS, "deployment": (str, True), "runtime": (str, False), "device": (str, False),
            "pid": (int, True)},
    HEARTBEAT: {**_LOAD_FIELDS, "failure": (str, False), "reason": (str, False)},
    CHUNKS: {"worker": (str, True), "chunks": (list, True)},
    DONE: {"worker": (str, True), "rid": (int, True), "finish_reason": (str, False), "usage": (dict, False)},
    # ``id`` is always nil: a worker's ERROR is about the broker's ``rid``, not a client id.
    ERROR: {"worker": (str, True), "rid": (int, True), "id": (int, False), "code": (str, True),
            "message": (str, False), "details": (dict, False)},
}


def _count(body: dict[str, Any], name: str, top: int, what: str) -> None:
    value = body.get(name)
    if value is not None and not 0 <= value <= top:
        raise ProtocolError(f"{what}: field {name!r} must be between 0 and {top}, got {value}")


def check_worker_message(command: bytes, body: dict[str, Any]) -> None:
    """Validate a worker's message beyond its field types; raises :class:`ProtocolError`.

    A message that passes can be used without another check: every rid is an
    integer (hashable, comparable), every count is in range, every state known.
    """
    what = command.decode()
    check_fields(body, WORKER_FIELDS[command], what)
    if command in (READY, HEARTBEAT):
        if body["state"] not in WORKER_STATES:
            raise ProtocolError(f"{what}: unknown state {body['state'][:32]!r}")
        _count(body, "credits", MAX_CREDITS, what)
        for name in ("in_flight", "resumes", "rebuilds"):
            _count(body, name, 2**63 - 1, what)
        if command == READY:
            _count(body, "pid", 2**31 - 1, what)
    elif command == DONE:
        if body.get("finish_reason", FINISH_STOP) not in FINISH_REASONS:
            raise ProtocolError(f"DONE: finish_reason must be one of {', '.join(sorted(FINISH_REASONS))}")
    elif body.get("id") is not None:
        raise ProtocolError("ERROR: a worker's ERROR carries rid, and id must be nil")


def chunk_problem(entry: Any) -> str | None:
    """What is wrong with one CHUNKS entry (``[rid, text]`` or ``[rid, text, finish_reason]``), if anything."""
    if type(entry) is not list or len(entry) not in (2, 3) or type(entry[0]) is not int:
        return f"a chunk must be [rid, text] or [rid, text, finish_reason], got {short(entry)}"
    if type(entry[1]) is not str:
        return f"a chunk's text must be a string, got {type(entry[1]).__name__}"
    if len(entry) == 3 and (type(entry[2]) is not str or entry[2] not in FINISH_REASONS):
        return f"a chunk's finish_reason must be one of {', '.join(sorted(FINISH_REASONS))}, got {short(entry[2])}"
    return None


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

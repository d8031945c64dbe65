"""The inferd wire protocol: frame layout, command names and the msgpack codec.

Every message on every inferd socket is three ZeroMQ frames after any ROUTER
routing id::

    [channel signature, command, msgpack body]

except the broker's replies to a client: one message carries one or more
replies bound for it, as ``[signature, replies]`` where ``replies`` is one
msgpack array of ``[command, body]`` pairs (one ZeroMQ message costs the broker
a send and the client a wake-up, whatever its size; and one array costs a
third of what a frame pair per reply did, measured for issue #10). The
signature names the channel and its version (``IFDC2``: client v2), so a
peer that connects to the wrong socket, or speaks another version, gets a
clear BAD_REQUEST instead of undefined behaviour. ``docs/protocol.md`` is the
normative description; this module is its single implementation, shared by
the broker, the workers, the supervisor, the client and ``inferctl``.

Decoding is strict and never raises anything but :class:`ProtocolError`, so a
process loop can turn any malformed input into an answer and carry on.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgspec

from inferd.errors import ErrorCode

# Channel signatures (frame 0).
CLIENT = b"IFDC2"      # clients <-> broker frontend
CLIENT_V1 = b"IFDC1"   # the retired client protocol v1, refused with a message that says so
V1_REFUSAL = ("this broker speaks the inferd client protocol v2 (signature IFDC2) since inferd 0.2.0; "
              "IFDC1 (v1) is no longer served: see docs/protocol.md")
WORKER = b"IFDW2"      # workers <-> broker backend
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

# Worker -> broker (plus ERROR).
READY = b"READY"
HEARTBEAT = b"HEARTBEAT"
CHUNKS = b"CHUNKS"            # the chunks and successful finals of one or more requests, in order
ATTACH = b"ATTACH"            # the engine thread's socket is up: REQUEST and CANCEL go to it
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

# A worker's engine thread has a socket of its own, identity "<worker id>+engine": REQUEST and CANCEL
# go to it, and its CHUNKS, ERROR and ATTACH come from it.
ENGINE_SUFFIX = "+engine"
ENGINE_COMMANDS = frozenset({REQUEST, CANCEL})

CLIENT_COMMANDS = frozenset({SUBMIT, CANCEL, PING})
WORKER_COMMANDS = frozenset({READY, HEARTBEAT, CHUNKS, ERROR, ATTACH})
CONTROL_COMMANDS = frozenset({STATUS, METRICS, RESTART, REBUILD, RELOAD, SCALE, DRAIN_WORKERS})

# Finish reasons carried by DONE.
FINISH_STOP = "stop"          # the output ended on its own (end of text, a stop string)
FINISH_LENGTH = "length"      # max_tokens reached


class ProtocolError(Exception):
    """A message that does not follow the protocol; ``reason`` is safe to send back."""

    def __init__(self, reason: str, request_id: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


def _no_ext(code: int, data: memoryview) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


# One encoder and one decoder for the process: msgspec's are reusable and thread-safe. The
# decoder wants a map with string keys at the top; _check_plain looks inside for the rest.
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_no_ext).decode
_decode_any = msgspec.msgpack.Decoder(ext_hook=_no_ext).decode
_NESTED = frozenset({dict, list, datetime.datetime})
_PYTHON_NAMES = {"array": "list", "null": "NoneType", "None": "NoneType"}  # msgspec's names, Python's


def pack(body: Any) -> bytes:
    return _encode(body)


def _check_plain(value: Any) -> None:
    """String keys in every map, and no timestamp (msgspec decodes extension type -1 natively,
    without calling ``ext_hook``)."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"map keys must be strings, got {type(key).__name__}")
            if type(item) in _NESTED:
                _check_plain(item)
    elif kind is list:
        for item in value:
            if type(item) in _NESTED:
                _check_plain(item)
    else:
        raise ValueError("msgpack extension type -1 (timestamp) is not allowed")


def unpack(data: bytes) -> dict[str, Any]:
    """Decode a msgpack body that must be a map with string keys and no extension types."""
    try:
        body = _decode(data)
        for value in body.values():
            if type(value) in _NESTED:
                _check_plain(value)
    except msgspec.ValidationError as exc:  # the decoder's type: not a map, or a key that is not a string
        try:  # msgspec checks the type before the end of the data: was it msgpack at all?
            _decode_any(data)
        except Exception as inner:
            raise ProtocolError(f"body is not valid msgpack ({type(inner).__name__}: {inner})") from None
        if str(exc).startswith("Expected `object`, got `"):
            got = str(exc)[24:].rstrip("`")
            raise ProtocolError(f"body must be a msgpack map, got {_PYTHON_NAMES.get(got, got)}") from None
        raise ProtocolError(f"body is not valid msgpack (map keys must be strings: {exc})") from None
    except Exception as exc:  # malformed bytes, an extension type, a bad key deep inside
        detail = f": {exc}" if str(exc) else ""
        raise ProtocolError(f"body is not valid msgpack ({type(exc).__name__}{detail})") from None
    return body


def encode(signature: bytes, command: bytes, body: dict[str, Any]) -> list[bytes]:
    return [signature, command, pack(body)]


def encode_replies(signature: bytes, replies: list[tuple[bytes, Any]]) -> list[bytes]:
    """One message carrying one or more replies: ``[signature, [[command, body], ...]]``."""
    return [signature, _encode([(command.decode(), body) for command, body in replies])]


_decode_replies = msgspec.msgpack.Decoder(list[tuple[str, dict[str, Any]]], ext_hook=_no_ext).decode


def decode_replies(frames: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    """The replies of one message from the broker, ``[IFDC2, [[command, body], ...]]``, with their
    command names as strings; :class:`ProtocolError` if it is not that."""
    if len(frames) != 2 or frames[0] != CLIENT:
        raise ProtocolError(f"expected 2 frames [{CLIENT.decode()}, replies], got {len(frames)} "
                            f"starting with {frames[0][:16]!r}")
    try:
        return _decode_replies(frames[1])
    except Exception as exc:
        raise ProtocolError(f"replies are not a msgpack array of [command, body] ({exc})") from None


def decode(signature: bytes, frames: list[bytes], commands: frozenset[bytes]) -> tuple[bytes, dict[str, Any]]:
    """Split ``[signature, command, body]`` (routing id already removed)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames [signature, command, body], got {len(frames)}")
    sig, command, data = frames
    if sig != signature:
        if sig == CLIENT_V1 and signature == CLIENT:
            raise ProtocolError(V1_REFUSAL)
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
            "pid": (int, True), "generation": (int, False)},
    HEARTBEAT: {**_LOAD_FIELDS, "failure": (str, False), "reason": (str, False)},
    CHUNKS: {"worker": (str, True), "chunks": (list, True)},
    ATTACH: {"worker": (str, True), "generation": (int, True)},
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
    elif command == ERROR and body.get("id") is not None:
        raise ProtocolError("ERROR: a worker's ERROR carries rid, and id must be nil")


def chunk_problem(entry: Any) -> str | None:
    """What is wrong with one CHUNKS entry, if anything.

    ``[rid, text]`` is a chunk; ``[rid, text, finish_reason]`` or ``[rid, text, finish_reason, usage]``
    is the request's successful end (its DONE), with its last chunk's text, or nil when it has none.
    """
    if type(entry) is not list or not 2 <= len(entry) <= 4 or type(entry[0]) is not int:
        return f"an entry must be [rid, text] or [rid, text, finish_reason(, usage)], got {short(entry)}"
    if type(entry[1]) is not str and (len(entry) == 2 or entry[1] is not None):
        return f"a chunk's text must be a string, got {type(entry[1]).__name__}"
    if len(entry) >= 3 and (type(entry[2]) is not str or entry[2] not in FINISH_REASONS):
        return f"a finish_reason must be one of {', '.join(sorted(FINISH_REASONS))}, got {short(entry[2])}"
    if len(entry) == 4 and entry[3] is not None and not usage_valid(entry[3]):
        return f"usage must be {{prompt_tokens, completion_tokens}}, non-negative integers, got {short(entry[3])}"
    return None


def usage_valid(usage: Any) -> bool:
    return (type(usage) is dict and usage.keys() == {"prompt_tokens", "completion_tokens"}
            and all(type(v) is int and 0 <= v < 2**63 for v in usage.values()))


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

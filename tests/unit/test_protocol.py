"""Unit tests for inferd.protocol: framing, the strict codec and field checks."""

from __future__ import annotations

import msgpack
import pytest

from inferd import protocol as P
from inferd.errors import ErrorCode


def decode_client(frames):
    return P.decode(P.CLIENT, frames, P.CLIENT_COMMANDS)


def protocol_error(frames) -> P.ProtocolError:
    """Decode and insist that exactly ProtocolError (not a subclass of something else) comes out."""
    try:
        decode_client(frames)
    except P.ProtocolError as exc:
        return exc
    except Exception as exc:  # pragma: no cover - this is the failure being tested for
        pytest.fail(f"decode raised {type(exc).__name__} instead of ProtocolError: {exc}")
    pytest.fail("decode accepted a malformed message")


# --- encode / decode round trip ---------------------------------------------------------------


def test_encode_layout():
    frames = P.encode(P.CLIENT, P.SUBMIT, {"id": 1, "deployment": "echo", "prompt": "hi"})
    assert len(frames) == 3
    assert frames[0] == b"IFDC2"
    assert frames[1] == b"SUBMIT"
    assert msgpack.unpackb(frames[2], raw=False) == {"id": 1, "deployment": "echo", "prompt": "hi"}


@pytest.mark.parametrize("body", [
    {},
    {"id": 1, "deployment": "echo", "prompt": "hello world"},
    {"id": "x" * 128, "deployment": "d", "prompt": "ünïcødé ✓", "params": {"max_tokens": 8}},
    {"id": 2**64 - 1, "deployment": "d", "prompt": "", "priority": 0, "deadline_ms": 5, "affinity": "s"},
    {"id": -(2**63), "nested": {"list": [1, 2.5, None, True, "s", b"raw"]}},
])
def test_round_trip(body):
    frames = P.encode(P.CLIENT, P.SUBMIT, body)
    command, decoded = decode_client(frames)
    assert command == P.SUBMIT
    assert decoded == body


def test_round_trip_preserves_bytes_vs_str():
    frames = P.encode(P.WORKER, P.CHUNKS, {"worker": "w", "text": "t", "blob": b"\x00\xff"})
    command, body = P.decode(P.WORKER, frames, P.WORKER_COMMANDS)
    assert command == P.CHUNKS
    assert body["blob"] == b"\x00\xff" and isinstance(body["blob"], bytes)
    assert body["text"] == "t" and isinstance(body["text"], str)


def test_every_channel_round_trips_its_commands():
    for sig, commands in [(P.CLIENT, P.CLIENT_COMMANDS), (P.WORKER, P.WORKER_COMMANDS),
                          (P.CONTROL, P.CONTROL_COMMANDS)]:
        for command in commands:
            assert P.decode(sig, P.encode(sig, command, {"id": 3}), commands) == (command, {"id": 3})


def test_pack_unpack():
    assert P.unpack(P.pack({"a": [1, "b"]})) == {"a": [1, "b"]}


# --- decode refuses everything malformed with ProtocolError only ------------------------------


GOOD_BODY = msgpack.packb({"id": 1}, use_bin_type=True)


@pytest.mark.parametrize("frames", [
    [],
    [b"IFDC2"],
    [b"IFDC2", b"SUBMIT"],
    [b"IFDC2", b"SUBMIT", GOOD_BODY, b"extra"],
    [b"routing-id", b"IFDC2", b"SUBMIT", GOOD_BODY],
])
def test_wrong_frame_count(frames):
    exc = protocol_error(frames)
    assert "expected 3 frames" in exc.reason
    assert f"got {len(frames)}" in exc.reason
    assert exc.request_id is None


@pytest.mark.parametrize("sig", [b"IFDC3", b"IFDW2", b"", b"ifdc2", b"X" * 1000])
def test_wrong_signature(sig):
    exc = protocol_error([sig, b"SUBMIT", GOOD_BODY])
    assert "unsupported protocol signature" in exc.reason
    assert "IFDC2" in exc.reason
    assert len(exc.reason) < 200  # the bad signature is truncated
    assert exc.request_id is None


def test_a_v1_client_is_told_that_the_broker_speaks_v2():
    exc = protocol_error([b"IFDC1", b"SUBMIT", GOOD_BODY])
    assert "protocol v2" in exc.reason and "IFDC2" in exc.reason and "IFDC1" in exc.reason
    assert exc.request_id is None


def test_v1_is_only_named_on_the_client_channel():
    with pytest.raises(P.ProtocolError) as info:
        P.decode(P.WORKER, [b"IFDC1", P.READY, GOOD_BODY], P.WORKER_COMMANDS)
    assert "unsupported protocol signature" in info.value.reason


def test_replies_coalesce_into_one_message():
    replies = [(P.CHUNK, {"id": 1, "index": 0, "text": "a"}), (P.DONE, {"id": 1, "finish_reason": "stop", "chunks": 1})]
    frames = P.encode_replies(P.CLIENT, replies)
    assert frames[0] == b"IFDC2" and len(frames) == 2
    assert msgpack.unpackb(frames[1]) == [["CHUNK", {"id": 1, "index": 0, "text": "a"}],
                                          ["DONE", {"id": 1, "finish_reason": "stop", "chunks": 1}]]
    assert P.decode_replies(frames) == [("CHUNK", replies[0][1]), ("DONE", replies[1][1])]


@pytest.mark.parametrize("frames", [
    [b"IFDC2"],
    [b"IFDC1", msgpack.packb([["DONE", {}]])],
    [b"IFDC2", msgpack.packb({"id": 1})],
    [b"IFDC2", msgpack.packb([["DONE"]])],
    [b"IFDC2", msgpack.packb([[b"DONE", {}]])],
    [b"IFDC2", msgpack.packb([["DONE", {1: 2}]])],
    [b"IFDC2", b"\xc1"],
])
def test_a_malformed_reply_message_is_a_protocol_error(frames):
    with pytest.raises(P.ProtocolError):
        P.decode_replies(frames)


@pytest.mark.parametrize("entry,problem", [
    ([1, "a"], None),
    ([1, "a", "stop"], None),
    ([1, None, "length"], None),
    ([1, "a", "stop", {"prompt_tokens": 3, "completion_tokens": 1}], None),
    ([1, None], "text must be a string"),
    ([1, "a", "later"], "finish_reason must be one of"),
    ([1, "a", "stop", {"prompt_tokens": 3}], "usage must be"),
    ([1, "a", "stop", {"prompt_tokens": 3, "completion_tokens": True}], "usage must be"),
    (["1", "a"], "an entry must be"),
    ([1], "an entry must be"),
    ([1, "a", "stop", None, None], "an entry must be"),
    ({"rid": 1}, "an entry must be"),
])
def test_chunks_entries_carry_chunks_and_ends(entry, problem):
    found = P.chunk_problem(entry)
    assert (found is None) if problem is None else (problem in found), found


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",                      # never-used msgpack byte
    b"\x81\xa2id",                # truncated map
    b"\x92\x01\x02\x03",          # trailing garbage after a complete object
    b"not msgpack at all \xff\xfe",
])
def test_non_msgpack_body(data):
    exc = protocol_error([b"IFDC2", b"SUBMIT", data])
    assert "not valid msgpack" in exc.reason


@pytest.mark.parametrize("value,name", [([1, 2], "list"), ("s", "str"), (5, "int"), (None, "NoneType"),
                                        (b"x", "bytes"), (1.5, "float")])
def test_non_map_body(value, name):
    exc = protocol_error([b"IFDC2", b"SUBMIT", msgpack.packb(value, use_bin_type=True)])
    assert "must be a msgpack map" in exc.reason
    assert name in exc.reason


def test_integer_keys_refused():
    protocol_error([b"IFDC2", b"SUBMIT", msgpack.packb({1: "x"})])


def test_nested_integer_keys_refused():
    protocol_error([b"IFDC2", b"SUBMIT", msgpack.packb({"params": {1: 2}})])


def test_binary_keys_refused():
    # The spec: "the body: a msgpack map with string keys". A bin key is not a string.
    protocol_error([b"IFDC2", b"SUBMIT", msgpack.packb({b"id": 1}, use_bin_type=True)])


def test_ext_type_refused():
    exc = protocol_error([b"IFDC2", b"SUBMIT", msgpack.packb({"id": msgpack.ExtType(5, b"ab")})])
    assert "extension type 5" in exc.reason


def test_ext_type_timestamp_refused():
    # The timestamp (-1) is a msgpack extension type too; the spec refuses all of them.
    protocol_error([b"IFDC2", b"SUBMIT", msgpack.packb({"id": msgpack.Timestamp(1, 0)})])


def test_unknown_command_carries_the_request_id():
    exc = protocol_error([b"IFDC2", b"SUMBIT", msgpack.packb({"id": "req-7"})])
    assert "unknown command" in exc.reason
    assert "SUMBIT" in exc.reason
    assert exc.request_id == "req-7"


def test_unknown_command_without_id():
    exc = protocol_error([b"IFDC2", b"HELLO", msgpack.packb({"x": 1})])
    assert exc.request_id is None


def test_command_of_another_channel_is_unknown():
    exc = protocol_error([b"IFDC2", b"READY", msgpack.packb({"id": 9})])
    assert exc.request_id == 9
    assert "unknown command" in exc.reason


def test_unknown_command_name_is_truncated():
    exc = protocol_error([b"IFDC2", b"X" * 5000, msgpack.packb({"id": 1})])
    assert len(exc.reason) < 200


def test_random_garbage_only_ever_raises_protocol_error():
    import random
    rng = random.Random(11)
    good = P.encode(P.CLIENT, P.SUBMIT, {"id": 1, "deployment": "echo", "prompt": "hi", "params": {"a": [1]}})
    accepted = 0
    for _ in range(3000):
        frames = [bytearray(f) for f in good]
        i = rng.randrange(3)
        for _ in range(rng.randint(1, 4)):
            if frames[i] and rng.random() < 0.7:
                frames[i][rng.randrange(len(frames[i]))] = rng.randrange(256)
            elif rng.random() < 0.5:
                del frames[i][rng.randrange(len(frames[i]) + 1):]
            else:
                frames[i] += bytes([rng.randrange(256)])
        try:
            command, body = decode_client([bytes(f) for f in frames])
        except P.ProtocolError:
            continue
        accepted += 1
        assert command in P.CLIENT_COMMANDS
        assert isinstance(body, dict)
    assert accepted < 3000


def test_protocol_error_attributes():
    exc = P.ProtocolError("why", 42)
    assert str(exc) == "why"
    assert exc.reason == "why"
    assert exc.request_id == 42
    assert P.ProtocolError("x").request_id is None


def test_error_body():
    assert P.error_body(5, ErrorCode.BACKPRESSURE, "full", {"retry_after_ms": 10}) == {
        "id": 5, "code": "BACKPRESSURE", "message": "full", "details": {"retry_after_ms": 10}}
    assert P.error_body(None, ErrorCode.BAD_REQUEST, "bad") == {"id": None, "code": "BAD_REQUEST", "message": "bad"}


# --- check_fields -----------------------------------------------------------------------------


def check_submit(body):
    P.check_fields(body, P.SUBMIT_FIELDS, "SUBMIT")


def test_check_fields_accepts_a_full_submit():
    check_submit({"id": "a", "deployment": "d", "prompt": "p", "priority": 0, "deadline_ms": 10,
                  "affinity": "s", "params": {"max_tokens": 3}})
    check_submit({"id": 1, "deployment": "d", "prompt": "p"})
    # optional fields may be nil
    check_submit({"id": 1, "deployment": "d", "prompt": "p", "priority": None, "params": None})


def test_check_fields_unknown_field():
    with pytest.raises(P.ProtocolError) as info:
        check_submit({"id": "r1", "deployment": "d", "prompt": "p", "priorty": 1})
    assert info.value.reason == "SUBMIT: unknown field 'priorty'"
    assert info.value.request_id == "r1"


@pytest.mark.parametrize("missing", ["id", "deployment"])
def test_check_fields_missing_required(missing):
    body = {"id": 4, "deployment": "d", "prompt": "p"}
    del body[missing]
    with pytest.raises(P.ProtocolError) as info:
        check_submit(body)
    assert info.value.reason == f"SUBMIT: missing field {missing!r}"
    assert info.value.request_id == (None if missing == "id" else 4)


def test_check_fields_nil_required_is_missing():
    with pytest.raises(P.ProtocolError) as info:
        check_submit({"id": 4, "deployment": None, "prompt": "p"})
    assert info.value.reason == "SUBMIT: missing field 'deployment'"


@pytest.mark.parametrize("name,value,expect,got", [
    ("prompt", 5, "a string", "int"),
    ("deployment", b"echo", "a string", "bytes"),
    ("priority", "1", "an integer", "str"),
    ("priority", 1.0, "an integer", "float"),
    ("deadline_ms", [1], "an integer", "list"),
    ("params", [1], "a map", "list"),
    ("id", 1.5, "an integer or a string", "float"),
    ("id", {"a": 1}, "an integer or a string", "dict"),
])
def test_check_fields_wrong_type(name, value, expect, got):
    body = {"id": 9, "deployment": "d", "prompt": "p", name: value}
    with pytest.raises(P.ProtocolError) as info:
        check_submit(body)
    assert info.value.reason == f"SUBMIT: field {name!r} must be {expect}, got {got}"


@pytest.mark.parametrize("name,expect", [("priority", "an integer"), ("deadline_ms", "an integer"),
                                         ("id", "an integer or a string")])
def test_check_fields_bool_where_int_expected(name, expect):
    body = {"id": 9, "deployment": "d", "prompt": "p", name: True}
    with pytest.raises(P.ProtocolError) as info:
        check_submit(body)
    assert info.value.reason == f"SUBMIT: field {name!r} must be {expect}, got bool"


def test_check_fields_bool_allowed_when_spec_says_bool():
    P.check_fields({"flag": True}, {"flag": (bool, True)}, "X")
    P.check_fields({"flag": False}, {"flag": ((int, bool), True)}, "X")


def test_check_fields_cancel_and_ping():
    P.check_fields({"id": 1}, P.CANCEL_FIELDS, "CANCEL")
    with pytest.raises(P.ProtocolError):
        P.check_fields({}, P.CANCEL_FIELDS, "CANCEL")
    P.check_fields({}, P.PING_FIELDS, "PING")
    with pytest.raises(P.ProtocolError) as info:
        P.check_fields({"id": 1, "x": 2}, P.PING_FIELDS, "PING")
    assert info.value.reason == "PING: unknown field 'x'"


# --- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("value,ok", [
    ("a", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("é" * 64, True),          # 128 bytes in UTF-8
    ("é" * 65, False),         # 130 bytes, although only 65 characters
    ("", False),
    (0, True),
    (2**64 - 1, True),
    (2**64, False),
    (-(2**63), True),
    (-(2**63) - 1, False),
    (True, False),
    (False, False),
    (1.0, False),
    (None, False),
    (b"abc", False),
    ([1], False),
])
def test_valid_request_id(value, ok):
    assert P.valid_request_id(value) is ok

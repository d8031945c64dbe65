"""The remote runtime's pure logic: SSE parsing, retry timing, failover and health, options."""

from __future__ import annotations

import random

import pytest

from inferd import config, runtimes
from inferd.runtimes.remote.chunks import ChunkError, decode, error_message
from inferd.runtimes.remote.retry import MAX_DELAY_S, Backoff, plan_retry, retry_after_s, should_retry
from inferd.runtimes.remote.sse import Event, SSEError, SSEParser
from inferd.runtimes.remote.upstreams import Upstreams
from tests.fake_upstream import http_date

STREAM = ('data: {"t": "héllo"}\n\n'
          ': a comment line\n\n'
          'event: error\ndata: {"error": {"message": "x"}}\n\n'
          'data: line one\ndata: line two\n\n'
          'id: 7\nretry: 10\ndata:no-space €\n\n'
          'data: [DONE]\n\n').encode()
EXPECTED = [Event('{"t": "héllo"}'), Event('{"error": {"message": "x"}}', "error"), Event("line one\nline two"),
            Event("no-space €"), Event("[DONE]")]


def test_sse_whole_stream():
    assert SSEParser().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_sse_split_anywhere_even_mid_utf8(size):
    parser = SSEParser()
    events = []
    for i in range(0, len(STREAM), size):
        events += parser.feed(STREAM[i:i + size])
    assert events == EXPECTED


def test_sse_every_split_point_with_crlf_and_cr():
    stream = 'data: a€\r\n\r\ndata: b\r\rdata: c\n\n'.encode()
    for cut in range(len(stream) + 1):
        parser = SSEParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == [Event("a€"), Event("b"), Event("c")], cut


def test_sse_incomplete_event_is_not_dispatched():
    parser = SSEParser()
    assert parser.feed(b"data: partial\n") == []
    assert parser.feed(b"\n") == [Event("partial")]


def test_sse_bad_utf8_and_endless_line_are_errors():
    with pytest.raises(SSEError, match="UTF-8"):
        SSEParser().feed(b"data: \xff\xfe\n\n")
    with pytest.raises(SSEError, match="exceeds"):
        SSEParser(max_line_bytes=100).feed(b"data: " + b"x" * 200)


def test_chunk_decode_text_finish_and_usage():
    chat = '{"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hé"}, "logprobs": null, '\
           '"finish_reason": null}], "usage": null}'
    assert decode(chat, chat=True) == ("hé", None, None)
    assert decode('{"choices": [{"delta": {}, "finish_reason": "length"}]}', chat=True) == ("", "length", None)
    assert decode('{"choices": [{"text": " b", "finish_reason": "stop"}]}', chat=False) == (" b", "stop", None)
    text, reason, usage = decode('{"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, '
                                 '"total_tokens": 6}}', chat=True)
    assert (text, reason, usage.as_dict()) == ("", None, {"prompt_tokens": 4, "completion_tokens": 2})
    _, _, partial = decode('{"choices": [], "usage": {"prompt_tokens": null, "completion_tokens": 2}}', chat=True)
    assert partial.as_dict() is None


@pytest.mark.parametrize("data, error_event, kind, message", [
    ('{"choices": [{"delta": {"content": "x"', False, "invalid_json", "not JSON"),
    ('{"error": {"message": "the model overheated"}}', False, "stream_error", "the model overheated"),
    ('{"message": "busy"}', True, "stream_error", "busy"),
    ('{"id": "no choices"}', False, "invalid_json", "without choices"),
    ('{"choices": [{"text": 5}]}', False, "invalid_json", "malformed"),
    ('{"choices": "many"}', False, "invalid_json", "malformed"),
    ('[1, 2]', False, "invalid_json", "malformed"),
])
def test_chunk_decode_errors_are_typed(data, error_event, kind, message):
    with pytest.raises(ChunkError, match=message) as caught:
        decode(data, chat=False, error_event=error_event)
    assert caught.value.kind == kind


def test_error_message_of_a_body():
    assert error_message(b'{"error": {"message": "bad key"}}') == "bad key"
    assert error_message(b'{"error": "plain"}') == "plain"
    assert error_message(b"<html>502</html>") == "<html>502</html>"


def test_retry_after_forms():
    assert retry_after_s({"retry-after": "2"}, 0) == 2
    assert retry_after_s({"retry-after": "1.5"}, 0) == 1.5
    assert retry_after_s({"retry-after-ms": "250"}, 0) == 0.25
    # retry-after-ms wins over Retry-After, as in openai-python.
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}, 0) == 0.25
    import time
    date = retry_after_s({"retry-after": http_date(3)}, time.time())
    assert 1.5 <= date <= 3.5
    assert retry_after_s({"retry-after": http_date(-10)}, time.time()) == 0
    assert retry_after_s({"retry-after": "soon"}, 0) is None
    assert retry_after_s({"retry-after": "-1"}, 0) is None
    assert retry_after_s({}, 0) is None


def test_should_retry():
    for status in (None, 408, 409, 429, 500, 502, 503, 504):
        assert should_retry(status), status
    for status in (400, 401, 403, 404, 422):
        assert not should_retry(status), status
    assert not should_retry(503, {"x-should-retry": "false"})
    assert should_retry(400, {"x-should-retry": "true"})


def test_backoff_grows_with_jitter_and_caps_at_60s():
    rng = random.Random(1)
    b = Backoff(0.5, 1000.0)
    delays = [b.delay(n, rng) for n in range(4)]
    for n, d in enumerate(delays):
        assert 0.5 * 2 ** n / 2 <= d <= 0.5 * 2 ** n
    assert all(b.delay(n, rng) <= MAX_DELAY_S for n in range(10, 80))
    assert {round(Backoff(1, 8).delay(2, rng), 6) for _ in range(20)}.__len__() > 1  # jittered


def test_plan_retry_never_past_the_deadline_or_the_budget():
    rng = random.Random(0)
    b = Backoff(0.1, 1.0)
    assert plan_retry(0, 2, None, b, now=0, deadline=10, rng=rng) is not None
    assert plan_retry(2, 2, None, b, now=0, deadline=10, rng=rng) is None       # budget spent
    assert plan_retry(0, 2, 5.0, b, now=0, deadline=10, rng=rng) == 5.0         # the hint is honoured
    assert plan_retry(0, 2, 5.0, b, now=6, deadline=10, rng=rng) is None        # it would pass the deadline
    assert plan_retry(0, 2, 600.0, b, now=0, deadline=1000, rng=rng) == MAX_DELAY_S


def test_failover_in_order_with_cooldown():
    now = [0.0]
    ups = Upstreams(["a", "b", "c"], cooldown_s=5, clock=lambda: now[0])
    assert ups.pick(set()).url == "a"
    ups.failed(ups.all[0], 503, "a answered 503")
    assert ups.pick(set()).url == "b"                 # a cools down
    assert ups.pick({"b"}).url == "c"                 # this request tried b already
    ups.failed(ups.all[1], None, "b refused")
    ups.failed(ups.all[2], None, "c refused")
    assert ups.pick({"a", "b", "c"}).url == "a"       # all cooling: the first to end
    assert ups.health()[0] == "degraded"
    now[0] = 6
    assert ups.pick(set()).url == "a"                 # cooldown over: back in order
    for u in ups.all:
        ups.succeeded(u)
    assert ups.health() == ("ok", "")


def test_health_names_an_auth_failure():
    ups = Upstreams(["a"], cooldown_s=1, clock=lambda: 0.0)
    ups.refused_auth(ups.all[0], 401, "a answered 401")
    state, problem = ups.health()
    assert state == "degraded" and "authentication failed (401)" in problem
    assert ups.report()[0]["state"] == "auth_failed"


def remote_config(**options) -> dict:
    return {"deployment": [{"name": "cloud", "runtime": "remote", "options": options}]}


def test_config_accepts_a_remote_deployment():
    cfg = config.parse(remote_config(upstreams=["http://a/v1", "https://b/v1"], api="completions", model="m",
                                     api_key_env="KEY", headers={"X-Org": "o"}, max_retries=3,
                                     backoff_base_ms=100, backoff_cap_ms=2000, read_timeout_ms=500))
    assert cfg.deployments[0].options["api"] == "completions"
    assert runtimes.SPECS["remote"].transport == "remote"


@pytest.mark.parametrize("options, problem", [
    ({"model": "m"}, "exactly one of base_url or upstreams"),
    ({"base_url": "http://a", "upstreams": ["http://b"], "model": "m"}, "exactly one of base_url or upstreams"),
    ({"base_url": "http://a"}, "model: missing"),
    ({"base_url": "ftp://a", "model": "m"}, "base_url: expected an http"),
    ({"base_url": "http://a", "model": "m", "api": "embeddings"}, "api: expected one of chat, completions"),
    ({"base_url": "http://a", "model": "m", "api_key": "sk-secret"}, "api_key: unknown"),
    ({"base_url": "http://a", "model": "m", "headers": {"Authorization": "Bearer sk-secret"}},
     "headers.Authorization: not allowed"),
    ({"base_url": "http://a", "model": "m", "backoff_cap_ms": 120_000}, "backoff_cap_ms: expected"),
    ({"base_url": "http://a", "model": "m", "backoff_base_ms": 5000, "backoff_cap_ms": 1000}, "at most backoff_cap"),
    ({"base_url": "http://a", "model": "m", "api_key_env": "not a name"}, "api_key_env: expected"),
])
def test_config_rejects_bad_remote_options(options, problem):
    with pytest.raises(config.ConfigError, match=problem) as info:
        config.parse(remote_config(**options))
    assert "sk-secret" not in str(info.value)


def test_remote_params_are_the_sampling_params():
    assert runtimes.validate_params("remote", {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 1,
                                               "stop": ["\n"]}, {}) is None
    assert runtimes.validate_params("remote", {"delay_ms": 5}, {}).startswith("delay_ms: unknown")


def test_the_commented_remote_example_in_the_default_config_is_valid():
    import tomllib
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "etc" / "inferd.toml").read_text()
    block = text[text.index('# [[deployment]]\n# name = "cloud"'):]
    block = "\n".join(line[2:] if line.startswith("# ") else line for line in block.splitlines())
    dep = config.parse(tomllib.loads(block)).deployments[0]
    assert (dep.runtime, dep.options["api_key_env"]) == ("remote", "OPENAI_API_KEY")

"""The remote runner against a real HTTP server (tests/fake_upstream.py): streaming, every fault the
fake injects, retries, failover, cancel, deadlines, the key's secrecy, health and recovery."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from inferd.errors import ErrorCode
from inferd.runtimes.base import Output, RequestRejected, RunRequest
from inferd.runtimes.remote.runner import REPORT_INTERVAL_S, RemoteRunner
from tests.daemon import wait_for
from tests.fake_upstream import FakeUpstream

KEY = "sk-test-0123456789abcdef"
PROMPT = "the quick brown fox jumps"


class Harness:
    """Drives a RemoteRunner as the worker's engine does: admit, cancel, and step when woken."""

    def __init__(self, options: dict, capacity: int = 8):
        self.runner = RemoteRunner(options, (), capacity)
        self.woken = threading.Event()
        self.runner.wake = self.woken.set
        self.runner.load()
        self.outputs: dict[int, list[Output]] = {}
        self.rid = 0

    def submit(self, prompt: str = PROMPT, params: dict | None = None, deadline_s: float = 30.0,
               messages: list | None = None) -> int:
        self.rid += 1
        self.outputs[self.rid] = []
        self.runner.admit(RunRequest(self.rid, prompt, params or {}, messages=messages,
                                     deadline=time.monotonic() + deadline_s))
        return self.rid

    def pump(self, timeout: float = 0.1) -> None:
        self.woken.wait(timeout)
        self.woken.clear()
        for out in self.runner.step():
            self.outputs[out.rid].append(out)

    def final(self, rid: int, timeout: float = 15.0) -> Output:
        deadline = time.monotonic() + timeout
        while not (self.outputs[rid] and self.outputs[rid][-1].final):
            assert time.monotonic() < deadline, f"no final output for {rid}: {self.outputs[rid]}"
            self.pump()
        return self.outputs[rid][-1]

    def text(self, rid: int) -> str:
        return "".join(o.text for o in self.outputs[rid] if o.text)

    def run(self, *args, **kwargs) -> tuple[Output, str]:
        rid = self.submit(*args, **kwargs)
        return self.final(rid), self.text(rid)

    def report(self) -> dict:
        """The load report once the runner has refreshed it (every REPORT_INTERVAL_S) since now."""
        settled = time.monotonic() + 2.5 * REPORT_INTERVAL_S
        while time.monotonic() < settled:
            self.pump(0.05)
        return self.runner.load_report()


@pytest.fixture
def make_harness(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", KEY)
    made = []

    def make(upstream: FakeUpstream | None = None, capacity: int = 8, **options) -> Harness:
        opts = {"model": "fake-model", "api_key_env": "FAKE_KEY", "backoff_base_ms": 20, "backoff_cap_ms": 100,
                "max_retries": 2, "probe_interval_ms": 100, "cooldown_ms": 200, **options}
        if "upstreams" not in opts and "base_url" not in opts:
            opts["base_url"] = upstream.base_url
        h = Harness(opts, capacity)
        made.append(h)
        return h

    yield make
    for h in made:
        h.runner.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_chat_stream_sends_params_key_and_headers(upstream, make_harness):
    h = make_harness(upstream, headers={"X-Org": "inferd"})
    final, text = h.run(PROMPT, {"max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["\n"]})
    assert (final.finish_reason, text) == ("length", "the quick brown")
    call = upstream.completion_calls()[-1]
    assert call.path == "/v1/chat/completions"
    assert call.body == {"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3,
                         "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["\n"], "stream": True,
                         "stream_options": {"include_usage": True}}
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.headers["X-Org"] == "inferd"
    assert call.completed and not call.disconnected
    # The upstream's usage event (asked for with stream_options) is the final output's usage.
    assert final.usage == {"prompt_tokens": 5, "completion_tokens": 3}
    final, text = h.run(PROMPT)
    assert (final.finish_reason, text) == ("stop", PROMPT)
    assert final.usage == {"prompt_tokens": 5, "completion_tokens": 5}


def test_chat_messages_are_sent_as_given(upstream, make_harness):
    h = make_harness(upstream)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    final, text = h.run("", messages=messages)
    assert text == "hello there"
    assert upstream.completion_calls()[-1].body["messages"] == messages


def test_completions_api(upstream, make_harness):
    h = make_harness(upstream, api="completions")
    final, text = h.run(PROMPT, {"max_tokens": 2})
    assert (final.finish_reason, text) == ("length", "the quick")
    call = upstream.completion_calls()[-1]
    assert call.path == "/v1/completions" and call.body["prompt"] == PROMPT
    assert final.usage == {"prompt_tokens": 5, "completion_tokens": 2}
    with pytest.raises(RequestRejected, match="completions API"):
        h.runner.admit(RunRequest(99, "", {}, messages=[{"role": "user", "content": "x"}]))


@pytest.mark.parametrize("fault, least_wait", [
    ({"status": 429, "retry_after": "1"}, 0.9),
    ({"status": 429, "retry_after_date": 2}, 0.5),
    ({"status": 429, "retry_after_ms": 300}, 0.28),
    ({"status": 500}, 0.0),
    ({"status": 503}, 0.0),
])
def test_retryable_statuses_are_retried_honouring_the_hint(upstream, make_harness, fault, least_wait):
    h = make_harness(upstream)
    upstream.fault("status", **fault)
    started = time.monotonic()
    final, text = h.run(PROMPT)
    assert (final.finish_reason, text) == ("stop", PROMPT)
    assert time.monotonic() - started >= least_wait
    assert [c.status for c in upstream.completion_calls()] == [fault["status"], 200]
    report = h.report()["upstream"]
    assert report["retries"] == 1 and report["status"] == {str(fault["status"]): 1, "200": 1}


def test_5xx_retries_exhausted_is_upstream_error(upstream, make_harness):
    h = make_harness(upstream, max_retries=2)
    for _ in range(3):
        upstream.fault("status", status=503, message="overloaded")
    final, text = h.run(PROMPT)
    assert final.error is ErrorCode.UPSTREAM_ERROR and text == ""
    assert "answered 503: overloaded" in final.message and "after 3 attempts" in final.message
    assert final.details == {"upstream": upstream.base_url, "kind": "status", "attempts": 3, "status": 503}
    assert len(upstream.completion_calls()) == 3


def test_429_retries_exhausted_is_backpressure_with_the_hint(upstream, make_harness):
    h = make_harness(upstream, max_retries=1)
    upstream.fault("status", status=429, retry_after_ms=100).fault("status", status=429, retry_after="7")
    final, _ = h.run(PROMPT)
    assert final.error is ErrorCode.BACKPRESSURE
    assert final.details["retry_after_ms"] == 7000 and final.details["status"] == 429


def test_a_hint_past_the_deadline_fails_at_once(upstream, make_harness):
    h = make_harness(upstream)
    upstream.fault("status", status=429, retry_after="30")
    started = time.monotonic()
    final, _ = h.run(PROMPT, deadline_s=5)
    assert final.error is ErrorCode.BACKPRESSURE and time.monotonic() - started < 2
    assert len(upstream.completion_calls()) == 1


def test_400_is_bad_request_with_the_upstream_message_and_no_retry(upstream, make_harness):
    h = make_harness(upstream)
    upstream.fault("status", status=400, message="max_tokens is too large")
    final, _ = h.run(PROMPT)
    assert final.error is ErrorCode.BAD_REQUEST and "max_tokens is too large" in final.message
    assert len(upstream.completion_calls()) == 1


def test_401_is_upstream_auth_not_retried_and_never_shows_the_key(upstream, make_harness):
    h = make_harness(upstream)
    upstream.fault("status", status=401)
    final, _ = h.run(PROMPT)
    assert final.error is ErrorCode.UPSTREAM_AUTH
    assert KEY in upstream.completion_calls()[0].headers["Authorization"]      # it was sent, and echoed back
    assert KEY not in final.message and "[redacted]" in final.message
    assert len(upstream.completion_calls()) == 1


def test_a_key_the_upstream_refuses_degrades_the_deployment_as_an_auth_problem(make_harness):
    strict = FakeUpstream(api_key="sk-the-right-one").start()
    try:
        h = make_harness(strict)
        final, _ = h.run(PROMPT)
        assert final.error is ErrorCode.UPSTREAM_AUTH and KEY not in final.message
        time.sleep(0.3)  # probes run meanwhile, and get 401s too
        report = h.report()
        assert report["health"] == "degraded" and "authentication failed (401)" in report["problem"]
        assert report["upstreams"][0]["state"] == "auth_failed"
        assert KEY not in json.dumps(report)
    finally:
        strict.stop()


def test_slow_first_byte_times_out_and_is_retried(upstream, make_harness):
    h = make_harness(upstream, read_timeout_ms=300)
    upstream.fault("slow_first_byte", delay_ms=1500)
    final, text = h.run(PROMPT)
    assert (final.finish_reason, text) == ("stop", PROMPT)
    assert h.report()["upstream"]["errors"] == {"timeout": 1}


def test_slow_first_byte_without_retries_is_a_timeout_error(upstream, make_harness):
    h = make_harness(upstream, read_timeout_ms=300, max_retries=0)
    upstream.fault("slow_first_byte", delay_ms=1500)
    final, _ = h.run(PROMPT)
    assert final.error is ErrorCode.UPSTREAM_ERROR and final.details["kind"] == "timeout"


def test_drop_before_the_first_token_is_retried(upstream, make_harness):
    h = make_harness(upstream)
    upstream.fault("drop", after=0)
    final, text = h.run(PROMPT)
    assert (final.finish_reason, text) == ("stop", PROMPT)
    assert len(upstream.completion_calls()) == 2


def test_drop_mid_stream_is_an_error_and_never_retried(upstream, make_harness):
    h = make_harness(upstream)
    upstream.fault("drop", after=2)
    final, text = h.run(PROMPT)
    assert text == "the quick"
    assert final.error is ErrorCode.UPSTREAM_ERROR and final.details["chunks"] == 2
    assert "not retried" in final.message
    assert len(upstream.completion_calls()) == 1


def test_a_stall_between_chunks_past_read_timeout_ms_ends_the_stream(upstream, make_harness):
    h = make_harness(upstream, read_timeout_ms=300)
    upstream.fault("stall", after=2, delay_ms=1500)
    started = time.monotonic()
    final, text = h.run(PROMPT)
    assert text == "the quick" and time.monotonic() - started < 1.2
    assert final.error is ErrorCode.UPSTREAM_ERROR and final.details["kind"] == "timeout"
    assert final.details["chunks"] == 2 and len(upstream.completion_calls()) == 1   # after a token: no retry


def test_events_split_across_writes_even_mid_utf8(upstream, make_harness):
    h = make_harness(upstream)
    prompt = "naïve café — 日本語 ok"
    upstream.fault("split", piece=3)
    final, text = h.run(prompt)
    assert (final.finish_reason, text) == ("stop", prompt)


@pytest.mark.parametrize("kind, expect", [("invalid_json", "not JSON"), ("error_event", "the model overheated")])
def test_invalid_json_and_error_events_are_typed_errors_and_the_runner_carries_on(upstream, make_harness, kind, expect):
    h = make_harness(upstream)
    upstream.fault(kind, after=1)
    final, text = h.run(PROMPT)
    assert text == "the"
    assert final.error is ErrorCode.UPSTREAM_ERROR and expect in final.message
    assert final.details["kind"] == {"invalid_json": "invalid_json", "error_event": "stream_error"}[kind]
    final, text = h.run(PROMPT)
    assert (final.finish_reason, text) == ("stop", PROMPT)


def test_a_200_that_is_not_an_event_stream_is_an_error_and_not_retried(upstream, make_harness):
    h = make_harness(upstream)
    upstream.fault("not_a_stream")
    final, _ = h.run(PROMPT)
    assert final.error is ErrorCode.UPSTREAM_ERROR and final.details["kind"] == "invalid_stream"
    assert "application/json" in final.message and len(upstream.completion_calls()) == 1


def test_cancel_closes_the_upstream_connection_at_once(make_harness):
    slow = FakeUpstream(itl_ms=200).start()
    try:
        h = make_harness(slow)
        rid = h.submit(" ".join(["w"] * 50))
        wait_for(lambda: (h.pump(), len(h.outputs[rid]) >= 2)[1], 10, what="two chunks")
        h.runner.cancel(rid)
        call = slow.completion_calls()[0]
        wait_for(lambda: call.disconnected, 2, what="the upstream to see the connection closed")
        assert not call.completed and call.chunks < 10
        h.pump(0.5)
        assert not any(o.final for o in h.outputs[rid])  # the engine answers a cancel; the runner says nothing
    finally:
        slow.stop()


def test_the_deadline_bounds_the_whole_exchange(upstream, make_harness):
    h = make_harness(upstream)
    upstream.fault("slow_first_byte", delay_ms=3000)
    started = time.monotonic()
    final, _ = h.run(PROMPT, deadline_s=0.5)
    assert final.error is ErrorCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5


def test_a_connect_that_hangs_times_out_after_connect_timeout_ms(make_harness):
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        for s in fillers:
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        time.sleep(0.2)
        try:
            h = make_harness(base_url=f"http://127.0.0.1:{port}/v1", connect_timeout_ms=300, max_retries=0)
            started = time.monotonic()
            final, _ = h.run(PROMPT)
            assert final.error is ErrorCode.UPSTREAM_ERROR and final.details["kind"] == "timeout"
            assert 0.25 <= time.monotonic() - started < 2
        finally:
            for s in fillers:
                s.close()


def test_failover_to_the_next_upstream_and_cooldown(upstream, make_harness):
    down = closed_port_url()
    h = make_harness(upstreams=[down, upstream.base_url], cooldown_ms=60_000)
    final, text = h.run(PROMPT)
    assert (final.finish_reason, text) == ("stop", PROMPT)
    report = h.report()
    assert report["upstream"]["failovers"] == 1 and report["upstream"]["errors"] == {"connection": 1}
    assert [u["state"] for u in report["upstreams"]] == ["cooling", "ok"]
    assert report["health"] == "degraded"
    final, text = h.run(PROMPT)                # the cooling upstream is skipped: no error this time
    assert text == PROMPT and h.report()["upstream"]["errors"] == {"connection": 1}


def test_concurrent_streams_up_to_the_credits():
    limited = FakeUpstream(itl_ms=50).start()
    try:
        h = Harness({"base_url": limited.base_url, "model": "m"}, capacity=6)
        rids = [h.submit(" ".join(["w"] * 6)) for _ in range(6)]
        for rid in rids:
            assert h.final(rid).finish_reason == "stop"
        assert limited.peak == 6
        h.runner.close()
    finally:
        limited.stop()


def test_the_fakes_concurrency_limit_queues_the_rest():
    limited = FakeUpstream(itl_ms=20, max_concurrency=2).start()
    try:
        h = Harness({"base_url": limited.base_url, "model": "m"}, capacity=5)
        rids = [h.submit("a b c") for _ in range(5)]
        assert all(h.final(rid).finish_reason == "stop" for rid in rids)
        assert limited.peak == 2
        h.runner.close()
    finally:
        limited.stop()


def test_outage_degrades_then_a_probe_recovers_without_traffic(upstream, make_harness):
    h = make_harness(upstream, max_retries=1, connect_timeout_ms=500)
    upstream.down()
    final, _ = h.run(PROMPT)
    assert final.error is ErrorCode.UPSTREAM_ERROR and final.details["kind"] == "connection"
    assert wait_for(lambda: h.report()["health"] == "degraded", 5)
    upstream.up()
    assert wait_for(lambda: h.report()["health"] == "ok", 5, what="the probe to find the upstream back")
    assert any(c.path == "/v1/models" for c in upstream.calls)
    final, text = h.run(PROMPT)
    assert text == PROMPT


@pytest.mark.parametrize("value, problem", [(None, "is not set or empty"), ("  \n", "is not set or empty"),
                                            ("sk-a\x07b", "control characters"), ("sk-a b", "spaces")])
def test_a_missing_or_unusable_key_fails_the_load_for_good(upstream, monkeypatch, value, problem):
    from inferd.failures import Failure, UnrecoverableError, classify
    monkeypatch.delenv("THE_KEY", raising=False)
    if value is not None:
        monkeypatch.setenv("THE_KEY", value)
    runner = RemoteRunner({"base_url": upstream.base_url, "model": "m", "api_key_env": "THE_KEY"}, (), 1)
    with pytest.raises(UnrecoverableError, match=problem) as info:
        runner.load()
    assert classify(info.value) is Failure.UNRECOVERABLE and "sk-a" not in str(info.value)


def test_a_key_with_a_trailing_newline_is_sent_without_it(upstream, make_harness, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", KEY + "\n")
    h = make_harness(upstream)
    assert h.run(PROMPT)[1] == PROMPT
    assert upstream.completion_calls()[0].headers["Authorization"] == f"Bearer {KEY}"


def test_time_to_first_token_and_inter_token_latency_pass_through(make_harness):
    paced = FakeUpstream(ttft_ms=300, itl_ms=100).start()
    try:
        h = make_harness(paced)
        started = time.monotonic()
        rid = h.submit("a b c d")
        arrivals = []
        while not (h.outputs[rid] and h.outputs[rid][-1].final):
            seen = len(h.outputs[rid])
            h.pump(0.01)
            arrivals += [time.monotonic() - started] * sum(1 for o in h.outputs[rid][seen:] if o.text)
        assert len(arrivals) == 4 and arrivals[0] >= 0.3
        # Streamed as they come, not buffered: three gaps of 100 ms between the first and the last
        # (each gap alone jitters on a loaded machine; their sum does not vanish).
        assert arrivals[-1] - arrivals[0] >= 0.25, arrivals
        assert h.report()["upstream"]["first_token_ms"]["p50"] >= 300
    finally:
        paced.stop()


def test_a_wedged_event_loop_fails_the_step_so_the_worker_is_restarted(upstream, make_harness, monkeypatch):
    from inferd.failures import Failure, classify
    from inferd.runtimes.remote import runner as runner_module
    monkeypatch.setattr(runner_module, "LOOP_STALL_S", 0.5)
    h = make_harness(upstream)
    assert h.run(PROMPT)[1] == PROMPT
    h.submit(PROMPT)                                        # a stream is open ...
    h.runner._loop.call_soon_threadsafe(time.sleep, 1.5)   # ... and the loop is stuck in a call
    time.sleep(1.0)
    assert h.runner.next_step_in() is not None              # an idle engine still steps, and so checks
    with pytest.raises(RuntimeError, match="event loop has not run") as info:
        h.runner.step()
    assert classify(info.value) is Failure.UNKNOWN       # Escalate: a new process

"""The HTTP gateway against real daemons: the official openai SDK, raw HTTP, probes, metrics, failures."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import echo_config, free_port, wait_for

WORDS = "the quick brown fox jumps over the lazy dog"


def gateway_config(port: int, gateway: str = "", deployments: str = "", **kwargs) -> str:
    return echo_config(**kwargs, extra=f"[gateway]\nport = {port}\n{gateway}\n{deployments}")


class Gateway:
    """A daemon with its gateway, and plain HTTP/1.1 helpers for the exact bytes."""

    def __init__(self, daemon, port: int):
        self.daemon = daemon
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def post(self, path: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
        status, head, data = self.request("POST", path, body, headers)
        return status, head, json.loads(data)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict]:
        status, _, data = self.request("GET", path, headers=headers)
        return status, json.loads(data)

    def sdk(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def pid(self) -> int:
        """The current gateway process, from the supervisor's log."""
        return int(re.findall(r"started gateway \(pid (\d+)\)", self.daemon.logs())[-1])

    def wait_healthy(self, timeout: float = 15.0) -> None:
        def healthy():
            try:
                return self.request("GET", "/health", timeout=1.0)[0] == 200
            except OSError:
                return False
        wait_for(healthy, timeout, what="the gateway's /health to answer 200")


@pytest.fixture
def make_gateway(make_daemon):
    def make(wait_workers: bool = True, **kwargs) -> Gateway:
        port = free_port()
        daemon = make_daemon(gateway_config(port, **kwargs), start=False)
        daemon.start(wait=wait_workers)
        gw = Gateway(daemon, port)
        gw.wait_healthy()
        return gw
    return make


@pytest.fixture
def gateway(make_gateway):
    return make_gateway()


def sse_events(data: bytes) -> list[str]:
    """The payloads of a complete SSE body, checking the framing: every event is one data line."""
    text = data.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [event[len("data: "):] for event in events]


# --- the openai SDK, the conformance client -------------------------------------------------------


def test_openai_sdk_sync(gateway):
    client = gateway.sdk()
    assert [m.id for m in client.models.list()] == ["echo"]

    done = client.completions.create(model="echo", prompt=WORDS, max_tokens=4)
    assert done.choices[0].text == "the quick brown fox"
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (9, 4, 13)

    parts = list(client.completions.create(model="echo", prompt=WORDS, stream=True))
    assert "".join(p.choices[0].text for p in parts) == WORDS
    assert [p.choices[0].finish_reason for p in parts][-1] == "stop"
    assert all(p.id == parts[0].id for p in parts)

    chat = client.chat.completions.create(model="echo", messages=[
        {"role": "system", "content": "echo"}, {"role": "user", "content": "hello there"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "echo hello there"
    assert chat.choices[0].finish_reason == "stop"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 3)

    stream = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": WORDS}],
                                            stream=True, stream_options={"include_usage": True}, max_tokens=5)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "the quick brown fox jumps"
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "length"
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == 5


def test_openai_sdk_async(gateway):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        prompts = [" ".join(f"w{i}-{j}" for j in range(i % 5 + 1)) for i in range(20)]
        # Many requests at once over the gateway's one ZeroMQ path, each answered with its own text.
        done = await asyncio.gather(*(client.completions.create(model="echo", prompt=p) for p in prompts))
        assert [d.choices[0].text for d in done] == prompts

        stream = await client.completions.create(model="echo", prompt=WORDS, stream=True, max_tokens=3)
        assert "".join([p.choices[0].text async for p in stream]) == "the quick brown"

        chat = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": WORDS}])
        assert chat.choices[0].message.content == WORDS
        stream = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}],
                                                      stream=True)
        parts = [p async for p in stream]
        assert "".join(p.choices[0].delta.content or "" for p in parts) == "a b"
        assert parts[-1].choices[0].finish_reason == "stop"
        await client.close()

    asyncio.run(main())


def test_extensions_priority_and_deadline(make_gateway):
    gw = make_gateway(replicas=1, max_concurrency=1, options="delay_ms = 100")
    client = gw.sdk()
    # A deadline shorter than the output takes: 504 in the error shape, whether body field or header.
    for kwargs in ({"extra_body": {"deadline_ms": 150}}, {"extra_headers": {"X-Inferd-Deadline-Ms": "150"}}):
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="echo", prompt=WORDS, **kwargs)
        assert info.value.status_code == 504
        assert info.value.body["code"] == "deadline_exceeded"
    # A priority the deployment does not have is refused by the broker: the extension reached it.
    for kwargs in ({"extra_body": {"priority": 9}}, {"extra_headers": {"X-Inferd-Priority": "9"}}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="echo", prompt="a", **kwargs)
        assert "priority must be between 0 (most urgent) and 2" in info.value.body["message"]
    ok = client.completions.create(model="echo", prompt="a b", extra_body={"priority": 0, "deadline_ms": 5000})
    assert ok.choices[0].text == "a b"


# --- raw HTTP: exact framing and error bodies ---------------------------------------------------


def test_sse_framing(gateway):
    status, head, data = gateway.request("POST", "/v1/completions", {"model": "echo", "prompt": "a b c",
                                                                      "stream": True})
    assert status == 200
    assert head["content-type"] == "text/event-stream"
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert [b["choices"][0]["text"] for b in bodies] == ["a", " b", " c", ""]
    assert [b["choices"][0]["finish_reason"] for b in bodies] == [None, None, None, "stop"]
    assert {b["object"] for b in bodies} == {"text_completion"}

    status, _, data = gateway.request("POST", "/v1/chat/completions", {
        "model": "echo", "messages": [{"role": "user", "content": "x y"}], "stream": True})
    events = sse_events(data)
    bodies = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert [b["choices"][0]["delta"] for b in bodies] == [
        {"role": "assistant", "content": ""}, {"content": "x"}, {"content": " y"}, {}]
    assert {b["object"] for b in bodies} == {"chat.completion.chunk"}


def test_an_error_after_streaming_began_is_a_final_sse_event(make_gateway):
    gw = make_gateway(replicas=1, options="delay_ms = 100")
    status, head, data = gw.request("POST", "/v1/completions", {"model": "echo", "prompt": WORDS, "stream": True},
                                    headers={"X-Inferd-Deadline-Ms": "250"})
    assert status == 200  # the first word came at once, so the response had begun
    events = [json.loads(e) for e in sse_events(data)]  # no [DONE]: the stream ended on the error
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["the", " quick", " brown"]
    assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "deadline_exceeded"
    assert events[-1]["error"]["type"] == "timeout_error" and "250 ms" in events[-1]["error"]["message"]


def assert_error(status: int, body: dict, expected_status: int, code: str) -> str:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]["message"]


def test_malformed_requests_get_400_or_413_never_500(gateway):
    url = "/v1/completions"
    json_type = {"Content-Type": "application/json"}
    cases = [
        (b"{not json", json_type, 400, "bad_request", "not valid JSON"),
        (b"[1, 2]", json_type, 400, "bad_request", "must be a JSON object"),
        (b"\xff\xfe", json_type, 400, "bad_request", "not valid JSON"),
        (b'{"model": "echo", "prompt": "x"}', {"Content-Type": "text/plain"}, 400, "bad_request", "Content-Type"),
        (b'{"model": "echo", "prompt": "x"}', {}, 400, "bad_request", "Content-Type"),
        (b"x" * (2 << 20), json_type, 413, "request_too_large", "max_body_bytes"),
    ]
    for body, headers, status, code, words in cases:
        got, _, data = gateway.request("POST", url, body, headers)
        assert words in assert_error(got, json.loads(data), status, code)

    for body, status, code, words in [
        ({"prompt": "x"}, 400, "bad_request", "model is required"),
        ({"model": "echo"}, 400, "bad_request", "prompt must be a string"),
        ({"model": "echo", "prompt": "x", "n": 2}, 400, "bad_request", "n must be 1"),
        ({"model": "echo", "prompt": "x", "max_tokens": 0}, 400, "bad_request", "max_tokens"),
        ({"model": "echo", "prompt": "x", "max_tokens": "5"}, 400, "bad_request", "max_tokens"),
        ({"model": "echo", "prompt": "x", "stream": "yes"}, 400, "bad_request", "stream must be a boolean"),
        ({"model": "echo", "prompt": "x", "bogus": 1}, 400, "bad_request", "unrecognized request argument"),
        ({"model": "echo", "prompt": "x", "logprobs": 3}, 400, "bad_request", "logprobs is not supported"),
        ({"model": "echo", "prompt": "x", "stop": [1]}, 400, "bad_request", "stop must be"),
        # Valid OpenAI, but not a param the echo runtime has: the broker says so.
        ({"model": "echo", "prompt": "x", "temperature": 0.5}, 400, "bad_request", "params.temperature"),
        ({"model": "nope", "prompt": "x"}, 404, "unknown_deployment", "no deployment named 'nope'"),
    ]:
        got, _, data = gateway.post(url, body)
        assert words in assert_error(got, data, status, code)

    got, _, data = gateway.post("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user"}]})
    assert "messages[0].content" in assert_error(got, data, 400, "bad_request")
    got, _, data = gateway.post("/v1/chat/completions", {"model": "echo", "messages": []})
    assert_error(got, data, 400, "bad_request")
    got, _, data = gateway.request("GET", "/v1/completions")
    assert_error(got, json.loads(data), 405, "method_not_allowed")
    got, _, data = gateway.request("GET", "/nowhere")
    assert_error(got, json.loads(data), 404, "not_found")
    # Still serving after all that.
    got, _, data = gateway.post(url, {"model": "echo", "prompt": "still here"})
    assert got == 200 and data["choices"][0]["text"] == "still here"


def test_a_body_within_the_gateway_limit_but_over_the_brokers_gets_413(make_gateway):
    gw = make_gateway(gateway="max_body_bytes = 4194304")  # the broker's max_message_bytes stays 1 MiB
    status, _, body = gw.post("/v1/completions", {"model": "echo", "prompt": "w " * 1_000_000})
    assert "max_message_bytes" in assert_error(status, body, 413, "request_too_large")
    assert gw.post("/v1/completions", {"model": "echo", "prompt": "fine"})[0] == 200


def test_full_queue_gets_429_with_retry_after(make_gateway):
    gw = make_gateway(replicas=1, max_concurrency=1, queue_capacity=1)
    with gw.daemon.client() as client:
        busy = client.generate("echo", "a b c", delay_ms=1500)    # holds the only credit
        queued = client.generate("echo", "a b c", delay_ms=1500)  # fills the queue
        wait_for(lambda: gw.daemon.metrics()["echo"]["queued"] == 1, what="a queued request")
        for stream in (False, True):
            status, head, body = gw.post("/v1/completions", {"model": "echo", "prompt": "x", "stream": stream})
            assert_error(status, body, 429, "backpressure")
            assert body["error"]["type"] == "rate_limit_error"
            assert int(head["retry-after"]) >= 1 and int(head["retry-after-ms"]) >= 10
        with pytest.raises(openai.RateLimitError):
            gw.sdk().completions.create(model="echo", prompt="x")
        busy.close()
        queued.close()
    assert gw.daemon.metrics()["echo"]["rejected_backpressure"] == 3


# --- probes ---------------------------------------------------------------------------------------


def test_health_and_ready(make_gateway):
    failing = """
    [[deployment]]
    name = "broken"
    runtime = "echo"
    replicas = 1
    max_restarts = 0
    [deployment.options]
    fault_injection = true
    load_fault = "unrecoverable"
    """
    gw = make_gateway(wait_workers=False, deployments=failing, replicas=1)
    wait_for(lambda: gw.daemon.worker("broken-0")["state"] == "failed", what="the broken worker to fail")
    wait_for(lambda: gw.daemon.worker("echo-0")["state"] == "ready", what="echo to be ready")
    status, body = gw.get("/health")
    assert status == 200 and body["status"] == "ok"
    status, body = gw.get("/ready")
    assert status == 503 and body["not_ready"] == ["broken"] and body["ready"] is False
    assert body["deployments"]["echo"]["ready"] == 1
    assert gw.get("/ready?deployment=echo")[0] == 200
    status, body = gw.get("/ready?deployment=broken")
    assert status == 503 and body["not_ready"] == ["broken"]
    status, body = gw.get("/ready?deployment=nope")
    assert_error(status, body, 404, "model_not_found")
    # The failed deployment's requests are answered at once, as 503.
    status, _, body = gw.post("/v1/completions", {"model": "broken", "prompt": "x"})
    assert_error(status, body, 503, "unavailable")


def test_ready_when_all_ready(gateway):
    status, body = gateway.get("/ready")
    assert status == 200 and body["ready"] is True and body["not_ready"] == []


# --- disconnects ----------------------------------------------------------------------------------


def test_client_disconnect_cancels_the_request(make_gateway):
    gw = make_gateway(replicas=1, max_concurrency=1, options="delay_ms = 200")
    prompt = " ".join(["w"] * 50)  # 10 s of output
    for stream in (True, False):
        sock = socket.create_connection(("127.0.0.1", gw.port))
        body = json.dumps({"model": "echo", "prompt": prompt, "stream": stream}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if stream:
            received = b""
            while b"data: " not in received:  # streaming has begun
                received += sock.recv(65536)
        wait_for(lambda: gw.daemon.worker("echo-0")["in_flight"] == 1, what="the request to run")
        sock.close()
        # The CANCEL reached the worker: its only slot is free again, well before the output's 10 s.
        wait_for(lambda: gw.daemon.worker("echo-0")["in_flight"] == 0, timeout=3, what="the slot to be freed")
    metrics = gw.daemon.metrics()["echo"]
    assert metrics["cancelled"] == 2 and metrics["finals"] == {"CANCELLED": 2}
    started = time.monotonic()
    status, _, body = gw.post("/v1/completions", {"model": "echo", "prompt": "a b"})
    assert status == 200 and time.monotonic() - started < 2


# --- metrics --------------------------------------------------------------------------------------


def scrape(gw: Gateway, headers: dict | None = None) -> dict[str, dict[tuple, float]]:
    status, head, data = gw.request("GET", "/metrics", headers=headers)
    assert status == 200 and head["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(data.decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_after_known_traffic(make_gateway):
    gw = make_gateway(replicas=2)
    prompts = ["one", "two words", "three more words", "a b c d e"]
    for prompt in prompts:
        assert gw.post("/v1/completions", {"model": "echo", "prompt": prompt})[0] == 200
    gw.request("POST", "/v1/completions", {"model": "echo", "prompt": "x y z", "stream": True})
    assert gw.post("/v1/completions", {"model": "echo", "prompt": "x", "max_tokens": 0})[0] == 400  # not sent
    m = scrape(gw)
    echo = (("deployment", "echo"),)
    words = sum(len(p.split()) for p in prompts) + 3
    assert m["inferd_requests_total"] == {(("code", "OK"), ("deployment", "echo")): 5}
    assert m["inferd_generation_tokens_total"][echo] == words
    assert m["inferd_requests_waiting"][echo] == 0 and m["inferd_requests_running"][echo] == 0
    assert m["inferd_backpressure_rejections_total"][echo] == 0
    for name, count in [("inferd_e2e_request_latency_seconds", 5), ("inferd_time_to_first_token_seconds", 5),
                        ("inferd_request_queue_time_seconds", 5), ("inferd_inter_token_latency_seconds", words - 5)]:
        assert m[f"{name}_count"][echo] == count, name
        buckets = {dict(k)["le"]: v for k, v in m[f"{name}_bucket"].items()}
        assert buckets["+Inf"] == count
        values = [buckets[le] for le in sorted(buckets, key=float)]
        assert values == sorted(values)  # cumulative
        assert m[f"{name}_sum"][echo] > 0 or name == "inferd_request_queue_time_seconds"
    states = {dict(k)["state"]: v for k, v in m["inferd_workers"].items()}
    assert states["ready"] == 2 and sum(states.values()) == 2
    assert "inferd_worker_restarts_total" not in m or not any(m["inferd_worker_restarts_total"].values())


def test_worker_restarts_by_reason_in_metrics(make_gateway):
    gw = make_gateway(replicas=1, options="fault_injection = true")
    with gw.daemon.client() as client:
        with pytest.raises(Exception):
            client.complete("echo", "x", fault="poison")
    wait_for(lambda: gw.daemon.worker("echo-0")["restarts"] == 1 and gw.daemon.worker("echo-0")["state"] == "ready",
             what="the poisoned worker to be back")
    m = scrape(gw)
    assert m["inferd_worker_restarts_total"] == {(("deployment", "echo"), ("reason", "context_poisoned")): 1}
    assert m["inferd_requests_total"][(("code", "CONTEXT_POISONED"), ("deployment", "echo"))] == 1


# --- auth -----------------------------------------------------------------------------------------


def test_api_keys_from_env_and_file(make_gateway, tmp_path, monkeypatch):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# operators\nfile-key-1\n\n")
    monkeypatch.setenv("TEST_GATEWAY_KEYS", "env-key-1, env-key-2")
    gw = make_gateway(gateway=f'api_keys_env = "TEST_GATEWAY_KEYS"\napi_keys_file = "{keyfile}"')
    request = {"model": "echo", "prompt": "secret stuff"}
    refusals = []
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer env-key"},
                    {"Authorization": "env-key-1"}, {"Authorization": "Basic env-key-1"}):
        status, head, body = gw.post("/v1/completions", request, headers)
        assert_error(status, body, 401, "invalid_api_key")
        assert head["www-authenticate"].startswith("Bearer")
        refusals.append(body)
    assert all(r == refusals[0] for r in refusals)  # one answer for every wrong key: nothing to probe
    assert not any(k in json.dumps(refusals) for k in ("env-key", "file-key"))
    for key in ("env-key-1", "env-key-2", "file-key-1"):
        assert gw.post("/v1/completions", request, {"Authorization": f"Bearer {key}"})[0] == 200
    assert gw.sdk(api_key="file-key-1").completions.create(model="echo", prompt="ok").choices[0].text == "ok"
    with pytest.raises(openai.AuthenticationError):
        gw.sdk(api_key="nope").models.list()
    # Probes stay open for load balancers; metrics need a key like the API.
    assert gw.get("/health")[0] == 200 and gw.get("/ready")[0] == 200
    assert gw.request("GET", "/metrics")[0] == 401
    assert gw.request("GET", "/metrics", headers={"Authorization": "Bearer env-key-2"})[0] == 200


# --- the gateway process under supervision ----------------------------------------------------------


def unix_sockets(pid: int) -> int:
    """How many unix-domain sockets (ZeroMQ's ipc connections) the process holds."""
    with open("/proc/net/unix") as fh:
        inodes = {line.split()[6] for line in fh.readlines()[1:]}
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    return sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in inodes)


def test_the_gateway_never_loads_torch(gateway):
    assert gateway.sdk().completions.create(model="echo", prompt="x").choices[0].text == "x"
    with open(f"/proc/{gateway.pid()}/maps") as fh:
        assert not [line for line in fh if "torch" in line]


def test_gateway_killed_under_load_is_restarted_and_requests_fail_fast(make_gateway):
    gw = make_gateway(replicas=2, options="delay_ms = 50")
    first = gw.pid()
    idle_sockets = unix_sockets(first)
    assert idle_sockets >= 2  # the frontend and the control socket: the count sees ZeroMQ's connections
    outcomes: list[str] = []

    async def one(session: aiohttp.ClientSession, stream: bool) -> None:
        try:
            async with session.post(f"{gw.url}/v1/completions", json={
                    "model": "echo", "prompt": " ".join(["w"] * 100), "stream": stream}) as response:
                await response.read()
                outcomes.append(f"status {response.status}")
        except aiohttp.ClientError as exc:
            outcomes.append(type(exc).__name__)

    async def main():
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [asyncio.ensure_future(one(session, i % 2 == 0)) for i in range(16)]
            await asyncio.sleep(1.0)
            # 16 requests in flight share the gateway's ZeroMQ sockets: none was opened for them.
            assert unix_sockets(first) == idle_sockets
            os.kill(first, signal.SIGKILL)
            started = time.monotonic()
            await asyncio.gather(*tasks)
            return time.monotonic() - started

    elapsed = asyncio.run(main())
    # Every in-flight request ended with a connection error (the output needs 5 s; no hang, no success).
    assert len(outcomes) == 16 and not any(o.startswith("status") for o in outcomes), outcomes
    assert elapsed < 3, elapsed
    wait_for(lambda: gw.pid() != first, what="the gateway to be restarted")
    gw.wait_healthy()
    row = gw.daemon.status()["daemon"]["gateway"]  # what `inferctl status` shows
    assert (row["url"], row["pid"], row["state"], row["restarts"]) == (gw.url, gw.pid(), "running", 1)
    assert row["last_exit"] == "killed by SIGKILL"
    assert "gateway (pid %d) killed by SIGKILL" % first in gw.daemon.logs()
    status, _, body = gw.post("/v1/completions", {"model": "echo", "prompt": "back again"})
    assert status == 200 and body["choices"][0]["text"] == "back again"
    # The broker noticed its gone client and stopped the orphaned work.
    wait_for(lambda: gw.daemon.metrics()["echo"]["in_flight"] == 0, timeout=10, what="orphans cancelled")


def test_a_port_in_use_leaves_the_gateway_down_and_zeromq_serving(make_daemon):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon(gateway_config(port, replicas=1))
        wait_for(lambda: "gateway (pid" in daemon.logs() and "stays down" in daemon.logs(),
                 what="the gateway to be left down")
        assert "cannot listen on 127.0.0.1:%d" % port in daemon.logs()
        row = wait_for(lambda: daemon.status()["daemon"]["gateway"], what="the gateway's row")
        assert row["state"] == "failed" and row["pid"] == 0 and "unrecoverable" in row["last_exit"]
        with daemon.client() as client:
            assert client.complete("echo", "still serving") == "still serving"
        assert daemon.proc.poll() is None


def test_the_gateway_outlives_a_broker_restart(gateway):
    old = gateway.daemon.status()["broker"]["pid"]
    os.kill(old, signal.SIGKILL)

    def new_broker():
        try:
            return gateway.daemon.status()["broker"]["pid"] != old
        except Exception:
            return False
    wait_for(new_broker, what="a new broker")
    first = gateway.pid()

    def served():
        status, _, body = gateway.post("/v1/completions", {"model": "echo", "prompt": "after the restart"})
        return status == 200 and body["choices"][0]["text"] == "after the restart"
    wait_for(served, timeout=15, interval=0.2, what="the gateway to serve through the new broker")
    assert gateway.get("/health")[0] == 200 and gateway.get("/ready")[0] == 200
    assert gateway.pid() == first  # the same gateway process: it reconnected, it was not restarted


def test_the_gateway_reaches_a_curve_tcp_frontend_with_its_own_key(make_daemon, tmp_path):
    from inferd import curve

    keys = tmp_path / "keys"
    _, server_secret = curve.generate(keys / "server", "server")
    _, gateway_secret = curve.generate(keys / "clients", "gateway")
    port = free_port()
    broker = (f'frontend = "tcp://127.0.0.1:{free_port()}"\ncurve_secret_key = "{server_secret}"\n'
              f'curve_allowed_clients = "{keys / "clients"}"\n')
    daemon = make_daemon(gateway_config(port, gateway=f'curve_client_key = "{gateway_secret}"', broker=broker,
                                        replicas=1))
    gw = Gateway(daemon, port)
    gw.wait_healthy()
    assert gw.sdk().completions.create(model="echo", prompt="over curve").choices[0].text == "over curve"


def test_a_draining_daemon_finishes_http_requests_and_refuses_new_ones(make_gateway):
    gw = make_gateway(replicas=1, options="delay_ms = 100")
    results: dict[str, object] = {}

    async def slow() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async with session.post(f"{gw.url}/v1/completions",
                                    json={"model": "echo", "prompt": " ".join(["w"] * 15)}) as response:
                results["slow"] = (response.status, await response.json())

    async def main():
        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.5)  # running on the worker
        gw.daemon.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        results["new"] = await asyncio.to_thread(gw.post, "/v1/completions", {"model": "echo", "prompt": "x"})
        results["ready"] = await asyncio.to_thread(gw.get, "/ready")
        await task

    asyncio.run(main())
    status, _, body = results["new"]
    assert_error(status, body, 503, "shutting_down")
    assert results["ready"][0] == 503 and results["ready"][1]["draining"] is True
    status, body = results["slow"]  # the in-flight request finished within the grace period
    assert status == 200 and body["choices"][0]["text"] == " ".join(["w"] * 15)
    assert gw.daemon.wait(20) == 0
    assert "gateway (pid" in gw.daemon.logs() and "gateway stopping" in gw.daemon.logs()

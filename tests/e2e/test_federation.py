"""Two inferd daemons federated: remote deployments on one stream from the other's OpenAI gateway.

The second daemon serves echo and the torch ``tiny`` model behind its gateway (with an API key); the
first calls it with the chat API (echo) and the completions API (tiny). Whatever the first streams must
be exactly what the second answers when asked directly, greedy or seeded sampling alike.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("torch")

from tests.daemon import echo_config, free_port, wait_for  # noqa: E402
from tests.e2e.test_torch import torch_deployment  # noqa: E402

KEY = "sk-federation-7777"
PROMPTS = ["Hello world", "the quick brown fox jumps over the lazy dog", "naïve café 日本語", "x"]


def federated(base_url: str) -> str:
    return "".join(f"""
[[deployment]]
name = "{name}"
runtime = "remote"
max_concurrency = 8
[deployment.options]
base_url = "{base_url}"
api = "{api}"
model = "{model}"
api_key_env = "INFERD_FED_KEY"
""" for name, api, model in (("fed-echo", "chat", "echo"), ("fed-tiny", "completions", "tiny")))


def test_a_remote_deployment_on_inferds_own_gateway_streams_what_the_other_daemon_serves(make_daemon, monkeypatch):
    monkeypatch.setenv("INFERD_FED_KEY", KEY)
    monkeypatch.setenv("INFERD_API_KEYS", KEY)    # the second daemon's gateway asks for it
    port = free_port()
    second = make_daemon(echo_config(replicas=1, extra=torch_deployment("tiny") + f"\n[gateway]\nport = {port}\n"),
                         start=False)
    second.start(wait=False)
    second.wait_ready(90)
    near_port = free_port()
    first = make_daemon(echo_config(replicas=1, extra=federated(f"http://127.0.0.1:{port}/v1")
                                    + f"\n[gateway]\nport = {near_port}\n"))
    with first.client() as near, second.client() as far:
        for prompt in PROMPTS:
            assert near.complete("fed-echo", prompt) == far.complete("echo", prompt)
            for params in ({"max_tokens": 24}, {"max_tokens": 16, "temperature": 0.8, "seed": 7}):
                direct = far.complete("tiny", prompt, **params)
                assert near.complete("fed-tiny", prompt, **params) == direct
        stream = near.generate("fed-tiny", "Hello", max_tokens=5)
        direct = far.generate("tiny", "Hello", max_tokens=5)
        assert "".join(c.text for c in stream) == "".join(c.text for c in direct)
        assert stream.finish_reason == "length"
        # The usage the far gateway streams (stream_options.include_usage) is the near DONE's: the
        # model's own counts for tiny, the gateway's (prompt words, chunks) for echo, which counts none.
        assert stream.usage == direct.usage and direct.usage["completion_tokens"] == 5
        echoed = near.generate("fed-echo", "one two three")
        assert [c.text for c in echoed if c.text] == ["one", " two", " three"]
        assert echoed.usage == {"prompt_tokens": 3, "completion_tokens": 3}
    # The first daemon's Prometheus metrics count what its providers did (the figures ride heartbeats).
    def upstream_figures() -> dict:
        reply = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{near_port}/metrics",
                                                              headers={"Authorization": f"Bearer {KEY}"}), timeout=5)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(reply.read().decode()) for s in family.samples
                if s.name.startswith("inferd_upstream")}
    calls = 2 * len(PROMPTS) + 1
    echo_calls = len(PROMPTS) + 1
    figures = wait_for(lambda: (f := upstream_figures()).get(
        ("inferd_upstream_responses_total", (("deployment", "fed-tiny"), ("status", "200")))) == calls
        and f.get(("inferd_upstream_attempts_total", (("deployment", "fed-echo"),))) == echo_calls and f, 5,
        what="the upstream figures in /metrics")
    assert figures[("inferd_upstream_time_to_first_token_seconds_count", (("deployment", "fed-tiny"),))] == calls
    assert figures[("inferd_upstream_up", (("deployment", "fed-tiny"), ("upstream", f"http://127.0.0.1:{port}/v1"),
                                           ("worker", "fed-tiny-0")))] == 1

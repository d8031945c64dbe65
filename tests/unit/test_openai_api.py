"""The gateway's OpenAI shapes: request checking, error mapping, response bodies (no sockets)."""

from __future__ import annotations

import json

import pytest

from inferd.errors import ErrorCode
from inferd.gateway import openai_api as api


def job(body: dict, chat: bool = False, headers: dict | None = None) -> api.Job:
    return api.parse_job(body, chat, headers or {})


def refusal(body: dict, chat: bool = False, headers: dict | None = None) -> api.ApiError:
    with pytest.raises(api.ApiError) as info:
        job(body, chat, headers)
    assert info.value.status == 400
    return info.value


def test_completion_fields_become_runtime_params():
    j = job({"model": "m", "prompt": ["hi"], "max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 3,
             "stop": "x", "n": 1, "presence_penalty": 0, "logprobs": None, "user": "u"})
    assert (j.model, j.prompt, j.messages, j.stream, j.chat) == ("m", "hi", None, False, False)
    assert j.params == {"max_tokens": 5, "temperature": 0.0, "top_p": 0.5, "seed": 3, "stop": ["x"]}
    assert (j.priority, j.deadline_ms) == (None, None)


def test_chat_messages_and_text_parts():
    j = job({"model": "m", "messages": [{"role": "system", "content": "be"},
                                        {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}],
             "max_completion_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}, chat=True)
    assert j.messages == [{"role": "system", "content": "be"}, {"role": "user", "content": "ab"}]
    assert j.params == {"max_tokens": 7} and j.stream and j.include_usage
    assert j.prompt_words() == 2


def test_extensions_from_body_and_headers_the_header_wins():
    j = job({"model": "m", "prompt": "x", "priority": 2, "deadline_ms": 100})
    assert (j.priority, j.deadline_ms) == (2, 100)
    j = job({"model": "m", "prompt": "x", "priority": 2}, headers={"X-Inferd-Priority": " 0 ",
                                                                    "X-Inferd-Deadline-Ms": "50"})
    assert (j.priority, j.deadline_ms) == (0, 50)
    assert refusal({"model": "m", "prompt": "x"}, headers={"X-Inferd-Deadline-Ms": "soon"}).param == \
        "X-Inferd-Deadline-Ms"
    assert refusal({"model": "m", "prompt": "x", "deadline_ms": 0}).param == "deadline_ms"


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x"}, "model", "model is required"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt", "list of one string"),
    ({"model": "m", "prompt": "x", "n": 3}, "n", "n must be 1"),
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of", "not supported"),
    ({"model": "m", "prompt": "x", "temperature": 3}, "temperature", "between 0 and 2"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p", "above 0"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed", "integer"),
    ({"model": "m", "prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"model": "m", "prompt": "x", "messages": []}, "messages", "unrecognized"),
])
def test_refusals_name_the_field(body, param, words):
    error = refusal(body)
    assert error.param == param and words in error.message
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error",
                                      "code": "bad_request", "param": param}}


@pytest.mark.parametrize("messages", [None, [], [{"content": "x"}], [{"role": "user", "content": 1}],
                                      [{"role": "user", "content": [{"type": "image_url"}]}],
                                      [{"role": "user", "content": "x", "tool_calls": []}]])
def test_bad_messages(messages):
    assert refusal({"model": "m", "messages": messages}, chat=True).param == "messages"


@pytest.mark.parametrize("data", [b"{", b"[]", b"\xff", b'"x"', b"[" * 100_000])
def test_parse_json_refuses_what_is_not_an_object(data):
    with pytest.raises(api.ApiError) as info:
        api.parse_json(data)
    assert info.value.status == 400


def test_status_table():
    expected = {ErrorCode.BAD_REQUEST: 400, ErrorCode.UNKNOWN_DEPLOYMENT: 404, ErrorCode.BACKPRESSURE: 429,
                ErrorCode.UNAVAILABLE: 503, ErrorCode.SHUTTING_DOWN: 503, ErrorCode.DEADLINE_EXCEEDED: 504,
                ErrorCode.INTERNAL: 500}
    for code, status in expected.items():
        error = api.from_inferd(code, "m")
        assert error.status == status and error.body()["error"]["code"] == code.value.lower()
    hint = api.from_inferd(ErrorCode.BACKPRESSURE, "full", {"retry_after_ms": 1200})
    assert hint.headers == {"Retry-After": "2", "retry-after-ms": "1200"}
    assert api.from_inferd(ErrorCode.BACKPRESSURE, "full", {"retry_after_ms": 10}).headers["Retry-After"] == "1"


def test_reply_bodies_and_usage_fallback():
    j = job({"model": "m", "prompt": "three little words"})
    reply = api.Reply(j)
    whole = reply.whole("out put", {"finish_reason": "length", "chunks": 2})
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert whole["choices"] == [{"index": 0, "text": "out put", "logprobs": None, "finish_reason": "length"}]
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    reported = reply.whole("x", {"finish_reason": "stop", "chunks": 1,
                                 "usage": {"prompt_tokens": 11, "completion_tokens": 4}})
    assert reported["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}

    chat = api.Reply(job({"model": "m", "messages": [{"role": "user", "content": "a"}]}, chat=True))
    assert chat.delta("", first=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat.delta("b")["choices"][0]["delta"] == {"content": "b"}
    assert chat.delta("", "stop")["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": "stop"}
    assert chat.whole("a", {"chunks": 1})["choices"][0]["message"] == {"role": "assistant", "content": "a"}
    assert api.sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert json.loads(api.sse(chat.usage_chunk({"chunks": 1}))[6:])["choices"] == []


@pytest.mark.parametrize("chat", [False, True])
def test_the_text_event_template_equals_the_whole_event(chat):
    body = {"model": 'a "model"\n', "messages": [{"role": "user", "content": "x"}]} if chat else {
        "model": "m\u00e9", "prompt": "x"}
    reply = api.Reply(job(body, chat=chat))
    for text in ("", "word", ' "quoted" ', "new\nline", "caf\u00e9 \U0001f600", "\\", "\x00"):
        assert reply.text_event(text) == api.sse(reply.delta(text))

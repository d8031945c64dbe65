"""The OpenAI HTTP API's shapes, without sockets: request bodies in, response bodies out.

Requests are checked as strictly as the wire protocol checks SUBMIT: an
unknown field, a wrong type or a value inferd cannot honour (``n`` above 1, a
penalty, logprobs) is a 400 that names it, never silently ignored. Fields
that OpenAI clients send with their neutral values (``n: 1``,
``presence_penalty: 0``, ``logprobs: null``...) are accepted, so LangChain and
friends work unchanged.

inferd's extensions, as body fields or headers (the header wins):

* ``priority`` / ``X-Inferd-Priority``: 0 is the most urgent;
* ``deadline_ms`` / ``X-Inferd-Deadline-Ms``: the request's time budget, which
  may only shorten the deployment's ``default_deadline_ms``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgspec

from inferd.errors import ErrorCode

PRIORITY_HEADER = "X-Inferd-Priority"
DEADLINE_HEADER = "X-Inferd-Deadline-Ms"

# inferd's error codes as HTTP statuses and OpenAI error types.
STATUS = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_DEPLOYMENT: (404, "invalid_request_error"),
    ErrorCode.BACKPRESSURE: (429, "rate_limit_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable_error"),
    ErrorCode.SHUTTING_DOWN: (503, "service_unavailable_error"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    # Failures of an accepted request that a retry may fix: the service, not the request, failed.
    ErrorCode.WORKER_LOST: (503, "server_error"),
    ErrorCode.CONTEXT_POISONED: (503, "server_error"),
    ErrorCode.OUT_OF_MEMORY: (503, "server_error"),
    # The gateway's own connection to the broker was reset or read too slowly: retry.
    ErrorCode.SLOW_READER: (503, "server_error"),
    ErrorCode.CONNECTION_RESET: (503, "server_error"),
    ErrorCode.CANCELLED: (499, "cancelled"),  # only ever seen by a client that has gone
    ErrorCode.INTERNAL: (500, "server_error"),
    # A remote deployment's provider failed or refused inferd's key: a bad gateway, not the caller's fault.
    ErrorCode.UPSTREAM_ERROR: (502, "server_error"),
    ErrorCode.UPSTREAM_AUTH: (502, "server_error"),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="bad_request", param=param)


def from_inferd(code: ErrorCode, message: str, details: Mapping[str, Any] | None = None) -> ApiError:
    """An inferd error as the HTTP error the table in docs/gateway.md says."""
    status, type_ = STATUS.get(code, (500, "server_error"))
    headers = {}
    retry_ms = (details or {}).get("retry_after_ms")
    if code is ErrorCode.BACKPRESSURE and isinstance(retry_ms, int):
        # Retry-After takes whole seconds; the OpenAI SDKs read retry-after-ms first.
        headers = {"Retry-After": str(max(1, math.ceil(retry_ms / 1000))), "retry-after-ms": str(retry_ms)}
    return ApiError(status, message, type_, code.value.lower(), headers=headers)


# --- requests ---------------------------------------------------------------------------------

@dataclass
class Job:
    """One OpenAI request, as inferd will run it."""
    chat: bool
    model: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    stream: bool
    include_usage: bool
    params: dict[str, Any] = field(default_factory=dict)
    priority: int | None = None
    deadline_ms: int | None = None

    def prompt_words(self) -> int:
        """The fallback prompt token count when the runtime reports none: whitespace-separated words."""
        if self.messages is not None:
            return sum(len(m["content"].split()) for m in self.messages)
        return len((self.prompt or "").split())


# Fields accepted only at these neutral values: what OpenAI clients send by default.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None), "best_of": (1, None), "presence_penalty": (0, None), "frequency_penalty": (0, None),
    "logit_bias": (None, {}), "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (False, None),
    "suffix": (None, ""), "parallel_tool_calls": (None, True, False), "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"),
}
_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "user",
           "priority", "deadline_ms"}
COMPLETION_FIELDS = _COMMON | {"prompt", "n", "best_of", "presence_penalty", "frequency_penalty", "logit_bias",
                               "logprobs", "echo", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "n", "presence_penalty", "frequency_penalty",
                         "logit_bias", "logprobs", "top_logprobs", "parallel_tool_calls", "tools", "tool_choice",
                         "response_format", "service_tier"}


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{name} must be a number between {low:g} and {high:g}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"{name} must be an integer between {low} and {high}", name)
    return value


def _header_int(headers: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise bad_request(f"header {name} must be an integer between {low} and {high}", name)
    return value


_decode_json = msgspec.json.Decoder().decode
encode_json = msgspec.json.Encoder().encode  # compact; measured at a tenth of json.dumps's time


def parse_json(data: bytes) -> dict[str, Any]:
    """The body as JSON (msgspec: measured at a tenth of ``json.loads``'s time, and strict: no NaN)."""
    try:
        body = _decode_json(data)
    except (msgspec.DecodeError, RecursionError) as exc:  # invalid UTF-8 included; nesting too deep
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def parse_job(body: dict[str, Any], chat: bool, headers: Mapping[str, str]) -> Job:
    """A checked :class:`Job` from a /v1/completions or /v1/chat/completions body; raises ApiError."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in body:
        if name not in allowed:
            raise bad_request(f"unrecognized request argument supplied: {name}", name)
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            if name == "n":
                raise bad_request("n must be 1: inferd returns one choice per request (send n requests instead)",
                                  "n")
            raise bad_request(f"{name} is not supported by inferd (only {neutral[0]!r} is accepted)", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: the name of a deployment (GET /v1/models lists them)", "model")

    prompt = messages = None
    if chat:
        messages = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string (or a list of one string)", "prompt")

    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise bad_request("stream_options must be an object with at most include_usage (a boolean)",
                          "stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("user must be a string", "user")

    params: dict[str, Any] = {}
    max_tokens = _integer(body, "max_tokens", 1, 1_000_000)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", 1, 1_000_000)
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = _number(body, name, low, high)
        if value is not None:
            params[name] = value
    if body.get("top_p") is not None and params["top_p"] == 0:
        raise bad_request("top_p must be above 0", "top_p")
    seed = _integer(body, "seed", 0, 2**63 - 1)
    if seed is not None:
        params["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) and s for s in stop)):
            raise bad_request("stop must be a string or a list of at most 16 non-empty strings", "stop")
        if stop:
            params["stop"] = stop

    priority = _header_int(headers, PRIORITY_HEADER, 0, 15)
    if priority is None:
        priority = _integer(body, "priority", 0, 15)
    deadline_ms = _header_int(headers, DEADLINE_HEADER, 1, 86_400_000)
    if deadline_ms is None:
        deadline_ms = _integer(body, "deadline_ms", 1, 86_400_000)
    return Job(chat, model, prompt, messages, stream, bool((options or {}).get("include_usage")), params,
               priority, deadline_ms)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
        if set(message) - {"role", "content", "name"}:
            raise bad_request(f"messages[{i}]: only role, content and name are supported", "messages")
        out.append({"role": message["role"], "content": content})
    return out


# --- responses --------------------------------------------------------------------------------

_MARK = "\x00"  # stands for the text in a content delta's template; no other field can hold it
# Response ids: unique within this process by the counter, across processes and restarts by the prefix.
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)


class Reply:
    """Builds the bodies of one request's response, streamed or whole."""

    def __init__(self, job: Job):
        self.job = job
        self.id = f"{'chatcmpl' if job.chat else 'cmpl'}-{_ID_PREFIX}{next(_ids):010x}"
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if job.chat else "text_completion"
        self._template: tuple[bytes, bytes] | None = None

    def usage(self, done: Mapping[str, Any]) -> dict[str, int]:
        """From DONE's usage when the runtime reports it; else prompt words and the chunks streamed."""
        usage = done.get("usage")
        if isinstance(usage, dict):
            prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        else:
            prompt, completion = self.job.prompt_words(), int(done.get("chunks", 0))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, text: str, done: Mapping[str, Any]) -> dict[str, Any]:
        finish = done.get("finish_reason", "stop")
        if self.job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion" if self.job.chat else "text_completion",
                "created": self.created, "model": self.job.model, "choices": [choice], "usage": self.usage(done)}

    def delta(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.job.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {"content": text} if finish_reason is None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.job.model,
                "choices": [choice]}

    def text_event(self, text: str) -> bytes:
        """``sse(self.delta(text))`` for a content delta, from a template: one per token, so only
        the text is encoded each time (0.5 µs against 7 µs for the whole body)."""
        if self._template is None:
            self._template = tuple(sse(self.delta(_MARK)).split(encode_json(_MARK)))
        head, tail = self._template
        return head + encode_json(text) + tail

    def usage_chunk(self, done: Mapping[str, Any]) -> dict[str, Any]:
        """The last event of a stream with ``stream_options.include_usage``: no choices, the usage."""
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.job.model,
                "choices": [], "usage": self.usage(done)}


def sse(body: Any) -> bytes:
    """One server-sent event: a ``data:`` line of compact JSON and a blank line."""
    return b"data: " + encode_json(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

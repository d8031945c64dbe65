"""The events of an OpenAI-compatible stream, decoded into what a worker forwards. Pure logic.

A worker decodes one event per token, so the shape it reads is declared once
as msgspec structs: the decoder fills only the fields named here, skips the
rest (ids, logprobs, roles) without building them, and checks the types on
the way, which ``json.loads`` and a walk through dicts did in Python.

An event is one of: a chunk of choices (the text of the first, and its finish
reason), a usage event (``stream_options.include_usage``: empty choices and
the token counts), or an error. Anything else raises :class:`ChunkError`,
whose ``kind`` is the ``details.kind`` of the request's UPSTREAM_ERROR.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ChunkError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind      # "stream_error" (the upstream reported one) or "invalid_json"
        self.message = message


class Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def as_dict(self) -> dict[str, int] | None:
        """DONE's usage; None when the provider left a count out (a usage it could not give is no error)."""
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None                 # completions
    delta: _Delta | None = None             # chat
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_any = msgspec.json.Decoder().decode


def error_message(data: str | bytes) -> str:
    """The message of an OpenAI-style error (``{"error": {"message": ...}}``), else the text itself."""
    text = (data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data).strip()
    try:
        obj = _decode_any(text)
    except msgspec.DecodeError:
        return text[:500]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:500]
        if isinstance(err, str):
            return err[:500]
    return text[:500]


def decode(data: str, chat: bool, error_event: bool = False) -> tuple[str, str | None, Usage | None]:
    """An event's text (maybe empty), finish reason and usage; an error event or a malformed one raises.
    ``error_event``: the SSE event was named ``error``."""
    try:
        chunk = _decode_chunk(data)
    except msgspec.ValidationError:
        chunk = None  # valid JSON of another shape: an error event, or malformed (below)
    except msgspec.DecodeError:
        raise ChunkError("invalid_json", f"an event that is not JSON: {data[:200]!r}") from None
    if error_event or chunk is None or chunk.error:
        if error_event or _has_error(data):
            raise ChunkError("stream_error", f"an error in the stream: {error_message(data)}")
        raise ChunkError("invalid_json", f"a malformed event: {data[:200]!r}")
    choices = chunk.choices
    if not choices:
        if choices is None and chunk.usage is None:
            raise ChunkError("invalid_json", f"an event without choices: {data[:200]!r}")
        return "", None, chunk.usage
    choice = choices[0]
    if chat:
        text = choice.delta.content if choice.delta is not None else None
    else:
        text = choice.text
    return text or "", choice.finish_reason, chunk.usage


def _has_error(data: str) -> bool:
    obj = _decode_any(data)
    return isinstance(obj, dict) and bool(obj.get("error"))

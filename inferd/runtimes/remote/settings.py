"""A remote deployment's options, with their defaults, and the request body it sends. Pure logic.

The options are validated with the config (``inferd.runtimes.SPECS["remote"]``);
this module only gives them types and defaults. Defaults follow openai-python:
2 retries, a backoff from 0.5 s up to 8 s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inferd.errors import ErrorCode
from inferd.runtimes.base import RequestRejected, RunRequest
from inferd.runtimes.remote.retry import Backoff

PATHS = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass(frozen=True)
class Settings:
    urls: tuple[str, ...]
    api: str
    model: str
    api_key_env: str | None
    headers: dict[str, str]
    connect_timeout_s: float
    read_timeout_s: float
    max_retries: int
    backoff: Backoff
    cooldown_s: float
    probe_interval_s: float

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "Settings":
        urls = options.get("upstreams") or [options["base_url"]]
        return cls(
            urls=tuple(url.rstrip("/") for url in urls),
            api=options.get("api", "chat"),
            model=options["model"],
            api_key_env=options.get("api_key_env"),
            headers=dict(options.get("headers", {})),
            connect_timeout_s=options.get("connect_timeout_ms", 5_000) / 1000,
            read_timeout_s=options.get("read_timeout_ms", 60_000) / 1000,
            max_retries=options.get("max_retries", 2),
            backoff=Backoff(options.get("backoff_base_ms", 500) / 1000, options.get("backoff_cap_ms", 8_000) / 1000),
            cooldown_s=options.get("cooldown_ms", 5_000) / 1000,
            probe_interval_s=options.get("probe_interval_ms", 2_000) / 1000,
        )

    def endpoint(self, url: str) -> str:
        return url + PATHS[self.api]

    def body(self, request: RunRequest) -> bytes:
        """The JSON body of the upstream call: the request's prompt (or chat messages) and its
        sampling params, which have the OpenAI API's names and meanings. It asks for the usage
        (``stream_options.include_usage``: a last event with the token counts), which the
        request's DONE then carries."""
        if self.api == "chat":
            messages = request.messages or [{"role": "user", "content": request.prompt}]
            body: dict[str, Any] = {"model": self.model, "messages": messages}
        elif request.messages:
            raise RequestRejected(ErrorCode.BAD_REQUEST, "messages: this deployment calls a completions API "
                                                         "(api = \"completions\"): send a prompt")
        else:
            body = {"model": self.model, "prompt": request.prompt}
        body.update(request.params)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return json.dumps(body).encode()

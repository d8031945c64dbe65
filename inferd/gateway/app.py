"""The gateway's aiohttp application: OpenAI routes, probes, metrics, auth.

Every HTTP request shares the gateway's one :class:`~inferd.client.AsyncClient`
(one DEALER socket to the broker's frontend) and one control socket: there is
no socket per request. Each completion is a broker request whose messages are
relayed as they come; the HTTP status is chosen at the first chunk, so an
error before it (a full queue, a deadline passed in the queue) gets its own
status even with ``stream: true``, and one after it is a final SSE error event.

The handler runs as a task that aiohttp cancels when the client disconnects
(``handler_cancellation``): leaving the request's message loop then sends
CANCEL, so the worker stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
from typing import Any, Awaitable, Callable, Mapping

import zmq
import zmq.asyncio
from aiohttp import web

from inferd import __version__, errors, protocol as P
from inferd.client import AsyncClient
from inferd.config import Config
from inferd.gateway import openai_api as api
from inferd.gateway.prom import CONTENT_TYPE as PROM_CONTENT_TYPE, Exporter

log = logging.getLogger("inferd.gateway")

# Paths a load balancer probes without credentials.
OPEN_PATHS = frozenset({"/health", "/ready"})
CONTROL_TIMEOUT_S = 2.0
JSON_TYPES = ("application/json",)


class Control:
    """STATUS and METRICS over one DEALER on the broker's control socket, many calls in flight."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def call(self, command: bytes, timeout_s: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        cid = next(self._ids)
        future = self._pending[cid] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self.sock.send_multipart(P.encode(P.CONTROL, command, {"id": cid}))
                answer, body = await future
        except TimeoutError:
            raise errors.Unavailable(f"the broker did not answer {command.decode()} within {timeout_s:g} s") from None
        finally:
            self._pending.pop(cid, None)
        if answer == P.ERROR:
            raise errors.from_wire(str(body.get("code")), str(body.get("message", "")), body.get("details"))
        return body["result"]

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                answer, body = P.decode(P.CONTROL, frames, frozenset({P.OK, P.ERROR}))
            except P.ProtocolError:
                continue
            future = self._pending.get(body.get("id"))
            if future is not None and not future.done():
                future.set_result((answer, body))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.sock.close(0)


def load_api_keys(env_value: str | None, file_path: str | None) -> frozenset[str]:
    """Keys from the environment variable (comma or newline separated) and the file (one per line,
    ``#`` comments). Raises OSError when the file cannot be read."""
    keys = set()
    for part in (env_value or "").replace("\n", ",").split(","):
        if part.strip():
            keys.add(part.strip())
    if file_path:
        with open(file_path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(line)
    return frozenset(keys)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``web.json_response``, encoded by msgspec (:func:`~inferd.gateway.openai_api.encode_json`)."""
    response = web.Response(body=api.encode_json(body), status=status, headers=headers)
    response.content_type = "application/json"
    return response


def error_response(error: api.ApiError) -> web.Response:
    return json_response(error.body(), status=error.status, headers=error.headers)


def _from_exception(exc: errors.InferdError) -> api.ApiError:
    if isinstance(exc, errors.MessageTooLarge):  # within max_body_bytes, over the broker's max_message_bytes
        return api.ApiError(413, exc.message, code="request_too_large")
    return api.from_inferd(exc.code, exc.message, exc.details)


class Gateway:
    def __init__(self, config: Config, client: AsyncClient, control: Control, api_keys: frozenset[str]):
        self.config = config
        self.client = client
        self.control = control
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.exporter = Exporter()
        self.started = int(time.time())

    def app(self) -> web.Application:
        gw = self.config.gateway
        app = web.Application(client_max_size=gw.max_body_bytes, middlewares=[self._guard])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        return app

    # --- middlewares ------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """The API key check, then every error in OpenAI's JSON shape, aiohttp's own (404, 405, 413)
        included. One middleware, not two: each is a coroutine layer on every request."""
        try:
            if self.api_keys and request.path not in OPEN_PATHS:
                self._check_key(request)
            return await handler(request)
        except api.ApiError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            return error_response(api.ApiError(exc.status, exc.reason if exc.status != 413 else
                                               f"the request body is larger than {self.config.gateway.max_body_bytes}"
                                               f" bytes (gateway.max_body_bytes)", code=code,
                                               headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers
                                               else None))

    def _check_key(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode()
        # Compared with every key, in constant time each: neither the answer nor its timing
        # tells which keys exist.
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not matched:
            raise api.ApiError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                               "authentication_error", "invalid_api_key",
                               headers={"WWW-Authenticate": 'Bearer realm="inferd"'})

    # --- completions ------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        content_type = request.content_type
        if content_type not in JSON_TYPES:
            raise api.bad_request(f"Content-Type must be application/json, got {content_type or 'none'}")
        job = api.parse_job(api.parse_json(await request.read()), chat, request.headers)
        reply = api.Reply(job)
        replies = self.client.request(job.model, job.prompt, messages=job.messages, priority=job.priority,
                                      deadline_ms=job.deadline_ms, params=job.params)
        async with contextlib.aclosing(replies):
            try:
                command, body = await anext(replies)  # the first reply: its acceptance, or the error refusing it
                join = body.get("join", "")
                if command == P.ACCEPTED:
                    command, body = await anext(replies)  # the first chunk, or DONE
            except errors.InferdError as exc:
                raise _from_exception(exc) from None
            if job.stream:
                return await self._stream(request, reply, join, replies, command, body)
            texts = []
            while True:
                if "text" in body:  # a CHUNK, or the DONE that carries the last one
                    texts.append(body["text"])
                if command != P.CHUNK:
                    break
                try:
                    command, body = await anext(replies)
                except errors.InferdError as exc:
                    raise _from_exception(exc) from None
            return json_response(reply.whole(join.join(texts), body))

    async def _stream(self, request: web.Request, reply: api.Reply, join: str, replies: Any, command: bytes,
                      body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        out = []
        if reply.job.chat:
            out.append(api.sse(reply.delta("", first=True)))
        try:
            while True:
                if "text" in body:  # a CHUNK, or the DONE that carries the last one
                    text = body["text"]
                    out.append(reply.text_event(join + text if body["index"] else text))
                if command != P.CHUNK:
                    break
                await response.write(b"".join(out))
                out.clear()
                command, body = await anext(replies)
        except errors.InferdError as exc:
            await response.write(b"".join(out) + api.sse(_from_exception(exc).body()))
            return response
        out.append(api.sse(reply.delta("", body.get("finish_reason", P.FINISH_STOP))))
        if reply.job.include_usage:
            out.append(api.sse(reply.usage_chunk(body)))
        out.append(api.SSE_DONE)
        await response.write(b"".join(out))
        await response.write_eof()
        return response

    # --- models, probes, metrics ------------------------------------------------------------

    def _model_row(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "inferd"}

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list",
                              "data": [self._model_row(d.name) for d in self.config.deployments]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in {d.name for d in self.config.deployments}:
            raise api.ApiError(404, f"no deployment named {name!r}", code="model_not_found", param="model")
        return json_response(self._model_row(name))

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: this process answers, and so does the broker."""
        try:
            pong = await self.client.ping()
        except errors.InferdError as exc:
            return json_response({"status": "unavailable", "error": exc.message}, status=503)
        return json_response({"status": "ok", "version": __version__, "broker_epoch": pong.get("epoch")})

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness: every deployment (or the one asked for) has a ready worker."""
        try:
            status = await self.control.call(P.STATUS)
        except errors.InferdError as exc:
            return json_response({"ready": False, "error": exc.message}, status=503)
        deployments = status.get("deployments", {})
        asked = request.query.get("deployment")
        if asked is not None:
            if asked not in deployments:
                raise api.ApiError(404, f"no deployment named {asked!r}", code="model_not_found",
                                   param="deployment")
            deployments = {asked: deployments[asked]}
        not_ready = sorted(name for name, d in deployments.items() if d["ready"] == 0 or d["state"] == "failed")
        draining = status.get("broker", {}).get("state") == "draining"
        ok = not not_ready and not draining
        return json_response({"ready": ok, "not_ready": not_ready, "draining": draining,
                              "deployments": deployments}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            metrics, status = await asyncio.gather(self.control.call(P.METRICS), self.control.call(P.STATUS))
        except errors.InferdError as exc:
            raise api.ApiError(503, exc.message, "service_unavailable_error", "unavailable") from None
        return web.Response(body=self.exporter.render(metrics, status), headers={"Content-Type": PROM_CONTENT_TYPE})

"""A fake OpenAI-compatible upstream on aiohttp.web, for the remote runtime's tests and benchmark.

Modelled on llm-d's inference simulator: it streams the prompt's words back
(the last user message's, for chat), one word per event, with a configurable
time to first token and inter-token latency, honours ``max_tokens``, caps
concurrent streams (the rest wait), and injects faults by kind. Faults are
queued: each new completion request takes the next one, so a test scripts
exactly what the upstream does, call by call.

It records every call (path, headers, body, status, whether the client closed
the connection before the stream ended) for the tests to check.

Run in a thread of the test process (:meth:`FakeUpstream.start`), or as a
process for the benchmark: ``python -m tests.fake_upstream --itl-ms 20``
prints its port on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email.utils
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 200
    chunks: int = 0               # content events written
    completed: bool = False       # it wrote [DONE]
    disconnected: bool = False    # the client closed the connection before the stream ended
    started: float = field(default_factory=time.monotonic)


# Fault kinds, each a dict with "kind" and its settings:
#   status        {"status": 500 | 503 | 401 | 429 ..., "retry_after": "2", "retry_after_date": 2, "retry_after_ms": 50,
#                  "message": "..."}; a 401's message echoes the key it was sent, as real providers do
#   slow_first_byte {"delay_ms": 1000}: wait before the response headers
#   drop          {"after": 2}: close the connection after that many content events
#   split         {"piece": 3}: write every event in pieces of that many bytes, a few ms apart
#   invalid_json  {"after": 1}: an event whose data is not JSON, after that many content events
#   error_event   {"after": 1}: an OpenAI error event in the stream
#   not_a_stream  a 200 with a whole JSON completion, as if stream were false
#   stall         {"after": 2, "delay_ms": 1000}: a pause that long after that many content events
FAULT_KINDS = ("status", "slow_first_byte", "drop", "split", "invalid_json", "error_event", "not_a_stream",
               "stall")


class FakeUpstream:
    def __init__(self, *, ttft_ms: float = 0, itl_ms: float = 0, max_concurrency: int | None = None,
                 model: str = "fake-model", port: int = 0, api_key: str | None = None):
        self.ttft_ms = ttft_ms
        self.itl_ms = itl_ms
        self.model = model
        self.max_concurrency = max_concurrency
        self.port = port
        self.api_key = api_key        # when set, every call without it gets a 401
        self.calls: list[Call] = []
        self.faults: collections.deque[dict[str, Any]] = collections.deque()
        self.active = 0
        self.peak = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._limit: asyncio.Semaphore | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fault(self, kind: str, **settings: Any) -> "FakeUpstream":
        """Queue a fault for the next completion call."""
        assert kind in FAULT_KINDS, kind
        self.faults.append({"kind": kind, **settings})
        return self

    def completion_calls(self) -> list[Call]:
        return [c for c in self.calls if c.path.endswith("completions")]

    # --- running ----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_get("/v1/models", self._models)
        return app

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.max_concurrency:
            self._limit = asyncio.Semaphore(self.max_concurrency)
        self._runner = web.AppRunner(self.app(), shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # closes the listener and every open connection
            self._runner = None

    def start(self) -> "FakeUpstream":
        """Serve from a thread of its own; returns once it listens."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(self.serve())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake upstream did not start")
        return self

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def down(self) -> None:
        """Take it down: the port refuses connections, open streams are cut."""
        self._run(self.shutdown())

    def up(self) -> None:
        """Bring it back on the same port."""
        self._run(self.serve())

    def stop(self) -> None:
        if self._loop is not None:
            self._run(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _close(self) -> None:
        await self.shutdown()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:  # handlers of connections that were cut: end them here, not at exit
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    # --- handlers ---------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        call = Call(request.path, dict(request.headers), None)
        self.calls.append(call)
        if not self._authorized(call):
            return self._status(call, {"status": 401})
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        call = Call(request.path, dict(request.headers), body)
        self.calls.append(call)
        fault = self.faults.popleft() if self.faults else {}
        if not self._authorized(call):
            fault = {"kind": "status", "status": 401}
        if self._limit is not None:
            await self._limit.acquire()
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self._answer(request, call, fault)
        except ConnectionError:  # the client went away: what the cancel tests look for
            call.disconnected = True
            return web.Response(status=499)
        except asyncio.CancelledError:
            call.disconnected = True
            raise
        finally:
            self.active -= 1
            if self._limit is not None:
                self._limit.release()

    def _authorized(self, call: Call) -> bool:
        return self.api_key is None or call.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _answer(self, request: web.Request, call: Call, fault: dict[str, Any]) -> web.StreamResponse:
        kind = fault.get("kind")
        if kind == "slow_first_byte":
            await asyncio.sleep(fault["delay_ms"] / 1000)
        if kind == "status":
            return self._status(call, fault)
        if not isinstance(call.body, dict) or call.body.get("stream") is not True:
            call.status = 400
            return web.json_response({"error": {"message": "expected a JSON body with stream: true"}}, status=400)
        words, finish = self._output(call.body, request.path.endswith("chat/completions"))
        if kind == "not_a_stream":
            return web.json_response({"choices": [{"index": 0, "text": " ".join(words), "finish_reason": finish}]})
        chat = request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        piece = fault.get("piece") if kind == "split" else None
        if self.ttft_ms:
            await asyncio.sleep(self.ttft_ms / 1000)
        if chat:
            await self._send(resp, self._event(chat, {"role": "assistant", "content": ""}, None), piece)
        for i, word in enumerate(words):
            if i and self.itl_ms:
                await asyncio.sleep(self.itl_ms / 1000)
            if kind == "stall" and i == fault["after"]:
                await asyncio.sleep(fault["delay_ms"] / 1000)
            if kind == "drop" and i == fault["after"]:
                request.transport.close()
                return resp
            if kind == "invalid_json" and i == fault["after"]:
                await self._send(resp, b'data: {"choices": [{"delta": {"content": "x"\n\n', piece)
                return resp
            if kind == "error_event" and i == fault["after"]:
                await self._send(resp, b'data: {"error": {"message": "the model overheated", "type": '
                                       b'"server_error", "code": null}}\n\n', piece)
                return resp
            text = word if i == 0 else " " + word
            await self._send(resp, self._event(chat, {"content": text} if chat else text, None), piece)
            call.chunks += 1
        await self._send(resp, self._event(chat, {} if chat else "", finish), piece)
        if (call.body.get("stream_options") or {}).get("include_usage"):  # as OpenAI: no choices, the counts
            usage = {"prompt_tokens": self._prompt_tokens(call.body, chat), "completion_tokens": len(words),
                     "total_tokens": self._prompt_tokens(call.body, chat) + len(words)}
            await self._send(resp, b"data: " + json.dumps({"id": "fake-1", "model": self.model, "choices": [],
                                                           "usage": usage}).encode() + b"\n\n", piece)
        await self._send(resp, b"data: [DONE]\n\n", piece)
        call.completed = True
        await resp.write_eof()
        return resp

    def _status(self, call: Call, fault: dict[str, Any]) -> web.Response:
        status = fault["status"]
        call.status = status
        headers = {}
        if "retry_after" in fault:
            headers["Retry-After"] = str(fault["retry_after"])
        if "retry_after_date" in fault:  # seconds from now, as an HTTP date
            headers["Retry-After"] = http_date(fault["retry_after_date"])
        if "retry_after_ms" in fault:
            headers["retry-after-ms"] = str(fault["retry_after_ms"])
        message = fault.get("message", f"fake upstream fault {status}")
        if status == 401:
            message = f"Incorrect API key provided: {call.headers.get('Authorization', '').removeprefix('Bearer ')}"
        return web.json_response({"error": {"message": message, "type": "fake", "code": status}}, status=status,
                                 headers=headers)

    @staticmethod
    def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
        """Its usage's prompt_tokens: the words of the prompt, or of every message."""
        if chat:
            return sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        return len(str(body.get("prompt", "")).split())

    def _output(self, body: dict[str, Any], chat: bool) -> tuple[list[str], str]:
        if chat:
            users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
            prompt = users[-1] if users else ""
        else:
            prompt = body.get("prompt", "")
        words = str(prompt).split()
        limit = body.get("max_tokens")
        if isinstance(limit, int) and limit < len(words):
            return words[:limit], "length"
        return words, "stop"

    def _event(self, chat: bool, payload: Any, finish: str | None) -> bytes:
        choice = ({"index": 0, "delta": payload, "finish_reason": finish} if chat
                  else {"index": 0, "text": payload, "finish_reason": finish})
        obj = {"id": "fake-1", "object": "chat.completion.chunk" if chat else "text_completion",
               "model": self.model, "choices": [choice]}
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    @staticmethod
    async def _send(resp: web.StreamResponse, data: bytes, piece: int | None) -> None:
        if not piece:
            await resp.write(data)
            return
        for i in range(0, len(data), piece):
            await resp.write(data[i:i + piece])
            await asyncio.sleep(0.002)  # separate writes, so they reach the client in separate reads


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0)
    parser.add_argument("--itl-ms", type=float, default=0)
    parser.add_argument("--max-concurrency", type=int, default=None)
    args = parser.parse_args()
    fake = FakeUpstream(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, max_concurrency=args.max_concurrency,
                        port=args.port)

    async def run() -> None:
        await fake.serve()
        print(fake.port, flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

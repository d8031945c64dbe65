"""The floor under any aiohttp gateway: an aiohttp server that answers the gateway's requests itself.

POST /v1/completions {"model", "prompt", "stream"}: the prompt back as a text completion, whole or
one SSE event per word then [DONE], with no broker and no worker behind it. bench_gateway.py runs
it with inferd's own interpreter, beside the gateway and with the same client, so the gateway's
figures can be read against what its HTTP server alone costs on this machine (the physical limit of
the design), not only against other servers that share none of its costs.

Usage: ``python bench/http_floor.py PORT``.
"""

import json
import sys

from aiohttp import web


async def completions(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    prompt = body["prompt"]
    if not body.get("stream"):
        return web.json_response({"object": "text_completion", "model": body["model"],
                                  "choices": [{"index": 0, "text": prompt, "finish_reason": "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for word in prompt.split():
        await response.write(b"data: " + json.dumps({"choices": [{"index": 0, "text": word}]}).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)

"""Ray Serve echo server for bench_gateway.py: run with the peers' venv python, never inferd's.

POST / {"prompt", "stream"}: {"text"} whole, or one SSE event per word then [DONE]. One replica.
"""

import json
import signal
import sys
import threading

import ray
from ray import serve
from starlette.responses import JSONResponse, StreamingResponse


@serve.deployment(max_ongoing_requests=256)
class Echo:
    async def __call__(self, request):
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse({"text": body["prompt"]})

        async def events():
            for word in body["prompt"].split():
                yield "data: " + json.dumps({"text": word}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
    serve.run(Echo.bind(), route_prefix="/", blocking=False)
    print("READY", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()

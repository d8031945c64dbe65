"""The gateway process: load the API keys, wait for the broker, serve HTTP until SIGTERM.

It never imports torch. It binds one TCP listener (loopback by default) and
talks to the broker as an ordinary client (with CURVE keys when the frontend
is a tcp:// one that requires them). A port it cannot bind, or an API
key file it cannot read, is a configuration problem that a restart will not
fix: it exits with the unrecoverable status and the supervisor leaves it down
(the daemon keeps serving over ZeroMQ).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import zmq.asyncio
from aiohttp import web

from inferd import curve, exitcodes
from inferd.client import AsyncClient
from inferd.config import Config
from inferd.gateway.app import Control, Gateway, load_api_keys
from inferd.paths import Endpoints
from inferd.proc import child_spec, die_with_parent, setup_logging

log = logging.getLogger("inferd.gateway")

BROKER_WAIT_S = 30.0
# How long in-flight HTTP requests get once SIGTERM came (the broker has drained by then).
SHUTDOWN_TIMEOUT_S = 5.0


async def _wait_for_socket(endpoint: str) -> None:
    """The broker starts beside the gateway: wait for its ipc socket to exist."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    deadline = time.monotonic() + BROKER_WAIT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no broker socket at {path} after {BROKER_WAIT_S:g} s")
        await asyncio.sleep(0.02)


async def serve(config: Config, endpoints: Endpoints, api_keys: frozenset[str]) -> int:
    gw = config.gateway
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await _wait_for_socket(endpoints.frontend)
    await _wait_for_socket(endpoints.control)
    keys = None
    if gw.curve_client_key:
        keys = curve.ClientKeys.load(config.broker.curve_secret_key, gw.curve_client_key)
    client = AsyncClient(endpoints.frontend, answer_timeout_s=2.0, curve_keys=keys)
    control = Control(zmq.asyncio.Context.instance(), endpoints.control)
    gateway = Gateway(config, client, control, api_keys)
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, gw.host, gw.port, backlog=1024).start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", gw.host, gw.port, exc.strerror or exc)
        await runner.cleanup()
        return exitcodes.WORKER_UNRECOVERABLE
    log.info("gateway listening on http://%s:%d (%s)", gw.host, gw.port,
             f"{len(api_keys)} API key(s)" if api_keys else "no API keys: open to every caller")
    await stop.wait()
    log.info("gateway stopping")
    await runner.cleanup()
    await client.close()
    await control.close()
    return exitcodes.OK


def main() -> None:
    spec = child_spec()
    config = Config.from_dict(spec["config"])
    setup_logging("gateway", config.daemon.log_level)
    die_with_parent()
    gw = config.gateway
    try:
        keys = load_api_keys(os.environ.get(gw.api_keys_env), gw.api_keys_file)
    except OSError as exc:
        log.error("cannot read gateway.api_keys_file %s: %s", gw.api_keys_file, exc.strerror or exc)
        sys.exit(exitcodes.WORKER_UNRECOVERABLE)
    endpoints = Endpoints.for_dir(Path(spec["runtime_dir"]), spec.get("frontend"))
    try:
        sys.exit(asyncio.run(serve(config, endpoints, keys)))
    except curve.CurveKeyError as exc:
        log.error("gateway.curve_client_key: %s", exc)
        sys.exit(exitcodes.WORKER_UNRECOVERABLE)
    except Exception:
        log.exception("gateway crashed")
        sys.exit(exitcodes.FAILURE)

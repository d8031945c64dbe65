"""The reference that bench_core.py measures inferd against: the least a ZeroMQ broker can do.

Two processes, started by the benchmark:

* ``forwarder FRONTEND BACKEND``: a ROUTER for clients and a DEALER for the one
  worker, and a poll loop that moves frames between them untouched. It never
  decodes a body: the client's routing id travels with the message to the
  worker and back, so there is no queue, no request table, no admission.
* ``worker BACKEND``: decodes each SUBMIT and answers with the least a reply
  can be: one message per word, the last one a DONE that carries it (for a
  one-word prompt, a single message), in inferd's v2 format. This is the
  physical limit of a Python broker: inferd sends no more messages than this
  (fewer, by coalescing), so what it costs beyond it is its own work.
* ``worker-v1 BACKEND``: answers as inferd's protocol v1 did (ACCEPTED, one
  CHUNK per word, DONE, three-frame IFDC1 messages), to show what the
  protocol's message count alone cost.

What inferd adds on top of this (validation, queueing, credits, deadlines,
metrics, a worker engine thread) is what the benchmark puts a price on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import msgpack
import zmq

SIGNATURE_V1 = b"IFDC1"
SIGNATURE = b"IFDC2"
EPOCH = int.from_bytes(os.urandom(6), "big")


def die_with_parent() -> None:
    """Let the kernel kill this process if the benchmark dies without cleaning up."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        sys.exit(1)


def forwarder(frontend_endpoint: str, backend_endpoint: str) -> None:
    ctx = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    frontend.bind(frontend_endpoint)
    backend = ctx.socket(zmq.DEALER)
    backend.bind(backend_endpoint)
    peer = {frontend: backend, backend: frontend}
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            # Drain what is there before polling again, as inferd's broker does.
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                peer[sock].send_multipart(frames)


def _serve(backend_endpoint: str, answer) -> None:
    """Receive SUBMITs and have ``answer(send, client, id, words)`` reply with ``send(client, frames)``."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(backend_endpoint)

    def send(client: bytes, frames: list[bytes]) -> None:
        sock.send_multipart([client, *frames])

    while True:
        client, _signature, command, body = sock.recv_multipart()
        if command != b"SUBMIT":
            continue  # the benchmark sends nothing else
        request = msgpack.unpackb(body)
        answer(send, client, request["id"], request["prompt"].split())


def _answer_v2(send, client: bytes, cid, words: list[str]) -> None:
    """One reply per word, the last in DONE: the fewest messages a request can take."""
    def reply(command: str, body: dict) -> None:
        send(client, [SIGNATURE, msgpack.packb([[command, body]])])

    for index, word in enumerate(words[:-1]):
        reply("CHUNK", {"id": cid, "index": index, "text": word})
    reply("DONE", {"id": cid, "finish_reason": "stop", "index": len(words) - 1, "text": words[-1],
                   "chunks": len(words), "epoch": EPOCH, "join": " "})


def _answer_v1(send, client: bytes, cid, words: list[str]) -> None:
    """Protocol v1's messages: ACCEPTED, a CHUNK per word, DONE."""
    def reply(command: bytes, body: dict) -> None:
        send(client, [SIGNATURE_V1, command, msgpack.packb(body)])

    reply(b"ACCEPTED", {"id": cid, "epoch": EPOCH, "join": " "})
    for index, word in enumerate(words):
        chunk = {"id": cid, "index": index, "text": word}
        if index == len(words) - 1:
            chunk["finish_reason"] = "stop"
        reply(b"CHUNK", chunk)
    reply(b"DONE", {"id": cid, "finish_reason": "stop", "chunks": len(words)})


def worker(backend_endpoint: str) -> None:
    _serve(backend_endpoint, _answer_v2)


def worker_v1(backend_endpoint: str) -> None:
    _serve(backend_endpoint, _answer_v1)


def main() -> None:
    die_with_parent()
    role, *endpoints = sys.argv[1:]
    {"forwarder": forwarder, "worker": worker, "worker-v1": worker_v1}[role](*endpoints)


if __name__ == "__main__":
    main()

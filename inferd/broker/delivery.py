"""Replies that a client connection cannot take now: held, retried, bounded.

Two things stop the broker from writing to a client's connection:

* ``FULL``: ZeroMQ already queues ``client_send_hwm`` messages for it. That
  happens for a moment to a busy client that reads fine, and for good to one
  that stopped reading. So the broker first keeps a *backlog*: every reply, in
  order, up to another ``client_send_hwm`` messages, retried every few
  milliseconds. A client that catches up never notices. One that does not is a
  slow reader: its requests are *cut*.
* ``GONE``: the connection does not exist (any more). It closed, or ZeroMQ
  reset it after the client sent a frame over ``max_message_bytes``; a client
  with a fixed routing id comes back under the same id within milliseconds.
  Whatever was sent meanwhile is lost, so its requests are cut at once.

Cutting ends each of the connection's requests with one final reply
(``SLOW_READER`` or ``CONNECTION_RESET``) and drops their chunks (a DONE that
carries its request's last chunk becomes that ERROR). The finals,
and every ACCEPTED still owed, wait here in order and are retried until they
are written: nothing owed for an accepted request is dropped while the
connection exists. A GONE connection that has not come back after ``hold_s``
is forgotten with what it was owed.

Memory stays bounded: at most ``client_send_hwm`` messages in ZeroMQ's queue
and as many again in the backlog; once cut, no new request of the connection
is accepted, so what it is owed is at most two replies (an ACCEPTED and a
final, with no output text) per request it had in flight, and those are
bounded by the deployments' queue capacities and worker credits. Other replies
(a PONG, the refusal of a new SUBMIT) are kept up to :data:`MAX_OTHERS` per
cut connection, then dropped and counted.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

from inferd import protocol as P

# What a Transport's to_client reports. SENT is falsy, so a transport that returns None sends.
SENT, FULL, GONE = 0, 1, 2

# Replies that are not owed to an accepted request, kept per cut connection.
MAX_OTHERS = 1024
# How often delivery is tried again: very soon while a backlog may be draining, soon for a cut
# slow reader (it may be reading now), less often for a connection that is gone (it comes back,
# if at all, by reconnecting).
RETRY_BACKLOG_S = 0.002
RETRY_CUT_S = 0.02
RETRY_GONE_S = 0.2


@dataclass(eq=False, slots=True)
class HeldClient:
    reason: int                   # FULL or GONE
    limit: int                    # backlog size past which a FULL connection is a slow reader
    cut_error: Callable[[Any, int], dict[str, Any]]  # (client's id, reason) -> the ERROR body that ends it
    next_try: float = 0.0
    expires: float = float("inf")  # GONE: when to forget it
    cut: bool = False             # its requests were ended; chunks are dropped from now on
    replies: collections.deque = field(default_factory=collections.deque)  # (command, body, owed)
    others: int = 0               # replies held that are not owed to an accepted request
    dropped_chunks: int = 0
    dropped_others: int = 0

    def keep(self, command: bytes, body: dict[str, Any], owed: bool) -> bool:
        """Hold a reply for later; True if this made the connection a slow reader, to be cut."""
        if not self.cut:
            self.replies.append((command, body, owed))
            self.others += not owed
            if len(self.replies) <= self.limit:
                return False
            self.start_cut()
            return True
        if command == P.CHUNK:
            self.dropped_chunks += 1
        elif owed:
            self.replies.append(self._owed_after_cut(command, body))
        elif self.others < MAX_OTHERS:
            self.others += 1
            self.replies.append((command, body, False))
        else:
            self.dropped_others += 1
        return False

    def start_cut(self) -> None:
        """From now on only what is owed is kept: the chunks waiting are dropped with their requests,
        and a DONE waiting behind a dropped chunk of its request becomes the cut's ERROR."""
        self.cut = True
        lost = {body["id"] for command, body, _ in self.replies if command == P.CHUNK}
        kept: collections.deque = collections.deque()
        for command, body, owed in self.replies:
            if command == P.CHUNK:
                self.dropped_chunks += 1
            elif command == P.DONE and (body["id"] in lost or "text" in body):
                kept.append(self._owed_after_cut(command, body))
            else:
                kept.append((command, body, owed))
        self.replies = kept
        self.others = sum(1 for _, _, owed in kept if not owed)

    def _owed_after_cut(self, command: bytes, body: dict[str, Any]) -> tuple[bytes, dict[str, Any], bool]:
        """A final kept once the connection is cut. A DONE becomes the cut's ERROR: output of its
        request may have been dropped (a DONE with ``text`` carries a chunk that is dropped now).
        The acceptance it carried (``epoch``, ``join``) stays with it."""
        if command != P.DONE:
            return command, body, True
        error = self.cut_error(body["id"], self.reason)
        for name in ("epoch", "join"):
            if name in body:
                error[name] = body[name]
        if "text" in body:
            self.dropped_chunks += 1
        return P.ERROR, error, True

    def sent_first(self) -> None:
        _, _, owed = self.replies.popleft()
        self.others -= not owed

    def set_reason(self, reason: int, now: float, hold_s: float) -> None:
        if reason == FULL:
            self.expires = float("inf")
        elif self.expires == float("inf"):  # gone from now on: it has hold_s to come back
            self.expires = now + hold_s
        self.reason = reason
        delay = RETRY_GONE_S if reason == GONE else RETRY_CUT_S if self.cut else RETRY_BACKLOG_S
        self.next_try = now + delay

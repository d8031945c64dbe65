"""Replies that a client connection cannot take now: held, retried, bounded.

Two things stop the broker from writing to a client's connection:

* ``FULL``: ZeroMQ already queues ``client_send_hwm`` messages for it: the
  client reads too slowly (or not at all) while its requests stream.
* ``GONE``: the connection does not exist (any more). It closed, or ZeroMQ
  reset it after the client sent a frame over ``max_message_bytes``; a client
  with a fixed routing id comes back under the same id within milliseconds.

Either way the broker stops streaming to that connection and ends each of its
requests with one final reply (``SLOW_READER`` or ``CONNECTION_RESET``). Those
finals, and every ACCEPTED still owed, wait here in order and are retried until
they are written; nothing owed for an accepted request is ever dropped while
the connection exists. A GONE connection that has not come back after
``hold_s`` is forgotten with what it was owed.

Memory stays bounded: once a connection is held, no new request of it is
accepted, so its owed replies are at most two per request it had in flight
(an ACCEPTED and a final), and those are bounded by the deployments' queue
capacities and worker credits. Other replies (a PONG, the refusal of a new
SUBMIT) are kept up to :data:`MAX_OTHERS` per connection and then dropped and
counted. Chunks are dropped at once: their requests end with an error.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from inferd import protocol as P

# What a Transport's to_client reports. SENT is falsy, so a transport that returns None sends.
SENT, FULL, GONE = 0, 1, 2

# Replies that are not owed to an accepted request, kept per held connection.
MAX_OTHERS = 1024
# How often delivery is tried again: soon for a slow reader (it may be reading now), less
# often for a connection that is gone (it comes back, if at all, by reconnecting).
RETRY_FULL_S = 0.02
RETRY_GONE_S = 0.2


@dataclass(eq=False, slots=True)
class HeldClient:
    reason: int                   # FULL or GONE
    next_try: float
    expires: float                # GONE: when to forget it; inf while FULL
    replies: collections.deque = field(default_factory=collections.deque)  # (command, body, owed)
    others: int = 0               # replies held that are not owed to an accepted request
    dropped_chunks: int = 0
    dropped_others: int = 0

    def keep(self, command: bytes, body: dict[str, Any], owed: bool) -> None:
        """Hold a reply for later. Owed replies (ACCEPTED, finals) are always kept."""
        if command == P.CHUNK:
            self.dropped_chunks += 1
        elif owed:
            self.replies.append((command, body, True))
        elif self.others < MAX_OTHERS:
            self.others += 1
            self.replies.append((command, body, False))
        else:
            self.dropped_others += 1

    def sent_first(self) -> None:
        _, _, owed = self.replies.popleft()
        if not owed:
            self.others -= 1

    def set_reason(self, reason: int, now: float, hold_s: float) -> None:
        if reason == FULL:
            self.expires = float("inf")
        elif self.expires == float("inf"):  # gone from now on: it has hold_s to come back
            self.expires = now + hold_s
        self.reason = reason
        self.next_try = now + (RETRY_FULL_S if reason == FULL else RETRY_GONE_S)

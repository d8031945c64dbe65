"""Request routing: which of a deployment's ready workers takes the next request.

A policy is given the deployment's whole ready pool, sorted by worker id (so
that load-aware policies can see every worker's load) and must pick a worker
with a free credit, so it can never overload one; the broker owns the credit
accounting. A choice is made for every request, over every worker of the
pool: the loops below read plain attributes into locals and build nothing,
which keeps a choice among 64 workers to a few microseconds
(``bench/bench_routing.py``).
Policies are small classes behind one interface: a new policy is one class
and one entry in :data:`POLICIES`. Pure logic: no sockets, no clock.

- ``least-loaded`` (default): fewest outstanding requests; ties go to the
  worker that was given work least recently, so an idle pool rotates.
- ``round-robin``: each worker in turn, by worker id, skipping full ones.
- ``sticky``: requests with the same ``affinity`` key (a session, a
  conversation: its KV cache is warm there) go to the same worker, by
  consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
  "Consistent Hashing with Bounded Loads", SODA 2018). A key keeps its worker
  while that worker is under ``ceil((1 + epsilon) * average load)``; otherwise
  it goes to the next worker clockwise on the ring that is. So no worker is
  ever more than (1+epsilon) times the average, however skewed the keys, and
  only about 1/N of the keys move when a worker joins or leaves. Requests
  without a key are routed least-loaded.
"""

from __future__ import annotations

import bisect
import math
from operator import attrgetter
from typing import Protocol, Sequence

from inferd.hashring import HashRing


class Candidate(Protocol):
    """What a policy may look at; the broker's worker records satisfy it."""

    @property
    def id(self) -> str: ...

    @property
    def outstanding(self) -> int: ...

    @property
    def free(self) -> int: ...

    @property
    def dispatch_seq(self) -> int: ...


class RoutingPolicy(Protocol):
    def choose(self, pool: Sequence[Candidate], affinity: str | None) -> Candidate | None:
        """A worker of ``pool`` with a free credit, or None if none has one."""

    def join(self, worker_id: str) -> None:
        """A worker became ready."""

    def leave(self, worker_id: str) -> None:
        """A worker is gone or no longer ready."""


_worker_id = attrgetter("id")


class LeastLoaded:
    name = "least-loaded"

    def choose(self, pool: Sequence[Candidate], affinity: str | None) -> Candidate | None:
        best = None
        best_load = best_seq = 0
        for w in pool:
            if w.free > 0:
                load = w.outstanding
                if best is None or load < best_load or (load == best_load and w.dispatch_seq < best_seq):
                    best, best_load, best_seq = w, load, w.dispatch_seq
        return best

    def join(self, worker_id: str) -> None:
        pass

    def leave(self, worker_id: str) -> None:
        pass


class RoundRobin(LeastLoaded):
    name = "round-robin"

    def __init__(self) -> None:
        self._last = ""

    def choose(self, pool: Sequence[Candidate], affinity: str | None) -> Candidate | None:
        n = len(pool)
        start = bisect.bisect_right(pool, self._last, key=_worker_id)  # the pool is sorted by id
        for i in range(n):
            w = pool[(start + i) % n]
            if w.free > 0:
                self._last = w.id
                return w
        return None


class Sticky(LeastLoaded):
    name = "sticky"

    def __init__(self, epsilon: float = 0.25, vnodes: int = 128):
        if epsilon <= 0:
            raise ValueError("epsilon must be > 0")
        self.epsilon = epsilon
        self.ring = HashRing(vnodes)
        self._pool: Sequence[Candidate] | None = None
        self._by_id: dict[str, Candidate] = {}

    def join(self, worker_id: str) -> None:
        self.ring.add(worker_id)

    def leave(self, worker_id: str) -> None:
        self.ring.remove(worker_id)

    def capacity(self, pool: Sequence[Candidate]) -> int:
        """The most outstanding requests a worker may hold before keys spill past it."""
        total = sum(w.outstanding for w in pool) + 1  # counting the request being placed
        return math.ceil((1 + self.epsilon) * total / len(pool))

    def choose(self, pool: Sequence[Candidate], affinity: str | None) -> Candidate | None:
        if affinity is None or not pool:
            return super().choose(pool, affinity)
        if pool is not self._pool:  # the broker rebuilds its pool only when membership changes
            self._pool, self._by_id = pool, {w.id: w for w in pool}
        by_id = self._by_id
        capacity = self.capacity(pool)
        for worker_id in self.ring.walk(affinity):
            w = by_id.get(worker_id)
            if w is not None and w.free > 0 and w.outstanding < capacity:
                return w
        return super().choose(pool, affinity)  # every worker at its bound or its credits: the least loaded


POLICIES: dict[str, type[LeastLoaded]] = {p.name: p for p in (LeastLoaded, RoundRobin, Sticky)}

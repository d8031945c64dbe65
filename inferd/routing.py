"""Request routing: which of a deployment's live workers takes the next request.

A policy sees only workers with a free credit, so it can never overload one;
the broker owns the credit accounting. Policies are small classes behind one
interface so that adding one (round-robin, sticky sessions) touches nothing
else. Pure logic: no sockets.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Candidate(Protocol):
    """What a policy may look at; the broker's worker records satisfy it."""

    @property
    def outstanding(self) -> int: ...

    @property
    def dispatch_seq(self) -> int: ...


class RoutingPolicy(Protocol):
    def choose(self, candidates: Sequence[Candidate], affinity: str | None) -> Candidate: ...


class LeastOutstanding:
    """Fewest outstanding requests; ties go to the worker that was given work least recently.

    The tie-break makes an idle pool rotate instead of piling every request on
    the first worker in the list.
    """

    def choose(self, candidates: Sequence[Candidate], affinity: str | None) -> Candidate:
        return min(candidates, key=lambda w: (w.outstanding, w.dispatch_seq))

"""Worker transitions: rolling, scaling and draining workers without dropping a request. Pure logic.

A reload, ``inferctl scale`` and ``inferctl drain`` all come down to three kinds
of operation on workers, each a small sequence driven by events:

* :class:`Start`: spawn a new worker of a deployment; done when it is ready
  (or has failed to start);
* :class:`Retire`: have the broker stop dispatching to a worker and let its
  requests finish (drain), then stop the process; done when it has exited.
  Afterwards it is removed from the process table, left stopped, or started
  again, as the operation says;
* :class:`Replace`: a rolling step. The new worker starts first; only once it
  is ready does the old one drain and stop, so the deployment never has fewer
  ready workers than before. If the new one fails to start, the old one is
  kept and the rest of the roll is abandoned.

Operations wait in *lanes*: those of one lane run one at a time, in order
(a deployment's roll goes worker by worker); lanes run side by side. This
class decides nothing about processes itself: it tells an :class:`Actions`
(the supervisor) what to do and listens to what happened, which keeps every
sequence testable with a recording fake.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("inferd.supervisor")

# What becomes of a retired worker once it has stopped.
REMOVE = "remove"    # gone from the process table (scale down, roll)
KEEP = "keep"        # stays in the table, stopped, until `inferctl restart` (inferctl drain)
RESTART = "restart"  # started again at once (inferctl drain --restart)


class Actions(Protocol):
    def spawn_new(self, deployment: str) -> str | None:
        """Place and start a new worker of ``deployment``; its id, or None if it cannot be placed."""

    def drain(self, worker: str) -> None:
        """Ask the broker to stop dispatching to ``worker`` and report when it has nothing in flight."""

    def stop(self, worker: str) -> None:
        """SIGTERM the worker's process (an expected exit: not a failure)."""

    def finish(self, worker: str, then: str) -> None:
        """The worker has exited after a retire: remove it, keep it stopped, or start it again."""


@dataclass(eq=False)
class Op:
    lane: str
    phase: str = "pending"

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(eq=False)
class Start(Op):
    deployment: str = ""
    new: str | None = None

    def describe(self) -> str:
        return f"start a worker of {self.deployment}" + (f" ({self.new})" if self.new else "")


@dataclass(eq=False)
class Retire(Op):
    worker: str = ""
    then: str = REMOVE

    def describe(self) -> str:
        return f"drain {self.worker}"


@dataclass(eq=False)
class Replace(Op):
    deployment: str = ""
    old: str = ""
    new: str | None = None

    def describe(self) -> str:
        return f"replace {self.old}" + (f" with {self.new}" if self.new else "")


@dataclass
class Transitions:
    actions: Actions
    lanes: dict[str, deque[Op]] = field(default_factory=dict)

    # --- queueing -----------------------------------------------------------------------------

    def add(self, *ops: Op) -> None:
        """Queue ops (of one lane, in order): a roll's steps go in together, so that a failed
        step abandons the ones after it."""
        lane = self.lanes.setdefault(ops[0].lane, deque())
        idle = not lane
        lane.extend(ops)
        if idle:
            self._begin(lane[0])

    def cancel_lane(self, lane: str) -> None:
        """Forget what waits in a lane (its deployment was removed); the running op finishes."""
        ops = self.lanes.get(lane)
        while ops and len(ops) > 1:
            ops.pop()

    @property
    def idle(self) -> bool:
        return not self.lanes

    def pending(self) -> list[str]:
        return [op.describe() for ops in self.lanes.values() for op in ops]

    def busy(self, worker: str) -> bool:
        """Whether a running op concerns ``worker``: the supervisor must not restart it meanwhile."""
        for ops in self.lanes.values():
            op = ops[0]
            if worker in (getattr(op, "worker", None), getattr(op, "old", None), getattr(op, "new", None)):
                return True
        return False

    # --- events -------------------------------------------------------------------------------

    def ready(self, worker: str) -> None:
        for op in self._running():
            if isinstance(op, Start) and op.new == worker and op.phase == "starting":
                self._done(op)
            elif isinstance(op, Replace) and op.new == worker and op.phase == "starting":
                op.phase = "draining"
                self.actions.drain(op.old)

    def drained(self, worker: str) -> None:
        for op in self._running():
            target = op.worker if isinstance(op, Retire) else op.old if isinstance(op, Replace) else None
            if target == worker and op.phase == "draining":
                op.phase = "stopping"
                self.actions.stop(worker)

    def exited(self, worker: str) -> None:
        """The worker's process is gone (stopped by us, or died)."""
        for op in self._running():
            if isinstance(op, Retire) and op.worker == worker:
                self.actions.finish(worker, op.then)
                self._done(op)
            elif isinstance(op, Replace) and op.old == worker and op.phase in ("draining", "stopping"):
                self.actions.finish(worker, REMOVE)
                self._done(op)

    def failed(self, worker: str, why: str) -> None:
        """A worker being started will not become ready (it failed, or could not be placed)."""
        for op in self._running():
            if isinstance(op, Start) and op.new == worker:
                log.error("%s: %s failed to start (%s)", op.lane, worker, why)
                self._done(op)
            elif isinstance(op, Replace) and op.new == worker and op.phase == "starting":
                log.error("%s: the new worker %s failed to start (%s); %s keeps serving and the rest of "
                          "the roll is abandoned", op.lane, worker, why, op.old)
                self.lanes[op.lane] = deque([op])
                self._done(op)

    # --- internals ----------------------------------------------------------------------------

    def _running(self) -> list[Op]:
        return [ops[0] for ops in list(self.lanes.values()) if ops]

    def _begin(self, op: Op) -> None:
        if isinstance(op, Retire):
            op.phase = "draining"
            self.actions.drain(op.worker)
            return
        op.phase = "starting"
        op.new = self.actions.spawn_new(op.deployment)
        if op.new is None:
            log.error("%s: %s: cannot place a new worker", op.lane, op.describe())
            if isinstance(op, Replace):
                self.lanes[op.lane] = deque([op])
            self._done(op)

    def _done(self, op: Op) -> None:
        ops = self.lanes.get(op.lane)
        if not ops or ops[0] is not op:
            return
        ops.popleft()
        if ops:
            self._begin(ops[0])
        else:
            del self.lanes[op.lane]

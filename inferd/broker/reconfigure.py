"""The broker's side of a live reload, a scale and a drain.

The supervisor plans a reload (``inferd.reload``) and sends the broker the new
config; :func:`apply` takes it over in place, without losing a queued request:

* a new deployment gets its queue and router at once (its workers register as
  they start);
* an existing one takes its new queue bounds, priority levels, deadlines and
  routing policy: queued requests move to the new queue in their order
  (a priority beyond the new levels becomes the least urgent level; a queue
  over its new capacity only refuses newcomers until it is back under it);
* a removed one *retires*: new requests get UNKNOWN_DEPLOYMENT, what it holds
  (queued and running) finishes on its workers within the grace, whatever is
  left then gets UNAVAILABLE, and the supervisor is told (REMOVED) to stop its
  workers.

:func:`drain_worker` takes one worker out of routing (a roll, a scale-down,
``inferctl drain``): it gets no new request and the supervisor hears
WORKER_DRAINED once it has none in flight, or when the grace is over.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from inferd import protocol as P
from inferd.config import Config
from inferd.errors import ErrorCode
from inferd.queue import BoundedPriorityQueue

if TYPE_CHECKING:
    from inferd.broker.core import BrokerCore, Deployment

log = logging.getLogger("inferd.broker")


def apply(core: "BrokerCore", config: Config, grace_s: float) -> None:
    from inferd.broker.core import Deployment, make_router

    now = core.clock()
    core.config = config
    new = {d.name: d for d in config.deployments}
    for name in [n for n in core.deployments if n not in new]:
        dep = core.deployments.pop(name)
        core.retiring[name] = (dep, now + grace_s)
        log.info("deployment %s removed by a reload: draining %d queued and %d running request(s), grace %.1f s",
                 name, len(dep.queue), core.in_flight(dep), grace_s)
    for name, cfg in new.items():
        dep = core.deployments.get(name)
        if dep is None:  # (the supervisor refuses a reload while a removed deployment still drains)
            core.deployments[name] = Deployment(cfg, make_router(cfg))
            log.info("deployment %s added by a reload", name)
        else:
            _reconfigure(dep, cfg, make_router)
    core._report_readiness()


def _reconfigure(dep: "Deployment", cfg, make_router) -> None:
    old = dep.config
    dep.config = cfg
    if (old.queue_capacity, old.priority_levels) != (cfg.queue_capacity, cfg.priority_levels):
        queue: BoundedPriorityQueue = BoundedPriorityQueue(cfg.queue_capacity, cfg.priority_levels)
        moved = 0
        for req in list(dep.queue.drain()):  # most urgent first, FIFO within a level
            req.priority = min(req.priority, cfg.priority_levels - 1)
            req.entry = queue.append(req, req.priority)
            moved += 1
        dep.queue = queue
        log.info("deployment %s: queue capacity %d, %d priority level(s); %d queued request(s) kept",
                 dep.name, cfg.queue_capacity, cfg.priority_levels, moved)
    if (old.routing, old.sticky_epsilon) != (cfg.routing, cfg.sticky_epsilon):
        dep.router = make_router(cfg)
        for worker in dep.pool:
            dep.router.join(worker.id)
        log.info("deployment %s: routing %s", dep.name, cfg.routing)


def drain_worker(core: "BrokerCore", wid: str, grace_s: float) -> None:
    worker = core.workers.get(wid)
    core.draining_workers[wid] = core.clock() + grace_s
    if worker is not None:
        worker.draining = True
        worker.recount()
        core._sync_router(worker)
        log.info("draining worker %s: %d request(s) in flight, grace %.1f s", wid, worker.outstanding, grace_s)
        core._report_readiness()
    tick(core, core.clock())


def tick(core: "BrokerCore", now: float) -> None:
    for wid, deadline in list(core.draining_workers.items()):
        worker = core.workers.get(wid)
        left = worker.outstanding if worker is not None else 0
        if left == 0 or now >= deadline:
            del core.draining_workers[wid]
            if left:
                log.warning("worker %s: drain grace over with %d request(s) in flight", wid, left)
            core.transport.to_supervisor(P.WORKER_DRAINED, {"worker": wid, "left": left})
    for name, (dep, deadline) in list(core.retiring.items()):
        live = [r for r in core.requests.values() if r.deployment is dep and not r.done]
        if live and now < deadline:
            continue
        for req in live:
            if req.entry is not None:
                dep.queue.remove(req.entry)
                req.entry = None
            core._finish(req, P.ERROR, P.error_body(
                req.cid, ErrorCode.UNAVAILABLE, f"deployment {name!r} was removed by a reload and its drain "
                                                f"grace ran out before the request finished"), "failed")
        del core.retiring[name]
        for worker in [w for w in core.workers.values() if w.deployment is dep]:
            worker.draining = True
            worker.recount()
        log.info("deployment %s removed%s", name, f"; {len(live)} request(s) failed when the grace ran out"
                 if live else ": everything it had accepted finished")
        core.transport.to_supervisor(P.REMOVED, {"deployment": name, "failed": len(live)})

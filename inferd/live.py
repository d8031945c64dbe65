"""The supervisor's live changes: reload, scale and drain, carried out on running children.

:class:`LiveChanges` is mixed into :class:`inferd.supervisor.Supervisor`. The
decisions are pure and live elsewhere: :mod:`inferd.reload` works out what a
new config changes, :mod:`inferd.transitions` sequences the worker starts,
drains and stops. This module does the I/O between them: it reads and
validates the file (the same checks as ``inferd --check``: a bad config is
refused and the old one keeps serving), tells systemd RELOADING=1 and then
READY=1, sends the broker the new config, and acts on the transitions'
requests (spawn, drain, stop) as children and the broker report back.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from inferd import protocol as P, reload as reload_plan
from inferd.config import Config, ConfigError, load
from inferd.placement import PlacementError, Planner
from inferd.restart import Limits
from inferd.transitions import KEEP, REMOVE, RESTART, Replace, Retire, Start, Transitions

if TYPE_CHECKING:
    from inferd.supervisor import Child

log = logging.getLogger("inferd.supervisor")

MAX_REPLICAS = 256


class LiveChanges:
    """Mixin: needs the Supervisor's config, planner, policy, workers, notifier and link helpers."""

    def _init_live(self) -> None:
        self.transitions = Transitions(self)
        self.reload_generation = 0
        self.reload_state = "none"        # none, applying, done, refused
        self.reload_note = ""
        self.removing: dict[str, set[str]] = {}  # deployment removed by a reload -> its workers still up
        self._exited_later: list[str] = []

    # --- entry points ---------------------------------------------------------------------------

    def reload(self, path: str | None = None) -> tuple[bool, str, dict[str, Any]]:
        """SIGHUP, ``systemctl reload`` and ``inferctl reload``. Returns (ok, message, details)."""
        path = path or self.config.path
        if self.phase != "running":
            return False, "inferd is shutting down", {}
        if not self.transitions.idle or self.removing:
            return False, f"a reload, scale or drain is still in progress: {self._pending()}", {}
        try:
            new = load(path)
            plan = reload_plan.plan(self.config, new)
            Planner(new, self.planner.nodes).plan(self.stats)  # refused like `inferd --check` would
        except (ConfigError, PlacementError) as exc:
            kind = "bad config" if isinstance(exc, ConfigError) else f"cannot place: {type(exc).__name__}"
            message = f"{kind}: {exc}"
            log.error("reload refused (%s); still serving %s", message, self.config.path)
            self.reload_state, self.reload_note = "refused", message
            self._publish()
            return False, message, {"bad_config": True}
        from inferd.daemon import missing_runtime_modules  # the daemon module imports this one

        for problem in missing_runtime_modules(new):
            log.warning("%s", problem)
        self.reload_generation += 1
        summary = plan.summary()
        log.info("reload %d of %s: %s", self.reload_generation, path, summary)
        self.reload_state, self.reload_note = "applying", summary
        self.notifier.reloading(self._status_line())
        self._apply(new, plan)
        self._publish()
        self._maybe_reloaded()
        return True, f"reloading {path}: {summary}", {"generation": self.reload_generation}

    def scale(self, name: str, replicas: int) -> tuple[bool, str]:
        """``inferctl scale``: run ``replicas`` workers of a deployment until the next reload or restart."""
        if self.phase != "running":
            return False, "inferd is shutting down"
        try:
            dep = self.config.deployment(name)
        except KeyError:
            return False, (f"no deployment named {name!r}; deployments: "
                           f"{', '.join(d.name for d in self.config.deployments)}")
        if not 1 <= replicas <= MAX_REPLICAS:
            return False, f"replicas must be between 1 and {MAX_REPLICAS}, got {replicas}"
        if self.transitions.lanes.get(name):
            return False, f"{name} is still changing: {self._pending()}"
        before = dep.replicas
        new = dataclasses.replace(self.config, deployments=tuple(
            dataclasses.replace(d, replicas=replicas) if d.name == name else d for d in self.config.deployments))
        self._adopt(new)
        self._scale(name, before, replicas)
        self._publish()
        return True, (f"scaling {name} from {before} to {replicas} worker(s); this lasts until the next reload "
                      f"or restart, which go back to the config file's replicas")

    def drain_target(self, target: str, then: str) -> tuple[bool, str]:
        """``inferctl drain WORKER|DEPLOYMENT``: no new work, in-flight work finishes, then stop (or restart)."""
        if self.phase != "running":
            return False, "inferd is shutting down"
        after = {"stop": KEEP, "restart": RESTART}.get(then)
        if after is None:
            return False, f"then must be stop or restart, got {then!r}"
        workers = [c for c in self.workers if c.name == target or c.plan.deployment == target]
        if not workers:
            return False, (f"no worker or deployment named {target!r}; workers: "
                           f"{', '.join(c.name for c in self.workers)}")
        busy = [c.name for c in workers if self.transitions.busy(c.name)]
        if busy:
            return False, f"{', '.join(busy)} already changing: {self._pending()}"
        for child in workers:
            self.transitions.add(Retire(lane=f"drain {child.name}", worker=child.name, then=after))
        self._publish()
        done = "stopped until `inferctl restart WORKER`" if after == KEEP else "started again"
        return True, f"draining {', '.join(c.name for c in workers)}; each is {done} once its requests finish"

    def _pending(self) -> str:
        return "; ".join(self.transitions.pending() + [f"remove {d}" for d in self.removing]) or "nothing"

    # --- applying a reload ----------------------------------------------------------------------

    def _apply(self, new: Config, plan: reload_plan.ReloadPlan) -> None:
        if "daemon" in plan.sections:
            d = new.daemon
            logging.getLogger().setLevel(d.log_level.upper())
            self.policy.tune(backoff_min_s=d.restart_backoff_min_ms / 1000,
                             backoff_max_s=d.restart_backoff_max_ms / 1000, backoff_reset_s=d.restart_backoff_reset_s,
                             jitter=d.restart_backoff_jitter, escalation_max=d.escalation_max,
                             escalation_window_s=d.escalation_window_s)
        for name in plan.removed:
            self.transitions.cancel_lane(name)
            self.removing[name] = {c.name for c in self.workers if c.plan.deployment == name}
            for child in self.workers:
                if child.plan.deployment == name:
                    child.retire = "its deployment was removed by a reload"
        self._adopt(new, keep_specs_of=set(plan.removed))
        for change in plan.changed:
            if change.policy_keys:
                dep = new.deployment(change.name)
                for child in self.workers:
                    if child.plan.deployment == change.name:
                        self.policy.limit(child.name, Limits(dep.max_restarts, dep.restart_window_s))
            if change.rolls:
                old_ids = [c.name for c in self._workers_of(change.name)]
                after = change.replicas[1] if change.replicas else len(old_ids)
                lane = change.name
                self.transitions.add(
                    *[Retire(lane=lane, worker=wid, then=REMOVE) for wid in reversed(old_ids[after:])],
                    *[Replace(lane=lane, deployment=lane, old=wid) for wid in old_ids[:after]],
                    *[Start(lane=lane, deployment=lane) for _ in range(after - len(old_ids))])
            elif change.replicas:
                self._scale(change.name, *change.replicas)
        for name in plan.added:
            self.transitions.add(*[Start(lane=name, deployment=name) for _ in range(new.deployment(name).replicas)])

    def _adopt(self, new: Config, keep_specs_of: set[str] = frozenset()) -> None:
        """Make ``new`` the running config: here, in the specs children restart with, and in the broker."""
        self.config = new
        self.planner.config = new
        spec = new.to_dict()
        self.broker.spec["config"] = spec
        if self.gateway is not None:
            self.gateway.spec["config"] = spec
        for child in self.workers:
            if child.plan.deployment not in keep_specs_of:
                child.spec["config"] = spec
        self._to_broker(P.CONFIG, {"config": spec, "grace_s": new.daemon.drain_grace_s})

    def _scale(self, name: str, before: int, after: int) -> None:
        current = [c.name for c in self._workers_of(name)]
        ops = [Retire(lane=name, worker=wid, then=REMOVE) for wid in reversed(current[after:])]
        ops += [Start(lane=name, deployment=name) for _ in range(after - len(current))]
        if ops:
            self.transitions.add(*ops)
        log.info("scaling %s from %d to %d worker(s)", name, before, after)

    def _workers_of(self, name: str) -> list["Child"]:
        return sorted((c for c in self.workers if c.plan.deployment == name), key=lambda c: c.plan.replica)

    def _maybe_reloaded(self) -> None:
        """Once nothing of a reload is pending: READY=1 again."""
        if self.reload_state == "applying" and self.transitions.idle and not self.removing:
            self.reload_state = "done"
            log.info("reload %d complete: %s", self.reload_generation, self.reload_note)
            self.notifier.notify(ready="1", status=self._status_line())
            self._publish()

    # --- events from the broker and from children -----------------------------------------------

    def on_worker_ready(self, workers: list[str]) -> None:
        for wid in workers:
            self.transitions.ready(wid)
        self._maybe_reloaded()

    def on_worker_drained(self, wid: str) -> None:
        self.transitions.drained(wid)
        self._maybe_reloaded()

    def broker_restarted(self) -> None:
        """A new broker has nothing in flight: drains are over, removed deployments have nothing left."""
        for name in list(self.removing):
            self.on_deployment_removed(name)
        for ops in list(self.transitions.lanes.values()):
            op = ops[0]
            target = op.worker if isinstance(op, Retire) else op.old if isinstance(op, Replace) else None
            if target and op.phase == "draining":
                self.transitions.drained(target)

    def on_deployment_removed(self, name: str) -> None:
        for wid in list(self.removing.get(name, ())):
            child = self._worker(wid)
            if child is None or child.proc is None:
                self._removed_exit(wid)
            else:
                child.proc.terminate()

    def _removed_exit(self, wid: str) -> None:
        for name, ids in list(self.removing.items()):
            if wid in ids:
                ids.discard(wid)
                self._forget(wid)
                if not ids:
                    del self.removing[name]
                    log.info("deployment %s removed", name)
        self._maybe_reloaded()

    def expected_exit(self, child: "Child") -> None:
        """A child the supervisor stopped on purpose has exited."""
        if any(child.name in ids for ids in self.removing.values()):
            self._removed_exit(child.name)
        else:
            self.transitions.exited(child.name)
        self._maybe_reloaded()

    def start_failed(self, child: "Child", why: str) -> None:
        self.transitions.failed(child.name, why)
        self._maybe_reloaded()

    def run_deferred(self) -> None:
        while self._exited_later:
            self.transitions.exited(self._exited_later.pop(0))
        self._maybe_reloaded()

    # --- transitions.Actions ----------------------------------------------------------------------

    def spawn_new(self, deployment: str) -> str | None:
        from inferd.supervisor import Child

        dep = self.config.deployment(deployment)
        used = {c.plan.replica for c in self.workers if c.plan.deployment == deployment}
        replica = next(i for i in range(len(used) + 1) if i not in used)
        placed = Counter((c.plan.node, d.id) for c in self.workers for d in c.plan.devices)
        try:
            plan = self.planner.place(dep, replica, self.stats, self.device_load(), placed)
        except PlacementError as exc:
            log.error("cannot place a new worker of %s: %s", deployment, exc)
            return None
        base = {"config": self.config.to_dict(), "runtime_dir": str(self.endpoints.runtime_dir),
                "frontend": self.config.broker.frontend}
        child = Child(plan.id, "inferd.worker", {**base, "worker": plan.id, "deployment": deployment}, plan=plan)
        self.workers.append(child)
        self.policy.limit(child.name, Limits(dep.max_restarts, dep.restart_window_s))
        log.info("placed %s on %s (%s)", plan.id, plan.device_ids, plan.why)
        self._spawn(child)
        return child.name

    def drain(self, worker: str) -> None:
        child = self._worker(worker)
        if self.broker_peer is None or child is None or child.proc is None:
            self.transitions.drained(worker)  # nothing can be in flight on it
            return
        self._to_broker(P.DRAIN_WORKER, {"worker": worker, "grace_s": self.config.daemon.drain_grace_s})

    def stop(self, worker: str) -> None:
        child = self._worker(worker)
        if child is None or child.proc is None:
            self._exited_later.append(worker)
            return
        child.retire = "drained"
        child.restart_at = None
        child.proc.send_signal(signal.SIGTERM)

    def finish(self, worker: str, then: str) -> None:
        child = self._worker(worker)
        if child is None:
            return
        child.retire = None
        if then == REMOVE:
            self._forget(worker)
        elif then == KEEP:
            child.state, child.last_exit = "drained", "drained by an operator"
            log.info("%s drained; it stays stopped until `inferctl restart %s`", worker, worker)
        else:  # asked for: not counted as a restart after a failure
            child.restart_reasons["operator"] += 1
            child.state, child.restart_at, child.operator_restart = "restarting", time.monotonic(), True
        self._publish()

    def _forget(self, wid: str) -> None:
        self.workers = [c for c in self.workers if c.name != wid]
        self.policy.forget(wid)
        self._publish()

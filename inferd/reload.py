"""Reload planning: what a new config changes in a running daemon. Pure logic.

A reload applies only the difference between the running config and the new
one, so that what did not change keeps serving untouched. :func:`plan` compares
two validated configs and sorts every change into what the daemon can do about
it live:

* a new deployment **starts** (its workers are placed and spawned);
* a removed deployment **drains**: its queued and running requests finish
  within ``drain_grace_s``, then its workers stop and its name is unknown;
* queue, priority, deadline and routing keys are **broker** settings: the
  broker takes them over in place, keeping every queued request;
* a changed runtime, model, options or anything a worker is built or placed
  from **rolls** the deployment's workers one at a time (the new worker is
  ready before the old one drains);
* ``replicas`` **scales** up (new workers) or down (the newest drain and stop);
* restart-policy keys and most ``[daemon]`` keys are the supervisor's own and
  apply at once.

Keys that running processes were set up with (the runtime dir, every
``[broker]`` and ``[gateway]`` key, ``[node]``, the CPU devices offered, the sampling interval)
cannot change under them: a plan that changes one is refused with a
:class:`~inferd.config.ConfigError` naming the key, like any other bad config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from inferd.config import Config, ConfigError, DeploymentConfig

# Deployment keys the broker reads for each request: changed in place.
BROKER_KEYS = frozenset({"queue_capacity", "priority_levels", "default_priority", "default_deadline_ms",
                         "routing", "sticky_epsilon", "watchdog_s"})
# Deployment keys of the supervisor's restart policy: changed in place.
POLICY_KEYS = frozenset({"max_restarts", "restart_window_s"})
SCALE_KEYS = frozenset({"replicas"})
# Everything else (runtime, options, max_concurrency, placement constraints) is read by a
# worker when it starts, or decides where it runs: the workers roll.

# Keys outside [[deployment]] that running processes were started with and cannot change: the
# runtime dir; every [broker] key (its sockets, CURVE keys, limits and heartbeats are set up when
# it starts, and the workers' heartbeats must match); the node ([node], the devices found).
ALL = frozenset({"*"})
RESTART_ONLY = {"daemon": frozenset({"runtime_dir"}), "broker": ALL, "node": ALL,
                "devices": frozenset({"cpu_devices", "poll_interval_ms"})}


@dataclass(frozen=True)
class DeploymentChange:
    name: str
    broker_keys: tuple[str, ...] = ()     # broker settings that change in place
    policy_keys: tuple[str, ...] = ()     # restart-policy settings that change in place
    roll_keys: tuple[str, ...] = ()       # keys that make every worker of it roll
    replicas: tuple[int, int] | None = None  # (old, new) when it scales

    @property
    def rolls(self) -> bool:
        return bool(self.roll_keys)


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[DeploymentChange, ...] = ()
    # Sections other than [[deployment]] whose keys changed, e.g. {"daemon": ("log_level",)}.
    sections: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.sections)

    def summary(self) -> str:
        """One line for logs, systemd's STATUS= and ``inferctl reload``."""
        parts = []
        if self.added:
            parts.append("start " + ", ".join(self.added))
        if self.removed:
            parts.append("drain and remove " + ", ".join(self.removed))
        for c in self.changed:
            what = []
            if c.roll_keys:
                what.append(f"roll workers ({', '.join(c.roll_keys)})")
            if c.replicas:
                what.append(f"scale {c.replicas[0]} -> {c.replicas[1]}")
            if c.broker_keys:
                what.append(f"broker settings ({', '.join(c.broker_keys)})")
            if c.policy_keys:
                what.append(f"restart policy ({', '.join(c.policy_keys)})")
            parts.append(f"{c.name}: {', '.join(what)}")
        for section, keys in self.sections.items():
            parts.append(f"[{section}] {', '.join(keys)}")
        return "; ".join(parts) or "no change"


def _changed_keys(old: object, new: object) -> list[str]:
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def compare(old: DeploymentConfig, new: DeploymentConfig) -> DeploymentChange | None:
    keys = _changed_keys(old, new)
    if not keys:
        return None
    return DeploymentChange(
        name=new.name,
        broker_keys=tuple(k for k in keys if k in BROKER_KEYS),
        policy_keys=tuple(k for k in keys if k in POLICY_KEYS),
        roll_keys=tuple(k for k in keys if k not in BROKER_KEYS | POLICY_KEYS | SCALE_KEYS),
        replicas=(old.replicas, new.replicas) if old.replicas != new.replicas else None)


def plan(old: Config, new: Config) -> ReloadPlan:
    """The difference from ``old`` to ``new``; ConfigError if it cannot apply without a restart."""
    if old.gateway != new.gateway:
        raise ConfigError(f"{new.path}: gateway: cannot change on reload (the HTTP gateway binds its address "
                          f"and reads its keys when it starts); restart inferd to apply it")
    sections = {}
    for section in ("daemon", "broker", "node", "devices"):
        keys = _changed_keys(getattr(old, section), getattr(new, section))
        fixed = [k for k in keys if RESTART_ONLY.get(section) is ALL or k in RESTART_ONLY.get(section, ())]
        if fixed:
            raise ConfigError(f"{new.path}: {section}.{fixed[0]}: cannot change on reload "
                              f"(the running processes were started with it); restart inferd to apply it")
        if keys:
            sections[section] = tuple(keys)
    old_deps = {d.name: d for d in old.deployments}
    new_deps = {d.name: d for d in new.deployments}
    changed = []
    for name, dep in new_deps.items():
        if name in old_deps:
            change = compare(old_deps[name], dep)
            if change is not None:
                changed.append(change)
    return ReloadPlan(added=tuple(n for n in new_deps if n not in old_deps),
                      removed=tuple(n for n in old_deps if n not in new_deps),
                      changed=tuple(changed), sections=sections)

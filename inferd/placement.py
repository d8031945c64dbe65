"""Placement: which node and which devices each replica runs on. Pure logic.

Two levels, as in the seeds:

1. **Deployment placement**, replicas onto nodes, by the runtime's transport:
   local runtimes (echo, torch) go onto nodes with devices, remote ones
   (network providers, no GPU) onto nodes with egress. Replicas are spread
   round-robin over the eligible nodes. Today the local node is the only node,
   but plans carry node names so that a multi-node supervisor can reuse this.
2. **Device placement**, a replica onto ``gpus_per_replica`` devices of its
   node, by the deployment's policy (``round-robin`` or ``least-loaded``),
   after filtering out devices with less than ``min_free_bytes`` free or a
   compute capability below ``min_compute_cap``.

Failures are typed (:class:`PlacementError` and its subclasses) and say what
was asked and what was available, at start-up, in ``inferctl placement`` and
whenever a replica is placed again on restart.

Device ids ("gpu:0") are unique within a node only, so stats, loads and
replica counts are keyed by ``(node name, device id)``: :data:`DeviceKey`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, TypeVar

from inferd import runtimes
from inferd.config import Config, DeploymentConfig
from inferd.devices import Device, DeviceStats


DeviceKey = tuple[str, str]


class PlacementError(Exception):
    """A deployment that cannot be placed; the message says what was asked and what was available."""


class NoGpuNodes(PlacementError):
    pass


class NotEnoughGpus(PlacementError):
    pass


class NoEgressNodes(PlacementError):
    pass


class UnknownRuntime(PlacementError):
    pass


class NoFittingDevice(PlacementError):
    """Devices exist, but the deployment's constraints (free memory, compute capability) rule them all out."""


@dataclass(frozen=True)
class Node:
    name: str
    devices: tuple[Device, ...]
    egress: bool = True


@dataclass(frozen=True)
class WorkerPlan:
    id: str                      # stable across restarts: "<deployment>-<replica>"
    deployment: str
    replica: int
    node: str
    devices: tuple[Device, ...]  # empty for a remote runtime
    why: str                     # how the policy chose, for `inferctl placement`

    @property
    def device_ids(self) -> str:
        return ",".join(d.id for d in self.devices) or "-"


UNKNOWN = DeviceStats(None, None)

T = TypeVar("T")


def on_node(node: str, by_device: Mapping[str, T]) -> dict[DeviceKey, T]:
    """Key a node's per-device figures (stats, load) by (node, device id)."""
    return {(node, device_id): value for device_id, value in by_device.items()}


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def _cc(cc: tuple[int, int] | None) -> str:
    return "none" if cc is None else f"{cc[0]}.{cc[1]}"


# --- device policies --------------------------------------------------------------------------

class DevicePolicy(Protocol):
    name: str

    def pick(self, node: str, fitting: Sequence[Device], count: int, load: Mapping[DeviceKey, float],
             placed: Counter) -> tuple[list[Device], str]:
        """``count`` devices of ``fitting`` (all on ``node``), and a line saying why."""


class RoundRobinDevices:
    """Each replica on the next device(s) of its node in order, continuing across deployments."""

    name = "round-robin"

    def __init__(self) -> None:
        self._cursors: Counter = Counter()  # per node

    def pick(self, node: str, fitting: Sequence[Device], count: int, load: Mapping[DeviceKey, float],
             placed: Counter) -> tuple[list[Device], str]:
        start = self._cursors[node]
        chosen = [fitting[(start + i) % len(fitting)] for i in range(count)]
        self._cursors[node] += count
        return chosen, f"round-robin over {len(fitting)} fitting device(s)"


class LeastLoadedDevices:
    """The device(s) with the lowest score: load (queue depth + active streams) plus the replicas
    already placed there, each of which will bring load of its own; ties to the fewest replicas."""

    name = "least-loaded"

    def pick(self, node: str, fitting: Sequence[Device], count: int, load: Mapping[DeviceKey, float],
             placed: Counter) -> tuple[list[Device], str]:
        def key(d: Device) -> tuple[float, int]:
            return load.get((node, d.id), 0.0) + placed[(node, d.id)], placed[(node, d.id)]

        ranked = sorted(fitting, key=key)  # stable: ties keep device order
        scores = ", ".join(f"{d.id} load {load.get((node, d.id), 0.0):g} replicas {placed[(node, d.id)]}"
                           for d in ranked[:4])
        return ranked[:count], f"least-loaded: {scores}"


DEVICE_POLICIES = {p.name: p for p in (RoundRobinDevices, LeastLoadedDevices)}


# --- the planner ------------------------------------------------------------------------------

class Planner:
    """Places replicas. One instance per policy, shared by the deployments using it, so that a
    round-robin cursor continues across deployments, as does the cursor over nodes."""

    def __init__(self, config: Config, nodes: Sequence[Node]):
        self.config = config
        self.nodes = list(nodes)
        self._policies = {name: cls() for name, cls in DEVICE_POLICIES.items()}
        self._node_cursors: Counter = Counter()  # per transport

    def policy(self, dep: DeploymentConfig) -> DevicePolicy:
        return self._policies[dep.placement or self.config.devices.placement]

    def plan(self, stats: Mapping[DeviceKey, DeviceStats] | None = None,
             load: Mapping[DeviceKey, float] | None = None) -> list[WorkerPlan]:
        """Every replica of every deployment; raises the first PlacementError."""
        placed: Counter = Counter()
        plans = []
        for dep in self.config.deployments:
            for replica in range(dep.replicas):
                plan = self.place(dep, replica, stats or {}, load or {}, placed)
                placed.update((plan.node, d.id) for d in plan.devices)
                plans.append(plan)
        return plans

    def _next_node(self, transport: str, nodes: list[Node]) -> Node:
        node = nodes[self._node_cursors[transport] % len(nodes)]
        self._node_cursors[transport] += 1
        return node

    def place(self, dep: DeploymentConfig, replica: int, stats: Mapping[DeviceKey, DeviceStats],
              load: Mapping[DeviceKey, float], placed: Counter) -> WorkerPlan:
        spec = runtimes.SPECS.get(dep.runtime)
        if spec is None:
            raise UnknownRuntime(f"deployment {dep.name!r}: unknown runtime {dep.runtime!r}; "
                                 f"known: {', '.join(runtimes.NAMES)}")
        worker_id = f"{dep.name}-{replica}"
        if spec.transport == "remote":
            egress = [n for n in self.nodes if n.egress]
            if not egress:
                names = ", ".join(n.name for n in self.nodes) or "none"
                raise NoEgressNodes(f"deployment {dep.name!r} ({dep.runtime}, remote) needs a node with network "
                                    f"egress; nodes: {names}, none with egress")
            node = self._next_node("remote", egress)
            return WorkerPlan(worker_id, dep.name, replica, node.name, (), f"remote runtime: node {node.name} (egress)")
        with_devices = [n for n in self.nodes if n.devices]
        if not with_devices:
            raise NoGpuNodes(f"deployment {dep.name!r} ({dep.runtime}) needs a node with devices; "
                             f"nodes: {', '.join(n.name for n in self.nodes) or 'none'}, none with a device")
        big_enough = [n for n in with_devices if len(n.devices) >= dep.gpus_per_replica]
        if not big_enough:
            largest = max(with_devices, key=lambda n: len(n.devices))
            raise NotEnoughGpus(f"deployment {dep.name!r} needs {dep.gpus_per_replica} device(s) per replica; "
                                f"the largest node, {largest.name}, has {len(largest.devices)}")
        fits = {n.name: self._fitting(dep, n, stats) for n in big_enough}
        eligible = [n for n in big_enough if len(fits[n.name]) >= dep.gpus_per_replica]
        if not eligible:
            raise NoFittingDevice(self._no_fit(dep, big_enough, stats))
        node = self._next_node("local", eligible)
        devices, why = self.policy(dep).pick(node.name, fits[node.name], dep.gpus_per_replica, load, placed)
        return WorkerPlan(worker_id, dep.name, replica, node.name, tuple(devices), why)

    def place_again(self, dep: DeploymentConfig, current: WorkerPlan, stats: Mapping[DeviceKey, DeviceStats],
                    load: Mapping[DeviceKey, float], placed: Counter) -> WorkerPlan:
        """Where a restarting replica goes. Round-robin keeps it where it was while its devices
        still fit (moving it would only churn); least-loaded chooses again with today's load."""
        node = next((n for n in self.nodes if n.name == current.node), None)
        if (node is not None and current.devices and self.policy(dep).name == RoundRobinDevices.name
                and set(current.devices) <= set(self._fitting(dep, node, stats))):
            return current
        return self.place(dep, current.replica, stats, load, placed)

    @staticmethod
    def _fitting(dep: DeploymentConfig, node: Node, stats: Mapping[DeviceKey, DeviceStats]) -> list[Device]:
        need_cc = dep.min_compute_capability
        out = []
        for device in node.devices:
            if dep.min_free_bytes:
                free = stats.get((node.name, device.id), UNKNOWN).memory_free
                if free is None or free < dep.min_free_bytes:
                    continue
            if need_cc is not None and (device.compute_capability is None or device.compute_capability < need_cc):
                continue
            out.append(device)
        return out

    def _no_fit(self, dep: DeploymentConfig, nodes: list[Node], stats: Mapping[DeviceKey, DeviceStats]) -> str:
        asked = []
        if dep.min_free_bytes:
            asked.append(f"at least {_gib(dep.min_free_bytes)} free")
        if dep.min_compute_capability is not None:
            asked.append(f"compute capability >= {_cc(dep.min_compute_capability)}")
        have = "; ".join(
            f"node {n.name}, {len(self._fitting(dep, n, stats))} fit: " + ", ".join(
                f"{d.id} ({_gib(stats.get((n.name, d.id), UNKNOWN).memory_free)} free, "
                f"compute capability {_cc(d.compute_capability)})" for d in n.devices) for n in nodes)
        return (f"deployment {dep.name!r} needs {dep.gpus_per_replica} device(s) with {' and '.join(asked)} "
                f"on one node; {have}")

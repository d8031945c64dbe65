"""Where each replica runs: the worker plan, computed from the config and the devices.

Replicas are spread round-robin over the node's devices, continuing across
deployments so that two single-replica deployments do not both land on device
0. Pure logic.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.config import Config
from inferd.devices import Device


@dataclass(frozen=True)
class WorkerPlan:
    id: str           # stable across restarts: "<deployment>-<replica>"
    deployment: str
    replica: int
    device: Device


def plan(config: Config, devices: list[Device]) -> list[WorkerPlan]:
    if not devices:
        raise ValueError("no devices to place replicas on")
    plans = []
    cursor = 0
    for dep in config.deployments:
        for replica in range(dep.replicas):
            plans.append(WorkerPlan(f"{dep.name}-{replica}", dep.name, replica, devices[cursor % len(devices)]))
            cursor += 1
    return plans

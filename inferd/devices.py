"""Devices a worker can be pinned to, and their discovery.

The supervisor discovers devices with NVML (which is not CUDA: it never
creates a CUDA context) and falls back to CPU devices when NVML is missing or
finds no GPU, saying why. A worker is pinned by setting CUDA_VISIBLE_DEVICES
in its environment before its interpreter starts: a GPU's UUID, or the empty
string for a CPU device so that no GPU is visible at all.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("inferd.devices")


@dataclass(frozen=True)
class Device:
    id: str                 # "cpu:0", "gpu:1"
    kind: str               # "cpu" or "cuda"
    name: str
    uuid: str | None = None
    memory_total: int | None = None

    @property
    def cuda_visible_devices(self) -> str:
        return self.uuid if self.kind == "cuda" and self.uuid else ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_devices(count: int) -> list[Device]:
    return [Device(f"cpu:{i}", "cpu", "CPU") for i in range(count)]


def discover(cpu_count: int) -> tuple[list[Device], str]:
    """The node's devices and a one-line note on how they were found."""
    try:
        import pynvml
    except ImportError:
        return cpu_devices(cpu_count), "no GPU: the pynvml module is not installed; using CPU devices"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return cpu_devices(cpu_count), f"no GPU: NVML unavailable ({exc}); using CPU devices"
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(Device(f"gpu:{index}", "cuda", str(name), str(uuid), int(memory)))
    finally:
        pynvml.nvmlShutdown()
    if not gpus:
        return cpu_devices(cpu_count), "no GPU: NVML found no devices; using CPU devices"
    return gpus, f"{len(gpus)} GPU(s) found by NVML"

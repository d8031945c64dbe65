"""Devices a worker can be pinned to: discovery through NVML, CPU fallback, live stats.

The supervisor discovers devices with NVML, which is not CUDA: it never
creates a CUDA context. Every GPU is a device; a GPU in MIG mode is not, but
each of its MIG instances is, since each is its own CUDA context and gets its
own worker. When NVML is missing, fails, or finds no GPU, the node offers
``cpu_devices`` CPU devices instead and says why.

A worker is pinned by setting CUDA_VISIBLE_DEVICES in its environment before
its interpreter starts: the UUIDs of its GPUs or MIG instances, or the empty
string for CPU devices so that no GPU is visible at all.

NVML is reached through a *provider*: any object with the few ``nvml*``
functions used here (the ``pynvml`` module of nvidia-ml-py in production, a
fake in tests), so that tests can describe any fleet: several GPUs, MIG,
different free memory and compute capabilities.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("inferd.devices")

MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE


@dataclass(frozen=True)
class Device:
    id: str                                       # "gpu:0", "gpu:1/mig:0", "cpu:0"
    kind: str                                     # "cuda" or "cpu"
    name: str
    uuid: str | None = None                       # "GPU-..." or "MIG-..."
    memory_total: int | None = None               # bytes
    compute_capability: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Device":
        cc = data.get("compute_capability")
        return cls(**{**data, "compute_capability": tuple(cc) if cc else None})


@dataclass(frozen=True)
class DeviceStats:
    memory_free: int | None       # bytes; for a CPU device, the host's available memory
    utilization: int | None       # percent; None where NVML cannot say (MIG instances, CPUs)


def cuda_visible_devices(devices: list[Device]) -> str:
    """The pinning of a worker: its GPUs' UUIDs, or "" (no GPU visible) for CPU devices."""
    return ",".join(d.uuid for d in devices if d.kind == "cuda" and d.uuid)


def cpu_devices(count: int) -> list[Device]:
    return [Device(f"cpu:{i}", "cpu", "CPU") for i in range(count)]


def host_memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_nvml() -> tuple[Any | None, str]:
    """The real provider (nvidia-ml-py's ``pynvml``), or None and why not."""
    try:
        import pynvml
    except ImportError:
        return None, "the pynvml module (nvidia-ml-py) is not installed"
    return pynvml, ""


class DeviceSource:
    """The node's devices and their live stats, from NVML or the CPU fallback."""

    def __init__(self, nvml: Any | None, cpu_count: int, why_no_nvml: str = ""):
        self.nvml = nvml
        self.handles: dict[str, Any] = {}
        self._initialized = False
        self.devices, self.note = self._discover(cpu_count, why_no_nvml)

    @property
    def gpu(self) -> bool:
        return bool(self.handles)

    def _discover(self, cpu_count: int, why_no_nvml: str) -> tuple[list[Device], str]:
        if self.nvml is None:
            return cpu_devices(cpu_count), f"no GPU: {why_no_nvml}; using {cpu_count} CPU device(s)"
        try:
            self.nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            return cpu_devices(cpu_count), f"no GPU: NVML unavailable ({exc}); using {cpu_count} CPU device(s)"
        self._initialized = True
        try:
            devices = []
            for index in range(self.nvml.nvmlDeviceGetCount()):
                devices.extend(self._gpu(index))
        except Exception as exc:
            log.exception("NVML discovery failed")
            self.handles.clear()
            return cpu_devices(cpu_count), f"no GPU: NVML discovery failed ({exc}); using {cpu_count} CPU device(s)"
        if not devices:
            return cpu_devices(cpu_count), f"no GPU: NVML found no devices; using {cpu_count} CPU device(s)"
        migs = sum(1 for d in devices if "/mig:" in d.id)
        mig_note = f", {migs} of them MIG instances" if migs else ""
        return devices, f"{len(devices)} GPU device(s) found by NVML{mig_note}"

    def _gpu(self, index: int) -> list[Device]:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        cc = tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle))
        if self._mig_enabled(handle):
            found = []
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                except nvml.NVMLError:
                    continue  # an empty slot
                found.append(self._device(f"gpu:{index}/mig:{slot}", mig, cc))
            return found
        return [self._device(f"gpu:{index}", handle, cc)]

    def _mig_enabled(self, handle: Any) -> bool:
        try:
            current, _pending = self.nvml.nvmlDeviceGetMigMode(handle)
        except self.nvml.NVMLError:
            return False  # not a MIG-capable GPU
        return current == MIG_ENABLED

    def _device(self, device_id: str, handle: Any, cc: tuple[int, int]) -> Device:
        nvml = self.nvml
        self.handles[device_id] = handle
        return Device(device_id, "cuda", _text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle)),
                      int(nvml.nvmlDeviceGetMemoryInfo(handle).total), (int(cc[0]), int(cc[1])))

    def stats(self) -> dict[str, DeviceStats]:
        """Free memory and utilization now: NVML for GPUs, the host's memory for CPU devices."""
        if not self.handles:
            free = host_memory_available()
            return {d.id: DeviceStats(free, None) for d in self.devices}
        out = {}
        for device_id, handle in self.handles.items():
            try:
                free = int(self.nvml.nvmlDeviceGetMemoryInfo(handle).free)
            except Exception:
                free = None
            try:
                util = int(self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:
                util = None  # MIG instances report no utilization
            out[device_id] = DeviceStats(free, util)
        return out

    def close(self) -> None:
        if self._initialized:
            self._initialized = False
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def discover(cpu_count: int) -> DeviceSource:
    """The real node: NVML when it is there, else CPU devices."""
    nvml, why = load_nvml()
    return DeviceSource(nvml, cpu_count, why)

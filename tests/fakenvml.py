"""A fake NVML provider for tests: any fleet of GPUs and MIG instances, no driver needed.

It mirrors the few functions of nvidia-ml-py's ``pynvml`` that inferd uses,
with the same signatures and semantics:

* every call but ``nvmlInit`` raises ``NVMLError_Uninitialized`` before
  ``nvmlInit`` (or after ``nvmlShutdown``);
* handles are opaque objects;
* ``nvmlDeviceGetMigMode`` returns ``[current, pending]`` and raises
  ``NVMLError_NotSupported`` for a GPU without MIG support;
* ``nvmlDeviceGetMigDeviceHandleByIndex`` raises ``NVMLError_NotFound`` for an
  empty slot;
* ``nvmlDeviceGetUtilizationRates`` raises ``NVMLError_NotSupported`` on a MIG
  handle, as the real NVML does;
* names and UUIDs are ``str`` (newer pynvml) or, with ``FakeNvml(..., as_bytes=True)``,
  ``bytes`` (older pynvml).

A test describes the fleet with :class:`FakeGpu` and :class:`FakeMig`, then may
change ``free`` and ``util`` on them later to simulate load for stats polling.

    nvml = FakeNvml([FakeGpu("A100", "GPU-a", total=80 * GiB, free=70 * GiB, cc=(8, 0))])
    nvml.gpus[0].free = 10 * GiB
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

GiB = 2**30

MIG_DISABLE = 0  # NVML_DEVICE_MIG_DISABLE
MIG_ENABLE = 1   # NVML_DEVICE_MIG_ENABLE


# --- errors, shaped like pynvml's ---------------------------------------------------------------

class NVMLError(Exception):
    """pynvml.NVMLError: carries an NVML return code in ``value``; str() is its description."""

    _strings = {
        1: "Uninitialized",
        2: "Invalid Argument",
        3: "Not Supported",
        6: "Not Found",
        9: "Driver Not Loaded",
        12: "NVML Shared Library Not Found",
        15: "GPU is lost",
        999: "Unknown Error",
    }

    def __init__(self, value: int = 999):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self._strings.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, value: int) -> type[NVMLError]:
    def __init__(self: NVMLError) -> None:
        NVMLError.__init__(self, value)
    return type(name, (NVMLError,), {"__init__": __init__})


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", 1)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", 2)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", 3)
NVMLError_NotFound = _error_class("NVMLError_NotFound", 6)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", 9)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", 12)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", 15)
NVMLError_Unknown = _error_class("NVMLError_Unknown", 999)


# --- the fleet --------------------------------------------------------------------------------

@dataclass
class FakeMig:
    """A MIG instance in one slot of a GPU in MIG mode."""
    uuid: str
    total: int
    free: int
    name: str = "MIG instance"


@dataclass
class FakeGpu:
    """A physical GPU.

    ``mig``: None for a GPU without MIG support; otherwise a list of slots,
    each a :class:`FakeMig` or None (an empty slot). ``mig_enabled`` says
    whether MIG mode is on; set it False for a MIG-capable GPU with MIG off
    (its slots are then ignored, as by NVML). ``lost``: the GPU has fallen off
    the bus; getting its handle raises ``NVMLError_GpuIsLost``.
    """
    name: str
    uuid: str
    total: int
    free: int
    cc: tuple[int, int] = (8, 0)
    util: int = 0
    mig: list[FakeMig | None] | None = None
    mig_enabled: bool = True
    mem_util: int = 0
    lost: bool = False


@dataclass
class MemoryInfo:
    """pynvml's c_nvmlMemory_t: total, free, used (bytes)."""
    total: int
    free: int
    used: int


@dataclass
class Utilization:
    """pynvml's c_nvmlUtilization_t: gpu and memory (percent)."""
    gpu: int
    memory: int


class _Handle:
    """An opaque device handle (pynvml's c_nvmlDevice_t)."""

    def __init__(self, target: FakeGpu | FakeMig, parent: FakeGpu | None = None):
        self._target = target
        self._parent = parent

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self._target.uuid}>"


@dataclass
class FakeNvml:
    """A provider with the ``nvml*`` functions DeviceSource uses, over ``gpus``.

    ``init_error``: an exception ``nvmlInit`` raises (e.g. ``NVMLError_DriverNotLoaded()``).
    ``fail_on``: the name of an ``nvml*`` function that raises ``NVMLError_Unknown``
    once initialized, to simulate a failure in the middle of discovery.
    ``calls``: the names of the functions called, in order.
    """
    gpus: Sequence[FakeGpu]
    init_error: BaseException | None = None
    as_bytes: bool = False
    fail_on: str | None = None
    initialized: bool = False
    calls: list[str] = field(default_factory=list)

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVML_DEVICE_MIG_DISABLE = MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = MIG_ENABLE

    # -- helpers --

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if not self.initialized:
            raise NVMLError_Uninitialized()
        if self.fail_on == name:
            raise NVMLError_Unknown()

    def _text(self, value: str) -> str | bytes:
        return value.encode() if self.as_bytes else value

    @staticmethod
    def _check(handle: Any) -> _Handle:
        if not isinstance(handle, _Handle):
            raise NVMLError_InvalidArgument()
        return handle

    # -- the pynvml API --

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        if self.gpus[index].lost:
            raise NVMLError_GpuIsLost()
        return _Handle(self.gpus[index])

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        self._enter("nvmlDeviceGetName")
        h = self._check(handle)
        if h._parent is not None:  # NVML names a MIG device after its parent and profile
            return self._text(f"{h._parent.name} MIG {h._target.name}")
        return self._text(h._target.name)

    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes:
        self._enter("nvmlDeviceGetUUID")
        return self._text(self._check(handle)._target.uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: Any = None) -> MemoryInfo:
        self._enter("nvmlDeviceGetMemoryInfo")
        t = self._check(handle)._target
        return MemoryInfo(total=t.total, free=t.free, used=t.total - t.free)

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        self._enter("nvmlDeviceGetCudaComputeCapability")
        h = self._check(handle)
        gpu = h._parent or h._target
        return (gpu.cc[0], gpu.cc[1])

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Utilization:
        self._enter("nvmlDeviceGetUtilizationRates")
        h = self._check(handle)
        if h._parent is not None:
            raise NVMLError_NotSupported()  # NVML reports no utilization for MIG devices
        return Utilization(gpu=h._target.util, memory=h._target.mem_util)

    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]:
        self._enter("nvmlDeviceGetMigMode")
        h = self._check(device)
        if h._parent is not None or h._target.mig is None:
            raise NVMLError_NotSupported()
        mode = MIG_ENABLE if h._target.mig_enabled else MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: Any) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount")
        h = self._check(device)
        if h._parent is not None or h._target.mig is None:
            raise NVMLError_NotSupported()
        return len(h._target.mig)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Any, index: int) -> _Handle:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex")
        h = self._check(device)
        gpu = h._target
        if h._parent is not None or gpu.mig is None:
            raise NVMLError_NotSupported()
        if not gpu.mig_enabled:
            raise NVMLError_InvalidArgument()
        if not 0 <= index < len(gpu.mig):
            raise NVMLError_InvalidArgument()
        mig = gpu.mig[index]
        if mig is None:
            raise NVMLError_NotFound()  # an empty slot
        return _Handle(mig, parent=gpu)

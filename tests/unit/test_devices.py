"""Unit tests for inferd.devices: NVML discovery (through a fake provider), MIG, CPU fallback, stats."""

from __future__ import annotations

import json
import sys

import pytest

from inferd import devices
from inferd.devices import Device, DeviceSource, DeviceStats, cuda_visible_devices
from tests.fakenvml import (
    GiB,
    FakeGpu,
    FakeMig,
    FakeNvml,
    NVMLError,
    NVMLError_DriverNotLoaded,
    NVMLError_LibraryNotFound,
)


def a100(index: int = 0, **kw) -> FakeGpu:
    args = dict(name="NVIDIA A100-SXM4-80GB", uuid=f"GPU-a100-{index}", total=80 * GiB, free=79 * GiB, cc=(8, 0))
    args.update(kw)
    return FakeGpu(**args)


def four_gpus() -> list[FakeGpu]:
    return [
        FakeGpu("Tesla T4", "GPU-t4", total=16 * GiB, free=15 * GiB, cc=(7, 5), util=10),
        FakeGpu("NVIDIA A100-SXM4-40GB", "GPU-a100", total=40 * GiB, free=30 * GiB, cc=(8, 0), util=20),
        FakeGpu("NVIDIA L40S", "GPU-l40s", total=48 * GiB, free=47 * GiB, cc=(8, 9), util=30),
        FakeGpu("NVIDIA H100 80GB HBM3", "GPU-h100", total=80 * GiB, free=1 * GiB, cc=(9, 0), util=99),
    ]


def mig_gpu(index: int = 0) -> FakeGpu:
    """An A100 in MIG mode: three instances in slots 0-2, slot 3 empty."""
    return a100(index, mig=[
        FakeMig(f"MIG-{index}-0", total=40 * GiB, free=39 * GiB, name="3g.40gb"),
        FakeMig(f"MIG-{index}-1", total=20 * GiB, free=18 * GiB, name="2g.20gb"),
        FakeMig(f"MIG-{index}-2", total=10 * GiB, free=9 * GiB, name="1g.10gb"),
        None,
    ])


# --- GPU fleets -------------------------------------------------------------------------------


def test_one_gpu():
    src = DeviceSource(FakeNvml([a100()]), cpu_count=2)
    assert src.devices == [Device("gpu:0", "cuda", "NVIDIA A100-SXM4-80GB", "GPU-a100-0", 80 * GiB, (8, 0))]
    assert src.note == "1 GPU device(s) found by NVML"
    assert src.gpu is True


def test_four_gpus_carry_memory_and_compute_capability():
    src = DeviceSource(FakeNvml(four_gpus()), cpu_count=1)
    assert src.devices == [
        Device("gpu:0", "cuda", "Tesla T4", "GPU-t4", 16 * GiB, (7, 5)),
        Device("gpu:1", "cuda", "NVIDIA A100-SXM4-40GB", "GPU-a100", 40 * GiB, (8, 0)),
        Device("gpu:2", "cuda", "NVIDIA L40S", "GPU-l40s", 48 * GiB, (8, 9)),
        Device("gpu:3", "cuda", "NVIDIA H100 80GB HBM3", "GPU-h100", 80 * GiB, (9, 0)),
    ]
    assert src.note == "4 GPU device(s) found by NVML"
    assert all(type(d.memory_total) is int for d in src.devices)
    assert all(type(d.compute_capability) is tuple for d in src.devices)


def test_mig_instances_are_devices_and_empty_slots_are_skipped():
    src = DeviceSource(FakeNvml([mig_gpu()]), cpu_count=1)
    assert src.devices == [
        Device("gpu:0/mig:0", "cuda", "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "MIG-0-0", 40 * GiB, (8, 0)),
        Device("gpu:0/mig:1", "cuda", "NVIDIA A100-SXM4-80GB MIG 2g.20gb", "MIG-0-1", 20 * GiB, (8, 0)),
        Device("gpu:0/mig:2", "cuda", "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "MIG-0-2", 10 * GiB, (8, 0)),
    ]
    assert src.note == "3 GPU device(s) found by NVML, 3 of them MIG instances"


def test_mig_compute_capability_is_inherited_from_the_parent():
    gpu = FakeGpu("NVIDIA H100", "GPU-h", total=80 * GiB, free=80 * GiB, cc=(9, 0),
                  mig=[FakeMig("MIG-h-0", 40 * GiB, 40 * GiB), FakeMig("MIG-h-1", 40 * GiB, 40 * GiB)])
    src = DeviceSource(FakeNvml([gpu]), cpu_count=1)
    assert [d.compute_capability for d in src.devices] == [(9, 0), (9, 0)]


def test_mig_ids_keep_the_slot_number_around_an_empty_slot():
    gpu = a100(mig=[FakeMig("MIG-x", 40 * GiB, 40 * GiB), None, FakeMig("MIG-y", 40 * GiB, 40 * GiB)])
    src = DeviceSource(FakeNvml([gpu]), cpu_count=1)
    assert [(d.id, d.uuid) for d in src.devices] == [("gpu:0/mig:0", "MIG-x"), ("gpu:0/mig:2", "MIG-y")]


def test_mig_capable_gpu_with_mig_disabled_is_one_device():
    gpu = a100(mig=[FakeMig("MIG-unused", 40 * GiB, 40 * GiB)], mig_enabled=False)
    src = DeviceSource(FakeNvml([gpu]), cpu_count=1)
    assert src.devices == [Device("gpu:0", "cuda", "NVIDIA A100-SXM4-80GB", "GPU-a100-0", 80 * GiB, (8, 0))]
    assert src.note == "1 GPU device(s) found by NVML"


def test_mixed_fleet_of_a_mig_gpu_and_a_plain_gpu():
    plain = FakeGpu("Tesla V100", "GPU-v100", total=32 * GiB, free=30 * GiB, cc=(7, 0))
    src = DeviceSource(FakeNvml([mig_gpu(0), plain]), cpu_count=1)
    assert [(d.id, d.uuid, d.memory_total, d.compute_capability) for d in src.devices] == [
        ("gpu:0/mig:0", "MIG-0-0", 40 * GiB, (8, 0)),
        ("gpu:0/mig:1", "MIG-0-1", 20 * GiB, (8, 0)),
        ("gpu:0/mig:2", "MIG-0-2", 10 * GiB, (8, 0)),
        ("gpu:1", "GPU-v100", 32 * GiB, (7, 0)),
    ]
    assert src.note == "4 GPU device(s) found by NVML, 3 of them MIG instances"
    assert set(src.handles) == {"gpu:0/mig:0", "gpu:0/mig:1", "gpu:0/mig:2", "gpu:1"}


def test_names_and_uuids_as_bytes_from_older_pynvml():
    src = DeviceSource(FakeNvml([a100(), mig_gpu(1)], as_bytes=True), cpu_count=1)
    assert [(d.id, d.name, d.uuid) for d in src.devices] == [
        ("gpu:0", "NVIDIA A100-SXM4-80GB", "GPU-a100-0"),
        ("gpu:1/mig:0", "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "MIG-1-0"),
        ("gpu:1/mig:1", "NVIDIA A100-SXM4-80GB MIG 2g.20gb", "MIG-1-1"),
        ("gpu:1/mig:2", "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "MIG-1-2"),
    ]
    assert all(type(d.name) is str and type(d.uuid) is str for d in src.devices)
    assert cuda_visible_devices(src.devices) == "GPU-a100-0,MIG-1-0,MIG-1-1,MIG-1-2"


def test_close_shuts_nvml_down():
    nvml = FakeNvml([a100()])
    src = DeviceSource(nvml, cpu_count=1)
    assert nvml.initialized
    src.close()
    assert not nvml.initialized
    assert nvml.calls[-1] == "nvmlShutdown"


# --- CPU fallback -----------------------------------------------------------------------------


def cpus(n: int) -> list[Device]:
    return [Device(f"cpu:{i}", "cpu", "CPU") for i in range(n)]


def test_no_provider_falls_back_to_cpu_devices_with_the_reason():
    src = DeviceSource(None, cpu_count=3, why_no_nvml="the pynvml module (nvidia-ml-py) is not installed")
    assert src.devices == cpus(3)
    assert src.note == "no GPU: the pynvml module (nvidia-ml-py) is not installed; using 3 CPU device(s)"
    assert src.gpu is False
    assert [d.kind for d in src.devices] == ["cpu"] * 3
    assert [d.id for d in src.devices] == ["cpu:0", "cpu:1", "cpu:2"]


@pytest.mark.parametrize("error, text", [
    (NVMLError_DriverNotLoaded(), "Driver Not Loaded"),
    (NVMLError_LibraryNotFound(), "NVML Shared Library Not Found"),
    (OSError("libnvidia-ml.so.1: cannot open shared object file"), "libnvidia-ml.so.1: cannot open"),
])
def test_nvml_init_failure_falls_back_and_names_the_error(error, text):
    nvml = FakeNvml([a100()], init_error=error)
    src = DeviceSource(nvml, cpu_count=2)
    assert src.devices == cpus(2)
    assert src.note.startswith("no GPU: NVML unavailable (")
    assert text in src.note
    assert src.note.endswith("; using 2 CPU device(s)")
    assert nvml.calls == ["nvmlInit"]
    assert src.gpu is False


def test_zero_gpus_falls_back():
    src = DeviceSource(FakeNvml([]), cpu_count=1)
    assert src.devices == cpus(1)
    assert src.note == "no GPU: NVML found no devices; using 1 CPU device(s)"
    assert src.gpu is False


def test_only_empty_mig_slots_falls_back():
    src = DeviceSource(FakeNvml([a100(mig=[None, None])]), cpu_count=2)
    assert src.devices == cpus(2)
    assert src.note == "no GPU: NVML found no devices; using 2 CPU device(s)"


def test_an_error_in_the_middle_of_discovery_falls_back():
    nvml = FakeNvml([a100(0), a100(1, lost=True), a100(2)])
    src = DeviceSource(nvml, cpu_count=4)
    assert src.devices == cpus(4)
    assert src.note == "no GPU: NVML discovery failed (GPU is lost); using 4 CPU device(s)"
    assert src.handles == {}  # gpu:0 was found before the failure, and forgotten
    assert src.gpu is False
    assert set(src.stats()) == {"cpu:0", "cpu:1", "cpu:2", "cpu:3"}


def test_an_error_reading_a_mig_instance_falls_back():
    nvml = FakeNvml([mig_gpu()], fail_on="nvmlDeviceGetUUID")
    src = DeviceSource(nvml, cpu_count=1)
    assert src.devices == cpus(1)
    assert src.note == "no GPU: NVML discovery failed (Unknown Error); using 1 CPU device(s)"


def test_fallback_notes_say_no_gpu_and_cpu_devices():
    sources = [
        DeviceSource(None, 2, "no pynvml"),
        DeviceSource(FakeNvml([a100()], init_error=NVMLError_DriverNotLoaded()), 2),
        DeviceSource(FakeNvml([]), 2),
        DeviceSource(FakeNvml([a100(lost=True)]), 2),
    ]
    for src in sources:
        assert "no GPU" in src.note and "2 CPU device(s)" in src.note, src.note
        assert src.devices == cpus(2)


def test_load_nvml_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert devices.load_nvml() == (None, "the pynvml module (nvidia-ml-py) is not installed")
    src = devices.discover(2)
    assert src.devices == cpus(2)
    assert src.note == "no GPU: the pynvml module (nvidia-ml-py) is not installed; using 2 CPU device(s)"


def test_discover_uses_the_provider_from_load_nvml(monkeypatch):
    monkeypatch.setattr(devices, "load_nvml", lambda: (FakeNvml([a100()]), ""))
    src = devices.discover(1)
    assert [d.id for d in src.devices] == ["gpu:0"]


# --- pinning ----------------------------------------------------------------------------------


def test_cuda_visible_devices_joins_gpu_uuids():
    src = DeviceSource(FakeNvml(four_gpus()), cpu_count=1)
    assert cuda_visible_devices(src.devices) == "GPU-t4,GPU-a100,GPU-l40s,GPU-h100"
    assert cuda_visible_devices(src.devices[1:3]) == "GPU-a100,GPU-l40s"
    assert cuda_visible_devices([src.devices[3]]) == "GPU-h100"


def test_cuda_visible_devices_with_mig_uuids():
    plain = FakeGpu("Tesla V100", "GPU-v100", total=32 * GiB, free=30 * GiB, cc=(7, 0))
    src = DeviceSource(FakeNvml([mig_gpu(), plain]), cpu_count=1)
    assert cuda_visible_devices(src.devices[:1]) == "MIG-0-0"
    assert cuda_visible_devices(src.devices) == "MIG-0-0,MIG-0-1,MIG-0-2,GPU-v100"


def test_cuda_visible_devices_is_empty_for_cpu_devices():
    src = DeviceSource(None, 2, "no pynvml")
    assert cuda_visible_devices(src.devices) == ""
    assert cuda_visible_devices([]) == ""


# --- stats ------------------------------------------------------------------------------------


def test_stats_report_free_memory_and_utilization():
    src = DeviceSource(FakeNvml(four_gpus()), cpu_count=1)
    assert src.stats() == {
        "gpu:0": DeviceStats(15 * GiB, 10),
        "gpu:1": DeviceStats(30 * GiB, 20),
        "gpu:2": DeviceStats(47 * GiB, 30),
        "gpu:3": DeviceStats(1 * GiB, 99),
    }


def test_stats_follow_changes():
    nvml = FakeNvml(four_gpus())
    src = DeviceSource(nvml, cpu_count=1)
    nvml.gpus[0].free = 2 * GiB
    nvml.gpus[0].util = 95
    nvml.gpus[3].free = 70 * GiB
    nvml.gpus[3].util = 0
    stats = src.stats()
    assert stats["gpu:0"] == DeviceStats(2 * GiB, 95)
    assert stats["gpu:3"] == DeviceStats(70 * GiB, 0)
    assert stats["gpu:1"] == DeviceStats(30 * GiB, 20)


def test_mig_stats_have_free_memory_but_no_utilization():
    nvml = FakeNvml([mig_gpu(), a100(1, util=42)])
    src = DeviceSource(nvml, cpu_count=1)
    assert src.stats() == {
        "gpu:0/mig:0": DeviceStats(39 * GiB, None),
        "gpu:0/mig:1": DeviceStats(18 * GiB, None),
        "gpu:0/mig:2": DeviceStats(9 * GiB, None),
        "gpu:1": DeviceStats(79 * GiB, 42),
    }
    nvml.gpus[0].mig[1].free = 1 * GiB
    assert src.stats()["gpu:0/mig:1"] == DeviceStats(1 * GiB, None)


def test_stats_with_a_failing_memory_query_say_unknown():
    nvml = FakeNvml([a100(util=7)])
    src = DeviceSource(nvml, cpu_count=1)
    nvml.fail_on = "nvmlDeviceGetMemoryInfo"
    assert src.stats() == {"gpu:0": DeviceStats(None, 7)}


def test_cpu_stats_report_host_memory_available():
    src = DeviceSource(None, 3, "no pynvml")
    stats = src.stats()
    assert set(stats) == {"cpu:0", "cpu:1", "cpu:2"}
    free = {s.memory_free for s in stats.values()}
    assert len(free) == 1
    (value,) = free
    assert type(value) is int and value > 0
    assert all(s.utilization is None for s in stats.values())


def test_cpu_stats_after_a_failed_discovery_do_not_call_nvml():
    nvml = FakeNvml([a100(lost=True)])
    src = DeviceSource(nvml, cpu_count=1)
    before = list(nvml.calls)
    stats = src.stats()
    assert nvml.calls == before
    assert stats["cpu:0"].utilization is None and stats["cpu:0"].memory_free > 0


# --- serialization ----------------------------------------------------------------------------


def test_device_round_trip_through_a_dict_and_json():
    src = DeviceSource(FakeNvml([mig_gpu(), a100(1)]), cpu_count=1)
    for device in src.devices + cpus(2):
        data = json.loads(json.dumps(device.to_dict()))
        back = Device.from_dict(data)
        assert back == device
        assert back.compute_capability is None or type(back.compute_capability) is tuple


def test_device_to_dict_fields():
    device = Device("gpu:1", "cuda", "Tesla T4", "GPU-t4", 16 * GiB, (7, 5))
    assert device.to_dict() == {"id": "gpu:1", "kind": "cuda", "name": "Tesla T4", "uuid": "GPU-t4",
                                "memory_total": 16 * GiB, "compute_capability": (7, 5)}
    assert Device.from_dict({**device.to_dict(), "compute_capability": [7, 5]}).compute_capability == (7, 5)


# --- the fake itself --------------------------------------------------------------------------


def test_fake_mirrors_pynvml_semantics():
    nvml = FakeNvml([a100(), mig_gpu(1)])
    with pytest.raises(NVMLError):  # Uninitialized
        nvml.nvmlDeviceGetCount()
    nvml.nvmlInit()
    plain = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(nvml.NVMLError) as info:
        nvml.nvmlDeviceGetMigMode(plain)
    assert str(info.value) == "Not Supported"
    mig_parent = nvml.nvmlDeviceGetHandleByIndex(1)
    assert list(nvml.nvmlDeviceGetMigMode(mig_parent)) == [1, 1]
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(mig_parent) == 4
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(mig_parent, 3)  # empty slot
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(mig_parent, 0)
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetUtilizationRates(mig)
    mem = nvml.nvmlDeviceGetMemoryInfo(mig)
    assert (mem.total, mem.free, mem.used) == (40 * GiB, 39 * GiB, 1 * GiB)
    util = nvml.nvmlDeviceGetUtilizationRates(plain)
    assert (util.gpu, util.memory) == (0, 0)
    assert nvml.nvmlDeviceGetCudaComputeCapability(plain) == (8, 0)
    nvml.nvmlShutdown()
    with pytest.raises(NVMLError):
        nvml.nvmlDeviceGetUUID(plain)

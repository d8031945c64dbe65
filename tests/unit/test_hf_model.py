"""HuggingFace checkpoints on the torch runtime's slot cache (inferd.models.hf), driven step by step.

Each architecture's greedy output through :class:`TorchRunner` must equal transformers' own
``generate(do_sample=False)`` token for token, alone and batched with staggered joins. The
checkpoints are tiny and random, written by ``inferd.models.hf_tiny`` (see tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from inferd.chat import render_plain  # noqa: E402
from inferd.failures import UnrecoverableError  # noqa: E402
from inferd.models import hf  # noqa: E402
from inferd.runtimes.base import RunRequest  # noqa: E402
from inferd.runtimes.textstream import TextStream  # noqa: E402
from tests.unit.test_torch_runner import Trace, make_runner, run_alone  # noqa: E402
from tests.unit.tiny_factory import threads  # noqa: E402

ARCHS = ["llama", "qwen2", "gpt2", "mistral", "gemma2", "qwen3", "phi3", "olmo2", "gemma"]
PROMPTS = ["The capital of France is", "Hello, world! How are", "def main(): return sum(x",
           "Café, naïve, 日本語", "An inference server batches requests so that a GPU stays busy: each step"]
NEW_TOKENS = 16


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):
        yield


def hf_options(path: str, **extra) -> dict:
    return {"checkpoint": path, "max_seq_len": 128, "max_batch_size": 4, **extra}


def reference(path: str, prompts: list[str], max_new_tokens: int = NEW_TOKENS) -> list[tuple[str, str, int]]:
    """transformers alone: (text, finish reason, tokens generated) per prompt, by generate()."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    ours = hf.HFTokenizer(tokenizer, hf._end_ids(model, tokenizer))
    out = []
    for prompt in prompts:
        ids = ours.encode(prompt)
        with torch.inference_mode():
            generated = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()
        ended = bool(generated) and generated[-1] in ours.eos_ids
        text = b"".join(ours.token_bytes(t) for t in generated[:-1] if ended) if ended else \
            b"".join(ours.token_bytes(t) for t in generated)
        out.append((text.decode("utf-8", errors="replace"), "stop" if ended else "length", len(generated)))
    return out


def served_alone(runner, prompt: str, rid: int = 1) -> tuple[str, str, int]:
    text, trace = run_alone(runner, prompt, {"max_tokens": NEW_TOKENS}, rid=rid)
    final = trace.final(rid)
    return text, final.finish_reason, final.usage["completion_tokens"]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate_alone_and_batched(hf_checkpoint, arch):
    path = hf_checkpoint(arch)
    expected = reference(path, PROMPTS)
    runner = make_runner(hf_options(path), capacity=4)
    assert runner.model.architecture == arch
    assert [served_alone(runner, p, rid=i) for i, p in enumerate(PROMPTS)] == expected

    # Batched: one request joins every other step while a slot is free, so joins land mid-decode
    # and slots are reused; each output must be what it was alone.
    trace, queue, live, step = Trace(), list(enumerate(PROMPTS)), set(), 0
    while queue or live:
        if step % 2 == 0 and queue and len(live) < runner.capacity:
            rid, prompt = queue.pop(0)
            runner.admit(RunRequest(rid, prompt, {"max_tokens": NEW_TOKENS}))
            live.add(rid)
        if runner.next_step_in() is not None:
            live -= {o.rid for o in trace.step(runner) if o.final}
        step += 1
        assert step < 500
    assert max(len(outs) for outs in trace.steps) > 1
    batched = [(trace.text(i), trace.final(i).finish_reason, trace.final(i).usage["completion_tokens"])
               for i in range(len(PROMPTS))]
    assert batched == expected


@pytest.mark.parametrize("count", [1, 2])
def test_a_request_logits_are_bitwise_identical_alone_and_in_a_full_batch(hf_checkpoint, count):
    """The slot path's own guarantee, below the argmax: every live slot's logits in a decode step of
    8 equal those of the same sequence decoded alone, bit for bit, with one torch thread and with
    two, through the oneDNN-packed linear layers the CPU path uses in float32."""
    model = hf.build(checkpoint=hf_checkpoint("gemma2"), device=torch.device("cpu"), dtype=torch.float32,
                     max_seq_len=128)
    linears = [m for m in model.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all("forward" in vars(m) for m in linears), "the linear layers are not packed"
    slots = 8
    prompts = [model.tokenizer.encode(p * (1 + i % 3)) for i, p in enumerate(PROMPTS * 2)][:slots]

    def decode_steps(live: list[int]) -> dict[int, list[torch.Tensor]]:
        cache = model.new_cache(slots)
        tokens, positions = [0] * slots, [0] * slots
        for slot in live:
            tokens[slot] = int(model.prefill(torch.tensor(prompts[slot]), cache, slot).argmax())
            positions[slot] = len(prompts[slot])
        out: dict[int, list[torch.Tensor]] = {slot: [] for slot in live}
        for _ in range(70):   # past a key block (64): rows attend over different numbers of blocks
            logits = model.decode(torch.tensor(tokens), torch.tensor(positions), cache, live)
            for slot in live:
                out[slot].append(logits[slot].clone())
                tokens[slot], positions[slot] = int(logits[slot].argmax()), positions[slot] + 1
        return out

    with threads(count):
        together = decode_steps(list(range(slots)))
        for slot in (0, 5, 7):
            alone = decode_steps([slot])[slot]
            assert all(torch.equal(a, b) for a, b in zip(alone, together[slot])), f"slot {slot} differs"


# --- tokens, text and chat ------------------------------------------------------------------------

def test_every_listed_end_token_ends_a_sequence(hf_checkpoint, tmp_path):
    """generation_config lists two end tokens; the second, made the model's third greedy token,
    ends the output there with finish reason stop."""
    path = Path(shutil.copytree(hf_checkpoint("llama"), tmp_path / "llama"))
    runner = make_runner(hf_options(str(path)))
    assert len(runner.model.tokenizer.eos_ids) == 2
    prompt = PROMPTS[0]
    ids = runner.model.tokenizer.encode(prompt)
    generated = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=3,
        do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"][0], generated[2]]
    (path / "generation_config.json").write_text(json.dumps(config))
    runner = make_runner(hf_options(str(path)))
    assert generated[2] in runner.model.tokenizer.eos_ids
    text, trace = run_alone(runner, prompt, {"max_tokens": 10})
    final = trace.final(1)
    assert (final.finish_reason, final.usage["completion_tokens"]) == ("stop", 3)
    tok = runner.model.tokenizer
    assert text == (tok.token_bytes(generated[0]) + tok.token_bytes(generated[1])).decode("utf-8", "replace")


def test_chat_messages_use_the_checkpoint_template(hf_checkpoint):
    path = hf_checkpoint("llama")
    runner = make_runner(hf_options(path))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    templated = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert templated.endswith("<|im_start|>assistant\n")
    runner.admit(RunRequest(1, "", {"max_tokens": NEW_TOKENS}, chat))
    trace = Trace()
    trace.drain(runner)
    assert trace.final(1).usage["prompt_tokens"] == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    # The same tokens as the templated text sent as a prompt (the template holds no BOS to add).
    assert trace.text(1) == run_alone(runner, templated, {"max_tokens": NEW_TOKENS}, rid=2)[0]


def test_chat_without_a_template_uses_the_plain_fallback():
    """tiny has no chat template: messages are rendered as role: content lines."""
    chat = [{"role": "user", "content": "Hello"}]
    assert render_plain(chat) == "user: Hello\nassistant:"
    runner = make_runner({"model": "tiny", "seed": 1})
    runner.admit(RunRequest(1, "", {"max_tokens": 12}, chat))
    trace = Trace()
    trace.drain(runner)
    assert trace.text(1) == run_alone(runner, render_plain(chat), {"max_tokens": 12}, rid=2)[0]


def test_multibyte_characters_split_across_tokens_stream_whole(hf_checkpoint):
    """A byte-level BPE token may hold part of a character; its bytes are held until the
    character is whole, so no chunk carries a broken one."""
    runner = make_runner(hf_options(hf_checkpoint("llama")))
    tok = runner.model.tokenizer
    text = "Café 日本語 🙂🚀 Русский"
    ids = tok.encode(text)
    pieces = [tok.token_bytes(t) for t in ids]
    assert b"".join(pieces) == text.encode()
    assert any(_broken(p) for p in pieces), "the test needs a token that splits a character"
    stream = TextStream()
    chunks = [stream.push(p) for p in pieces] + [stream.finish()]
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)


def _broken(piece: bytes) -> bool:
    try:
        piece.decode()
        return False
    except UnicodeDecodeError:
        return True


# --- bad checkpoints --------------------------------------------------------------------------------

def _load(checkpoint: str) -> None:
    hf.build(checkpoint=checkpoint, device=torch.device("cpu"), dtype=torch.float32, max_seq_len=64)


def test_bad_checkpoints_are_unrecoverable_and_name_the_problem(hf_checkpoint, tmp_path):
    good = Path(hf_checkpoint("llama"))
    cases = {}
    cases["missing"] = (str(tmp_path / "nope"), "no such directory")
    no_config = Path(shutil.copytree(good, tmp_path / "no_config"))
    (no_config / "config.json").unlink()
    cases["no config"] = (str(no_config), "no config.json")
    no_weights = Path(shutil.copytree(good, tmp_path / "no_weights"))
    (no_weights / "model.safetensors").unlink()
    cases["no weights"] = (str(no_weights), "no *.safetensors")
    corrupt = Path(shutil.copytree(good, tmp_path / "corrupt"))
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["corrupt"] = (str(corrupt), "unreadable weights")
    unsupported = Path(shutil.copytree(good, tmp_path / "unsupported"))
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox",
                                                         "architectures": ["GPTNeoXForCausalLM"]}))
    cases["unsupported"] = (str(unsupported), "architecture 'gpt_neox' is not supported")
    no_tokenizer = Path(shutil.copytree(good, tmp_path / "no_tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    cases["no tokenizer"] = (str(no_tokenizer), "tokenizer")
    cases["no package"] = ("package:inferd_no_such_package/m.gguf", "package 'inferd_no_such_package' is not installed")
    cases["no gguf"] = (str(tmp_path / "m.gguf"), "no such GGUF file")
    for case, (checkpoint, needle) in cases.items():
        with pytest.raises(UnrecoverableError) as info:
            _load(checkpoint)
        assert needle in str(info.value), (case, str(info.value))


def test_the_load_guard_refuses_a_slot_path_that_disagrees(hf_checkpoint, monkeypatch):
    """If the slot path's logits drift from transformers' own forward (an architecture whose layers
    use the cache or the mask in a way this path does not mirror), the model is refused, by name."""
    right = hf.slot_attention

    def off_by_a_little(*args, **kwargs):
        out, weights = right(*args, **kwargs)
        return out * 1.01, weights

    monkeypatch.setattr(hf, "slot_attention", off_by_a_little)
    with pytest.raises(UnrecoverableError, match="architecture 'qwen2': the slot path's logits differ"):
        _load(hf_checkpoint("qwen2"))


# --- the runner's guarantees, on a checkpoint ---------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_passes_the_guard_and_generates(hf_checkpoint, dtype):
    runner = make_runner(hf_options(hf_checkpoint("qwen2"), dtype=dtype))
    assert runner.model.dtype == getattr(torch, dtype)
    text, trace = run_alone(runner, PROMPTS[0], {"max_tokens": 8})
    assert trace.final(1).usage["completion_tokens"] >= 1


def test_cancel_rebuild_and_out_of_memory_resume_as_for_tiny(hf_checkpoint):
    from inferd.failures import Failure, classify

    runner = make_runner(hf_options(hf_checkpoint("llama"), fault_injection=True), capacity=2)
    expected, _ = run_alone(runner, PROMPTS[1], {"max_tokens": 12})
    # A cancel frees the slot at once; the next request takes it and is unaffected.
    runner.admit(RunRequest(7, PROMPTS[0], {"max_tokens": 50}))
    runner.step()
    assert runner.load_report()["batch"] == 1
    runner.cancel(7)
    assert runner.load_report()["batch"] == 0
    assert run_alone(runner, PROMPTS[1], {"max_tokens": 12}, rid=8)[0] == expected
    # A real allocation failure in a step is an out-of-memory (Resume); the runner carries on.
    runner.admit(RunRequest(9, PROMPTS[1], {"max_tokens": 12, "fault": "oom"}))
    with pytest.raises(Exception) as info:
        runner.step()
    assert classify(info.value) is Failure.OUT_OF_MEMORY
    runner.cancel(9)
    runner.release_memory()
    assert run_alone(runner, PROMPTS[1], {"max_tokens": 12}, rid=10)[0] == expected
    # A rebuild reloads the checkpoint and serves the same.
    runner.rebuild()
    assert run_alone(runner, PROMPTS[1], {"max_tokens": 12}, rid=11)[0] == expected


def test_a_prompt_past_max_seq_len_is_rejected_alone(hf_checkpoint):
    from inferd.runtimes.base import RequestRejected

    runner = make_runner(hf_options(hf_checkpoint("llama"), max_seq_len=32))
    with pytest.raises(RequestRejected, match="this model's context is 32"):
        runner.admit(RunRequest(1, "word " * 64, {}))
    text, trace = run_alone(runner, "Hello", {"max_tokens": 100})
    assert trace.final(1).finish_reason == "length" and trace.final(1).usage["completion_tokens"] <= 32

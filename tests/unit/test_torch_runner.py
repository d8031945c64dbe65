"""Unit tests for inferd.runtimes.torch_runtime.TorchRunner on the CPU, driven step by step.

The model is the small ``tiny`` of ``tests.unit.tiny_factory`` (about a millisecond a step),
from a weights file written by ``python -m inferd.models.tiny`` or from the test factory.
"""

from __future__ import annotations

import collections

import pytest

torch = pytest.importorskip("torch")

from inferd.devices import Device  # noqa: E402
from inferd.errors import ErrorCode  # noqa: E402
from inferd.failures import ContextPoisonedError, Failure, UnrecoverableError, classify  # noqa: E402
from inferd.models.tiny import TinyLM  # noqa: E402
from inferd.runtimes.base import Output, RequestRejected, RunRequest  # noqa: E402
from inferd.runtimes.torch_runtime import TorchRunner  # noqa: E402
from tests.unit import tiny_factory  # noqa: E402
from tests.unit.tiny_factory import small_config, threads, write_with_tool  # noqa: E402

CPU0 = Device("cpu:0", "cpu", "CPU")
FACTORY = "tests.unit.tiny_factory:build_small"

PROMPTS = [
    "a",
    "Hello",
    "héllo wörld ✓ 😀",
    "The quick brown fox jumps over the lazy dog",
    "中文字符 and more",
    "1234567890",
    "\n\tTabs and newlines\n",
    "A long prompt that fills most of the context window: " + "lorem ipsum dolor " * 2,  # 89 bytes
]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (see tiny_factory.threads); batch invariance is also checked with two."""
    with threads(1):
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Small model, context 128 tokens, seed 5."""
    return write_with_tool(str(tmp_path_factory.mktemp("weights") / "w.pt"), seed=5, max_seq_len=128)


@pytest.fixture(scope="module")
def weights64(tmp_path_factory) -> str:
    """Small model, context 64 tokens, seed 5."""
    return write_with_tool(str(tmp_path_factory.mktemp("weights") / "w64.pt"), seed=5, max_seq_len=64)


def make_runner(options: dict, capacity: int = 4) -> TorchRunner:
    runner = TorchRunner({"max_batch_delay_ms": 0, **options}, (CPU0,), capacity)
    runner.load()
    runner.warmup()
    return runner


class Trace:
    """Every step's outputs, checked as they come: at most one output per request per step,
    nothing after a request's final output."""

    def __init__(self):
        self.steps: list[list[Output]] = []
        self.by_rid: dict[int, list[Output]] = collections.defaultdict(list)
        self.done: set[int] = set()

    def step(self, runner: TorchRunner) -> list[Output]:
        outputs = runner.step()
        rids = [o.rid for o in outputs]
        assert len(rids) == len(set(rids)), f"more than one output for a request in one step: {rids}"
        for out in outputs:
            assert out.rid not in self.done, f"output for request {out.rid} after its final output"
            assert out.text is None or (isinstance(out.text, str) and out.text), out
            self.by_rid[out.rid].append(out)
            if out.final:
                self.done.add(out.rid)
        self.steps.append(outputs)
        return outputs

    def drain(self, runner: TorchRunner, limit: int = 2000) -> None:
        for _ in range(limit):
            if runner.next_step_in() is None:
                return
            self.step(runner)
        raise AssertionError("the runner never went idle")

    def text(self, rid: int) -> str:
        return "".join(o.text or "" for o in self.by_rid[rid])

    def final(self, rid: int) -> Output:
        outs = self.by_rid[rid]
        assert outs and outs[-1].final, f"request {rid} did not finish: {outs[-3:]}"
        return outs[-1]


def run_alone(runner: TorchRunner, prompt: str, params: dict | None = None, rid: int = 1) -> tuple[str, Trace]:
    trace = Trace()
    runner.admit(RunRequest(rid, prompt, dict(params or {})))
    trace.drain(runner)
    final = trace.final(rid)
    assert final.error is None, final
    return trace.text(rid), trace


# --- determinism and batch invariance ---------------------------------------------------------------

def test_greedy_deterministic_across_runner_instances(weights):
    texts = []
    for _ in range(2):
        runner = make_runner({"weights": weights})
        texts.append([run_alone(runner, p, {"max_tokens": 24})[0] for p in PROMPTS[:3]])
    assert texts[0] == texts[1]
    assert all(len(t) > 0 for t in texts[0])
    assert len(set(texts[0])) > 1          # the output depends on the prompt


def test_builtin_tiny_seed_determines_output():
    def text(seed: int) -> str:
        runner = make_runner({"seed": seed, "max_batch_size": 2})
        assert runner.model.max_seq_len == 256      # the built-in default model
        return run_alone(runner, "Hello", {"max_tokens": 16})[0]

    first = text(7)
    assert first == text(7)
    assert first != text(8)


def test_factory_and_weights_file_with_same_seed_agree(weights64):
    from_file = make_runner({"weights": weights64})
    from_factory = make_runner({"model": FACTORY, "seed": 5})
    assert isinstance(from_factory.model, TinyLM) and from_factory.model.cfg == small_config()
    for prompt in PROMPTS[:4]:
        assert run_alone(from_file, prompt, {"max_tokens": 20})[0] == run_alone(from_factory, prompt,
                                                                                {"max_tokens": 20})[0]


def _params(i: int) -> dict:
    params = {"max_tokens": 12 + 5 * i}
    if i in (2, 5):       # two sampled requests: a seeded request is reproducible in any batch
        params.update(temperature=0.9, seed=100 + i)
    return params


@pytest.mark.parametrize("thread_count", [1, 2])
def test_batched_equals_unbatched_with_staggered_joins_and_cancels(weights, thread_count):
    with threads(thread_count):
        _batched_equals_unbatched(weights)


def _batched_equals_unbatched(weights):
    runner = make_runner({"weights": weights, "max_batch_size": 4}, capacity=4)
    solo = {}
    for i, prompt in enumerate(PROMPTS):
        text, trace = run_alone(runner, prompt, _params(i), rid=i)
        solo[i] = (text, trace.final(i).finish_reason, len(trace.by_rid[i]))
    long_prompt_tokens = len(PROMPTS[7].encode()) + 1
    assert long_prompt_tokens > 80
    assert solo[7][1:] == ("length", 128 - long_prompt_tokens + 1)   # the long one is clipped to the context

    # All together: one joins every third step while a slot is free, with two extra requests that
    # are cancelled mid-way, so slots are reused by requests of other lengths.
    victims = {100: "a victim that gets cancelled", 101: "another victim ✓"}
    queue = [(100, victims[100], {"max_tokens": 100})] + [(i, p, _params(i)) for i, p in enumerate(PROMPTS)]
    queue.insert(4, (101, victims[101], {"max_tokens": 100}))
    trace = Trace()
    live: set[int] = set()
    cancel_at = {100: 9, 101: 20}   # steps at which the victims are cancelled
    cancelled: set[int] = set()
    step = 0
    while queue or live:
        if step % 3 == 0 and queue and len(live) < runner.capacity:
            rid, prompt, params = queue.pop(0)
            runner.admit(RunRequest(rid, prompt, params))
            live.add(rid)
        for rid, when in cancel_at.items():
            if step == when and rid in live:
                runner.cancel(rid)
                live.discard(rid)
                cancelled.add(rid)
        if runner.next_step_in() is not None:
            outputs = trace.step(runner)
            assert {o.rid for o in outputs} <= live
            live -= {o.rid for o in outputs if o.final}
        step += 1
        assert step < 2000
    assert cancelled == {100, 101}
    assert all(not trace.by_rid[rid][-1].final for rid in cancelled)   # no output after the cancel
    assert max(len(outs) for outs in trace.steps) == runner.capacity     # the batch was full at times
    for i in range(len(PROMPTS)):
        final = trace.final(i)
        assert (trace.text(i), final.finish_reason, len(trace.by_rid[i])) == solo[i], f"prompt {i} differs"


def test_batch_invariance_holds_at_a_near_tie():
    """docs/architecture.md: greedy output is the same alone or batched, "by construction, not by
    tolerance". Alone, a request gets slot 0; behind five others, slot 5 of 8. With two torch
    threads the CPU attention kernel rounds the second half of the slots differently (see
    test_tiny_model.test_every_slot_gives_the_same_result), so where two tokens nearly tie the
    greedy choice, and the rest of the text, depends on the slot. FAILS on this project's machines."""
    options = {"model": "tests.unit.tiny_factory:build_near_tie", "max_batch_size": 8}
    with threads(2):
        alone = run_alone(make_runner(options, capacity=8), tiny_factory.NEAR_TIE_PROMPT, {"max_tokens": 30})[0]
        runner = make_runner(options, capacity=8)
        trace = Trace()
        for rid in range(10, 15):
            runner.admit(RunRequest(rid, f"filler {rid}", {"max_tokens": 40}))
        runner.admit(RunRequest(1, tiny_factory.NEAR_TIE_PROMPT, {"max_tokens": 30}))
        trace.drain(runner)
    assert len(trace.by_rid[1]) == 30
    assert trace.text(1) == alone, "the same greedy request gave another text in slot 5 than alone in slot 0"


def test_every_live_request_gets_one_output_per_step(weights):
    runner = make_runner({"weights": weights, "max_batch_size": 3}, capacity=3)
    solo = {i: run_alone(runner, PROMPTS[i], {"max_tokens": 10 + 4 * i}, rid=i)[0] for i in range(3)}
    trace = Trace()
    for i in range(3):
        runner.admit(RunRequest(i, PROMPTS[i], {"max_tokens": 10 + 4 * i}))
    live = {0, 1, 2}
    while live:
        outputs = trace.step(runner)
        assert sorted(o.rid for o in outputs) == sorted(live)     # exactly one each
        live -= {o.rid for o in outputs if o.final}
    assert runner.next_step_in() is None
    for i in range(3):
        assert len(trace.by_rid[i]) == 10 + 4 * i
        assert trace.text(i) == solo[i]
        assert all(o.finish_reason is None for o in trace.by_rid[i][:-1])


# --- finishing ---------------------------------------------------------------------------------------

def test_finish_length_counts_tokens(weights):
    runner = make_runner({"weights": weights})
    for max_tokens in (1, 2, 7, 30):
        text, trace = run_alone(runner, "Hello", {"max_tokens": max_tokens})
        outs = trace.by_rid[1]
        assert len(outs) == max_tokens
        assert outs[-1].finish_reason == "length"
        assert len(text.encode("utf-8")) <= max_tokens      # one byte per token at most
    assert run_alone(runner, "Hello", {"max_tokens": 7})[0] == run_alone(runner, "Hello", {"max_tokens": 30})[0][:7]


def test_default_max_tokens(weights):
    text, trace = run_alone(make_runner({"weights": weights}), "Hi")
    assert len(trace.by_rid[1]) == 128 - 3 + 1     # the default (128) clipped to the context


def test_stop_string_truncates_output(weights):
    runner = make_runner({"weights": weights})
    full, _ = run_alone(runner, "Hello", {"max_tokens": 40})
    assert len(full) == 40 and full.isascii()
    stop = full[15:18]
    cut = full.find(stop)
    text, trace = run_alone(runner, "Hello", {"max_tokens": 40, "stop": stop})
    assert text == full[:cut]
    assert stop not in text
    assert trace.final(1).finish_reason == "stop"
    # The request ran until the token that completed the stop string, and no further.
    assert len(trace.by_rid[1]) == cut + len(stop)


def test_stop_strings_earliest_wins_and_absent_stop_changes_nothing(weights):
    runner = make_runner({"weights": weights})
    full, _ = run_alone(runner, "Hello", {"max_tokens": 40})
    late, early = full[25:28], full[10:12]
    text, trace = run_alone(runner, "Hello", {"max_tokens": 40, "stop": [late, early, "\x00never"]})
    assert text == full[:min(full.find(late), full.find(early))]
    assert trace.final(1).finish_reason == "stop"
    unstopped, trace = run_alone(runner, "Hello", {"max_tokens": 40, "stop": ["\x00never", "☃"]})
    assert unstopped == full and trace.final(1).finish_reason == "length"


def test_stop_string_at_the_very_start(weights):
    runner = make_runner({"weights": weights})
    full, _ = run_alone(runner, "Hello", {"max_tokens": 10})
    text, trace = run_alone(runner, "Hello", {"max_tokens": 10, "stop": full[0]})
    assert text == ""
    assert len(trace.by_rid[1]) == 1
    assert trace.by_rid[1][0] == Output(1, None, "stop", usage={"prompt_tokens": 6, "completion_tokens": 1})


# --- slots and credits -------------------------------------------------------------------------------

def test_cancel_frees_the_slot(weights):
    runner = make_runner({"weights": weights, "max_batch_size": 2}, capacity=2)
    trace = Trace()
    runner.admit(RunRequest(1, "first", {"max_tokens": 50}))
    runner.admit(RunRequest(2, "second", {"max_tokens": 50}))
    assert {o.rid for o in trace.step(runner)} == {1, 2}
    runner.admit(RunRequest(3, "third", {"max_tokens": 5}))
    assert {o.rid for o in trace.step(runner)} == {1, 2}           # no slot for the third
    assert runner.load_report()["waiting"] == 1 and runner.load_report()["batch"] == 2
    runner.cancel(1)
    assert {o.rid for o in trace.step(runner)} == {2, 3}           # it took the freed slot at once
    assert runner.load_report()["waiting"] == 0
    trace.drain(runner)
    assert len(trace.by_rid[1]) == 2
    assert trace.final(3).finish_reason == "length"
    assert trace.text(3) == run_alone(make_runner({"weights": weights}), "third", {"max_tokens": 5})[0]


def test_cancel_pending_and_unknown_requests(weights):
    runner = make_runner({"weights": weights, "max_batch_size": 1}, capacity=1)
    trace = Trace()
    runner.admit(RunRequest(1, "running", {"max_tokens": 4}))
    runner.admit(RunRequest(2, "pending", {"max_tokens": 4}))
    trace.step(runner)
    runner.cancel(2)          # never got a slot
    runner.cancel(99)         # unknown: ignored
    runner.cancel(2)          # twice: ignored
    trace.drain(runner)
    assert 2 not in trace.by_rid
    assert len(trace.by_rid[1]) == 4
    assert runner.next_step_in() is None


def test_finished_request_frees_its_slot_for_the_next(weights):
    runner = make_runner({"weights": weights, "max_batch_size": 1}, capacity=1)
    trace = Trace()
    runner.admit(RunRequest(1, "one", {"max_tokens": 3}))
    runner.admit(RunRequest(2, "two", {"max_tokens": 3}))
    rids = [[o.rid for o in trace.step(runner)] for _ in range(6)]
    assert rids == [[1], [1], [1], [2], [2], [2]]
    assert runner.next_step_in() is None


@pytest.mark.parametrize("capacity, max_batch_size, expected", [(8, 3, 3), (2, 8, 2), (5, None, 5), (1, 1, 1)])
def test_capacity_is_the_smaller_of_credits_and_batch_size(weights, capacity, max_batch_size, expected):
    options = {"weights": weights} if max_batch_size is None else {"weights": weights,
                                                                   "max_batch_size": max_batch_size}
    runner = make_runner(options, capacity=capacity)
    assert runner.capacity == expected
    assert runner.cache.k.shape[1] == expected               # one cache slot per credit
    assert runner.load_report()["slots"] == expected


def test_batch_delay(weights):
    runner = make_runner({"weights": weights, "max_batch_size": 2, "max_batch_delay_ms": 5000}, capacity=2)
    assert runner.next_step_in() is None                     # idle
    runner.admit(RunRequest(1, "a", {"max_tokens": 3}))
    wait = runner.next_step_in()
    assert 4.0 < wait <= 5.0                                 # waits for the batch to fill
    runner.admit(RunRequest(2, "b", {"max_tokens": 3}))
    assert runner.next_step_in() == 0.0                      # full: no waiting
    trace = Trace()
    trace.step(runner)
    runner.cancel(2)
    assert runner.next_step_in() == 0.0                      # generating: never waits
    trace.drain(runner)
    assert runner.next_step_in() is None


def test_no_delay_by_default_is_short(weights):
    runner = TorchRunner({"weights": weights}, (CPU0,), 4)
    runner.load()
    runner.admit(RunRequest(1, "a", {"max_tokens": 3}))
    assert 0.0 <= runner.next_step_in() <= 0.002


def test_prefill_budget_spreads_joiners_over_steps(weights):
    # Prompts of 11 tokens (10 bytes and the start token), a budget of 25: two join per step.
    runner = make_runner({"weights": weights, "max_batch_size": 5, "max_prefill_tokens": 25}, capacity=5)
    for rid in range(5):
        runner.admit(RunRequest(rid, f"prompt {rid:03d}", {"max_tokens": 4}))
    trace = Trace()
    firsts = [sorted(o.rid for o in trace.step(runner) if len(trace.by_rid[o.rid]) == 1) for _ in range(3)]
    assert firsts == [[0, 1], [2, 3], [4]]
    # Each step still gives one token to every request already generating.
    assert [len(step) for step in trace.steps] == [2, 4, 5]
    trace.drain(runner)
    assert all(trace.final(rid).finish_reason == "length" for rid in range(5))


def test_a_prompt_over_the_prefill_budget_still_joins_alone(weights):
    runner = make_runner({"weights": weights, "max_batch_size": 2, "max_prefill_tokens": 1}, capacity=2)
    runner.admit(RunRequest(1, "a longer prompt", {"max_tokens": 2}))
    runner.admit(RunRequest(2, "another one", {"max_tokens": 2}))
    trace = Trace()
    assert [o.rid for o in trace.step(runner)] == [1]
    assert sorted(o.rid for o in trace.step(runner)) == [1, 2]


def test_busy_runner_does_not_wait_for_a_new_request(weights):
    runner = make_runner({"weights": weights, "max_batch_size": 3, "max_batch_delay_ms": 5000}, capacity=3)
    for rid in (1, 2, 3):
        runner.admit(RunRequest(rid, "x", {"max_tokens": 20}))
    Trace().step(runner)
    runner.cancel(3)
    runner.admit(RunRequest(4, "y", {"max_tokens": 20}))
    assert runner.next_step_in() == 0.0


# --- sampling ----------------------------------------------------------------------------------------

def test_temperature_sampling_is_reproducible_by_seed(weights):
    runner = make_runner({"weights": weights})
    other = make_runner({"weights": weights})

    def sample(r, seed):
        return run_alone(r, "Hello", {"max_tokens": 30, "temperature": 1.0, "seed": seed})[0]

    assert sample(runner, 1) == sample(runner, 1) == sample(other, 1)
    texts = {sample(runner, seed) for seed in (1, 2, 3, 4)}
    assert len(texts) >= 2
    greedy = run_alone(runner, "Hello", {"max_tokens": 30})[0]
    assert any(t != greedy for t in texts)


def test_unseeded_sampling_varies(weights):
    runner = make_runner({"weights": weights})
    texts = {run_alone(runner, "Hello", {"max_tokens": 30, "temperature": 1.5})[0] for _ in range(4)}
    assert len(texts) >= 2


def test_tiny_top_p_is_greedy(weights):
    runner = make_runner({"weights": weights})
    greedy = run_alone(runner, "Hello", {"max_tokens": 30})[0]
    for seed in (1, 2):
        nucleus = run_alone(runner, "Hello", {"max_tokens": 30, "temperature": 1.5, "top_p": 1e-6, "seed": seed})[0]
        assert nucleus == greedy


def test_temperature_zero_is_greedy_even_with_seed(weights):
    runner = make_runner({"weights": weights})
    greedy = run_alone(runner, "Hello", {"max_tokens": 20})[0]
    assert run_alone(runner, "Hello", {"max_tokens": 20, "temperature": 0, "seed": 3, "top_p": 0.5})[0] == greedy


# --- the context -------------------------------------------------------------------------------------

def test_prompt_longer_than_the_context_is_rejected_alone(weights64):
    runner = make_runner({"weights": weights64})
    trace = Trace()
    with pytest.raises(RequestRejected) as err:
        runner.admit(RunRequest(1, "x" * 64, {"max_tokens": 5}))   # 65 tokens with the start token
    assert err.value.code is ErrorCode.BAD_REQUEST
    assert "65" in str(err.value) and "64" in str(err.value)
    runner.admit(RunRequest(2, "fine", {"max_tokens": 5}))
    trace.drain(runner)
    assert set(trace.by_rid) == {2}
    assert trace.final(2).finish_reason == "length" and len(trace.by_rid[2]) == 5


def test_rejected_request_takes_no_slot_and_no_wait(weights64):
    runner = make_runner({"weights": weights64, "max_batch_delay_ms": 5000})
    with pytest.raises(RequestRejected):
        runner.admit(RunRequest(1, "é" * 40, {}))                  # 81 tokens
    assert runner.next_step_in() is None
    assert runner.load_report()["batch"] == 0 and runner.load_report()["waiting"] == 0


def test_prompt_filling_the_context_exactly_gets_one_token(weights64):
    runner = make_runner({"weights": weights64})
    text, trace = run_alone(runner, "x" * 63, {"max_tokens": 50})  # 64 tokens
    assert len(trace.by_rid[1]) == 1 and trace.final(1).finish_reason == "length"


@pytest.mark.parametrize("prompt_bytes", [1, 30, 50, 62])
def test_max_tokens_clipped_to_the_context(weights64, prompt_bytes):
    runner = make_runner({"weights": weights64})
    text, trace = run_alone(runner, "y" * prompt_bytes, {"max_tokens": 1000})
    assert len(trace.by_rid[1]) == 64 - (prompt_bytes + 1) + 1
    assert trace.final(1).finish_reason == "length"


# --- dtypes ------------------------------------------------------------------------------------------

def test_bfloat16_generates_on_cpu(weights):
    runner = make_runner({"weights": weights, "dtype": "bfloat16"})
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    assert runner.cache.k.dtype == torch.bfloat16
    assert runner.load_report()["dtype"] == "bfloat16"
    texts = [run_alone(runner, "Hello", {"max_tokens": 20}) for _ in range(2)]
    assert texts[0][0] == texts[1][0] and len(texts[0][0]) > 0
    assert len(texts[0][1].by_rid[1]) == 20


# --- faults ------------------------------------------------------------------------------------------

def test_injected_oom_is_classified_and_the_runner_recovers(weights):
    reference = run_alone(make_runner({"weights": weights}), "after the storm", {"max_tokens": 20})[0]
    runner = make_runner({"weights": weights, "fault_injection": True})
    trace = Trace()
    runner.admit(RunRequest(1, "healthy", {"max_tokens": 30}))
    trace.step(runner)
    trace.step(runner)
    runner.admit(RunRequest(2, "faulty", {"max_tokens": 30, "fault": "oom"}))
    with pytest.raises(Exception) as info:
        runner.step()
    assert classify(info.value) is Failure.OUT_OF_MEMORY, repr(info.value)
    # What the engine does on Resume: cancel the step's requests, free memory, carry on.
    for rid in (1, 2):
        runner.cancel(rid)
    runner.release_memory()
    assert runner.load_report()["batch"] == 0 and runner.next_step_in() is None
    text, _ = run_alone(runner, "after the storm", {"max_tokens": 20}, rid=3)
    assert text == reference


@pytest.mark.parametrize("fault, kind, exc_type", [("poison", Failure.CONTEXT_POISONED, ContextPoisonedError),
                                                   ("error", Failure.UNKNOWN, RuntimeError)])
def test_other_injected_faults(weights, fault, kind, exc_type):
    runner = make_runner({"weights": weights, "fault_injection": True})
    runner.admit(RunRequest(1, "x", {"fault": fault}))
    with pytest.raises(exc_type) as info:
        runner.step()
    assert classify(info.value) is kind


def test_fault_param_ignored_without_fault_injection(weights):
    runner = make_runner({"weights": weights})
    text, trace = run_alone(runner, "x", {"max_tokens": 5, "fault": "oom"})
    assert len(trace.by_rid[1]) == 5
    # fault_injection must be exactly True, not merely truthy.
    runner = make_runner({"weights": weights, "fault_injection": "yes"})
    text, trace = run_alone(runner, "x", {"max_tokens": 5, "fault": "oom"})
    assert len(trace.by_rid[1]) == 5


# --- loading -----------------------------------------------------------------------------------------

def test_factory_model_loads_and_serves():
    runner = make_runner({"model": FACTORY, "seed": 3})
    assert runner.model.cfg == small_config()
    text, trace = run_alone(runner, "Hello", {"max_tokens": 10})
    assert len(trace.by_rid[1]) == 10 and text
    assert text == run_alone(make_runner({"model": FACTORY, "seed": 3}), "Hello", {"max_tokens": 10})[0]
    assert text != run_alone(make_runner({"model": FACTORY, "seed": 4}), "Hello", {"max_tokens": 10})[0]


@pytest.mark.parametrize("model, words", [
    ("tests.unit.no_such_module:build", ["cannot import", "no_such_module"]),
    ("no_such_package.sub:build", ["cannot import"]),
    ("tests.unit.tiny_factory:no_such_function", ["cannot import", "no_such_function"]),
    ("tests.unit.tiny_factory:NOT_CALLABLE", ["not callable"]),
    ("tests.unit.tiny_factory:build_not_a_model", ["tokenizer", "max_seq_len", "new_cache", "prefill", "decode"]),
])
def test_bad_factory_is_unrecoverable(model, words):
    runner = TorchRunner({"model": model}, (CPU0,), 2)
    with pytest.raises(UnrecoverableError) as info:
        runner.load()
    message = str(info.value)
    assert model in message
    for word in words:
        assert word in message, message
    assert classify(info.value) is Failure.UNRECOVERABLE


def test_missing_weights_file_is_unrecoverable(tmp_path):
    path = str(tmp_path / "absent.safetensors")
    with pytest.raises(UnrecoverableError, match="no such file") as info:
        TorchRunner({"weights": path}, (CPU0,), 2).load()
    assert path in str(info.value)


def test_rebuild_reloads_and_serves_the_same(weights):
    runner = make_runner({"weights": weights})
    before = run_alone(runner, "Hello", {"max_tokens": 15})[0]
    old_model = runner.model
    runner.rebuild()
    assert runner.model is not old_model
    assert run_alone(runner, "Hello", {"max_tokens": 15})[0] == before


def test_load_report_counts(weights):
    runner = make_runner({"weights": weights})
    run_alone(runner, "Hello", {"max_tokens": 6})
    report = runner.load_report()
    assert report["tokens"] == 6 and report["steps"] == 6
    assert report["device"] == "cpu" and report["batch"] == 0 and report["waiting"] == 0


def test_gpu_placement_without_cuda_falls_back_to_cpu(weights):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    gpu = Device("gpu:0", "cuda", "Fake GPU", uuid="GPU-0")
    runner = TorchRunner({"weights": weights}, (gpu,), 2)
    runner.load()
    assert runner.device.type == "cpu"
    assert tiny_factory.greedy(runner.model, "hi", 3)

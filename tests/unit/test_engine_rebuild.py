"""Unit tests for inferd.worker.engine.Engine driving a real TorchRunner (small model, CPU) in its
thread: loading/warming/ready, rebuild with running and deferred requests, out of memory.

The runner is wrapped to log, from the engine thread, what it was asked to do and in which engine
state, so the order of events is checked exactly; waits are loops with deadlines.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest

pytest.importorskip("torch")

from inferd.devices import Device  # noqa: E402
from inferd.errors import ErrorCode  # noqa: E402
from inferd.runtimes.base import Output, RunRequest  # noqa: E402
from inferd.runtimes.torch_runtime import TorchRunner  # noqa: E402
from inferd.worker.engine import Engine  # noqa: E402
from tests.unit.tiny_factory import threads, write_with_tool  # noqa: E402

CPU0 = Device("cpu:0", "cpu", "CPU")
TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return write_with_tool(str(tmp_path_factory.mktemp("weights") / "w.pt"), seed=8)


class ProbeRunner(TorchRunner):
    """A TorchRunner that logs its calls (from the engine thread) and can hold each step until
    the test releases it."""

    def __init__(self, options: dict, capacity: int = 4, gated: bool = False):
        super().__init__({"max_batch_delay_ms": 0, **options}, (CPU0,), capacity)
        self.engine: Engine | None = None
        self.events: list[tuple] = []
        self.gate = threading.Semaphore(0) if gated else None

    def _state(self) -> str | None:
        return self.engine.state if self.engine is not None else None

    def load(self) -> None:
        self.events.append(("load", self._state()))
        super().load()

    def warmup(self) -> None:
        self.events.append(("warmup", self._state()))
        super().warmup()

    def rebuild(self) -> None:
        self.events.append(("rebuild", self._state()))
        super().rebuild()
        self.events.append(("rebuilt", self._state()))

    def admit(self, request: RunRequest) -> None:
        self.events.append(("admit", request.rid))
        super().admit(request)

    def step(self) -> list[Output]:
        if self.gate is not None and not self.gate.acquire(timeout=TIMEOUT):
            raise AssertionError("the test never released this step")
        outputs = super().step()
        self.events.extend(("out", o.rid, o.final) for o in outputs)
        return outputs

    def open_gate(self) -> None:
        if self.gate is not None:
            self.gate.release(100_000)

    def index(self, event: tuple) -> int:
        return self.events.index(event)

    def first(self, kind: str, rid: int) -> int:
        return next(i for i, e in enumerate(self.events) if e[0] == kind and e[1] == rid)


class Harness:
    def __init__(self, runner: ProbeRunner):
        self.runner = runner
        self.woken = threading.Event()
        self.wake_states: list[str] = []      # the engine's state at each wake-up
        self.engine = Engine(runner, self._wake)
        runner.engine = self.engine
        self.outputs: dict[int, list[Output]] = collections.defaultdict(list)

    def _wake(self) -> None:
        self.wake_states.append(self.engine.state)
        self.woken.set()

    def collect(self) -> None:
        while self.engine.outputs:
            for out in self.engine.outputs.popleft():
                self.outputs[out.rid].append(out)

    def wait_for(self, predicate, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.collect()
            if predicate():
                return
            if not self.engine.is_alive() and not self.engine.outputs:
                raise AssertionError(f"the engine stopped ({self.engine.failure}: "
                                     f"{self.engine.failure_message}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; state {self.engine.state}, "
                                     f"events {self.runner.events[-8:]}")
            self.woken.wait(0.05)
            self.woken.clear()

    def finished(self, *rids: int) -> bool:
        return all(self.outputs[rid] and self.outputs[rid][-1].final for rid in rids)

    def wait_finished(self, *rids: int) -> None:
        self.wait_for(lambda: self.finished(*rids), f"requests {rids} to finish")

    def text(self, rid: int) -> str:
        return "".join(o.text or "" for o in self.outputs[rid])

    def states(self) -> list[str]:
        """The wake-up states, consecutive repeats merged."""
        return [s for i, s in enumerate(self.wake_states) if i == 0 or self.wake_states[i - 1] != s]

    def stop(self) -> None:
        self.runner.open_gate()
        if self.engine.is_alive():
            self.engine.stop()
            self.engine.join(timeout=TIMEOUT)
        assert not self.engine.is_alive()


@pytest.fixture
def harnesses():
    made: list[Harness] = []

    def make(runner: ProbeRunner) -> Harness:
        harness = Harness(runner)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.stop()


def reference(weights: str, prompt: str, params: dict) -> tuple[str, int, str]:
    """(text, outputs, finish reason) of a request alone on a fresh runner, without an engine."""
    runner = TorchRunner({"weights": weights, "max_batch_delay_ms": 0}, (CPU0,), 4)
    runner.load()
    runner.admit(RunRequest(1, prompt, dict(params)))
    outputs: list[Output] = []
    while runner.next_step_in() is not None:
        outputs += runner.step()
    assert outputs[-1].final and outputs[-1].error is None
    return "".join(o.text or "" for o in outputs), len(outputs), outputs[-1].finish_reason


def result(harness: Harness, rid: int) -> tuple[str, int, str]:
    outs = harness.outputs[rid]
    assert outs[-1].error is None, outs[-1]
    assert all(not o.final for o in outs[:-1])
    return harness.text(rid), len(outs), outs[-1].finish_reason


# --- loading ---------------------------------------------------------------------------------------

def test_states_loading_warming_ready_then_serves(weights, harnesses):
    runner = ProbeRunner({"weights": weights})
    h = harnesses(runner)
    assert h.engine.state == "loading"
    h.engine.start()
    h.wait_for(lambda: h.engine.state == "ready", "ready")
    assert runner.events[:2] == [("load", "loading"), ("warmup", "warming")]
    assert h.states() == ["warming", "ready"]
    assert h.engine.report["slots"] == 4 and h.engine.report["batch"] == 0
    assert h.engine.failure is None
    h.engine.admit(RunRequest(1, "Hello", {"max_tokens": 12}))
    h.wait_finished(1)
    assert result(h, 1) == reference(weights, "Hello", {"max_tokens": 12})
    assert h.engine.report["tokens"] == 12


def test_load_failure_stops_the_engine_unrecoverable(tmp_path, harnesses):
    from inferd.failures import Failure

    runner = ProbeRunner({"weights": str(tmp_path / "absent.pt")})
    h = harnesses(runner)
    h.engine.admit(RunRequest(1, "queued before the failure", {}))
    h.engine.start()
    h.engine.join(timeout=TIMEOUT)
    assert not h.engine.is_alive()
    assert h.engine.failure is Failure.UNRECOVERABLE
    assert h.engine.state == "failed"
    assert "no such file" in h.engine.failure_message


def test_cancel_through_the_engine(weights, harnesses):
    runner = ProbeRunner({"weights": weights}, gated=True)
    h = harnesses(runner)
    h.engine.admit(RunRequest(1, "cancel me", {"max_tokens": 50}))
    h.engine.start()
    runner.gate.release(1)
    h.wait_for(lambda: len(h.outputs[1]) == 1, "the first output")
    h.engine.cancel(1)
    h.engine.cancel(77)                      # unknown: no output
    runner.open_gate()
    h.wait_finished(1)
    final = h.outputs[1][-1]
    assert final.error is ErrorCode.CANCELLED
    assert len(h.outputs[1]) <= 3            # at most the step that was already under way
    # The freed slot shows in the engine's report at once, though no step follows the cancel.
    h.wait_for(lambda: h.engine.report.get("batch") == 0, "the report of a freed slot", timeout=10)
    h.engine.admit(RunRequest(2, "next", {"max_tokens": 5}))
    h.wait_finished(2)
    assert result(h, 2) == reference(weights, "next", {"max_tokens": 5})
    assert 77 not in h.outputs


# --- rebuild -----------------------------------------------------------------------------------------

def test_rebuild_while_a_request_is_running(weights, harnesses):
    a_params, b_params = {"max_tokens": 30}, {"max_tokens": 20}
    runner = ProbeRunner({"weights": weights}, gated=True)
    h = harnesses(runner)
    h.engine.admit(RunRequest(1, "running during the rebuild", a_params))
    h.engine.start()
    h.wait_for(lambda: h.engine.state == "ready", "ready")
    runner.gate.release(1)
    h.wait_for(lambda: len(h.outputs[1]) == 1, "the running request's first token")
    # The engine is now held in its second step, with request 1 mid-way.
    h.engine.rebuild()
    h.engine.admit(RunRequest(2, "admitted after rebuild()", b_params))
    runner.open_gate()
    h.wait_finished(1, 2)
    h.wait_for(lambda: h.engine.state == "ready" and h.engine.rebuilds == 1, "ready after the rebuild")

    assert result(h, 1) == reference(weights, "running during the rebuild", a_params)   # finished normally
    assert result(h, 2) == reference(weights, "admitted after rebuild()", b_params)
    assert h.engine.rebuilds == 1 and h.engine.failure is None
    # Order: request 1 ran to its end, then the rebuild, only then was 2 admitted and served.
    last_of_1 = runner.index(("out", 1, True))
    rebuild = runner.index(("rebuild", "rebuilding"))
    assert last_of_1 < rebuild < runner.index(("rebuilt", "rebuilding")) < runner.first("admit", 2) \
        < runner.first("out", 2)
    assert runner.events[rebuild + 1:rebuild + 3] == [("load", "rebuilding"), ("warmup", "rebuilding")]
    assert h.states()[-2:] == ["rebuilding", "ready"]
    assert "rebuilding" in h.states() and h.states().index("rebuilding") > h.states().index("ready")


def test_rebuild_requested_before_requests_run(weights, harnesses):
    # Everything queued before the engine starts, so it is applied in one batch: 1 is admitted,
    # the rebuild requested, 2 and 3 held; 3 is cancelled while held.
    runner = ProbeRunner({"weights": weights})
    h = harnesses(runner)
    h.engine.admit(RunRequest(1, "first", {"max_tokens": 15}))
    h.engine.rebuild()
    h.engine.admit(RunRequest(2, "second", {"max_tokens": 15}))
    h.engine.admit(RunRequest(3, "third, cancelled while held", {"max_tokens": 15}))
    h.engine.cancel(3)
    h.engine.rebuild()                        # a second request while one is pending: one rebuild
    h.engine.start()
    h.wait_finished(1, 2, 3)
    h.wait_for(lambda: h.engine.state == "ready" and h.engine.rebuilds == 1, "ready after the rebuild")
    assert result(h, 1) == reference(weights, "first", {"max_tokens": 15})
    assert result(h, 2) == reference(weights, "second", {"max_tokens": 15})
    assert [o.error for o in h.outputs[3]] == [ErrorCode.CANCELLED]
    assert ("admit", 3) not in runner.events
    assert runner.index(("out", 1, True)) < runner.index(("rebuild", "rebuilding")) < runner.first("admit", 2)
    assert [e for e in runner.events if e[0] == "rebuild"] == [("rebuild", "rebuilding")]


def test_rebuild_when_idle_happens_at_once(weights, harnesses):
    runner = ProbeRunner({"weights": weights})
    h = harnesses(runner)
    h.engine.start()
    h.wait_for(lambda: h.engine.state == "ready", "ready")
    old_model = runner.model
    h.engine.rebuild()
    h.wait_for(lambda: h.engine.rebuilds == 1 and h.engine.state == "ready", "the rebuild")
    assert runner.model is not old_model
    h.engine.admit(RunRequest(5, "after", {"max_tokens": 8}))
    h.wait_finished(5)
    assert result(h, 5) == reference(weights, "after", {"max_tokens": 8})


# --- out of memory -----------------------------------------------------------------------------------

def test_oom_fails_the_step_and_the_engine_keeps_serving(weights, harnesses):
    runner = ProbeRunner({"weights": weights, "fault_injection": True, "max_batch_size": 2}, capacity=2)
    h = harnesses(runner)
    h.engine.admit(RunRequest(1, "faulty", {"max_tokens": 10, "fault": "oom"}))
    h.engine.admit(RunRequest(2, "bystander in the same step", {"max_tokens": 10}))
    h.engine.start()
    h.wait_finished(1, 2)
    for rid in (1, 2):
        assert len(h.outputs[rid]) == 1
        out = h.outputs[rid][0]
        assert out.error is ErrorCode.OUT_OF_MEMORY, out
        assert "allocate" in out.message
    assert h.engine.resumes == 1
    assert h.engine.failure is None and h.engine.state == "ready" and h.engine.is_alive()
    # It keeps serving, with the same results as before the fault.
    h.engine.admit(RunRequest(3, "after the fault", {"max_tokens": 10}))
    h.engine.admit(RunRequest(4, "bystander in the same step", {"max_tokens": 10}))
    h.wait_finished(3, 4)
    assert result(h, 3) == reference(weights, "after the fault", {"max_tokens": 10})
    assert result(h, 4) == reference(weights, "bystander in the same step", {"max_tokens": 10})
    assert h.engine.resumes == 1


def test_oom_spares_requests_waiting_for_a_rebuild(weights, harnesses):
    runner = ProbeRunner({"weights": weights, "fault_injection": True, "max_batch_size": 2}, capacity=2)
    h = harnesses(runner)
    h.engine.admit(RunRequest(1, "faulty", {"max_tokens": 10, "fault": "oom"}))
    h.engine.admit(RunRequest(2, "in the failing step", {"max_tokens": 10}))
    h.engine.rebuild()
    h.engine.admit(RunRequest(3, "held for the rebuild", {"max_tokens": 10}))
    h.engine.start()
    h.wait_finished(1, 2, 3)
    h.wait_for(lambda: h.engine.state == "ready" and h.engine.rebuilds == 1, "ready after the rebuild")
    assert [o.error for o in h.outputs[1]] == [ErrorCode.OUT_OF_MEMORY]
    assert [o.error for o in h.outputs[2]] == [ErrorCode.OUT_OF_MEMORY]
    assert result(h, 3) == reference(weights, "held for the rebuild", {"max_tokens": 10})
    assert h.engine.resumes == 1 and h.engine.failure is None
    assert runner.index(("rebuild", "rebuilding")) < runner.first("admit", 3)

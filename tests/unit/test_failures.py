"""Unit tests for inferd.failures: classify(), from_exit_status(), describe_exit(), EXIT_STATUS.

classify() is checked against real torch exception types and the real messages
CUDA errors carry (torch >= 2.8 raises ``torch.AcceleratorError``; older versions a
plain RuntimeError starting "CUDA error:"), and against real exceptions raised by
torch on the CPU.
"""

from __future__ import annotations

import random
import signal

import pytest

from inferd import exitcodes
from inferd.failures import (
    EXIT_STATUS,
    STICKY_CUDA_MARKERS,
    ContextPoisonedError,
    Failure,
    OutOfMemoryError,
    UnrecoverableError,
    classify,
    describe_exit,
    from_exit_status,
)

torch = pytest.importorskip("torch")

CUDA_OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
    "1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the "
    "allocated memory 76.50 GiB is allocated by PyTorch, and 1.10 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
    "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)

# The tail torch (c10_cuda_check_implementation) appends to every CUDA error message, sticky or not.
ASYNC_TAIL = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
    "below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)
# The shorter tail of older versions (before the device-side assertion line was added).
OLD_TAIL = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call,so the stacktrace "
    "below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1."
)

STICKY_HEADS = [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered",
    "CUDA error: unspecified launch failure",
    "CUDA error: misaligned address",
    "CUDA error: an illegal instruction was encountered",
    "CUDA error: uncorrectable ECC error encountered",
    "CUDA error: invalid program counter",
    "CUDA error: hardware stack error",
    "CUDA error: operation not permitted when stream is capturing",
]
# The messages older torch versions raise as a plain RuntimeError, one per sticky error, with and
# without each tail.
STICKY_RUNTIME_MESSAGES = [head + tail for head in STICKY_HEADS for tail in ("", OLD_TAIL, ASYNC_TAIL)]

# Real non-sticky CUDA errors (the context stays usable).
NON_STICKY_HEADS = [
    "CUDA error: invalid argument",
    "CUDA error: invalid configuration argument",
    "CUDA error: invalid resource handle",
    "CUDA error: invalid device ordinal",
    "CUDA error: no kernel image is available for execution on the device",
    "CUDA error: too many resources requested for launch",
]


# --- torch's own exception types ----------------------------------------------------------------


def test_accelerator_error_with_a_sticky_message_is_poisoned():
    exc = torch.AcceleratorError("CUDA error: an illegal memory access was encountered" + ASYNC_TAIL)
    assert isinstance(exc, RuntimeError)
    assert classify(exc) is Failure.CONTEXT_POISONED


@pytest.mark.parametrize("message", [
    "CUDA error: invalid argument",
    "CUDA error: invalid configuration argument",
    "CUDA error: no kernel image is available for execution on the device",
    "",
])
def test_accelerator_error_naming_no_sticky_error_is_still_poisoned(message):
    # The docstring: a CUDA error in a context we cannot inspect is not safe to reuse.
    assert classify(torch.AcceleratorError(message)) is Failure.CONTEXT_POISONED


def test_accelerator_error_saying_out_of_memory_is_out_of_memory():
    # cudaErrorMemoryAllocation raised through C10_CUDA_CHECK: the out-of-memory test comes first.
    assert classify(torch.AcceleratorError("CUDA error: out of memory" + ASYNC_TAIL)) is Failure.OUT_OF_MEMORY


def test_accelerator_error_subclass_is_poisoned():
    class MyAcceleratorError(torch.AcceleratorError):
        pass

    assert classify(MyAcceleratorError("whatever")) is Failure.CONTEXT_POISONED


def test_torch_cuda_out_of_memory_error():
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError
    assert classify(torch.cuda.OutOfMemoryError(CUDA_OOM_MESSAGE)) is Failure.OUT_OF_MEMORY
    assert classify(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) \
        is Failure.OUT_OF_MEMORY


def test_torch_out_of_memory_error_is_recognised_by_its_class_not_its_message():
    assert classify(torch.OutOfMemoryError(CUDA_OOM_MESSAGE)) is Failure.OUT_OF_MEMORY
    assert classify(torch.OutOfMemoryError("")) is Failure.OUT_OF_MEMORY
    assert classify(torch.OutOfMemoryError("something else entirely")) is Failure.OUT_OF_MEMORY


# --- older torch: plain RuntimeErrors with the CUDA messages ----------------------------------------


@pytest.mark.parametrize("message", STICKY_RUNTIME_MESSAGES)
def test_runtime_error_with_a_sticky_cuda_message_is_poisoned(message):
    assert classify(RuntimeError(message)) is Failure.CONTEXT_POISONED


@pytest.mark.parametrize("marker", STICKY_CUDA_MARKERS)
def test_every_sticky_marker_after_cuda_error_is_poisoned(marker):
    assert classify(RuntimeError(f"CUDA error: {marker}")) is Failure.CONTEXT_POISONED
    assert classify(RuntimeError(f"CUDA error: {marker.upper()}")) is Failure.CONTEXT_POISONED


def test_sticky_markers_are_lowercase():
    # classify lowercases the message; an uppercase marker could never match.
    assert all(m == m.lower() for m in STICKY_CUDA_MARKERS)


def test_runtime_error_cuda_out_of_memory_message():
    assert classify(RuntimeError(CUDA_OOM_MESSAGE)) is Failure.OUT_OF_MEMORY
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total "
                                 "capacity; 14.21 GiB already allocated; 3.19 MiB free)")) is Failure.OUT_OF_MEMORY
    assert classify(RuntimeError("CUDA error: out of memory")) is Failure.OUT_OF_MEMORY


def test_cpu_allocator_failure_is_out_of_memory():
    # A CPU worker out of host memory: the very exception torch raises, not a hand-written message.
    with pytest.raises(RuntimeError) as err:
        torch.empty(1 << 60, dtype=torch.uint8)
    assert classify(err.value) is Failure.OUT_OF_MEMORY
    assert classify(RuntimeError("can't allocate the thing")) is Failure.UNKNOWN


# --- not poisoned -------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 2x3)"),
    ValueError("bad value"),
    KeyError("missing"),
    IndexError("index 5 is out of bounds for dimension 0 with size 2"),
    TypeError("expected Tensor"),
    RuntimeError(""),
    RuntimeError(),
    Exception("boom"),
    AssertionError(),
])
def test_other_errors_are_unknown(exc):
    assert classify(exc) is Failure.UNKNOWN


@pytest.mark.parametrize("head", NON_STICKY_HEADS)
@pytest.mark.parametrize("tail", ["", OLD_TAIL])
def test_non_sticky_cuda_error_runtime_error_is_unknown(head, tail):
    assert classify(RuntimeError(head + tail)) is Failure.UNKNOWN


@pytest.mark.parametrize("head", NON_STICKY_HEADS)
def test_non_sticky_cuda_error_with_the_real_torch_tail_is_unknown(head):
    # Suspected bug: torch appends "Compile with `TORCH_USE_CUDA_DSA` to enable device-side
    # assertions." to EVERY CUDA error message. "device-side assertions" contains the sticky marker
    # "device-side assert", and classify() searches the whole message, so every CUDA error a
    # pre-2.8 torch raises as a RuntimeError is classified CONTEXT_POISONED, sticky or not.
    assert classify(RuntimeError(head + ASYNC_TAIL)) is Failure.UNKNOWN


def test_the_real_torch_tail_alone_names_no_sticky_error():
    # The same suspected bug, isolated: the tail is common to all CUDA errors.
    assert classify(RuntimeError("CUDA error: unknown error" + ASYNC_TAIL)) is Failure.UNKNOWN


def test_illegal_memory_access_without_cuda_error_prefix_is_unknown():
    # classify needs both "cuda error" and a sticky marker in a RuntimeError's message.
    assert classify(RuntimeError("an illegal memory access was encountered")) is Failure.UNKNOWN
    assert classify(RuntimeError("illegal memory access")) is Failure.UNKNOWN
    assert classify(RuntimeError("CUDA: an illegal memory access was encountered")) is Failure.UNKNOWN


def test_sticky_cuda_message_outside_a_runtime_error_is_unknown():
    # The message test applies only to RuntimeError (and its subclasses).
    assert classify(ValueError("CUDA error: an illegal memory access was encountered")) is Failure.UNKNOWN
    assert classify(Exception("CUDA error: device-side assert triggered")) is Failure.UNKNOWN


def test_sticky_cuda_message_in_a_runtime_error_subclass_is_poisoned():
    assert classify(NotImplementedError("CUDA error: misaligned address")) is Failure.CONTEXT_POISONED


def test_cuda_launch_timeout_is_sticky():
    # cudaErrorLaunchTimeout ("the launch timed out and was terminated") is sticky per the CUDA
    # documentation: only a new process helps, so it is Restart, not Escalate.
    assert classify(RuntimeError("CUDA error: the launch timed out and was terminated")) is Failure.CONTEXT_POISONED


@pytest.mark.parametrize("exc", [
    MemoryError(),
    MemoryError("out of memory"),
    RuntimeError("out of memory"),
    OSError(12, "Cannot allocate memory"),
])
def test_python_out_of_memory_is_unknown(exc):
    # Only torch's allocators say which memory ran out. Python's MemoryError can come from
    # anywhere in the process (the broker link, a leak), so it escalates: a new process.
    assert classify(exc) is Failure.UNKNOWN


def test_cuda_out_of_memory_message_in_any_exception_type_is_out_of_memory():
    # Pinned: unlike the sticky test, the out-of-memory message test is not limited to RuntimeError.
    assert classify(ValueError("CUDA out of memory")) is Failure.OUT_OF_MEMORY
    assert classify(KeyError("CUDA out of memory")) is Failure.OUT_OF_MEMORY


def test_any_class_named_out_of_memory_error_or_accelerator_error_is_recognised():
    # torch-free recognition by class name: any class with these names counts.
    OOM = type("OutOfMemoryError", (Exception,), {})
    Acc = type("AcceleratorError", (Exception,), {})
    assert classify(OOM("x")) is Failure.OUT_OF_MEMORY
    assert classify(Acc("x")) is Failure.CONTEXT_POISONED


# --- real torch CPU exceptions ------------------------------------------------------------------


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("expected an exception")


@pytest.mark.parametrize("fn, exc_type, fragment", [
    (lambda: torch.ones(2, 3) @ torch.ones(2, 3), RuntimeError, "mat1 and mat2 shapes cannot be multiplied"),
    (lambda: torch.empty(-1), RuntimeError, "negative dimension"),
    (lambda: torch.ones(2, 3).view(4), RuntimeError, "is invalid for input of size 6"),
    (lambda: torch.ones(2)[5], IndexError, "out of bounds"),
    (lambda: torch.ones(2) + torch.ones(3), RuntimeError, "must match the size"),
])
def test_real_torch_cpu_errors_are_unknown(fn, exc_type, fragment):
    exc = _raised(fn)
    assert type(exc) is exc_type
    assert fragment in str(exc)
    assert classify(exc) is Failure.UNKNOWN


# --- inferd's own exceptions --------------------------------------------------------------------


@pytest.mark.parametrize("cls, kind", [
    (ContextPoisonedError, Failure.CONTEXT_POISONED),
    (OutOfMemoryError, Failure.OUT_OF_MEMORY),
    (UnrecoverableError, Failure.UNRECOVERABLE),
])
def test_inferd_errors_and_their_subclasses(cls, kind):
    assert classify(cls("x")) is kind
    assert classify(cls()) is kind
    sub = type("Sub" + cls.__name__, (cls,), {})
    assert classify(sub("x")) is kind
    subsub = type("SubSub", (sub,), {})
    assert classify(subsub()) is kind


@pytest.mark.parametrize("cls, kind", [
    (ContextPoisonedError, Failure.CONTEXT_POISONED),
    (OutOfMemoryError, Failure.OUT_OF_MEMORY),
    (UnrecoverableError, Failure.UNRECOVERABLE),
])
def test_inferd_errors_win_over_their_message(cls, kind):
    assert classify(cls(CUDA_OOM_MESSAGE)) is kind
    assert classify(cls("CUDA error: an illegal memory access was encountered")) is kind
    assert classify(cls("mat1 and mat2 shapes cannot be multiplied")) is kind


def test_inferd_errors_are_runtime_errors():
    for cls in (ContextPoisonedError, OutOfMemoryError, UnrecoverableError):
        assert issubclass(cls, RuntimeError)


def test_inferd_out_of_memory_is_not_torch_s():
    # inferd's own OutOfMemoryError shares torch's class name; both are OUT_OF_MEMORY.
    assert OutOfMemoryError is not torch.OutOfMemoryError
    assert classify(OutOfMemoryError()) is classify(torch.OutOfMemoryError()) is Failure.OUT_OF_MEMORY


# --- classify never raises -----------------------------------------------------------------------


class StrRaises(RuntimeError):
    def __str__(self):
        raise ValueError("__str__ is broken")


class StrReturnsNonString(RuntimeError):
    def __str__(self):
        return 42  # type: ignore[return-value]


def test_classify_does_not_raise_when_str_raises():
    # Suspected bug: classify() calls str(exc) unguarded (failures.py, `message = str(exc).lower()`),
    # so an exception whose __str__ raises makes classify raise instead of returning UNKNOWN.
    assert classify(StrRaises()) is Failure.UNKNOWN


def test_classify_does_not_raise_when_str_returns_a_non_string():
    # Same line as above: str() raises TypeError for a __str__ returning a non-str.
    assert classify(StrReturnsNonString()) is Failure.UNKNOWN


def test_classify_of_an_inferd_error_with_a_broken_str_still_works():
    # The isinstance checks come before str(exc), so these never reach it.
    bad = type("BadPoisoned", (ContextPoisonedError,), {"__str__": lambda self: 1 / 0})
    assert classify(bad()) is Failure.CONTEXT_POISONED


@pytest.mark.parametrize("exc", [
    KeyboardInterrupt(),
    SystemExit(1),
    GeneratorExit(),
    StopIteration(),
    RuntimeError(None),
    RuntimeError(1, 2, 3),
    RuntimeError(b"CUDA error: bytes"),
    RuntimeError("\udcff lone surrogate"),
    RuntimeError("x" * 1_000_000),
    BaseExceptionGroup("group", [ValueError("a"), RuntimeError("CUDA error: misaligned address")]),
    ExceptionGroup("group", [ValueError("a")]),
])
def test_classify_odd_exceptions_is_unknown(exc):
    assert classify(exc) is Failure.UNKNOWN


@pytest.mark.parametrize("seed", range(3))
def test_classify_never_raises_on_random_messages(seed):
    rng = random.Random(seed)
    pieces = ["CUDA error:", "cuda", "out of memory", "illegal memory access", "device-side assert",
              "launch failure", "\n", "\x00", "é", "\udcff", "", " ", "OOM", *STICKY_CUDA_MARKERS]
    types = [RuntimeError, ValueError, KeyError, Exception, MemoryError, torch.AcceleratorError,
             torch.OutOfMemoryError, ContextPoisonedError, OutOfMemoryError, UnrecoverableError, OSError]
    for _ in range(2000):
        message = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        exc = rng.choice(types)(message)
        assert isinstance(classify(exc), Failure)


# --- exit statuses --------------------------------------------------------------------------------


@pytest.mark.parametrize("status, kind", [
    (4, Failure.CONTEXT_POISONED),
    (3, Failure.UNRECOVERABLE),
    (0, Failure.UNKNOWN),
    (1, Failure.UNKNOWN),
    (2, Failure.UNKNOWN),
    (70, Failure.UNKNOWN),
    (75, Failure.UNKNOWN),
    (78, Failure.UNKNOWN),
    (-9, Failure.UNKNOWN),
    (-11, Failure.UNKNOWN),
    (-4, Failure.UNKNOWN),
    (-3, Failure.UNKNOWN),
])
def test_from_exit_status(status, kind):
    assert from_exit_status(status) is kind


def test_exit_codes_values():
    assert (exitcodes.OK, exitcodes.FAILURE, exitcodes.WORKER_UNRECOVERABLE, exitcodes.WORKER_POISONED,
            exitcodes.ESCALATED, exitcodes.RUNTIME_DIR_BUSY, exitcodes.CONFIG) == (0, 1, 3, 4, 70, 75, 78)


def test_exit_status_table():
    assert EXIT_STATUS == {
        Failure.CONTEXT_POISONED: 4,
        Failure.UNRECOVERABLE: 3,
        Failure.UNKNOWN: 1,
    }
    # OutOfMemory never ends a worker: it has no exit status.
    assert Failure.OUT_OF_MEMORY not in EXIT_STATUS


def test_exit_status_maps_back():
    for kind, status in EXIT_STATUS.items():
        assert from_exit_status(status) is kind
    # distinct statuses, so the mapping is invertible
    assert len(set(EXIT_STATUS.values())) == len(EXIT_STATUS)


@pytest.mark.parametrize("status, text", [
    (-9, "killed by SIGKILL"),
    (-11, "killed by SIGSEGV"),
    (-15, "killed by SIGTERM"),
    (-6, "killed by SIGABRT"),
    (-200, "killed by signal 200"),
    (-1000, "killed by signal 1000"),
    (4, "context poisoned (status 4)"),
    (3, "unrecoverable (status 3)"),
    (1, "exited with status 1"),
    (0, "exited with status 0"),
    (2, "exited with status 2"),
    (70, "exited with status 70"),
])
def test_describe_exit(status, text):
    assert describe_exit(status) == text


def test_describe_exit_every_known_signal():
    for sig in signal.Signals:
        assert describe_exit(-int(sig)) == f"killed by {sig.name}"

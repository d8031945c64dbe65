"""How a worker failed: one :class:`Failure` kind per exit status and per in-band report.

A worker classifies an exception raised by its runner (:func:`classify`) and
acts on the kind: OutOfMemory fails the batch and carries on, ContextPoisoned
and anything unknown end the process with the kind's exit status. The
supervisor maps the exit status back to the kind (:func:`from_exit_status`)
and its decider maps the kind to a directive.

Pure logic, and torch-free: torch exceptions are recognised by their class
names and messages, so the supervisor can import this module.
"""

from __future__ import annotations

import enum
import signal

from inferd import exitcodes


class Failure(str, enum.Enum):
    CONTEXT_POISONED = "context_poisoned"   # the GPU context is unusable: only a new process helps
    OUT_OF_MEMORY = "out_of_memory"         # not sticky: free the cache, fail the batch, keep serving
    UNRECOVERABLE = "unrecoverable"         # the model cannot load, the runtime config is wrong
    UNKNOWN = "unknown"                     # anything else: a bug, a signal, a hang


class ContextPoisonedError(RuntimeError):
    """Raised by a runner whose device context is unusable (and by the echo runtime's fault injection)."""


class OutOfMemoryError(RuntimeError):
    """Raised by a runner that ran out of device memory for a step."""


class UnrecoverableError(RuntimeError):
    """Raised by a runner that cannot ever serve with this config: bad weights, bad options."""


# Sticky CUDA errors: after one, every later call in the process fails too.
# (cudaErrorIllegalAddress, cudaErrorAssert, cudaErrorLaunchFailure, cudaErrorLaunchTimeout,
# cudaErrorMisalignedAddress, cudaErrorIllegalInstruction, cudaErrorInvalidPc,
# cudaErrorHardwareStackError, ECC errors, ...). Matched on the message's first line only:
# torch ends every CUDA error with "... to enable device-side assertions.", sticky or not.
STICKY_CUDA_MARKERS = (
    "illegal memory access",
    "device-side assert triggered",
    "unspecified launch failure",
    "launch timed out",
    "launch failure",
    "misaligned address",
    "illegal instruction",
    "invalid program counter",
    "hardware stack error",
    "uncorrectable ecc error",
    "operation not permitted when stream is capturing",
    "an illegal address",
)


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def describe(exc: BaseException) -> str:
    """``Type: message``, even for an exception whose ``__str__`` raises or returns a non-string."""
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    return f"{type(exc).__name__}: {text}"


def classify(exc: BaseException) -> Failure:
    """The kind of a runner's exception.

    - torch >= 2.8 raises ``torch.AcceleratorError`` (a RuntimeError with an
      ``error_code``) for CUDA errors; older versions a RuntimeError whose
      message starts ``CUDA error:``. Both are sticky when the message names a
      sticky error; an AcceleratorError that names none is treated as poisoned
      too, since a CUDA error in a context we cannot inspect is not safe to reuse.
    - ``torch.cuda.OutOfMemoryError`` (``torch.OutOfMemoryError``), and the
      "CUDA out of memory" message of older versions, are OutOfMemory; so is
      the CPU allocator's "can't allocate memory" (a CPU worker out of host memory).
    """
    if isinstance(exc, ContextPoisonedError):
        return Failure.CONTEXT_POISONED
    if isinstance(exc, OutOfMemoryError):
        return Failure.OUT_OF_MEMORY
    if isinstance(exc, UnrecoverableError):
        return Failure.UNRECOVERABLE
    names = _class_names(exc)
    message = describe(exc).lower()
    if ("OutOfMemoryError" in names or ("out of memory" in message and "cuda" in message)
            or "defaultcpuallocator: can't allocate memory" in message):
        return Failure.OUT_OF_MEMORY
    if "AcceleratorError" in names:
        return Failure.CONTEXT_POISONED
    first_line = message.split("\n", 1)[0]
    sticky = "cuda error" in first_line and any(m in first_line for m in STICKY_CUDA_MARKERS)
    if isinstance(exc, RuntimeError) and sticky:
        return Failure.CONTEXT_POISONED
    return Failure.UNKNOWN


EXIT_STATUS = {
    Failure.CONTEXT_POISONED: exitcodes.WORKER_POISONED,
    Failure.UNRECOVERABLE: exitcodes.WORKER_UNRECOVERABLE,
    Failure.UNKNOWN: exitcodes.FAILURE,
}


def from_exit_status(status: int) -> Failure:
    """The kind of a worker's exit, from ``Popen.returncode`` (negative: killed by that signal)."""
    if status == exitcodes.WORKER_POISONED:
        return Failure.CONTEXT_POISONED
    if status == exitcodes.WORKER_UNRECOVERABLE:
        return Failure.UNRECOVERABLE
    return Failure.UNKNOWN


def describe_exit(status: int) -> str:
    """A line for logs and ``inferctl status``."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    kind = from_exit_status(status)
    if kind is Failure.UNKNOWN:
        return f"exited with status {status}"
    return f"{kind.value.replace('_', ' ')} (status {status})"

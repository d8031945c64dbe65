"""Process plumbing shared by the supervisor and its children: logging, lifetime, signals."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
SPEC_ENV = "INFERD_SPEC"
PARENT_ENV = "INFERD_PARENT_PID"


def setup_logging(role: str, level: str) -> None:
    """One line per event on stderr, which journald and supervisord both capture."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)-7s inferd[{role}:%(process)d] %(message)s",
    )


def die_with_parent() -> None:
    """Make the kernel SIGKILL this process when the supervisor dies.

    Without it a SIGKILLed supervisor leaves workers holding GPU memory
    (vllm#55510). The parent pid check closes the race where the parent died
    before prctl ran.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logging.getLogger("inferd").warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    expected = os.environ.get(PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)


def child_spec() -> dict[str, Any]:
    """The JSON spec the supervisor handed this child in its environment."""
    return json.loads(os.environ[SPEC_ENV])


def child_signals(on_term: Any, wakeup_fd: int) -> None:
    """Children stop on SIGTERM from the supervisor: ``on_term`` records it and
    ``wakeup_fd`` wakes the poll loop so it acts at once."""
    signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_term)

"""Exit statuses of inferd's processes (documented in docs/architecture.md).

The supervisor's statuses are what systemd sees: a bad config must not be
retried (RestartPreventExitStatus=78), anything else non-zero may be.
"""

OK = 0
FAILURE = 1             # an unexpected error
WORKER_LOAD_FAILED = 3  # a worker could not load its runtime or model
RUNTIME_DIR_BUSY = 75   # EX_TEMPFAIL: another live inferd serves the runtime dir
CONFIG = 78             # EX_CONFIG: the configuration is invalid

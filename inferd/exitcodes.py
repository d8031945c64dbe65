"""Exit statuses of inferd's processes (documented in docs/architecture.md).

The supervisor's statuses are what systemd sees: a bad config must not be
retried (RestartPreventExitStatus=78), anything else non-zero may be. A
worker's status tells the supervisor how it failed (``inferd.failures``).
"""

OK = 0
FAILURE = 1               # an unexpected error (a worker: Escalate)
WORKER_UNRECOVERABLE = 3  # a worker cannot load its runtime or model with this config (Stop)
WORKER_POISONED = 4       # a worker's GPU context is poisoned (Restart)
ESCALATED = 70            # the supervisor gave up: escalations past the daemon-wide intensity
RUNTIME_DIR_BUSY = 75     # EX_TEMPFAIL: another live inferd serves the runtime dir
CONFIG = 78               # EX_CONFIG: the configuration is invalid

"""The runtime registry: what each runtime accepts, without importing it.

The supervisor and the broker must validate a deployment's options and a
request's params, but must never import a runtime's implementation (the torch
runtime imports torch). So each runtime is described here by a light
:class:`RuntimeSpec`; only a worker imports ``spec.runner`` and builds the
:class:`~inferd.runtimes.base.ModelRunner`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from inferd.schema import Param


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    runner: str                      # "module:Class", imported by workers only
    params: dict[str, Param] = field(default_factory=dict)
    options: dict[str, Param] = field(default_factory=dict)
    # Params and options accepted only when the named boolean option is true.
    gated: dict[str, str] = field(default_factory=dict)
    # How chunk texts join into the full output: " " for word streams, "" for token deltas.
    chunk_joiner: str = ""
    # "local": runs on a device of its node (a GPU, or a CPU device when there is none);
    # "remote": calls a network provider, needs egress and no device.
    transport: str = "local"

    def load_runner_class(self) -> type:
        module, _, attr = self.runner.partition(":")
        return getattr(importlib.import_module(module), attr)


# Faults the echo runtime injects when asked (see inferd/runtimes/echo.py).
ECHO_FAULTS = ("poison", "oom", "crash", "hang", "error")

_MAX_TOKENS = Param(int, "an integer between 1 and 1000000", lambda v: 1 <= v <= 1_000_000)

SPECS: dict[str, RuntimeSpec] = {
    "echo": RuntimeSpec(
        name="echo",
        runner="inferd.runtimes.echo:EchoRunner",
        params={
            "max_tokens": _MAX_TOKENS,
            # Below the default watchdog_s (60 s): a pause is not a hang.
            "delay_ms": Param(int, "an integer between 0 and 10000", lambda v: 0 <= v <= 10_000),
            "fault": Param(str, f"one of {', '.join(ECHO_FAULTS)}", lambda v: v in ECHO_FAULTS),
        },
        options={
            # Test-only faults; off unless a config turns them on.
            "fault_injection": Param(bool, "true or false"),
            "load_fault": Param(str, "\"unrecoverable\"", lambda v: v == "unrecoverable"),
        },
        gated={"fault": "fault_injection", "load_fault": "fault_injection"},
        chunk_joiner=" ",
    ),
}

NAMES = tuple(SPECS)


def _check(table: dict[str, Any], schema: dict[str, Param]) -> str | None:
    for key, value in table.items():
        param = schema.get(key)
        if param is None:
            known = ", ".join(sorted(schema)) or "none"
            return f"{key}: unknown; known: {known}"
        problem = param.problem(value)
        if problem:
            return f"{key}: {problem}"
    return None


def _gate(spec: RuntimeSpec, table: dict[str, Any], options: dict[str, Any]) -> str | None:
    for name, option in spec.gated.items():
        if name in table and options.get(option) is not True:
            return f"{name}: not enabled for this deployment (options.{option} is not true)"
    return None


def validate_params(runtime: str, params: dict[str, Any], options: dict[str, Any]) -> str | None:
    """The first problem with a request's params, naming the param, or None.

    A gated param is refused unless the deployment's options turn it on, so a
    client can never reach what the config has not enabled.
    """
    spec = SPECS[runtime]
    return _gate(spec, params, options) or _check(params, spec.params)


def validate_options(runtime: str, options: dict[str, Any]) -> str | None:
    """The first problem with a deployment's runtime options, naming the key, or None."""
    spec = SPECS[runtime]
    return _check(options, spec.options) or _gate(spec, options, options)

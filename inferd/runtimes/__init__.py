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
from typing import Any, Callable


@dataclass(frozen=True)
class Param:
    kind: type
    expect: str
    check: Callable[[Any], bool] = lambda v: True

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, self.kind) and not isinstance(value, bool) or (
            self.kind is float and isinstance(value, int) and not isinstance(value, bool))
        if ok and self.check(value):
            return None
        return f"expected {self.expect}, got {value!r}"


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    runner: str                      # "module:Class", imported by workers only
    params: dict[str, Param] = field(default_factory=dict)
    options: dict[str, Param] = field(default_factory=dict)
    # How chunk texts join into the full output: " " for word streams, "" for token deltas.
    chunk_joiner: str = ""

    def load_runner_class(self) -> type:
        module, _, attr = self.runner.partition(":")
        return getattr(importlib.import_module(module), attr)


_MAX_TOKENS = Param(int, "an integer between 1 and 1000000", lambda v: 1 <= v <= 1_000_000)

SPECS: dict[str, RuntimeSpec] = {
    "echo": RuntimeSpec(
        name="echo",
        runner="inferd.runtimes.echo:EchoRunner",
        params={
            "max_tokens": _MAX_TOKENS,
            "delay_ms": Param(int, "an integer between 0 and 60000", lambda v: 0 <= v <= 60_000),
        },
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


def validate_params(runtime: str, params: dict[str, Any]) -> str | None:
    """The first problem with a request's params, naming the param, or None."""
    return _check(params, SPECS[runtime].params)


def validate_options(runtime: str, options: dict[str, Any]) -> str | None:
    """The first problem with a deployment's runtime options, naming the key, or None."""
    return _check(options, SPECS[runtime].options)

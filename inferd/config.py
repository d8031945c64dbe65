"""Typed, validated configuration read from TOML.

The schema is the dataclasses below: each field's metadata says what values
are allowed, and :func:`_build` checks a TOML table against it. Unknown keys,
wrong types and impossible values are all errors that name the file, the key
and what was expected, because a daemon that silently ignores ``replcias = 4``
costs an operator an afternoon.

This module is pure: no sockets, no processes, no torch.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from inferd import runtimes
from inferd.schema import Param


class ConfigError(Exception):
    """A bad configuration. The message names the file, the key and the expectation."""


def _opt(default: Any = dataclasses.MISSING, *, kind: type, expect: str,
         check: Callable[[Any], bool] = lambda v: True, factory: Callable[[], Any] | None = None) -> Any:
    meta = {"param": Param(kind, expect, check)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v: float) -> bool:
    return v > 0 and math.isfinite(v)


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class DaemonConfig:
    runtime_dir: str | None = _opt(None, kind=str, expect="a directory path",
                                   check=lambda v: len(v) > 0)
    log_level: str = _opt("info", kind=str, expect=f"one of {', '.join(LOG_LEVELS)}",
                          check=lambda v: v in LOG_LEVELS)
    drain_grace_s: float = _opt(30.0, kind=float, expect="a number of seconds >= 0",
                                check=lambda v: v >= 0 and math.isfinite(v))
    stop_timeout_s: float = _opt(10.0, kind=float, expect="a number of seconds > 0", check=_positive)
    restart_backoff_min_ms: int = _opt(100, kind=int, expect="an integer between 0 and 600000",
                                       check=lambda v: 0 <= v <= 600_000)
    restart_backoff_max_ms: int = _opt(30_000, kind=int, expect="an integer between 0 and 3600000",
                                       check=lambda v: 0 <= v <= 3_600_000)
    restart_backoff_reset_s: float = _opt(60.0, kind=float, expect="a number of seconds > 0", check=_positive)
    restart_backoff_jitter: float = _opt(0.2, kind=float, expect="a number between 0 and 1",
                                         check=lambda v: 0 <= v <= 1)
    escalation_max: int = _opt(10, kind=int, expect="an integer between 1 and 100000",
                               check=lambda v: 1 <= v <= 100_000)
    escalation_window_s: float = _opt(60.0, kind=float, expect="a number of seconds > 0", check=_positive)
    # Under systemd: while workers load, the start (and reload) timeout is extended by
    # EXTEND_TIMEOUT_USEC, up to this long after the start.
    start_timeout_s: float = _opt(600.0, kind=float, expect="a number of seconds > 0", check=_positive)
    # Test-only: SIGUSR2 wedges the supervisor's main loop, so that WatchdogSec can be tested.
    fault_injection: bool = _opt(False, kind=bool, expect="true or false")


@dataclass(frozen=True)
class BrokerConfig:
    heartbeat_interval_ms: int = _opt(500, kind=int, expect="an integer between 50 and 60000",
                                      check=lambda v: 50 <= v <= 60000)
    heartbeat_liveness: int = _opt(4, kind=int, expect="an integer between 2 and 100",
                                   check=lambda v: 2 <= v <= 100)
    max_message_bytes: int = _opt(1 << 20, kind=int, expect="an integer between 1024 and 1073741824",
                                  check=lambda v: 1024 <= v <= 1 << 30)
    frontend: str | None = _opt(None, kind=str, expect="a ZeroMQ endpoint such as tcp://127.0.0.1:5555",
                                check=lambda v: v.startswith(("ipc://", "tcp://")))
    # Replies ZeroMQ queues for one client connection before the broker deems it a slow reader.
    client_send_hwm: int = _opt(10_000, kind=int, expect="an integer between 100 and 10000000",
                                check=lambda v: 100 <= v <= 10_000_000)
    # CURVE for a tcp:// frontend: the server's key pair, and a directory of allowed clients' public keys.
    curve_secret_key: str | None = _opt(None, kind=str, expect="the path of the server's .key_secret file",
                                        check=lambda v: len(v) > 0)
    curve_allowed_clients: str | None = _opt(None, kind=str, expect="a directory of clients' .key files",
                                             check=lambda v: len(v) > 0)
    # A tcp:// frontend without CURVE: refused unless this is set and the address is loopback.
    allow_plain_tcp: bool = _opt(False, kind=bool, expect="true or false")
    # How long the final replies owed to an unreachable client connection are kept for it to come back.
    client_hold_s: float = _opt(10.0, kind=float, expect="a number of seconds between 0 and 3600",
                                check=lambda v: 0 <= v <= 3600)
    # How long an accepted request may go without any reply before it gets an ACCEPTED of its own
    # (docs/protocol.md: a request answered sooner has its acceptance in its first reply). 0 sends
    # every ACCEPTED at once, as protocol v1 did: one more message per request.
    accept_delay_ms: int = _opt(20, kind=int, expect="an integer between 0 and 1000",
                                check=lambda v: 0 <= v <= 1000)


def _is_host(text: str) -> bool:
    return 0 < len(text) <= 255 and not any(c.isspace() for c in text)


@dataclass(frozen=True)
class GatewayConfig:
    """The OpenAI-compatible HTTP gateway; it runs only when the config has a [gateway] table."""
    # Loopback unless told otherwise: the gateway is the daemon's only network listener.
    host: str = _opt("127.0.0.1", kind=str, expect="a host name or IP address to bind", check=_is_host)
    port: int = _opt(8000, kind=int, expect="a TCP port between 1 and 65535", check=lambda v: 1 <= v <= 65535)
    # A request body larger than this gets 413 before it is read.
    max_body_bytes: int = _opt(1 << 20, kind=int, expect="an integer between 1024 and 1073741824",
                               check=lambda v: 1024 <= v <= 1 << 30)
    # Bearer API keys: comma- or newline-separated in this environment variable, and one per line in
    # api_keys_file. With neither, no key is asked for.
    api_keys_env: str = _opt("INFERD_API_KEYS", kind=str, expect="an environment variable name",
                             check=lambda v: 0 < len(v) <= 255 and "=" not in v)
    api_keys_file: str | None = _opt(None, kind=str, expect="a file path", check=lambda v: len(v) > 0)
    # With a tcp:// CURVE frontend: this client's key pair (a .key_secret whose .key is among
    # broker.curve_allowed_clients); the server's public key is read from broker.curve_secret_key.
    curve_client_key: str | None = _opt(None, kind=str, expect="the path of the gateway's .key_secret file",
                                        check=lambda v: len(v) > 0)


DEVICE_POLICIES = ("least-loaded", "round-robin")
ROUTING_POLICIES = ("least-loaded", "round-robin", "sticky")


def parse_compute_capability(text: str) -> tuple[int, int] | None:
    """ "8.0" -> (8, 0); "" -> None (no constraint)."""
    if not text:
        return None
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def _is_compute_capability(text: str) -> bool:
    major, dot, minor = text.partition(".")
    return text == "" or (major.isdigit() and (not dot or minor.isdigit()))


@dataclass(frozen=True)
class NodeConfig:
    # This node's name in placement plans (multi-node placement will compare them).
    name: str = _opt(os.uname().nodename, kind=str, expect="a node name", check=lambda v: 0 < len(v) <= 255)
    # Whether this node may reach remote providers over the network.
    egress: bool = _opt(True, kind=bool, expect="true or false")


@dataclass(frozen=True)
class DevicesConfig:
    # How many CPU devices to offer when NVML finds no GPU.
    cpu_devices: int = _opt(1, kind=int, expect="an integer between 1 and 1024",
                            check=lambda v: 1 <= v <= 1024)
    # The default device placement policy; a deployment may choose its own.
    placement: str = _opt("least-loaded", kind=str, expect=f"one of {', '.join(DEVICE_POLICIES)}",
                          check=lambda v: v in DEVICE_POLICIES)
    # How often free memory (NVML) and per-worker load (the broker) are sampled.
    poll_interval_ms: int = _opt(250, kind=int, expect="an integer between 10 and 60000",
                                 check=lambda v: 10 <= v <= 60_000)


@dataclass(frozen=True)
class DeploymentConfig:
    name: str = _opt(kind=str, expect="a name of letters, digits, '-', '_' or '.' (at most 64)",
                     check=lambda v: 0 < len(v) <= 64 and all(c.isalnum() or c in "-_." for c in v))
    runtime: str = _opt(kind=str, expect=f"one of {', '.join(runtimes.NAMES)}",
                        check=lambda v: v in runtimes.NAMES)
    replicas: int = _opt(1, kind=int, expect="an integer between 1 and 256", check=lambda v: 1 <= v <= 256)
    queue_capacity: int = _opt(1024, kind=int, expect="an integer between 1 and 1000000",
                               check=lambda v: 1 <= v <= 1_000_000)
    priority_levels: int = _opt(3, kind=int, expect="an integer between 1 and 16", check=lambda v: 1 <= v <= 16)
    default_priority: int = _opt(1, kind=int, expect="an integer >= 0", check=lambda v: v >= 0)
    default_deadline_ms: int = _opt(60_000, kind=int, expect="an integer between 1 and 86400000",
                                    check=lambda v: 1 <= v <= 86_400_000)
    max_concurrency: int = _opt(8, kind=int, expect="an integer between 1 and 4096",
                                check=lambda v: 1 <= v <= 4096)
    max_restarts: int = _opt(3, kind=int, expect="an integer between 0 and 100000",
                             check=lambda v: 0 <= v <= 100_000)
    restart_window_s: float = _opt(60.0, kind=float, expect="a number of seconds > 0", check=_positive)
    watchdog_s: float = _opt(60.0, kind=float, expect="a number of seconds > 0", check=_positive)
    # Device placement: the policy (default: [devices].placement) and what a device must offer.
    placement: str | None = _opt(None, kind=str, expect=f"one of {', '.join(DEVICE_POLICIES)}",
                                 check=lambda v: v in DEVICE_POLICIES)
    gpus_per_replica: int = _opt(1, kind=int, expect="an integer between 1 and 64", check=lambda v: 1 <= v <= 64)
    min_free_bytes: int = _opt(0, kind=int, expect="an integer >= 0", check=lambda v: v >= 0)
    min_compute_cap: str = _opt("", kind=str, expect='a compute capability such as "8.0"',
                                check=_is_compute_capability)
    # Request routing among the deployment's ready workers.
    routing: str = _opt("least-loaded", kind=str, expect=f"one of {', '.join(ROUTING_POLICIES)}",
                        check=lambda v: v in ROUTING_POLICIES)
    sticky_epsilon: float = _opt(0.25, kind=float, expect="a number between 0.01 and 10",
                                 check=lambda v: 0.01 <= v <= 10)
    options: dict = _opt(factory=dict, kind=dict, expect="a table of runtime options")

    @property
    def min_compute_capability(self) -> tuple[int, int] | None:
        return parse_compute_capability(self.min_compute_cap)


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig
    broker: BrokerConfig
    node: NodeConfig
    devices: DevicesConfig
    deployments: tuple[DeploymentConfig, ...]
    gateway: GatewayConfig | None = None     # None: no [gateway] table, no HTTP gateway

    def deployment(self, name: str) -> DeploymentConfig:
        for dep in self.deployments:
            if dep.name == name:
                return dep
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able form, handed to child processes so they never re-read the file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return cls(
            path=data["path"],
            daemon=DaemonConfig(**data["daemon"]),
            broker=BrokerConfig(**data["broker"]),
            node=NodeConfig(**data["node"]),
            devices=DevicesConfig(**data["devices"]),
            deployments=tuple(DeploymentConfig(**d) for d in data["deployments"]),
            gateway=GatewayConfig(**data["gateway"]) if data.get("gateway") is not None else None,
        )


_SECTIONS = {"daemon": DaemonConfig, "broker": BrokerConfig, "node": NodeConfig, "devices": DevicesConfig}


def load(path: str | Path) -> Config:
    """Read and validate a config file. Raises :class:`ConfigError`."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: str = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    allowed = set(_SECTIONS) | {"deployment", "gateway"}
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key {key!r}; expected one of "
                              f"{', '.join(sorted(allowed))}")
    sections = {}
    for key, cls in _SECTIONS.items():
        table = raw.get(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {key}: expected a table [{key}]")
        sections[key] = _build(cls, table, key, path)

    _check_frontend(sections["broker"], path)
    gateway = raw.get("gateway")
    if gateway is not None:
        if not isinstance(gateway, dict):
            raise ConfigError(f"{path}: gateway: expected a table [gateway]")
        sections["gateway"] = _build(GatewayConfig, gateway, "gateway", path)
        if sections["broker"].curve_secret_key and not sections["gateway"].curve_client_key:
            raise ConfigError(f"{path}: gateway.curve_client_key: missing; expected the gateway's .key_secret "
                              f"(its .key in broker.curve_allowed_clients), since the frontend requires CURVE")

    deployments_raw = raw.get("deployment", [])
    if not isinstance(deployments_raw, list) or not all(isinstance(d, dict) for d in deployments_raw):
        raise ConfigError(f"{path}: deployment: expected an array of tables [[deployment]]")
    if not deployments_raw:
        raise ConfigError(f"{path}: deployment: expected at least one [[deployment]] table")
    deployments = []
    seen: set[str] = set()
    for index, table in enumerate(deployments_raw):
        label = f"deployment[{index}]" + (f" ({table['name']})" if isinstance(table.get("name"), str) else "")
        dep = _build(DeploymentConfig, table, label, path)
        if dep.name in seen:
            raise ConfigError(f"{path}: {label}.name: expected a unique name, {dep.name!r} is used twice")
        seen.add(dep.name)
        if dep.default_priority >= dep.priority_levels:
            raise ConfigError(f"{path}: {label}.default_priority: expected an integer between 0 and "
                              f"{dep.priority_levels - 1} (priority_levels = {dep.priority_levels}), "
                              f"got {dep.default_priority}")
        problem = runtimes.validate_options(dep.runtime, dep.options)
        if problem:
            raise ConfigError(f"{path}: {label}.options.{problem}")
        deployments.append(dep)

    return Config(path=path, deployments=tuple(deployments), **sections)


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether a tcp:// endpoint binds a loopback address only (127.0.0.0/8, ::1, localhost)."""
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_frontend(broker: BrokerConfig, path: str) -> None:
    """A tcp frontend is reachable by anyone who reaches the port: it must authenticate clients."""
    tcp = (broker.frontend or "").startswith("tcp://")
    curve = (broker.curve_secret_key, broker.curve_allowed_clients)
    if any(curve) and not all(curve):
        raise ConfigError(f"{path}: broker.curve_secret_key and broker.curve_allowed_clients: expected both "
                          f"or neither")
    if any(curve) and not tcp:
        raise ConfigError(f"{path}: broker.curve_secret_key: CURVE applies to a tcp:// frontend only; "
                          f"an ipc frontend is guarded by its file permissions")
    if broker.allow_plain_tcp and not (tcp and is_loopback_endpoint(broker.frontend)):
        raise ConfigError(f"{path}: broker.allow_plain_tcp: expected only with a tcp:// frontend on a loopback "
                          f"address, got frontend {broker.frontend!r}")
    if tcp and not all(curve) and not broker.allow_plain_tcp:
        raise ConfigError(
            f"{path}: broker.frontend: a tcp:// frontend lets anyone who reaches {broker.frontend} submit work; "
            f"expected CURVE (broker.curve_secret_key and broker.curve_allowed_clients; `inferctl keys generate "
            f"DIR` writes key pairs), or a loopback address with broker.allow_plain_tcp = true")


def _build(cls: type, table: dict[str, Any], where: str, path: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{path}: {where}.{key}: unknown key; expected one of "
                              f"{', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        param = f.metadata["param"]
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: {where}.{name}: missing; expected {param.expect}")
            continue
        value = table[name]
        problem = param.problem(value)
        if problem:
            raise ConfigError(f"{path}: {where}.{name}: {problem}")
        values[name] = float(value) if param.kind is float else value
    return cls(**values)

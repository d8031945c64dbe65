"""``inferd``: validate the config, claim the runtime dir, and run the supervisor."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import click

from inferd import __version__, curve, exitcodes, runtimes, service
from inferd.config import Config, ConfigError, load
from inferd.devices import DeviceSource, discover
from inferd.paths import Endpoints, RuntimeDirBusy, RuntimeDirError, default_runtime_dir, lock, prepare
from inferd.placement import Node, PlacementError, Planner, WorkerPlan, on_node
from inferd.proc import setup_logging
from inferd.restart import Limits, SupervisionPolicy
from inferd.supervisor import Supervisor

DEFAULT_CONFIG = "/etc/inferd/inferd.toml"
# The broker's own retry window: past it the daemon cannot serve, and exits for systemd to act.
# The gateway has the same window; past it only HTTP stops.
BROKER_LIMITS = Limits(max_restarts=3, within_s=60.0)


def plan_node(config: Config) -> tuple[DeviceSource, Planner, list[WorkerPlan]]:
    """Discover this node's devices and place every replica; raises PlacementError."""
    source = discover(config.devices.cpu_devices)
    node = config.node.name
    planner = Planner(config, [Node(node, tuple(source.devices), config.node.egress)])
    return source, planner, planner.plan(on_node(node, source.stats()))


def missing_runtime_modules(config: Config) -> list[str]:
    """One line per deployment whose runtime's packages are not installed: its workers will fail."""
    problems = []
    for dep in config.deployments:
        spec = runtimes.SPECS[dep.runtime]
        missing = spec.missing_modules()
        if missing:
            problems.append(f"deployment {dep.name}: runtime {dep.runtime} needs {', '.join(missing)}, "
                            f"not installed ({spec.install_hint}); its workers will fail")
    return problems


def policy(config: Config, plans: list[WorkerPlan]) -> SupervisionPolicy:
    d = config.daemon
    limits = {}
    for p in plans:
        dep = config.deployment(p.deployment)
        limits[p.id] = Limits(dep.max_restarts, dep.restart_window_s)
    limits["broker"] = BROKER_LIMITS
    limits["gateway"] = BROKER_LIMITS
    return SupervisionPolicy(limits, backoff_min_s=d.restart_backoff_min_ms / 1000,
                             backoff_max_s=d.restart_backoff_max_ms / 1000, backoff_reset_s=d.restart_backoff_reset_s,
                             jitter=d.restart_backoff_jitter, escalation_max=d.escalation_max,
                             escalation_window_s=d.escalation_window_s)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="INFERD_CONFIG",
              default=DEFAULT_CONFIG, show_default=True, help="The TOML config file.")
@click.option("--runtime-dir", type=click.Path(file_okay=False),
              help="Directory for the ipc sockets; overrides the config's daemon.runtime_dir.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Overrides the config's daemon.log_level.")
@click.option("--check", is_flag=True, help="Validate the config, print the worker plan and exit.")
@click.version_option(__version__, prog_name="inferd")
@click.pass_context
def main(ctx: click.Context, config_path: str, runtime_dir: str | None, log_level: str | None, check: bool) -> None:
    """Run the inferd supervisor in the foreground (systemd, supervisord or a terminal).

    `inferd install-service` installs it as a systemd service running from this environment.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        config = load(config_path)
    except ConfigError as exc:
        click.echo(f"inferd: bad config: {exc}", err=True)
        sys.exit(exitcodes.CONFIG)
    if config.broker.curve_secret_key:
        try:
            curve.load_secret(config.broker.curve_secret_key)
            curve.allowed_clients(config.broker.curve_allowed_clients)
        except curve.CurveKeyError as exc:
            click.echo(f"inferd: bad config: {config_path}: broker: {exc}", err=True)
            sys.exit(exitcodes.CONFIG)
    setup_logging("supervisor", log_level or config.daemon.log_level)
    log = logging.getLogger("inferd")
    try:
        source, planner, plans = plan_node(config)
    except PlacementError as exc:
        click.echo(f"inferd: cannot place {config_path}: {type(exc).__name__}: {exc}", err=True)
        sys.exit(exitcodes.CONFIG)
    for problem in missing_runtime_modules(config):
        log.warning("%s", problem)
        if check:
            click.echo(f"warning: {problem}", err=True)
    if check:
        click.echo(f"{config_path}: OK ({source.note})")
        for p in plans:
            click.echo(f"  {p.id}: deployment {p.deployment} on {p.node} {p.device_ids} ({p.why})")
        return
    run_dir = Path(runtime_dir or config.daemon.runtime_dir or default_runtime_dir()).absolute()
    endpoints = Endpoints.for_dir(run_dir, config.broker.frontend)
    try:
        prepare(run_dir, endpoints)
        lock_fd = lock(run_dir)
    except RuntimeDirBusy as exc:
        log.error("%s; refusing to start", exc)
        sys.exit(exitcodes.RUNTIME_DIR_BUSY)
    except RuntimeDirError as exc:
        log.error("%s", exc)
        sys.exit(exitcodes.FAILURE)
    if log_level:  # children read the level from the config they are handed
        config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, log_level=log_level))
    code = Supervisor(config, endpoints, source, planner, plans, policy(config, plans)).run()
    os.close(lock_fd)
    sys.exit(code)


main.add_command(service.install_service)
main.add_command(service.uninstall_service)


"""``inferd install-service`` and ``inferd uninstall-service``: inferd as a systemd service, in one step.

The unit is written for the Python environment that runs this command (the
README's ``.venv``, a system-wide install, anything): its ExecStart is this
environment's ``inferd``. The default config goes to ``/etc/inferd/inferd.toml``
unless a config is already there, and a system user is created if missing.

Hardening keeps GPUs usable: the filesystem is read-only but for the runtime
dir (RuntimeDirectory=, the ipc sockets) and the state dir (StateDirectory=,
model files); devices are closed but for the nvidia character devices
(DevicePolicy=closed + DeviceAllow=, never PrivateDevices=, which would hide
them); kernel tunables, modules, logs and control groups are out of reach.
``README.md`` next to this module is the operator's guide the unit's
Documentation= points to.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
GUIDE = HERE / "README.md"
DEFAULT_CONFIG_FILE = HERE / "inferd.toml"
UNIT_DIR = "/etc/systemd/system"
CONFIG_PATH = "/etc/inferd/inferd.toml"
UNIT_NAME = "inferd.service"
USER = "inferd"
STATE_DIR = "/var/lib/inferd"
# PrivateTmp= gives the service its own /tmp and /var/tmp: an environment there is invisible to it.
HIDDEN_FROM_SERVICE = ("/tmp/", "/var/tmp/")

# The nvidia character device groups, as /proc/devices names them (drivers name major 195
# "nvidia-frontend", newer ones "nvidia"); a group the driver does not have is skipped at start.
NVIDIA_DEVICE_GROUPS = ("char-nvidia-frontend", "char-nvidia", "char-nvidiactl", "char-nvidia-uvm",
                        "char-nvidia-caps")

UNIT = """\
# inferd, written by `inferd install-service` for the environment {prefix}.
# Remove it with `{inferd} uninstall-service`. Guide: {guide}
[Unit]
Description=inferd inference-serving daemon
Documentation=file://{guide}
After=network-online.target nvidia-persistenced.service
Wants=network-online.target

[Service]
# READY=1 once every deployment has a ready worker; STATUS= is one line for `systemctl status`.
Type=notify
NotifyAccess=main
User={user}
Group={group}
ExecStart={exec_start} --config {config} --runtime-dir ${{RUNTIME_DIRECTORY}}
# Live reload: validated first (a bad config is refused, `systemctl reload` fails saying why, and
# the old config keeps serving), then only the difference is applied. inferd sends RELOADING=1,
# then READY=1 once applied; `inferctl reload` returns only then (`kill -HUP $MAINPID` would
# return before systemd has seen RELOADING=1, and `systemctl reload` would not wait).
ExecReload={inferctl} --runtime-dir ${{RUNTIME_DIRECTORY}} reload
# /run/inferd, mode 0700: the ipc sockets. inferctl (as root) finds them there by default.
RuntimeDirectory=inferd
RuntimeDirectoryMode=0700
# /var/lib/inferd: model and weights files; the working directory.
StateDirectory=inferd
StateDirectoryMode=0750
WorkingDirectory={state_dir}
# Model loads extend the start timeout (EXTEND_TIMEOUT_USEC) while workers load, up to
# [daemon] start_timeout_s; the base timeout stays short so a wedged start is caught.
TimeoutStartSec=90
# The main loop sends WATCHDOG=1 every WatchdogSec/2: a wedged supervisor is killed and restarted.
WatchdogSec=30
# SIGTERM to the supervisor only: it drains (drain_grace_s), then stops its children itself
# (stop_timeout_s), extending TimeoutStopSec meanwhile (EXTEND_TIMEOUT_USEC). Whatever is left
# after that gets SIGKILL.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=50
Restart=on-failure
RestartSec=2
# 78 = bad configuration: restarting cannot help. (70 = the daemon gave up on children that
# kept failing: a fresh start may help, so it is restarted.)
RestartPreventExitStatus=78
# Hardening that leaves GPUs usable.
ProtectSystem=strict
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictNamespaces=yes
# Devices: only the pseudo devices (/dev/null, ...) and the nvidia ones. Not PrivateDevices=yes,
# which hides /dev/nvidia*. nvidia-uvm must be loaded before the start (modules-load.d), since
# ProtectKernelModules= and NoNewPrivileges= keep nvidia-modprobe from loading it later.
DevicePolicy=closed
{device_allow}

[Install]
WantedBy=multi-user.target
"""


def environment_command(name: str, module: str) -> list[str]:
    """The command that runs ``name`` (inferd, inferctl) from this very environment."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", f"from {module} import main; main()"]


def environment_inferd() -> list[str]:
    return environment_command("inferd", "inferd.daemon")


def render_unit(*, user: str, group: str, config: str) -> str:
    exec_start = environment_inferd()
    return UNIT.format(prefix=sys.prefix, inferd=" ".join(exec_start), inferctl=" ".join(
                       environment_command("inferctl", "inferd.ctl")),
                       guide=GUIDE, user=user, group=group, exec_start=" ".join(exec_start), config=config,
                       state_dir=STATE_DIR,
                       device_allow="\n".join(f"DeviceAllow={g} rw" for g in NVIDIA_DEVICE_GROUPS))


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def _problems_with_environment() -> list[str]:
    places = {"the environment": sys.prefix, "inferd's package": str(HERE.parent)}
    return [f"{what} is under {hidden.rstrip('/')} ({where}), which PrivateTmp= hides from the service; "
            f"install inferd elsewhere (e.g. /opt/inferd/.venv)"
            for what, where in places.items() for hidden in HIDDEN_FROM_SERVICE
            if (where.rstrip("/") + "/").startswith(hidden)]


def _create_user(user: str) -> None:
    subprocess.run(["useradd", "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
                    "--shell", "/usr/sbin/nologin", "--comment", "inferd inference-serving daemon", user],
                   check=True, capture_output=True, text=True)


def _user_can_import(user: str) -> str | None:
    """None when ``user`` can run this environment's inferd; else why not."""
    if shutil.which("runuser") is None or user == "root":
        return None
    out = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import inferd.daemon"],
                         capture_output=True, text=True, cwd="/")
    return None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["?"])[-1]


@click.command("install-service")
@click.option("--user", default=USER, show_default=True, help="The system user the daemon runs as.")
@click.option("--create-user/--no-create-user", default=True, show_default=True,
              help="Create the user (a system user, no login, home /var/lib/inferd) if it does not exist.")
@click.option("--config", "config_path", default=CONFIG_PATH, show_default=True,
              help="The config the unit runs; the default config is put there unless a file is already there.")
@click.option("--unit-dir", default=UNIT_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Where the unit file goes.")
@click.option("--print", "print_only", is_flag=True, help="Print the unit and change nothing.")
def install_service(user: str, create_user: bool, config_path: str, unit_dir: str, print_only: bool) -> None:
    """Install inferd as a systemd service running from this Python environment (run it as root)."""
    unit_path = Path(unit_dir) / UNIT_NAME
    if print_only:
        click.echo(render_unit(user=user, group=user, config=config_path), nl=False)
        return
    problems = _problems_with_environment()
    if os.geteuid() != 0:
        problems.append("run it as root: sudo " + " ".join(environment_inferd()) + " install-service")
    if problems:
        raise click.ClickException("; ".join(problems))
    done = []
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        if not create_user:
            raise click.ClickException(f"no user {user!r}: create it, or drop --no-create-user") from None
        try:
            _create_user(user)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise click.ClickException(f"cannot create the user {user!r}: "
                                       f"{getattr(exc, 'stderr', '') or exc}".strip()) from None
        pw = pwd.getpwnam(user)
        done.append(f"created the system user {user}")
    group = grp.getgrgid(pw.pw_gid).gr_name
    config = Path(config_path)
    if config.exists():
        done.append(f"kept the config already at {config}")
    else:
        config.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT_CONFIG_FILE, config)
        config.chmod(0o644)
        done.append(f"put the default config at {config}")
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(render_unit(user=user, group=group, config=str(config)))
    done.append(f"wrote {unit_path} (ExecStart {' '.join(environment_inferd())})")
    if _systemd_running():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        done.append("ran systemctl daemon-reload")
    for line in done:
        click.echo(line)
    why = _user_can_import(user)
    if why:
        click.echo(f"warning: the user {user} cannot run {sys.prefix}: {why}; make the environment readable "
                   f"by it (every directory up to it o+x, its files o+r) or install it under /opt", err=True)
    click.echo("")
    click.echo("next: systemctl enable --now inferd")
    click.echo("then: systemctl status inferd; journalctl -u inferd -f; sudo inferctl status")
    click.echo(f"config: edit {config}, then `systemctl reload inferd` (a bad config is refused, the old "
               f"one keeps serving)")


@click.command("uninstall-service")
@click.option("--unit-dir", default=UNIT_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Where the unit file is.")
@click.option("--purge", is_flag=True, help="Also remove /etc/inferd and /var/lib/inferd.")
def uninstall_service(unit_dir: str, purge: bool) -> None:
    """Stop and disable the inferd service and remove its unit (run it as root)."""
    if os.geteuid() != 0:
        raise click.ClickException("run it as root: sudo " + " ".join(environment_inferd()) + " uninstall-service")
    unit_path = Path(unit_dir) / UNIT_NAME
    if _systemd_running() and unit_path.exists():
        subprocess.run(["systemctl", "disable", "--now", UNIT_NAME], check=False)
        click.echo("stopped and disabled inferd")
    if unit_path.exists():
        unit_path.unlink()
        click.echo(f"removed {unit_path}")
        if _systemd_running():
            subprocess.run(["systemctl", "daemon-reload"], check=False)
    else:
        click.echo(f"no unit at {unit_path}")
    kept = [Path(CONFIG_PATH).parent, Path(STATE_DIR)]
    if purge:
        for path in kept:
            if path.exists():
                shutil.rmtree(path)
                click.echo(f"removed {path}")
        kept = []
    for path in (p for p in kept if p.exists()):
        click.echo(f"kept {path} (remove it with --purge)")
    try:
        pwd.getpwnam(USER)
        click.echo(f"kept the user {USER} (remove it with `userdel {USER}`)")
    except KeyError:
        pass

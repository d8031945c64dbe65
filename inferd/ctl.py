"""``inferctl``: talk to a running inferd from a shell.

Every command finds the daemon through the runtime dir (``--runtime-dir``, or
$INFERD_RUNTIME_DIR, or the default). When no daemon is running each command
says so in one line and exits 3, never with a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import zmq

from inferd import __version__, curve, errors, exitcodes, protocol as P, runtimes
from inferd.client import Client
from inferd.paths import daemon_alive, default_runtime_dir

EXIT_ERROR = 1
EXIT_NOT_RUNNING = 3
EXIT_CONFIG = exitcodes.CONFIG  # a bad config, as `inferd --check` says it


class BadConfig(Exception):
    """A config refused as `inferd --check` would refuse it: inferctl exits 78."""


class CtlError(Exception):
    """A failure inferctl reports in one line and exits 1 on."""


def control_call(runtime_dir: Path, command: bytes, timeout_s: float, **fields: Any) -> dict[str, Any]:
    socket_path = runtime_dir / "control.sock"
    if not socket_path.exists() or daemon_alive(runtime_dir) is False:
        raise errors.DaemonNotRunning(f"inferd is not running (no live daemon in {runtime_dir})")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{socket_path}")
        sock.send_multipart(P.encode(P.CONTROL, command, {"id": 1, **fields}))
        if not sock.poll(timeout_s * 1000, zmq.POLLIN):
            raise errors.DaemonNotRunning(f"inferd is not responding at {socket_path} (no answer in {timeout_s:g} s)")
        reply, body = P.decode(P.CONTROL, sock.recv_multipart(), frozenset({P.OK, P.ERROR}))
    finally:
        sock.close(0)
    if reply == P.ERROR:
        raise errors.from_wire(str(body.get("code")), str(body.get("message", "")), body.get("details"))
    return body["result"]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


class Ctx:
    def __init__(self, runtime_dir: Path, timeout_s: float, endpoint: str | None = None,
                 server_key: str | None = None, client_key: str | None = None):
        self.runtime_dir = runtime_dir
        self.timeout_s = timeout_s
        self.endpoint = endpoint
        self.server_key = server_key
        self.client_key = client_key

    def client(self) -> Client:
        """A client of the frontend: the runtime dir's, or ``--endpoint`` (with CURVE keys for tcp)."""
        keys = None
        if self.server_key or self.client_key:
            if not (self.server_key and self.client_key):
                raise CtlError("CURVE needs both --server-key and --client-key")
            try:
                keys = curve.ClientKeys.load(self.server_key, self.client_key)
            except curve.CurveKeyError as exc:
                raise CtlError(str(exc)) from None
        return Client(self.endpoint, runtime_dir=self.runtime_dir, answer_timeout_s=self.timeout_s,
                      curve_keys=keys)

    def call(self, command: bytes, **fields: Any) -> dict[str, Any]:
        return control_call(self.runtime_dir, command, self.timeout_s, **fields)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runtime-dir", type=click.Path(file_okay=False), envvar="INFERD_RUNTIME_DIR",
              help="The daemon's runtime dir. Default: $INFERD_RUNTIME_DIR, else /run/inferd for root, "
                   "else $XDG_RUNTIME_DIR/inferd, else /tmp/inferd-$UID.")
@click.option("--timeout", "timeout_s", type=float, default=3.0, show_default=True,
              help="Seconds to wait for the daemon to answer.")
@click.option("--endpoint", envvar="INFERD_ENDPOINT",
              help="The broker's frontend for generate, e.g. tcp://host:5555 (default: the runtime dir's socket).")
@click.option("--server-key", envvar="INFERD_SERVER_KEY",
              help="CURVE: the server's public key (a .key file, or 40 Z85 characters).")
@click.option("--client-key", type=click.Path(dir_okay=False), envvar="INFERD_CLIENT_KEY",
              help="CURVE: this client's .key_secret file (inferctl keys generate).")
@click.version_option(__version__, prog_name="inferctl")
@click.pass_context
def cli(ctx: click.Context, runtime_dir: str | None, timeout_s: float, endpoint: str | None,
        server_key: str | None, client_key: str | None) -> None:
    """Control and query a running inferd."""
    ctx.obj = Ctx(Path(runtime_dir) if runtime_dir else default_runtime_dir(), timeout_s, endpoint,
                  server_key, client_key)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(obj: Ctx, as_json: bool) -> None:
    """The daemon, the broker, each deployment and each worker."""
    st = obj.call(P.STATUS)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    d, b = st["daemon"], st["broker"]
    click.echo(f"inferd {d.get('version', '?')}  pid {d.get('pid', '?')}  up {d.get('uptime_s', '?')} s  "
               f"{d.get('state', '?')}  {'READY' if st['ready'] else 'NOT READY'}")
    click.echo(f"runtime dir {d.get('runtime_dir', obj.runtime_dir)}  config {d.get('config', '?')}")
    click.echo(f"devices: {d.get('devices', 'unknown')}")
    reload_state = d.get("reload") or {}
    if reload_state.get("state") in ("applying", "refused"):  # what a reload is doing, or why it was refused
        click.echo(f"reload {reload_state['generation']}: {reload_state['state']}: {reload_state.get('note', '')}"
                   + (f" (pending: {'; '.join(reload_state['pending'])})" if reload_state.get("pending") else ""))
    click.echo(f"broker pid {b['pid']}  {b['state']}  up {b['uptime_s']} s  "
               f"restarts {d.get('broker_restarts', 0)}")
    gw = d.get("gateway")
    if gw:
        click.echo(f"gateway {gw['url']}  pid {gw['pid'] or '-'}  {gw['state']}  restarts {gw['restarts']}"
                   + (f"  last exit: {gw['last_exit']}" if gw["last_exit"] else ""))
    click.echo("")
    click.echo(_table(["DEPLOYMENT", "RUNTIME", "STATE", "READY", "QUEUED", "IN_FLIGHT"],
                      [[n, v["runtime"], v["state"], f"{v['ready']}/{v['replicas']}", v["queued"], v["in_flight"]]
                       for n, v in st["deployments"].items()]))
    click.echo("")
    click.echo(_table(["WORKER", "DEPLOYMENT", "DEVICES", "PID", "STATE", "RESTARTS", "CREDITS", "IN_FLIGHT",
                       "OOM_RESUMES", "LAST_EXIT"],
                      [[w["id"], w["deployment"], w["device"], w["pid"] or None, _state(w), w["restarts"],
                        w["credits"], w["in_flight"], w["resumes"], w["last_exit"]] for w in st["workers"]]))
    notes = [f"{w['id']}: {w['failure']}" for w in st["workers"] if w.get("failure")]
    notes += [f"{n} degraded: {problem}" for n, v in st["deployments"].items() for problem in v.get("problems", [])]
    notes += [f"runner {w['id']}: " + " ".join(f"{k}={v}" for k, v in sorted(w["runner"].items())
                                               if not isinstance(v, (dict, list)) and k != "problem")
              for w in st["workers"] if w.get("runner")]
    notes += [f"upstream {w['id']}: {u['url']} {u['state']}" + (f" ({u['last_error']})" if u["last_error"] else "")
              for w in st["workers"] for u in w.get("runner", {}).get("upstreams", [])]
    if notes:  # what a worker reported before it went down; each runtime's own load figures
        click.echo("")
        click.echo("\n".join(notes))


def _state(worker: dict[str, Any]) -> str:
    if worker["state"] == "restarting" and worker.get("restart_in_s") is not None:
        return f"restarting in {worker['restart_in_s']:.1f}s"
    return worker["state"]


def _gib(n: int | None) -> str | None:
    return None if n is None else f"{n / 2**30:.1f}"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def devices(obj: Ctx, as_json: bool) -> None:
    """The node's devices: GPUs and MIG instances from NVML, or CPU devices when there is no GPU."""
    st = obj.call(P.STATUS)
    rows = st["devices"]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    click.echo(st["daemon"].get("devices", ""))
    click.echo(_table(
        ["DEVICE", "KIND", "NAME", "UUID", "MEM_TOTAL_GIB", "MEM_FREE_GIB", "CC", "UTIL_%", "LOAD", "WORKERS"],
        [[d["id"], "CPU (no GPU)" if d["kind"] == "cpu" else "GPU", d["name"], d["uuid"], _gib(d["memory_total"]),
          _gib(d["memory_free"]), ".".join(map(str, d["compute_capability"])) if d["compute_capability"] else None,
          d["utilization"], d["load"], ",".join(d["workers"]) or None] for d in rows]))


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Dry run: place this config's replicas on this node's devices, without starting anything.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def placement(obj: Ctx, config_path: str | None, as_json: bool) -> None:
    """Which replica runs on which device, and why."""
    if config_path:
        rows, note = _dry_run(config_path)
    else:
        st = obj.call(P.STATUS)
        rows, note = st["workers"], st["daemon"].get("devices", "")
    rows = [{key: row[key] for key in ("id", "deployment", "node", "device", "placed_by")} for row in rows]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    click.echo(note)
    click.echo(_table(["WORKER", "DEPLOYMENT", "NODE", "DEVICES", "WHY"],
                      [[r["id"], r["deployment"], r["node"], r["device"], r["placed_by"]] for r in rows]))


def _dry_run(config_path: str) -> tuple[list[dict[str, Any]], str]:
    from inferd.config import ConfigError, load
    from inferd.daemon import plan_node
    from inferd.placement import PlacementError

    try:
        source, _, plans = plan_node(load(config_path))
    except (ConfigError, PlacementError) as exc:
        kind = "bad config" if isinstance(exc, ConfigError) else type(exc).__name__
        raise BadConfig(f"{kind}: {exc}") from None
    rows = [{"id": p.id, "deployment": p.deployment, "node": p.node, "device": p.device_ids, "placed_by": p.why}
            for p in plans]
    return rows, source.note


@cli.command()
@click.argument("worker")
@click.pass_obj
def restart(obj: Ctx, worker: str) -> None:
    """Start WORKER again now, with a fresh restart window (a failed worker too)."""
    click.echo(obj.call(P.RESTART, worker=worker)["message"])


@cli.command()
@click.argument("deployment")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until every worker has rebuilt and is ready again.")
@click.option("--wait-timeout", type=float, default=600.0, show_default=True, help="Seconds to wait at most.")
@click.pass_obj
def rebuild(obj: Ctx, deployment: str, wait: bool, wait_timeout: float) -> None:
    """Rebuild the model session of each of DEPLOYMENT's workers.

    Each worker finishes the requests it runs, rebuilds (reloading the model,
    so a new weights file takes effect) and takes requests again. Requests
    that arrive meanwhile wait in the queue; none is lost.
    """
    asked: dict[str, int] = obj.call(P.REBUILD, deployment=deployment)["workers"]
    if not asked:
        raise CtlError(f"no ready worker of {deployment} to rebuild")
    click.echo(f"rebuilding {deployment}: {', '.join(sorted(asked))}")
    if not wait:
        return
    deadline = time.monotonic() + wait_timeout
    while asked:
        time.sleep(0.1)
        rows = {w["id"]: w for w in obj.call(P.STATUS)["workers"]}
        for wid, before in list(asked.items()):
            row = rows.get(wid, {})
            if row.get("state") == "ready" and row.get("rebuilds", 0) > before:
                click.echo(f"{wid}: ready")
                del asked[wid]
            elif row.get("state") in ("failed", "poisoned", "restarting", "stopped"):
                raise CtlError(f"{wid} did not rebuild: {row.get('failure') or row.get('state')}")
        if asked and time.monotonic() > deadline:
            raise CtlError(f"not rebuilt after {wait_timeout:g} s: {', '.join(sorted(asked))}")


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Reload from this file (read by the daemon) instead of the file it runs; later reloads "
                   "read it too.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the reload is applied: new workers ready, old ones drained.")
@click.option("--wait-timeout", type=float, default=600.0, show_default=True, help="Seconds to wait at most.")
@click.pass_obj
def reload(obj: Ctx, config_path: str | None, wait: bool, wait_timeout: float) -> None:
    """Reload the daemon's config, applying only what changed (like SIGHUP or `systemctl reload inferd`).

    The new config is validated and placed first, exactly as `inferd --check` does: a bad one is refused
    (exit 78, with the reason) and the running config keeps serving. Then new deployments start,
    removed ones drain, queue and routing settings change in place, changed runtimes, models and options
    roll the workers one at a time, and replicas scale.
    """
    fields = {"config": str(Path(config_path).absolute())} if config_path else {}
    answer = obj.call(P.RELOAD, **fields)
    click.echo(answer["message"])
    generation = answer.get("generation")
    deadline = time.monotonic() + wait_timeout
    while wait:
        state = obj.call(P.STATUS)["daemon"].get("reload", {})
        if state.get("generation") != generation or state.get("state") != "applying":
            click.echo(f"reload {generation}: done")
            return
        if time.monotonic() > deadline:
            raise CtlError(f"reload {generation} not done after {wait_timeout:g} s; pending: "
                           f"{'; '.join(state.get('pending', [])) or '?'}")
        time.sleep(0.1)


@cli.command()
@click.argument("deployment")
@click.argument("replicas", type=click.IntRange(1, 256))
@click.pass_obj
def scale(obj: Ctx, deployment: str, replicas: int) -> None:
    """Run REPLICAS workers of DEPLOYMENT, starting or draining workers as needed.

    This lasts until the next reload or restart of inferd, which go back to the config file's
    `replicas`: edit the file to make it last.
    """
    click.echo(obj.call(P.SCALE, deployment=deployment, replicas=replicas)["message"])


@cli.command()
@click.argument("target", metavar="WORKER|DEPLOYMENT")
@click.option("--restart", "then", flag_value="restart", help="Start it again once drained.")
@click.option("--stop", "then", flag_value="stop", default=True,
              help="Leave it stopped once drained, until `inferctl restart WORKER` (the default).")
@click.pass_obj
def drain(obj: Ctx, target: str, then: str) -> None:
    """Stop giving WORKER (or each worker of DEPLOYMENT) new requests and let its requests finish.

    Then it stops and stays stopped until `inferctl restart WORKER`, or with --restart it starts again
    at once (a graceful restart). Requests that arrive meanwhile go to the deployment's other workers,
    or wait in its queue.
    """
    click.echo(obj.call(P.DRAIN_WORKERS, target=target, then=then)["message"])


def _ms(dist: dict[str, Any], key: str) -> str:
    return f"{dist[key]:.1f}" if key in dist else "-"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def metrics(obj: Ctx, as_json: bool) -> None:
    """Per-deployment counters and latency distributions (ms)."""
    m = obj.call(P.METRICS)
    if as_json:
        click.echo(json.dumps(m, indent=2, sort_keys=True))
        return
    click.echo(_table(
        ["DEPLOYMENT", "QUEUED", "IN_FLIGHT", "COMPLETED", "FAILED", "BACKPRESSURE", "TIMED_OUT", "CANCELLED"],
        [[n, v["queued"], v["in_flight"], v["completed"], v["failed"], v["rejected_backpressure"],
          v["timed_out"], v["cancelled"]] for n, v in m.items()]))
    click.echo("")
    rows = []
    for name, v in m.items():
        for dist in ("queue_ms", "first_chunk_ms", "inter_chunk_ms", "latency_ms"):
            s = v[dist]
            rows.append([name, dist, s["count"], _ms(s, "p50"), _ms(s, "p90"), _ms(s, "p99"), _ms(s, "max")])
    click.echo(_table(["DEPLOYMENT", "DISTRIBUTION", "COUNT", "P50", "P90", "P99", "MAX"], rows))
    upstream = [[name, wid, u["attempts"], u["retries"], u["failovers"],
                 " ".join(f"{code}:{n}" for code, n in u["status"].items()) or None,
                 " ".join(f"{kind}:{n}" for kind, n in u["errors"].items()) or None,
                 _ms(u["first_token_ms"], "p50"), _ms(u["latency_ms"], "p50")]
                for name, v in m.items() for wid, u in v.get("upstream", {}).items()]
    if upstream:  # remote deployments: what their providers did
        click.echo("")
        click.echo(_table(["DEPLOYMENT", "WORKER", "ATTEMPTS", "RETRIES", "FAILOVERS", "STATUS", "ERRORS",
                           "FIRST_TOKEN_P50", "LATENCY_P50"], upstream))


def _param(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _params_help() -> str:
    """Each runtime's request params, for `generate --help` (test-only ones, such as fault, left out)."""
    lines = []
    for spec in runtimes.SPECS.values():
        public = {k: p for k, p in spec.params.items() if k not in spec.gated}
        lines.append(f"{spec.name}: " + "; ".join(f"{k} ({p.expect})" for k, p in sorted(public.items())))
    return "\n".join(lines)


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give PROMPT or --prompt-file, not both")
    source = prompt_file if prompt_file is not None else prompt if prompt is not None else "-"
    if prompt_file is None and source != "-":
        return source
    if source == "-":
        if sys.stdin.isatty():
            click.echo("inferctl: reading the prompt from stdin (end with Ctrl-D)", err=True)
        return sys.stdin.read()
    try:
        with open(source, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise CtlError(f"cannot read the prompt from {source}: {exc.strerror}") from None


@cli.command(epilog="\b\nRuntime params (-p KEY=VALUE):\n" + _params_help())
@click.argument("deployment")
@click.argument("prompt", required=False)
@click.option("-f", "--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-': stdin).")
@click.option("--priority", type=int, help="0 is the most urgent.")
@click.option("--deadline-ms", type=int, help="Shortens the deployment's default deadline.")
@click.option("--affinity", help="Session key for sticky routing.")
@click.option("--max-tokens", type=int, help="At most this many tokens (echo: words).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="A runtime param; repeatable.")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message, in the model's chat template.")
@click.option("--system", help="With --chat: a system message before PROMPT.")
@click.option("--usage", is_flag=True, help="Print the token counts to stderr at the end.")
@click.pass_obj
def generate(obj: Ctx, deployment: str, prompt: str | None, prompt_file: str | None, priority: int | None,
             deadline_ms: int | None, affinity: str | None, max_tokens: int | None, params: tuple[str, ...],
             chat: bool, system: str | None, usage: bool) -> None:
    """Stream DEPLOYMENT's output for PROMPT to stdout as it arrives.

    PROMPT '-' (or none) reads the prompt from stdin; --prompt-file reads it from a file.
    """
    if system is not None and not chat:
        raise click.BadParameter("needs --chat", param_hint="--system")
    prompt = _read_prompt(prompt, prompt_file)
    extra: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        extra[key] = _param(value)
    if max_tokens is not None:
        extra["max_tokens"] = max_tokens
    with obj.client() as client:
        request: str | list[dict[str, str]] = prompt
        if chat:
            request = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": "user", "content": prompt}]
        stream = client.generate(deployment, request, priority=priority, deadline_ms=deadline_ms,
                                 affinity=affinity, **extra)
        with stream:
            first = True
            for chunk in stream:
                if chunk.text:
                    sys.stdout.write(chunk.text if first else stream.join + chunk.text)
                    sys.stdout.flush()
                    first = False
        sys.stdout.write("\n")
        sys.stdout.flush()
        if usage and stream.usage:
            click.echo(" ".join(f"{k}={v}" for k, v in stream.usage.items()), err=True)


@cli.group()
def keys() -> None:
    """CURVE key pairs for a tcp:// frontend."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="inferd", show_default=True, help="The files are NAME.key and NAME.key_secret.")
def keys_generate(directory: str, name: str) -> None:
    """Write a key pair into DIRECTORY: NAME.key (public) and NAME.key_secret (0600).

    For the server, point broker.curve_secret_key at its .key_secret and give
    clients its .key. For a client, copy its .key into the server's
    broker.curve_allowed_clients directory and use its .key_secret with
    --client-key.
    """
    try:
        public, secret = curve.generate(directory, name)
    except (curve.CurveKeyError, OSError) as exc:
        raise CtlError(str(exc)) from None
    click.echo(f"public key {public}\nsecret key {secret} (keep it private; mode 600)")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("inferctl: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except CtlError as exc:
        click.echo(f"inferctl: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except BadConfig as exc:
        click.echo(f"inferctl: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except errors.DaemonNotRunning as exc:
        click.echo(f"inferctl: {exc.message}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    except errors.InferdError as exc:
        click.echo(f"inferctl: {exc}", err=True)
        sys.exit(EXIT_CONFIG if exc.details.get("bad_config") else EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("\ninferctl: interrupted", err=True)
        sys.exit(130)

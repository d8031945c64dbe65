"""The torch runtime end to end: a real daemon serving the tiny transformer on the CPU.

What the daemon streams is checked against the same model run in this process
(a :class:`TorchRunner` with the deployment's options, one request at a time),
so "deterministic", "batched equals unbatched" and "nothing lost across a
rebuild" are checked token for token, not only for being non-empty.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

import zmq  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from inferd import errors, protocol as P  # noqa: E402
from inferd.client import AsyncClient  # noqa: E402
from inferd.runtimes.base import RunRequest  # noqa: E402
from tests.daemon import Daemon, echo_config, wait_for  # noqa: E402
from tests.e2e.test_inferctl import inferctl  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# A prompt per request, all different, of different lengths.
PROMPTS = [f"{word} number {i}{'!' * (i % 5)}" for i, word in enumerate(
    "Hello world the quick brown fox jumps over lazy dogs while seven small cats sleep soundly".split())]
SMALL_DIMS = ["--layers", "1", "--d-model", "64", "--heads", "2", "--d-ff", "128", "--max-seq-len", "128"]


# --- configs ------------------------------------------------------------------------------------

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def torch_deployment(name: str = "tiny", replicas: int = 1, max_concurrency: int = 8, deployment: str = "",
                     **options: Any) -> str:
    """A [[deployment]] block for the torch runtime (with its own [deployment.options])."""
    # One torch thread: two OpenMP threads per process spin against each other (and against the
    # other tests' processes) on a 2-core machine, several times slower than one.
    options = {"model": "tiny", "seed": 0, "max_batch_size": 8, "max_batch_delay_ms": 2, "cpu_threads": 1,
               **options}
    opts = "\n".join(f"{key} = {_toml(value)}" for key, value in options.items() if value is not None)
    return (f'\n[[deployment]]\nname = "{name}"\nruntime = "torch"\nreplicas = {replicas}\n'
            f"max_concurrency = {max_concurrency}\n{deployment}\n[deployment.options]\n{opts}\n")


def torch_config(*deployments: str) -> str:
    """The tests' fast daemon settings, one echo worker, and the given torch deployments."""
    return echo_config(replicas=1, extra="".join(deployments))


def start(make_daemon, config: str, ready: bool = True, timeout: float = 60) -> Daemon:
    """Torch workers import torch (seconds on a busy 2-core machine): wait longer than the default."""
    daemon = make_daemon(config, start=False)
    daemon.start(wait=False)
    if ready:
        daemon.wait_ready(timeout)
    return daemon


# --- the reference: the same model, in this process -----------------------------------------------

_RUNNERS: dict[tuple[str, int], Any] = {}


def reference(prompt: str, options: dict[str, Any] | None = None, capacity: int = 8, fresh: bool = False,
              **params: Any) -> tuple[str, str]:
    """(text, finish_reason) of ``prompt`` run alone through a TorchRunner with ``options``."""
    import torch

    from inferd.runtimes.torch_runtime import TorchRunner

    torch.set_num_threads(1)
    options = {"model": "tiny", "seed": 0, "max_batch_size": 8, "max_batch_delay_ms": 2, "cpu_threads": 1,
               **(options or {})}
    key = (json.dumps(options, sort_keys=True), capacity)
    runner = None if fresh else _RUNNERS.get(key)
    if runner is None:
        runner = TorchRunner(dict(options), (), capacity)
        runner.load()
        runner.warmup()
        _RUNNERS[key] = runner
    runner.admit(RunRequest(1, prompt, params))
    texts, finish = [], None
    while finish is None:
        for out in runner.step():
            assert out.rid == 1 and out.error is None, out
            texts.append(out.text or "")
            finish = out.finish_reason
    return "".join(texts), finish


# --- talking to the daemon ------------------------------------------------------------------------

def run(client, prompt: str, deployment: str = "tiny", **params: Any) -> tuple[str, str, list]:
    """(text, finish_reason, chunks) of one request."""
    chunks = list(client.generate(deployment, prompt, **params))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks


class Conn:
    """A raw client socket (one per thread), to see every message the broker sends, duplicates included."""

    def __init__(self, daemon: Daemon):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(daemon.frontend)
        self.unread: list[tuple[bytes, dict]] = []

    def close(self) -> None:
        self.sock.close(0)

    def send(self, command: bytes, body: dict[str, Any]) -> None:
        self.sock.send_multipart(P.encode(P.CLIENT, command, body))

    def submit(self, cid: Any, prompt: str, deployment: str = "tiny", **params: Any) -> None:
        self.send(P.SUBMIT, {"id": cid, "deployment": deployment, "prompt": prompt, "params": params})

    def recv(self, timeout: float) -> tuple[bytes, dict] | None:
        """The next reply; a message from the broker holds one or more: [IFDC2, [[command, body], ...]]."""
        if not self.unread:
            if not self.sock.poll(max(0.0, timeout) * 1000, zmq.POLLIN):
                return None
            replies = P.decode_replies(self.sock.recv_multipart())
            self.unread.extend((command.encode(), body) for command, body in replies)
        return self.unread.pop(0)

    def collect(self, ids: list, timeout: float = 60, linger: float = 0.5,
                on_final=lambda cid: None) -> dict[Any, list[tuple[bytes, dict]]]:
        """Every message for ``ids`` until each has a final reply, then ``linger`` s more (for extras)."""
        messages: dict[Any, list[tuple[bytes, dict]]] = defaultdict(list)
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            message = self.recv(0.5)
            if message is None:
                continue
            messages[message[1].get("id")].append(message)
            if message[0] in (P.DONE, P.ERROR) and message[1].get("id") in pending:
                pending.discard(message[1]["id"])
                on_final(message[1]["id"])
        end = time.monotonic() + linger
        while (message := self.recv(end - time.monotonic())) is not None:
            messages[message[1].get("id")].append(message)
        return messages


def stream_text(messages: list[tuple[bytes, dict]]) -> tuple[str, tuple[bytes, dict]]:
    """Check one request's messages (its acceptance first: an ACCEPTED or carried by its first reply;
    chunks indexed 0.., the last one possibly in DONE; exactly one final, last); (text, final)."""
    assert "epoch" in messages[0][1], messages[0]
    finals = [m for m in messages if m[0] in (P.DONE, P.ERROR)]
    assert len(finals) == 1, f"{len(finals)} final replies: {messages}"
    assert messages[-1] is finals[0], f"messages after the final reply: {messages}"
    chunks = [body for command, body in messages if command == P.CHUNK or (command == P.DONE and "text" in body)]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    return "".join(c["text"] for c in chunks), finals[0]


def states(daemon: Daemon) -> dict[str, str] | None:
    """Each worker's state; None while the daemon is not answering yet."""
    try:
        return {w["id"]: w["state"] for w in daemon.status()["workers"]}
    except errors.InferdError:
        return None


def settled_runner(daemon: Daemon, wid: str) -> dict:
    """The worker's runner report once idle and reported (two reads a heartbeat apart agree)."""
    def settled():
        first = daemon.worker(wid)["runner"]
        time.sleep(0.25)
        second = daemon.worker(wid)["runner"]
        return second if first == second and second.get("batch") == 0 and second.get("waiting") == 0 else None

    return wait_for(settled, timeout=10, interval=0.0, what=f"{wid}'s runner report to settle")


# --- one daemon shared by the serving tests (their checks do not disturb each other) --------------

SERVED_OPTIONS = {"seed": 0, "max_batch_size": 8}


@pytest.fixture(scope="module")
def _served():
    daemon = Daemon(torch_config(torch_deployment("tiny", **SERVED_OPTIONS)))
    try:
        daemon.start(wait=False)
        daemon.wait_ready(60)
    except BaseException:
        print(f"--- inferd log ({daemon.runtime_dir}) ---\n{daemon.logs()}")
        daemon.stop()
        raise
    yield daemon
    daemon.stop()


@pytest.fixture
def served(_served, request):
    yield _served
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- inferd log ({_served.runtime_dir}) ---\n{_served.logs()}")


# --- 1. inferctl generate --------------------------------------------------------------------------

def test_inferctl_generate_prints_the_models_text(served):
    out = inferctl(served.runtime_dir, "generate", "tiny", "Hello", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    text = out.stdout.removesuffix("\n")
    assert text.strip(), f"no text: {out.stdout!r}"
    assert (text, "length") == reference("Hello", SERVED_OPTIONS, max_tokens=16)


def test_default_config_serves_tiny(shipped_daemon):
    daemon = shipped_daemon  # the shipped file itself, as an operator runs it (it also serves smol)
    out = inferctl(daemon.runtime_dir, "generate", "tiny", "Hello, world", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    # The shipped options: seed 0, 16 batch slots (max_concurrency 16).
    assert out.stdout == reference("Hello, world", {"seed": 0, "max_batch_size": 16}, capacity=16,
                                   max_tokens=16)[0] + "\n"
    table = inferctl(daemon.runtime_dir, "status")
    assert table.returncode == 0, table.stderr
    lines = [line.split() for line in table.stdout.splitlines()]
    assert ["tiny", "torch", "healthy", "1/1", "0", "0"] in lines
    tiny = [line for line in lines if line[:1] == ["tiny-0"]]
    assert len(tiny) == 1 and tiny[0][1] == "tiny" and tiny[0][4] == "ready" and tiny[0][6] == "16", table.stdout
    assert "READY" in table.stdout.splitlines()[0]
    # The runner's own figures: where it runs, and its batch.
    assert any(line.startswith("runner tiny-0: ") and "device=cpu" in line and "slots=16" in line
               for line in table.stdout.splitlines()), table.stdout


# --- 2. determinism, and batched == unbatched ------------------------------------------------------

MT = 16


def test_greedy_is_deterministic_and_batched_equals_alone(served):
    expected = {p: reference(p, SERVED_OPTIONS, max_tokens=MT) for p in PROMPTS}
    assert len(set(expected.values())) == len(PROMPTS), "the model ignores its prompt: the check would be weak"

    with served.client() as client:
        alone = {p: run(client, p, max_tokens=MT)[:2] for p in PROMPTS}
        assert run(client, PROMPTS[0], max_tokens=MT)[:2] == alone[PROMPTS[0]]  # again: the same
    assert alone == expected

    before = settled_runner(served, "tiny-0")

    async def batch():
        async with AsyncClient(runtime_dir=served.runtime_dir) as client:
            async def one(prompt):
                chunks = [c async for c in client.generate("tiny", prompt, max_tokens=MT)]
                return "".join(c.text for c in chunks), chunks[-1].finish_reason
            return await asyncio.gather(*(one(p) for p in PROMPTS))

    batched = dict(zip(PROMPTS, asyncio.run(batch()), strict=True))
    assert batched == alone
    after = settled_runner(served, "tiny-0")
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens == len(PROMPTS) * MT
    # 16 requests on 8 slots: about 2 x 16 steps when batched; 256 steps if run one by one.
    assert steps <= tokens // 2, f"not batched: {steps} steps for {tokens} tokens"


def test_seeded_sampling_is_reproducible_alone_and_batched(served):
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "max_tokens": MT}
    expected = reference(PROMPTS[3], SERVED_OPTIONS, **sampled)
    greedy = reference(PROMPTS[3], SERVED_OPTIONS, max_tokens=MT)
    assert expected != greedy  # sampling does change the text
    with served.client() as client:
        assert run(client, PROMPTS[3], **sampled)[:2] == expected
        others = [client.generate("tiny", p, max_tokens=MT) for p in PROMPTS[:6]]
        mine = client.generate("tiny", PROMPTS[3], **sampled)
        assert ("".join(c.text for c in mine), mine.finish_reason) == expected
        for stream in others:
            list(stream)
        # A nucleus that keeps one token is greedy, whatever the temperature.
        assert run(client, PROMPTS[3], temperature=5.0, top_p=1e-6, seed=1, max_tokens=MT)[:2] == greedy


# --- 3. streaming order, finish reasons, cancel -----------------------------------------------------

def test_streaming_finish_reasons_and_stop_strings(served):
    prompt = PROMPTS[1]
    with served.client() as client:
        text, finish, chunks = run(client, prompt, max_tokens=40)
        assert finish == "length" and (text, finish) == reference(prompt, SERVED_OPTIONS, max_tokens=40)
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert len(chunks) <= 40

        # A stop string that the greedy text contains: the text ends just before its first occurrence.
        stop = text[20:23]
        cut = text.index(stop)
        stopped, finish, chunks = run(client, prompt, max_tokens=40, stop=stop)
        assert (stopped, finish) == (text[:cut], "stop")
        assert [c.index for c in chunks] == list(range(len(chunks)))
        # A list: the earliest match of any of them wins; a string that never occurs changes nothing.
        stop2 = text[8:10]
        stopped, finish, _ = run(client, prompt, max_tokens=40, stop=["\x00never", stop, stop2])
        assert (stopped, finish) == (text[:min(cut, text.index(stop2))], "stop")
        assert run(client, prompt, max_tokens=40, stop=["\x00never"])[:2] == (text, "length")
        # Stop on the very first token: no text, still one final chunk.
        stopped, finish, chunks = run(client, prompt, max_tokens=40, stop=text[0])
        assert (stopped, finish) == ("", "stop") and chunks[-1].finish_reason == "stop"


def test_cancel_mid_stream_frees_the_slot(served):
    prompt = PROMPTS[2]
    before = settled_runner(served, "tiny-0")
    cancelled_before = served.metrics()["tiny"]["cancelled"]
    with served.client() as client:
        stream = client.generate("tiny", prompt, max_tokens=200)
        firsts = [next(stream) for _ in range(3)]
        assert [c.index for c in firsts] == [0, 1, 2]
        stream.close()
        assert list(stream) == []  # nothing more once closed

    # On a raw socket: after CANCEL, the final reply is CANCELLED and nothing follows it.
    conn = Conn(served)
    try:
        conn.submit(7, prompt, max_tokens=200)
        seen = []
        while sum(1 for c, _ in seen if c == P.CHUNK) < 3:
            message = conn.recv(10)
            assert message is not None, f"no chunks: {seen}"
            seen.append(message)
        conn.send(P.CANCEL, {"id": 7})
        messages = conn.collect([7], timeout=10, linger=0.5)[7]
        text, (command, body) = stream_text(seen + messages)
        assert command == P.ERROR and body["code"] == "CANCELLED", body
        assert len(text) < 100  # stopped early, not run to max_tokens
    finally:
        conn.close()

    wait_for(lambda: served.metrics()["tiny"]["cancelled"] == cancelled_before + 2, what="2 cancellations")
    st = served.status()
    assert st["deployments"]["tiny"]["in_flight"] == 0 and st["deployments"]["tiny"]["queued"] == 0
    row = served.worker("tiny-0")
    assert row["in_flight"] == 0 and row["credits"] == 8
    with served.client() as client:  # the slots serve again
        assert run(client, prompt, max_tokens=8)[:2] == reference(prompt, SERVED_OPTIONS, max_tokens=8)
    after = settled_runner(served, "tiny-0")
    assert after["batch"] == 0  # both slots freed in the runner too
    assert after["tokens"] - before["tokens"] < 2 * 100 + 8  # generation stopped with the cancel


def test_runner_report_shows_the_slot_freed_by_a_cancel(served):
    """The status' runner report follows a cancel at once, not only at the next request's step."""
    settled_runner(served, "tiny-0")
    with served.client() as client:
        stream = client.generate("tiny", PROMPTS[4], max_tokens=200)
        next(stream)
        wait_for(lambda: served.worker("tiny-0")["runner"]["batch"] == 1, what="the report of a batch of 1")
        stream.close()
    wait_for(lambda: served.worker("tiny-0")["in_flight"] == 0, what="the broker to free the slot")
    try:
        # Heartbeats go out every 200 ms with the runner's report: two seconds are plenty.
        wait_for(lambda: served.worker("tiny-0")["runner"]["batch"] == 0, timeout=2,
                 what="the runner report to show the slot free")
    finally:
        with served.client() as client:  # a step refreshes the report, for the tests that follow
            run(client, "Hello", max_tokens=2)


# --- 4. bad params ------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ({"temperature": -1}, "params.temperature: expected a number between 0 (greedy) and 100, got -1"),
    ({"top_p": 2}, "params.top_p: expected a number in (0, 1], got 2"),
    ({"top_p": 0}, "params.top_p: expected a number in (0, 1], got 0"),
    ({"bogus": 1}, "params.bogus: unknown; known: ignore_eos, max_tokens, seed, stop, temperature, top_p"),
    ({"stop": []}, "params.stop: expected a string or a list of 1 to 16 strings"),
    ({"stop": [""]}, "params.stop: expected a string or a list of 1 to 16 strings"),
    ({"max_tokens": 0}, "params.max_tokens: expected an integer between 1 and 1000000"),
    ({"seed": -5}, "params.seed:"),
    ({"fault": "oom"}, "params.fault: unknown; known: ignore_eos, max_tokens, seed, stop, temperature, top_p"),
])
def test_bad_params_are_bad_requests_naming_the_param(served, params, message):
    with served.client() as client:
        with pytest.raises(errors.BadRequest) as info:
            next(client.generate("tiny", "Hello", **params))
        assert info.value.code is errors.ErrorCode.BAD_REQUEST
        assert message in info.value.message
        assert run(client, "Hello", max_tokens=4)[:2] == reference("Hello", SERVED_OPTIONS, max_tokens=4)


def test_prompts_at_the_edge_of_the_context(served):
    with served.client() as client:
        # 256 tokens with the start token: room for exactly one generated token; 255: two.
        for size, room in ((255, 1), (254, 2)):
            prompt = "a" * size
            text, finish, _ = run(client, prompt, max_tokens=10)
            assert (text, finish) == reference(prompt, SERVED_OPTIONS, max_tokens=10) and finish == "length"
            assert len(text.encode()) == room
        with pytest.raises(errors.BadRequest, match="the prompt is 257 tokens; this model's context is 256"):
            list(client.generate("tiny", "a" * 256))
        assert run(client, "Hello", max_tokens=4)[:2] == reference("Hello", SERVED_OPTIONS, max_tokens=4)
    assert served.worker("tiny-0")["restarts"] == 0


# --- 5. weights files -------------------------------------------------------------------------

def write_weights(path: Path, seed: int) -> None:
    """``python -m inferd.models.tiny PATH --seed SEED <small dims>``, the tool itself, run in this process."""
    from inferd.models.tiny import main

    result = CliRunner().invoke(main, [str(path), "--seed", str(seed), *SMALL_DIMS])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    assert f"wrote {path}: tiny model" in result.output


def test_weights_tool_writes_safetensors(tmp_path):
    """The command etc/inferd.toml tells operators to run must work with inferd[torch]'s dependencies."""
    path = tmp_path / "tiny.safetensors"
    write_weights(path, seed=1)
    from inferd.models import weights as weights_io

    tensors, metadata = weights_io.read(path)
    assert metadata["inferd.model"] == "tiny" and "tok.weight" in tensors


def test_weights_files_serve_and_a_bad_one_fails_once(make_daemon, tmp_path):
    st_file, pt_file, bad_file = tmp_path / "w.safetensors", tmp_path / "w.pt", tmp_path / "bad.safetensors"
    write_weights(st_file, seed=1)
    write_weights(pt_file, seed=1)
    bad_file.write_bytes(b"\x93garbage, not a weights file\x00" * 40)
    daemon = start(make_daemon, torch_config(
        torch_deployment("st", weights=str(st_file), seed=None, max_batch_size=4),
        torch_deployment("pt", weights=str(pt_file), seed=None, max_batch_size=4),
        torch_deployment("bad", weights=str(bad_file), seed=None, max_batch_size=4),
    ), ready=False)

    wait_for(lambda: states(daemon) == {"echo-0": "ready", "st-0": "ready", "pt-0": "ready", "bad-0": "failed"},
             timeout=60, what="st-0 and pt-0 ready, bad-0 failed")

    st_opts = {"weights": str(st_file), "seed": 0, "max_batch_size": 4}
    pt_opts = {"weights": str(pt_file), "seed": 0, "max_batch_size": 4}
    prompt = "Weights from a file"
    expected = reference(prompt, st_opts, max_tokens=20)
    assert expected == reference(prompt, pt_opts, max_tokens=20)  # the same seed in both formats
    assert expected != reference(prompt, SERVED_OPTIONS, max_tokens=20)  # and not the seeded default model
    with daemon.client() as client:
        assert run(client, prompt, "st", max_tokens=20)[:2] == expected
        assert run(client, prompt, "pt", max_tokens=20)[:2] == expected
        # The small model's context is 128 tokens, as the file says.
        with pytest.raises(errors.BadRequest, match="context is 128"):
            list(client.generate("st", "x" * 200))

        bad = daemon.worker("bad-0")
        assert bad["restarts"] == 0
        assert bad["failure"] and str(bad_file) in bad["failure"], bad
        assert "unrecoverable" in (bad["last_exit"] or ""), bad
        time.sleep(2.0)  # long enough for several restarts, had there been any
        bad = daemon.worker("bad-0")
        assert (bad["state"], bad["restarts"]) == ("failed", 0), bad
        assert daemon.logs().count("started bad-0") == 1
        st = daemon.status()
        assert st["deployments"]["bad"]["state"] == "failed"
        assert st["deployments"]["st"]["state"] == "healthy" and st["deployments"]["pt"]["state"] == "healthy"
        with pytest.raises(errors.Unavailable, match="no worker left"):
            next(client.generate("bad", prompt))
        # The others keep serving.
        assert run(client, prompt, "st", max_tokens=20)[:2] == expected
        assert run(client, prompt, "pt", max_tokens=20)[:2] == expected
    table = inferctl(daemon.runtime_dir, "status").stdout
    assert f"bad-0: unrecoverable: UnrecoverableError: weights file {bad_file}" in table

    # A new weights file takes effect at a rebuild, without restarting the worker.
    pid = daemon.worker("st-0")["pid"]
    write_weights(st_file, seed=2)
    renewed = reference(prompt, st_opts, fresh=True, max_tokens=20)
    assert renewed != expected
    out = inferctl(daemon.runtime_dir, "rebuild", "st", timeout=60)
    assert out.returncode == 0, out.stderr
    with daemon.client() as client:
        assert run(client, prompt, "st", max_tokens=20)[:2] == renewed
    row = daemon.worker("st-0")
    assert (row["pid"], row["restarts"], row["rebuilds"]) == (pid, 0, 1)

    # A rebuild onto a broken file: inferctl says so, and the worker fails once, like at a start.
    st_file.write_bytes(b"not weights any more")
    out = inferctl(daemon.runtime_dir, "rebuild", "st", timeout=60)
    assert out.returncode == 1, out
    assert f"inferctl: st-0 did not rebuild: unrecoverable: UnrecoverableError: weights file {st_file}" in out.stderr
    row = wait_for(lambda: (w := daemon.worker("st-0"))["state"] == "failed" and w, what="st-0 failed")
    assert row["restarts"] == 0 and str(st_file) in row["failure"], row
    with daemon.client() as client:
        with pytest.raises(errors.Unavailable):
            next(client.generate("st", prompt))
        assert run(client, prompt, "pt", max_tokens=20)[:2] == expected


# --- 6. rebuild under load -----------------------------------------------------------------------

def test_rebuild_under_load_loses_nothing(make_daemon):
    options = {"seed": 0, "max_batch_size": 4}
    daemon = start(make_daemon, torch_config(torch_deployment("tiny", replicas=2, **options)))
    mt, threads, per_thread = 40, 4, 12
    prompts = PROMPTS[:8]
    expected = {p: reference(p, options, max_tokens=mt) for p in prompts}
    pids = {w: daemon.worker(w)["pid"] for w in ("tiny-0", "tiny-1")}

    finals: list[float] = []
    lock = threading.Lock()
    results: dict[int, tuple[dict, dict]] = {}
    failures: list[BaseException] = []

    def on_final(cid):
        with lock:
            finals.append(time.monotonic())

    def client(t: int) -> None:
        conn = Conn(daemon)
        try:
            jobs = {t * 100 + i: prompts[(t * 3 + i) % len(prompts)] for i in range(per_thread)}
            for cid, prompt in jobs.items():
                conn.submit(cid, prompt, max_tokens=mt)
            messages = conn.collect(list(jobs), timeout=120, linger=1.0, on_final=on_final)
            results[t] = (jobs, messages)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            conn.close()

    pool = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    wait_for(lambda: len(finals) >= 4, timeout=60, what="the first requests to finish")
    asked_at = time.monotonic()
    out = inferctl(daemon.runtime_dir, "rebuild", "tiny", timeout=90)
    rebuilt_at = time.monotonic()
    for thread in pool:
        thread.join(150)
    assert not failures, failures
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "rebuilding tiny: tiny-0, tiny-1", out.stdout
    assert sorted(lines[1:]) == ["tiny-0: ready", "tiny-1: ready"], out.stdout

    total = threads * per_thread
    assert len(finals) == total
    # It was a rebuild under load: requests finished before it was asked, and after it was done.
    assert sum(t < asked_at for t in finals) >= 4
    assert sum(t > rebuilt_at for t in finals) >= 1, "the load was over before the rebuild: not under load"
    for jobs, messages in results.values():
        assert set(messages) == set(jobs), f"replies for unknown ids: {set(messages) - set(jobs)}"
        for cid, prompt in jobs.items():
            text, (command, body) = stream_text(messages[cid])
            assert command == P.DONE, f"request {cid}: {body}"
            assert (text, body["finish_reason"]) == expected[prompt], f"request {cid} ({prompt!r})"

    st = daemon.status()
    for wid in ("tiny-0", "tiny-1"):
        row = next(w for w in st["workers"] if w["id"] == wid)
        assert (row["state"], row["rebuilds"], row["restarts"], row["pid"]) == ("ready", 1, 0, pids[wid]), row
    m = daemon.metrics()["tiny"]
    assert (m["completed"], m["failed"], m["cancelled"], m["in_flight"], m["queued"]) == (total, 0, 0, 0, 0)
    assert daemon.logs().count("model session rebuilt") == 2

    out = inferctl(daemon.runtime_dir, "rebuild", "nope")
    assert out.returncode == 1
    assert "inferctl: UNKNOWN_DEPLOYMENT: no deployment 'nope'" in out.stderr
    assert "Traceback" not in out.stderr
    assert [w["rebuilds"] for w in daemon.status()["workers"] if w["deployment"] == "tiny"] == [1, 1]


# --- 7. faults: out of memory resumes, a poisoned context restarts -----------------------------------

FAULTY = {"seed": 0, "max_batch_size": 4, "fault_injection": True}


def test_out_of_memory_fails_the_batch_and_the_worker_carries_on(make_daemon):
    daemon = start(make_daemon, torch_config(torch_deployment("tiny", **FAULTY)))
    pid = daemon.worker("tiny-0")["pid"]
    with daemon.client() as client:
        bystander = client.generate("tiny", "a long one", max_tokens=200)
        next(bystander)
        with pytest.raises(errors.OutOfMemory, match="can't allocate memory") as info:
            list(client.generate("tiny", "Hello", fault="oom"))
        assert info.value.code is errors.ErrorCode.OUT_OF_MEMORY
        with pytest.raises(errors.OutOfMemory):  # it was in the step that ran out: failed with it
            list(bystander)
        assert run(client, "Hello", max_tokens=12)[:2] == reference("Hello", FAULTY, capacity=4, max_tokens=12)
    # A heartbeat sent while the last request still ran reports resumes 1 with a busy slot:
    # wait for one sent after it finished.
    row = wait_for(lambda: (w := daemon.worker("tiny-0"))["resumes"] == 1 and w["runner"]["batch"] == 0 and w,
                   what="the resume and the idle runner reported")
    assert (row["pid"], row["restarts"], row["state"], row["last_exit"]) == (pid, 0, "ready", None)
    workers = [line.split() for line in inferctl(daemon.runtime_dir, "status").stdout.splitlines()
               if line.startswith("tiny-0")]
    assert workers[0][8] == "1", workers  # OOM_RESUMES
    assert "out of memory in a step: failing its 2 request(s) and carrying on" in daemon.logs()


def test_poisoned_context_restarts_the_worker(make_daemon):
    daemon = start(make_daemon, torch_config(torch_deployment("tiny", **FAULTY)))
    pid = daemon.worker("tiny-0")["pid"]
    expected = reference("Hello", FAULTY, capacity=4, max_tokens=12)
    with daemon.client() as client:
        with pytest.raises(errors.ContextPoisoned, match="illegal memory access"):
            list(client.generate("tiny", "Hello", fault="poison"))
        row = wait_for(lambda: (w := daemon.worker("tiny-0"))["state"] == "ready" and w["restarts"] == 1 and w,
                       timeout=60, what="tiny-0 ready after a restart")
        assert row["pid"] != pid and row["last_exit"] == "context poisoned (status 4)" and row["resumes"] == 0
        assert run(client, "Hello", max_tokens=12)[:2] == expected

        # Any other runner error is an unknown failure: the request fails, the worker is restarted.
        with pytest.raises(errors.Internal, match="injected fault: error"):
            list(client.generate("tiny", "Hello", fault="error"))
        row = wait_for(lambda: (w := daemon.worker("tiny-0"))["state"] == "ready" and w["restarts"] == 2 and w,
                       timeout=60, what="tiny-0 ready after a second restart")
        assert row["last_exit"] == "exited with status 1"
        assert run(client, "Hello", max_tokens=12)[:2] == expected
    assert "the device context is poisoned" in daemon.logs()


# --- 8. a user's model factory ---------------------------------------------------------------------

def test_a_user_factory_is_served(make_daemon):
    factory = "tests.e2e.tiny_factory:build"
    options = {"model": factory, "seed": 3, "max_batch_size": 4}
    daemon = start(make_daemon, torch_config(
        torch_deployment("mine", **options),
        torch_deployment("missing", model="tests.e2e.tiny_factory:nope", max_batch_size=4),
    ), ready=False)
    wait_for(lambda: states(daemon) == {"echo-0": "ready", "mine-0": "ready", "missing-0": "failed"}, timeout=60,
             what="mine-0 ready and missing-0 failed")
    expected = reference("Hello", options, capacity=4, max_tokens=20)
    assert expected != reference("Hello", {"seed": 3, "max_batch_size": 4}, capacity=4, max_tokens=20)
    with daemon.client() as client:
        assert run(client, "Hello", "mine", max_tokens=20)[:2] == expected
        # The factory's model, not the built-in one: its context is 64 tokens.
        with pytest.raises(errors.BadRequest, match="this model's context is 64"):
            list(client.generate("mine", "x" * 64))
        with pytest.raises(errors.Unavailable):
            next(client.generate("missing", "Hello"))
    missing = daemon.worker("missing-0")
    assert missing["restarts"] == 0
    assert "cannot import tests.e2e.tiny_factory:nope" in (missing["failure"] or ""), missing
    assert "tests.e2e.tiny_factory:build" in daemon.logs()  # "loading model tests.e2e.tiny_factory:build ..."

import pytest

from tests.daemon import Daemon, echo_config
from tests.fake_upstream import FakeUpstream


@pytest.fixture
def make_daemon(request):
    """Start real daemons; each is stopped (and its logs shown on failure) after the test."""
    started = []

    def make(config_text: str | None = None, start: bool = True, **kwargs) -> Daemon:
        daemon = Daemon(config_text or echo_config(**kwargs))
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    failed = getattr(request.node, "rep_call", None)
    for daemon in started:
        if failed is not None and failed.failed:
            print(f"--- inferd log ({daemon.runtime_dir}) ---\n{daemon.logs()}")
        daemon.stop()


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()


@pytest.fixture
def upstream():
    """A fake OpenAI-compatible upstream (tests/fake_upstream.py), serving from a thread."""
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(arch)``: a tiny random HuggingFace checkpoint directory, written once per
    session by ``inferd.models.hf_tiny`` (offline, with its own trained tokenizer)."""
    pytest.importorskip("transformers")
    from inferd.models import hf_tiny

    root = tmp_path_factory.mktemp("hf")
    built: dict[str, str] = {}

    def make(arch: str = "llama") -> str:
        if arch not in built:
            built[arch] = str(hf_tiny.build(root / arch, arch))
        return built[arch]

    return make


@pytest.fixture(scope="session")
def shipped_daemon():
    """A daemon running the shipped etc/inferd.toml itself, as an operator runs it, started once
    per session (it loads SmolLM2: seconds to a minute), with the runner reports `inferctl status`
    showed for each worker while they loaded."""
    import threading
    import time
    from pathlib import Path

    from inferd import errors

    config = Path(__file__).resolve().parents[1] / "etc" / "inferd.toml"
    daemon = Daemon(config.read_text())
    daemon.config_path = config
    daemon.start(wait=False)
    seen: dict[str, list[dict]] = {}
    loading = threading.Event()

    def watch() -> None:
        while not loading.is_set():
            try:
                for w in daemon.status()["workers"]:
                    if w.get("runner"):
                        seen.setdefault(w["id"], []).append(w["runner"])
            except errors.InferdError:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        try:
            daemon.wait_ready(300)
        except AssertionError:
            print(f"--- inferd log ---\n{daemon.logs()}")
            raise
        finally:
            loading.set()
            watcher.join()
        daemon.seen = seen
        yield daemon
    finally:
        daemon.stop()

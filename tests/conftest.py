import pytest

from tests.daemon import Daemon, echo_config


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

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

"""inferd install-service (inferd.service): what it checks and writes before touching the system."""

from __future__ import annotations

from click.testing import CliRunner

from inferd import service
from inferd.service import install_service


def test_install_service_refuses_an_environment_privatetmp_would_hide(monkeypatch):
    monkeypatch.setattr(service.sys, "prefix", "/tmp/checkout/.venv")
    problems = service._problems_with_environment()
    assert problems and "the environment is under /tmp (/tmp/checkout/.venv), which PrivateTmp= hides" in problems[0]
    monkeypatch.setattr(service.sys, "prefix", "/opt/inferd/.venv")
    assert not [p for p in service._problems_with_environment() if "the environment" in p]


def test_install_service_print_changes_nothing(tmp_path):
    out = CliRunner().invoke(install_service, ["--print", "--unit-dir", str(tmp_path), "--user", "svc"])
    assert out.exit_code == 0 and "\nUser=svc\nGroup=svc\n" in out.output and list(tmp_path.iterdir()) == []

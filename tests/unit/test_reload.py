"""Reload planning (inferd.reload) and worker transitions (inferd.transitions): pure logic."""

from __future__ import annotations

import pytest

from inferd.config import ConfigError, parse
from inferd.reload import plan
from inferd.transitions import KEEP, REMOVE, RESTART, Replace, Retire, Start, Transitions


def config(*deployments: dict, **sections: dict) -> object:
    return parse({**sections, "deployment": list(deployments)}, "<new>")


ECHO = {"name": "echo", "runtime": "echo"}


def test_no_change_is_an_empty_plan():
    p = plan(config(ECHO), config(ECHO))
    assert p.empty and p.summary() == "no change"


def test_every_kind_of_change_is_sorted_into_what_can_be_done_live():
    old = config({**ECHO, "replicas": 2}, {"name": "gone", "runtime": "echo"},
                 {"name": "rolled", "runtime": "echo"}, {"name": "scaled", "runtime": "echo"})
    new = config({**ECHO, "replicas": 2, "queue_capacity": 8, "routing": "sticky", "max_restarts": 9},
                 {"name": "rolled", "runtime": "echo", "options": {"fault_injection": True}, "replicas": 2},
                 {"name": "scaled", "runtime": "echo", "replicas": 3}, {"name": "fresh", "runtime": "echo"},
                 daemon={"log_level": "debug"}, devices={"placement": "round-robin"})
    p = plan(old, new)
    assert p.added == ("fresh",) and p.removed == ("gone",)
    changes = {c.name: c for c in p.changed}
    assert set(changes) == {"echo", "rolled", "scaled"}
    echo = changes["echo"]
    assert echo.broker_keys == ("queue_capacity", "routing") and echo.policy_keys == ("max_restarts",)
    assert not echo.rolls and echo.replicas is None
    assert changes["rolled"].roll_keys == ("options",) and changes["rolled"].replicas == (1, 2)
    assert changes["scaled"].replicas == (1, 3) and not changes["scaled"].rolls
    assert p.sections == {"daemon": ("log_level",), "devices": ("placement",)}
    assert p.summary() == ("start fresh; drain and remove gone; echo: broker settings (queue_capacity, routing), "
                           "restart policy (max_restarts); rolled: roll workers (options), scale 1 -> 2; "
                           "scaled: scale 1 -> 3; [daemon] log_level; [devices] placement")


@pytest.mark.parametrize("key, value", [("runtime", "torch"), ("max_concurrency", 2), ("gpus_per_replica", 2),
                                        ("min_free_bytes", 1), ("placement", "round-robin")])
def test_what_a_worker_is_built_or_placed_from_rolls(key, value):
    change = plan(config(ECHO), config({**ECHO, key: value})).changed[0]
    assert change.roll_keys == (key,) and not change.broker_keys


@pytest.mark.parametrize("key", ["queue_capacity", "priority_levels", "default_deadline_ms", "routing",
                                 "sticky_epsilon", "watchdog_s"])
def test_broker_settings_change_in_place(key):
    value = {"routing": "round-robin", "priority_levels": 5}.get(key, 7)
    change = plan(config(ECHO), config({**ECHO, key: value})).changed[0]
    assert change.broker_keys == (key,) and not change.rolls


@pytest.mark.parametrize("section, key, value", [("daemon", "runtime_dir", "/elsewhere"),
                                                 ("broker", "frontend", "ipc:///elsewhere/frontend.sock"),
                                                 ("broker", "max_message_bytes", 4096),
                                                 ("broker", "heartbeat_interval_ms", 100), ("node", "name", "other"),
                                                 ("node", "egress", False), ("devices", "cpu_devices", 2)])
def test_keys_bound_into_running_processes_are_refused(section, key, value):
    with pytest.raises(ConfigError, match=rf"<new>: {section}\.{key}: cannot change on reload"):
        plan(config(ECHO), config(ECHO, **{section: {key: value}}))


def test_a_gateway_change_is_refused():
    with pytest.raises(ConfigError, match=r"<new>: gateway: cannot change on reload"):
        plan(config(ECHO), config(ECHO, gateway={"port": 8123}))


# --- transitions ------------------------------------------------------------------------------


class Recorder:
    """transitions.Actions that records what it is asked, and names new workers n0, n1, ..."""

    def __init__(self, placeable: bool = True):
        self.log: list[tuple[str, ...]] = []
        self.placeable = placeable
        self.count = 0

    def spawn_new(self, deployment):
        if not self.placeable:
            self.log.append(("spawn", deployment, "unplaceable"))
            return None
        wid = f"n{self.count}"
        self.count += 1
        self.log.append(("spawn", deployment, wid))
        return wid

    def drain(self, worker):
        self.log.append(("drain", worker))

    def stop(self, worker):
        self.log.append(("stop", worker))

    def finish(self, worker, then):
        self.log.append(("finish", worker, then))


def test_a_roll_replaces_one_worker_at_a_time_new_ready_before_old_drains():
    rec = Recorder()
    t = Transitions(rec)
    t.add(Replace(lane="d", deployment="d", old="d-0"))
    t.add(Replace(lane="d", deployment="d", old="d-1"))
    assert rec.log == [("spawn", "d", "n0")]  # the second waits its turn
    t.drained("d-0")                        # not draining yet: ignored
    assert rec.log == [("spawn", "d", "n0")]
    t.ready("n0")
    assert rec.log[-1] == ("drain", "d-0")
    t.drained("d-0")
    assert rec.log[-1] == ("stop", "d-0")
    assert t.busy("d-0") and not t.idle
    t.exited("d-0")
    assert rec.log[-2:] == [("finish", "d-0", REMOVE), ("spawn", "d", "n1")]
    t.ready("n1"), t.drained("d-1"), t.exited("d-1")
    assert rec.log[-3:] == [("drain", "d-1"), ("stop", "d-1"), ("finish", "d-1", REMOVE)]
    assert t.idle


def test_a_new_worker_that_fails_ends_the_roll_and_the_old_ones_stay():
    rec = Recorder()
    t = Transitions(rec)
    t.add(*[Replace(lane="d", deployment="d", old=old) for old in ("d-0", "d-1")])
    t.failed("n0", "exited with status 3")
    assert rec.log == [("spawn", "d", "n0")] and t.idle  # no drain of d-0, nothing more spawned


def test_unplaceable_new_worker_ends_the_roll():
    rec = Recorder(placeable=False)
    t = Transitions(rec)
    t.add(Replace(lane="d", deployment="d", old="d-0"), Replace(lane="d", deployment="d", old="d-1"))
    assert rec.log == [("spawn", "d", "unplaceable")] and t.idle


def test_lanes_run_side_by_side_and_starts_finish_on_ready():
    rec = Recorder()
    t = Transitions(rec)
    t.add(Start(lane="a", deployment="a"))
    t.add(Retire(lane="drain b-0", worker="b-0", then=KEEP))
    t.add(Retire(lane="drain b-1", worker="b-1", then=RESTART))
    assert rec.log == [("spawn", "a", "n0"), ("drain", "b-0"), ("drain", "b-1")]
    t.ready("n0")
    t.drained("b-1"), t.exited("b-1")
    t.drained("b-0"), t.exited("b-0")
    assert rec.log[3:] == [("stop", "b-1"), ("finish", "b-1", RESTART), ("stop", "b-0"), ("finish", "b-0", KEEP)]
    assert t.idle and t.pending() == []


def test_cancel_lane_keeps_only_the_running_op():
    rec = Recorder()
    t = Transitions(rec)
    for _ in range(3):
        t.add(Start(lane="a", deployment="a"))
    t.cancel_lane("a")
    t.ready("n0")
    assert t.idle and rec.log == [("spawn", "a", "n0")]


"""Unit tests for inferd.placement: replicas onto nodes, replicas onto devices, typed errors.

Nodes are built from fake NVML fleets through DeviceSource, so discovery, stats
and placement are exercised together.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest

from inferd import runtimes
from inferd.config import Config, DeploymentConfig, parse
from inferd.devices import DeviceSource, cuda_visible_devices
from inferd.placement import (
    NoEgressNodes,
    NoFittingDevice,
    NoGpuNodes,
    Node,
    NotEnoughGpus,
    Planner,
    PlacementError,
    UnknownRuntime,
    WorkerPlan,
    on_node,
)
from inferd.runtimes import RuntimeSpec
from tests.fakenvml import GiB, FakeGpu, FakeMig, FakeNvml

POLICIES = ("round-robin", "least-loaded")


# --- helpers ----------------------------------------------------------------------------------


def gpus(*specs: tuple[int, tuple[int, int]]) -> list[FakeGpu]:
    """GPUs from (free GiB, compute capability); each has 80 GiB in all."""
    return [FakeGpu(f"GPU {i}", f"GPU-{i}", total=80 * GiB, free=free * GiB, cc=cc)
            for i, (free, cc) in enumerate(specs)]


def uniform(n: int, free: int = 40, cc: tuple[int, int] = (8, 0)) -> list[FakeGpu]:
    return gpus(*[(free, cc)] * n)


def source(fleet: list[FakeGpu] | None, cpu_count: int = 1) -> DeviceSource:
    return DeviceSource(FakeNvml(fleet) if fleet is not None else None, cpu_count, "no NVML in this test")


def node(name: str, src: DeviceSource, egress: bool = True) -> Node:
    return Node(name, tuple(src.devices), egress)


def config(*deployments: dict[str, Any], placement: str | None = None, cpu_devices: int | None = None) -> Config:
    raw: dict[str, Any] = {"deployment": [{"runtime": "echo", **d} for d in deployments]}
    if placement is not None or cpu_devices is not None:
        raw["devices"] = {k: v for k, v in (("placement", placement), ("cpu_devices", cpu_devices)) if v is not None}
    return parse(raw, "<test>")


def layout(plans: list[WorkerPlan]) -> list[tuple[str, str, str]]:
    """(worker id, node, device ids) of each plan: what tests compare exactly."""
    return [(p.id, p.node, p.device_ids) for p in plans]


def error(exc_type: type[PlacementError], planner: Planner, **kw) -> str:
    with pytest.raises(exc_type) as info:
        planner.plan(**kw)
    return str(info.value)


@pytest.fixture
def remote(monkeypatch) -> str:
    """A registered runtime with transport "remote" (a network provider), accepted by config validation."""
    spec = RuntimeSpec(name="remote-llm", runner="tests.nowhere:Runner", transport="remote")
    monkeypatch.setitem(runtimes.SPECS, "remote-llm", spec)
    monkeypatch.setattr(runtimes, "NAMES", runtimes.NAMES + ("remote-llm",))
    return "remote-llm"


# --- round-robin ------------------------------------------------------------------------------


def test_round_robin_cycles_over_devices_across_replicas():
    src = source(uniform(4))
    planner = Planner(config({"name": "chat", "replicas": 6}, placement="round-robin"), [node("n1", src)])
    plans = planner.plan(on_node("n1", src.stats()))
    assert layout(plans) == [
        ("chat-0", "n1", "gpu:0"), ("chat-1", "n1", "gpu:1"), ("chat-2", "n1", "gpu:2"),
        ("chat-3", "n1", "gpu:3"), ("chat-4", "n1", "gpu:0"), ("chat-5", "n1", "gpu:1"),
    ]
    assert {p.why for p in plans} == {"round-robin over 4 fitting device(s)"}


def test_round_robin_cursor_continues_across_deployments():
    # RoundRobinDevices: "Each replica on the next device(s) in order, continuing across deployments."
    src = source(uniform(3))
    cfg = config({"name": "a", "replicas": 2}, {"name": "b", "replicas": 2}, placement="round-robin")
    plans = Planner(cfg, [node("n1", src)]).plan()
    assert layout(plans) == [
        ("a-0", "n1", "gpu:0"), ("a-1", "n1", "gpu:1"),
        ("b-0", "n1", "gpu:2"), ("b-1", "n1", "gpu:0"),
    ]


def test_round_robin_cursor_persists_for_a_replica_placed_again():
    src = source(uniform(3))
    cfg = config({"name": "chat", "replicas": 2}, placement="round-robin")
    planner = Planner(cfg, [node("n1", src)])
    assert layout(planner.plan()) == [("chat-0", "n1", "gpu:0"), ("chat-1", "n1", "gpu:1")]
    again = planner.place(cfg.deployment("chat"), 0, on_node("n1", src.stats()), {}, Counter())  # chat-0 restarts
    assert (again.id, again.node, again.device_ids) == ("chat-0", "n1", "gpu:2")


def test_deployment_policy_overrides_the_global_default():
    src = source(uniform(3))
    load = {"gpu:0": 5, "gpu:1": 0, "gpu:2": 3}
    cfg = config({"name": "ll", "replicas": 1, "placement": "least-loaded"},
                 {"name": "rr", "replicas": 2},
                 placement="round-robin")
    planner = Planner(cfg, [node("n1", src)])
    plans = planner.plan(load=on_node("n1", load))
    # ll ignores the global round-robin: the lowest load; rr follows the global default and ignores load.
    assert layout(plans) == [("ll-0", "n1", "gpu:1"), ("rr-0", "n1", "gpu:0"), ("rr-1", "n1", "gpu:1")]
    assert planner.policy(cfg.deployment("ll")).name == "least-loaded"
    assert planner.policy(cfg.deployment("rr")).name == "round-robin"
    assert plans[0].why.startswith("least-loaded: ")
    assert plans[1].why == "round-robin over 3 fitting device(s)"


def test_round_robin_deployment_under_a_least_loaded_default():
    src = source(uniform(3))
    load = {"gpu:0": 5, "gpu:1": 0, "gpu:2": 3}
    cfg = config({"name": "rr", "replicas": 2, "placement": "round-robin"}, {"name": "ll", "replicas": 1})
    assert cfg.devices.placement == "least-loaded"  # the global default
    planner = Planner(cfg, [node("n1", src)])
    assert layout(planner.plan(load=on_node("n1", load))) == [
        ("rr-0", "n1", "gpu:0"), ("rr-1", "n1", "gpu:1"),
        ("ll-0", "n1", "gpu:1"),  # load 0 beats gpu:2's load 3 although gpu:1 already holds rr-1
    ]


# --- least-loaded -----------------------------------------------------------------------------


def test_least_loaded_spreads_replicas_when_loads_are_equal():
    src = source(uniform(3))
    plans = Planner(config({"name": "chat", "replicas": 5}), [node("n1", src)]).plan(on_node("n1", src.stats()))
    assert layout(plans) == [
        ("chat-0", "n1", "gpu:0"), ("chat-1", "n1", "gpu:1"), ("chat-2", "n1", "gpu:2"),
        ("chat-3", "n1", "gpu:0"), ("chat-4", "n1", "gpu:1"),
    ]
    assert plans[0].why == ("least-loaded: gpu:0 load 0 replicas 0, gpu:1 load 0 replicas 0, "
                            "gpu:2 load 0 replicas 0")
    assert plans[3].why == ("least-loaded: gpu:0 load 0 replicas 1, gpu:1 load 0 replicas 1, "
                            "gpu:2 load 0 replicas 1")


def test_least_loaded_counts_replicas_of_other_deployments():
    src = source(uniform(2))
    plans = Planner(config({"name": "a"}, {"name": "b"}), [node("n1", src)]).plan()
    assert layout(plans) == [("a-0", "n1", "gpu:0"), ("b-0", "n1", "gpu:1")]


def test_least_loaded_follows_the_load():
    src = source(uniform(4))
    load = {"gpu:0": 4, "gpu:1": 1, "gpu:2": 0.5, "gpu:3": 2}
    plans = Planner(config({"name": "chat"}), [node("n1", src)]).plan(load=on_node("n1", load))
    assert layout(plans) == [("chat-0", "n1", "gpu:2")]
    assert plans[0].why == ("least-loaded: gpu:2 load 0.5 replicas 0, gpu:1 load 1 replicas 0, "
                            "gpu:3 load 2 replicas 0, gpu:0 load 4 replicas 0")


def test_least_loaded_scores_load_plus_replicas_and_breaks_ties_by_replicas():
    src = source(uniform(3))
    cfg = config({"name": "chat"})
    planner = Planner(cfg, [node("n1", src)])
    placed = Counter(on_node("n1", {"gpu:0": 3, "gpu:1": 1}))
    # Scores: gpu:0 1+3, gpu:1 1+1, gpu:2 2+0; gpu:1 and gpu:2 tie, gpu:2 holds fewer replicas.
    plan = planner.place(cfg.deployment("chat"), 0, {}, on_node("n1", {"gpu:0": 1, "gpu:1": 1, "gpu:2": 2}), placed)
    assert plan.device_ids == "gpu:2"
    plan = planner.place(cfg.deployment("chat"), 0, {}, on_node("n1", {"gpu:0": 1, "gpu:1": 0, "gpu:2": 2}), placed)
    assert plan.device_ids == "gpu:1"


def test_least_loaded_follows_load_changes():
    src = source(uniform(2))
    cfg = config({"name": "chat"})
    planner = Planner(cfg, [node("n1", src)])
    dep = cfg.deployment("chat")
    assert planner.place(dep, 0, on_node("n1", src.stats()), on_node("n1", {"gpu:0": 0, "gpu:1": 3}), Counter()).device_ids == "gpu:0"
    assert planner.place(dep, 0, on_node("n1", src.stats()), on_node("n1", {"gpu:0": 5, "gpu:1": 3}), Counter()).device_ids == "gpu:1"


def test_stats_updates_change_the_choice():
    nvml = FakeNvml(gpus((20, (8, 0)), (5, (8, 0))))
    src = DeviceSource(nvml, 1)
    cfg = config({"name": "chat", "min_free_bytes": 10 * GiB})
    planner = Planner(cfg, [node("n1", src)])
    assert layout(planner.plan(on_node("n1", src.stats()))) == [("chat-0", "n1", "gpu:0")]
    nvml.gpus[0].free = 2 * GiB     # another process took gpu:0's memory
    nvml.gpus[1].free = 30 * GiB    # and gpu:1's was freed
    assert layout(planner.plan(on_node("n1", src.stats()))) == [("chat-0", "n1", "gpu:1")]


# --- filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_min_free_bytes_uses_free_memory_from_stats(policy):
    src = source(gpus((4, (8, 0)), (12, (8, 0)), (20, (8, 0))))
    cfg = config({"name": "chat", "replicas": 3, "min_free_bytes": 10 * GiB}, placement=policy)
    plans = Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))
    assert layout(plans) == [("chat-0", "n1", "gpu:1"), ("chat-1", "n1", "gpu:2"), ("chat-2", "n1", "gpu:1")]


def test_min_free_bytes_is_inclusive():
    src = source(gpus((10, (8, 0)), (9, (8, 0))))
    cfg = config({"name": "chat", "min_free_bytes": 10 * GiB})
    assert layout(Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))) == [("chat-0", "n1", "gpu:0")]


def test_unknown_free_memory_does_not_pass():
    src = source(uniform(2, free=40))
    cfg = config({"name": "chat", "min_free_bytes": GiB})
    message = error(NoFittingDevice, Planner(cfg, [node("n1", src)]))  # no stats at all
    assert message == ("deployment 'chat' needs 1 device(s) with at least 1.0 GiB free on one node; node n1, 0 fit: "
                       "gpu:0 (unknown free, compute capability 8.0), gpu:1 (unknown free, compute capability 8.0)")


def test_a_device_whose_free_memory_is_unknown_is_skipped():
    nvml = FakeNvml(uniform(2, free=40))
    src = DeviceSource(nvml, 1)
    nvml.fail_on = "nvmlDeviceGetMemoryInfo"
    stats = src.stats()
    nvml.fail_on = None
    stats = {**stats, "gpu:1": src.stats()["gpu:1"]}  # gpu:0's free memory is unknown
    cfg = config({"name": "chat", "replicas": 2, "min_free_bytes": GiB})
    assert layout(Planner(cfg, [node("n1", src)]).plan(on_node("n1", stats))) == [("chat-0", "n1", "gpu:1"),
                                                                   ("chat-1", "n1", "gpu:1")]


def test_min_free_bytes_zero_needs_no_stats():
    src = source(uniform(1))
    assert layout(Planner(config({"name": "chat"}), [node("n1", src)]).plan()) == [("chat-0", "n1", "gpu:0")]


@pytest.mark.parametrize("policy", POLICIES)
def test_min_compute_cap_excludes_older_devices(policy):
    src = source(gpus((40, (7, 5)), (40, (8, 0)), (40, (8, 6)), (40, (7, 0))))
    cfg = config({"name": "chat", "replicas": 3, "min_compute_cap": "8.0"}, placement=policy)
    plans = Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))
    assert layout(plans) == [("chat-0", "n1", "gpu:1"), ("chat-1", "n1", "gpu:2"), ("chat-2", "n1", "gpu:1")]


def test_min_compute_cap_compares_major_then_minor():
    src = source(gpus((40, (8, 0)), (40, (8, 6)), (40, (9, 0)), (40, (10, 0))))
    cfg = config({"name": "chat", "replicas": 3, "min_compute_cap": "8.6"}, placement="round-robin")
    assert layout(Planner(cfg, [node("n1", src)]).plan()) == [
        ("chat-0", "n1", "gpu:1"), ("chat-1", "n1", "gpu:2"), ("chat-2", "n1", "gpu:3")]


def test_cpu_devices_never_pass_min_compute_cap():
    src = source(None, cpu_count=2)
    cfg = config({"name": "chat", "min_compute_cap": "1.0"})
    message = error(NoFittingDevice, Planner(cfg, [node("n1", src)]), stats=on_node("n1", src.stats()))
    assert message.startswith("deployment 'chat' needs 1 device(s) with compute capability >= 1.0 on one node; "
                              "node n1, 0 fit: cpu:0 (")
    assert "cpu:0 (" in message and "cpu:1 (" in message
    assert message.count("compute capability none") == 2


def test_min_free_bytes_and_min_compute_cap_together():
    src = source(gpus((4, (9, 0)), (40, (7, 5)), (20, (8, 0)), (30, (8, 6))))
    cfg = config({"name": "chat", "replicas": 3, "min_free_bytes": 10 * GiB, "min_compute_cap": "8.0"},
                 placement="round-robin")
    plans = Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))
    assert layout(plans) == [("chat-0", "n1", "gpu:2"), ("chat-1", "n1", "gpu:3"), ("chat-2", "n1", "gpu:2")]
    assert plans[0].why == "round-robin over 2 fitting device(s)"


def test_no_fitting_device_names_the_constraints_and_what_each_device_has():
    src = source(gpus((4, (8, 0)), (20, (7, 5))))
    cfg = config({"name": "big", "min_free_bytes": 10 * GiB, "min_compute_cap": "8.0"})
    message = error(NoFittingDevice, Planner(cfg, [node("n1", src)]), stats=on_node("n1", src.stats()))
    assert message == ("deployment 'big' needs 1 device(s) with at least 10.0 GiB free and compute capability "
                       ">= 8.0 on one node; node n1, 0 fit: gpu:0 (4.0 GiB free, compute capability 8.0), "
                       "gpu:1 (20.0 GiB free, compute capability 7.5)")


def test_no_fitting_device_when_fewer_fit_than_a_replica_needs():
    src = source(gpus((40, (8, 0)), (40, (7, 5)), (40, (7, 5))))
    cfg = config({"name": "pair", "gpus_per_replica": 2, "min_compute_cap": "8.0"})
    message = error(NoFittingDevice, Planner(cfg, [node("n1", src)]), stats=on_node("n1", src.stats()))
    assert message == ("deployment 'pair' needs 2 device(s) with compute capability >= 8.0 on one node; node n1, 1 fit: "
                       "gpu:0 (40.0 GiB free, compute capability 8.0), gpu:1 (40.0 GiB free, compute capability "
                       "7.5), gpu:2 (40.0 GiB free, compute capability 7.5)")


def test_filters_apply_to_mig_instances():
    mig = FakeGpu("A100", "GPU-m", total=80 * GiB, free=80 * GiB, cc=(8, 0), mig=[
        FakeMig("MIG-0", 40 * GiB, 38 * GiB), FakeMig("MIG-1", 20 * GiB, 19 * GiB), FakeMig("MIG-2", 10 * GiB, 9 * GiB)])
    src = source([mig])
    cfg = config({"name": "chat", "replicas": 2, "min_free_bytes": 15 * GiB})
    plans = Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))
    assert layout(plans) == [("chat-0", "n1", "gpu:0/mig:0"), ("chat-1", "n1", "gpu:0/mig:1")]
    assert [cuda_visible_devices(list(p.devices)) for p in plans] == ["MIG-0", "MIG-1"]


# --- several devices per replica --------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_two_gpus_per_replica_get_disjoint_pairs(policy):
    src = source(uniform(4))
    cfg = config({"name": "tp2", "replicas": 2, "gpus_per_replica": 2}, placement=policy)
    plans = Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))
    assert layout(plans) == [("tp2-0", "n1", "gpu:0,gpu:1"), ("tp2-1", "n1", "gpu:2,gpu:3")]
    assert [cuda_visible_devices(list(p.devices)) for p in plans] == ["GPU-0,GPU-1", "GPU-2,GPU-3"]


def test_more_gpus_per_replica_than_any_node_has():
    src = source(uniform(4))
    cfg = config({"name": "wide", "gpus_per_replica": 5})
    message = error(NotEnoughGpus, Planner(cfg, [node("n1", src)]), stats=on_node("n1", src.stats()))
    assert message == "deployment 'wide' needs 5 device(s) per replica; the largest node, n1, has 4"


def test_not_enough_gpus_names_the_largest_of_several_nodes():
    cfg = config({"name": "wide", "gpus_per_replica": 4})
    nodes = [node("small", source(uniform(1))), node("big", source(uniform(3))), Node("empty", ())]
    message = error(NotEnoughGpus, Planner(cfg, nodes))
    assert message == "deployment 'wide' needs 4 device(s) per replica; the largest node, big, has 3"


# --- node-level errors and remote runtimes ----------------------------------------------------


def test_no_nodes_with_devices():
    cfg = config({"name": "chat"})
    message = error(NoGpuNodes, Planner(cfg, [Node("a", ()), Node("b", ())]))
    assert message == "deployment 'chat' (echo) needs a node with devices; nodes: a, b, none with a device"


def test_no_nodes_at_all():
    message = error(NoGpuNodes, Planner(config({"name": "chat"}), []))
    assert message == "deployment 'chat' (echo) needs a node with devices; nodes: none, none with a device"


def test_remote_runtime_without_egress_nodes(remote):
    cfg = config({"name": "chat", "runtime": remote})
    nodes = [node("a", source(uniform(2)), egress=False), Node("b", (), egress=False)]
    message = error(NoEgressNodes, Planner(cfg, nodes))
    assert message == ("deployment 'chat' (remote-llm, remote) needs a node with network egress; "
                       "nodes: a, b, none with egress")


def test_remote_runtime_goes_to_egress_nodes_without_devices(remote):
    cfg = config({"name": "chat", "runtime": remote, "replicas": 3})
    nodes = [node("gpu-box", source(uniform(2)), egress=False), Node("edge-1", ()), Node("edge-2", ())]
    plans = Planner(cfg, nodes).plan()
    assert layout(plans) == [("chat-0", "edge-1", "-"), ("chat-1", "edge-2", "-"), ("chat-2", "edge-1", "-")]
    assert [p.devices for p in plans] == [(), (), ()]
    assert plans[0].why == "remote runtime: node edge-1 (egress)"


def test_local_and_remote_deployments_together(remote):
    src = source(uniform(1))
    cfg = config({"name": "local", "replicas": 2}, {"name": "cloud", "runtime": remote})
    nodes = [node("gpu-box", src, egress=False), Node("edge", ())]
    assert layout(Planner(cfg, nodes).plan()) == [
        ("local-0", "gpu-box", "gpu:0"), ("local-1", "gpu-box", "gpu:0"), ("cloud-0", "edge", "-")]


def test_remote_config_built_directly(monkeypatch):
    monkeypatch.setitem(runtimes.SPECS, "api", RuntimeSpec(name="api", runner="x:Y", transport="remote"))
    base = config({"name": "chat"})
    cfg = dataclasses.replace(base, deployments=(DeploymentConfig(name="api", runtime="api", replicas=2),))
    plans = Planner(cfg, [Node("edge", ())]).plan()
    assert layout(plans) == [("api-0", "edge", "-"), ("api-1", "edge", "-")]


def test_unknown_runtime():
    base = config({"name": "chat"})
    cfg = dataclasses.replace(base, deployments=(DeploymentConfig(name="ghost", runtime="nope"),))
    message = error(UnknownRuntime, Planner(cfg, [node("n1", source(uniform(1)))]))
    assert message == "deployment 'ghost': unknown runtime 'nope'; known: echo, torch, remote"


def test_plan_raises_the_first_error_and_errors_are_placement_errors():
    cfg = config({"name": "ok"}, {"name": "wide", "gpus_per_replica": 2}, {"name": "big", "min_compute_cap": "99"})
    with pytest.raises(PlacementError) as info:
        Planner(cfg, [node("n1", source(uniform(1)))]).plan()
    assert type(info.value) is NotEnoughGpus
    assert "'wide'" in str(info.value)


# --- several nodes ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_replicas_spread_across_nodes(policy):
    cfg = config({"name": "chat", "replicas": 4}, placement=policy)
    nodes = [node("node-a", source(uniform(2))), node("node-b", source(uniform(2)))]
    plans = Planner(cfg, nodes).plan()
    assert [(p.id, p.node) for p in plans] == [
        ("chat-0", "node-a"), ("chat-1", "node-b"), ("chat-2", "node-a"), ("chat-3", "node-b")]


@pytest.mark.parametrize("policy", POLICIES)
def test_replicas_spread_across_the_devices_of_each_node(policy):
    # Four replicas, two nodes of two GPUs each: every GPU should get one replica.
    cfg = config({"name": "chat", "replicas": 4}, placement=policy)
    nodes = [node("node-a", source(uniform(2))), node("node-b", source(uniform(2)))]
    plans = Planner(cfg, nodes).plan()
    assert layout(plans) == [
        ("chat-0", "node-a", "gpu:0"), ("chat-1", "node-b", "gpu:0"),
        ("chat-2", "node-a", "gpu:1"), ("chat-3", "node-b", "gpu:1"),
    ]


def test_nodes_without_devices_or_too_small_are_skipped():
    cfg = config({"name": "tp2", "replicas": 2, "gpus_per_replica": 2})
    nodes = [Node("empty", ()), node("small", source(uniform(1))), node("big", source(uniform(4)))]
    assert layout(Planner(cfg, nodes).plan()) == [("tp2-0", "big", "gpu:0,gpu:1"), ("tp2-1", "big", "gpu:2,gpu:3")]


def test_node_choice_respects_device_constraints():
    # node-a's only GPU is too old; node-b's fits: both replicas belong on node-b.
    cfg = config({"name": "chat", "replicas": 2, "min_compute_cap": "8.0"})
    nodes = [node("node-a", source(gpus((40, (7, 5))))), node("node-b", source(gpus((40, (8, 0)), (40, (8, 0)))))]
    plans = Planner(cfg, nodes).plan()
    assert layout(plans) == [("chat-0", "node-b", "gpu:0"), ("chat-1", "node-b", "gpu:1")]


# --- CPU fallback -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_cpu_devices_share_replicas(policy):
    src = source(None, cpu_count=2)
    cfg = config({"name": "chat", "replicas": 4}, placement=policy, cpu_devices=2)
    plans = Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))
    assert layout(plans) == [
        ("chat-0", "n1", "cpu:0"), ("chat-1", "n1", "cpu:1"), ("chat-2", "n1", "cpu:0"), ("chat-3", "n1", "cpu:1")]
    assert Counter(p.device_ids for p in plans) == {"cpu:0": 2, "cpu:1": 2}
    assert {cuda_visible_devices(list(p.devices)) for p in plans} == {""}


def test_cpu_devices_pass_min_free_bytes_with_host_memory():
    src = source(None, cpu_count=1)
    cfg = config({"name": "chat", "min_free_bytes": 1})
    assert layout(Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))) == [("chat-0", "n1", "cpu:0")]


# --- worker plans -----------------------------------------------------------------------------


def test_worker_plans():
    src = source(uniform(2))
    cfg = config({"name": "chat", "replicas": 2}, {"name": "embed.v2", "replicas": 1, "gpus_per_replica": 2})
    plans = Planner(cfg, [node("n1", src)]).plan(on_node("n1", src.stats()))
    assert [(p.id, p.deployment, p.replica) for p in plans] == [
        ("chat-0", "chat", 0), ("chat-1", "chat", 1), ("embed.v2-0", "embed.v2", 0)]
    assert [p.device_ids for p in plans] == ["gpu:0", "gpu:1", "gpu:0,gpu:1"]
    assert all(p.why for p in plans)
    assert plans[2].devices == tuple(src.devices)
    assert WorkerPlan("x-0", "x", 0, "n", (), "remote").device_ids == "-"

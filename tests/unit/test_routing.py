"""Unit tests for inferd.routing (least-loaded, round-robin, sticky) and inferd.hashring.

Policies get the deployment's whole ready pool; a tiny dataclass with the attributes the broker's
WorkerRecord offers (id, outstanding, free, dispatch_seq) stands in for it. Simulations "dispatch"
as the broker does: the chosen worker's outstanding goes up and its dispatch_seq takes the next number.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from inferd.hashring import HashRing, stable_hash
from inferd.routing import POLICIES, LeastLoaded, RoundRobin, Sticky


@dataclass(eq=False)
class W:
    id: str
    outstanding: int = 0
    credits: int = 1_000_000
    dispatch_seq: int = 0

    @property
    def free(self) -> int:
        return self.credits - self.outstanding


def pool_of(n: int, **kw) -> list[W]:
    return [W(f"w{i:02d}", **kw) for i in range(n)]


def sticky_with(pool: list[W], epsilon: float = 0.25) -> Sticky:
    policy = Sticky(epsilon=epsilon)
    for w in pool:
        policy.join(w.id)
    return policy


class Dispatcher:
    """The broker's side of a dispatch: one more outstanding request, the next dispatch number."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, w: W, stays: bool = True) -> W:
        self.seq += 1
        w.dispatch_seq = self.seq
        if stays:
            w.outstanding += 1
        return w


KEYS = [f"session-{i}" for i in range(10_000)]


def owners(policy, pool, keys=KEYS) -> dict[str, str]:
    """Where each key goes with every worker idle: its owner on the ring."""
    return {k: policy.choose(pool, k).id for k in keys}


def zipf_requests(n_keys: int, s: float, count: int, seed: int) -> list[str]:
    weights = [1 / (rank + 1) ** s for rank in range(n_keys)]
    return random.Random(seed).choices([f"session-{i}" for i in range(n_keys)], weights=weights, k=count)


# --- every policy -----------------------------------------------------------------------------


def test_policies_registry():
    assert POLICIES == {"least-loaded": LeastLoaded, "round-robin": RoundRobin, "sticky": Sticky}
    assert all(name == cls.name for name, cls in POLICIES.items())


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("affinity", [None, "session-7"])
def test_every_policy_returns_a_free_worker_or_none(name, affinity):
    rng = random.Random(11)
    for _ in range(500):
        pool = [W(f"w{i}", outstanding=rng.randrange(4), credits=rng.randrange(5), dispatch_seq=rng.randrange(50))
                for i in range(rng.randrange(0, 7))]
        policy = POLICIES[name]()
        for w in pool[: len(pool) // 2 + 1]:  # only some of them on sticky's ring
            policy.join(w.id)
        chosen = policy.choose(pool, affinity)
        if any(w.free > 0 for w in pool):
            assert chosen is not None and chosen.free > 0 and any(chosen is w for w in pool)
        else:
            assert chosen is None


# --- least-loaded -----------------------------------------------------------------------------


def test_least_loaded_picks_fewest_outstanding():
    pool = [W("a", outstanding=3), W("b", outstanding=1), W("c", outstanding=2), W("d", outstanding=5)]
    assert LeastLoaded().choose(pool, None).id == "b"
    assert LeastLoaded().choose(list(reversed(pool)), "key is ignored").id == "b"


def test_least_loaded_tie_goes_to_least_recently_dispatched():
    pool = [W("a", outstanding=1, dispatch_seq=9), W("b", outstanding=1, dispatch_seq=4),
            W("c", outstanding=1, dispatch_seq=7), W("d", outstanding=2, dispatch_seq=1)]
    assert LeastLoaded().choose(pool, None).id == "b"


def test_least_loaded_idle_pool_rotates_evenly():
    pool = pool_of(4)
    policy, dispatch = LeastLoaded(), Dispatcher()
    picks = [dispatch(policy.choose(pool, None), stays=False).id for _ in range(400)]  # each finishes at once
    assert Counter(picks) == {w.id: 100 for w in pool}
    assert picks[:8] == ["w00", "w01", "w02", "w03"] * 2  # a strict rotation


def test_least_loaded_fills_evenly_when_requests_stay():
    pool = pool_of(4)
    policy, dispatch = LeastLoaded(), Dispatcher()
    for step in range(1, 401):
        dispatch(policy.choose(pool, None))
        loads = [w.outstanding for w in pool]
        assert max(loads) - min(loads) <= 1, (step, loads)


def test_least_loaded_never_picks_a_full_worker():
    pool = [W("idle-but-full", outstanding=0, credits=0), W("busy", outstanding=3, credits=4),
            W("full", outstanding=4, credits=4)]
    assert LeastLoaded().choose(pool, None).id == "busy"


def test_least_loaded_none_without_a_free_credit():
    assert LeastLoaded().choose([W("a", outstanding=2, credits=2), W("b", credits=0)], None) is None
    assert LeastLoaded().choose([], None) is None


# --- round-robin ------------------------------------------------------------------------------


def test_round_robin_exact_order_by_worker_id():
    # The broker hands policies its ready pool sorted by worker id (rebuilt on membership changes).
    pool = sorted([W("w2"), W("w0"), W("w1")], key=lambda w: w.id)
    policy = RoundRobin()
    assert [policy.choose(pool, None).id for _ in range(7)] == ["w0", "w1", "w2", "w0", "w1", "w2", "w0"]


def test_round_robin_ignores_load():
    pool = [W("w0", outstanding=9), W("w1"), W("w2", outstanding=3)]
    policy = RoundRobin()
    assert [policy.choose(pool, None).id for _ in range(3)] == ["w0", "w1", "w2"]


def test_round_robin_skips_full_workers():
    pool = [W("w0"), W("w1", outstanding=2, credits=2), W("w2")]
    policy = RoundRobin()
    assert [policy.choose(pool, None).id for _ in range(4)] == ["w0", "w2", "w0", "w2"]
    pool[1].outstanding = 1  # w1 has a credit again: back in turn
    assert [policy.choose(pool, None).id for _ in range(3)] == ["w0", "w1", "w2"]


def test_round_robin_none_when_all_full():
    policy = RoundRobin()
    assert policy.choose([W("w0", credits=0), W("w1", outstanding=1, credits=1)], None) is None
    assert policy.choose([], None) is None


def test_round_robin_keeps_its_place_when_the_pool_changes():
    w0, w1, w2, w3 = W("w0"), W("w1"), W("w2"), W("w3")
    policy = RoundRobin()
    assert [policy.choose([w0, w1, w2], None).id for _ in range(2)] == ["w0", "w1"]
    # A worker joins: the turn goes on from w1, not from the start.
    assert [policy.choose([w0, w1, w2, w3], None).id for _ in range(3)] == ["w2", "w3", "w0"]
    # w1 (next in turn) leaves: w2 comes next.
    assert policy.choose([w0, w2, w3], None).id == "w2"
    # The worker chosen last leaves: the next id after it still comes next.
    assert policy.choose([w0, w3], None).id == "w3"
    assert policy.choose([w0, w1], None).id == "w0"


# --- sticky: affinity -------------------------------------------------------------------------


def test_sticky_same_key_same_worker_under_the_bound():
    pool = pool_of(8)
    policy = sticky_with(pool)
    first = owners(policy, pool, KEYS[:2000])
    assert len(set(first.values())) == 8  # keys do spread over the pool
    rng = random.Random(3)
    for load in (0, 1, 5, 40):
        for w in pool:  # equal loads: every worker is under ceil(1.25 * average)
            w.outstanding = load
            w.dispatch_seq = rng.randrange(1000)
        shuffled = rng.sample(pool, len(pool))
        for key in KEYS[:2000]:
            assert policy.choose(shuffled, key).id == first[key]
            assert policy.choose(shuffled, key).id == first[key]


def test_sticky_mapping_is_the_same_in_every_broker_with_the_same_members():
    """Join order and policy instance do not matter: the hash is stable, the ring is a set."""
    pool = pool_of(8)
    a = sticky_with(pool)
    b = Sticky()
    for w in reversed(pool):
        b.join(w.id)
    assert owners(a, pool, KEYS[:2000]) == owners(b, pool, KEYS[:2000])


@pytest.mark.parametrize("n", [4, 8, 16])
def test_sticky_key_movement_on_join(n):
    """N-1 workers, then a worker joins (N after the join): about 1/N of the keys move, all to it."""
    pool = pool_of(n)
    policy = sticky_with(pool[:-1])
    before = owners(policy, pool[:-1])
    policy.join(pool[-1].id)
    after = owners(policy, pool)
    moved = [k for k in KEYS if before[k] != after[k]]
    fraction = len(moved) / len(KEYS)
    mod_moved = sum(stable_hash(k) % (n - 1) != stable_hash(k) % n for k in KEYS) / len(KEYS)
    print(f"\njoin, N={n}: consistent hashing moved {fraction:.3f} of keys (ideal 1/N = {1 / n:.3f}); "
          f"hash mod N moved {mod_moved:.3f}")
    assert 0.5 / n <= fraction <= 2 / n
    assert all(after[k] == pool[-1].id for k in moved)  # only keys the new worker now owns
    assert {k for k in KEYS if after[k] == pool[-1].id} == set(moved)
    assert abs(mod_moved - (n - 1) / n) < 0.05 and mod_moved > 2 * fraction  # hash mod N: ~(N-1)/N


@pytest.mark.parametrize("n", [4, 8, 16])
def test_sticky_key_movement_on_leave(n):
    """N workers, then one leaves: about 1/N of the keys move, and only the departed worker's."""
    pool = pool_of(n)
    policy = sticky_with(pool)
    before = owners(policy, pool)
    gone = pool[n // 2]
    policy.leave(gone.id)
    rest = [w for w in pool if w is not gone]
    after = owners(policy, rest)
    moved = [k for k in KEYS if before[k] != after[k]]
    fraction = len(moved) / len(KEYS)
    mod_moved = sum(stable_hash(k) % n != stable_hash(k) % (n - 1) for k in KEYS) / len(KEYS)
    print(f"\nleave, N={n}: consistent hashing moved {fraction:.3f} of keys (ideal 1/N = {1 / n:.3f}); "
          f"hash mod N moved {mod_moved:.3f}")
    assert 0.5 / n <= fraction <= 2 / n
    assert set(moved) == {k for k in KEYS if before[k] == gone.id}  # its keys, and only its keys
    assert abs(mod_moved - (n - 1) / n) < 0.05 and mod_moved > 2 * fraction  # hash mod N: ~(N-1)/N


# --- sticky: bounded loads --------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.25, 0.1])
def test_sticky_bounded_loads_under_zipf_keys(epsilon):
    """Zipf keys (s = 1.1, 1,000 keys, 20,000 requests), every request stays outstanding.

    The total only grows, so the bound the policy enforces at each placement must hold for every
    worker after every placement. Plain consistent hashing (HashRing.owner) on the same requests
    piles the hot key's ~18% of the traffic on one worker. 16 workers: at 8 the hot key alone is
    1.4x the average, at 16 it is 2.9x.
    """
    n, requests = 16, zipf_requests(1000, 1.1, 20_000, seed=7)
    pool = pool_of(n)
    policy, dispatch = sticky_with(pool, epsilon), Dispatcher()
    worst = 0.0
    for step, key in enumerate(requests, 1):
        dispatch(policy.choose(pool, key))
        bound = math.ceil((1 + epsilon) * step / n)
        top = max(w.outstanding for w in pool)
        assert top <= bound, (step, top, bound)
        if step >= 1000:  # before, ceil() dominates: one request over an average of 0.06
            worst = max(worst, top / (step / n))
    avg = len(requests) / n
    bounded = max(w.outstanding for w in pool) / avg

    ring = HashRing()
    for w in pool:
        ring.add(w.id)
    plain = Counter(ring.owner(key) for key in requests)
    hot = plain[ring.owner("session-0")] / avg
    print(f"\nzipf s=1.1, N={n}, eps={epsilon}: bounded max/avg {bounded:.3f} at the end "
          f"(worst from step 1,000 on {worst:.3f}); plain consistent hashing max/avg "
          f"{max(plain.values()) / avg:.3f}, the hot key's worker {hot:.3f}")
    assert hot > 2
    assert max(plain.values()) > math.ceil((1 + epsilon) * avg)


@pytest.mark.parametrize("epsilon", [0.25, 0.1])
def test_sticky_bounded_loads_with_departures(epsilon):
    """A steady state: 64 requests in flight on 8 workers; before each arrival a random request
    in flight completes (service times vary), so the total stays 64 and the bound the policy applies,
    ceil((1 + eps) * 64 / 8), is the same at every placement: no worker may exceed it after one.
    (Right after a departure the average drops and a worker may sit above the new bound: the
    guarantee is made at placement.) Hot keys still mostly reach their own worker.
    """
    n, window, requests = 8, 64, zipf_requests(1000, 1.1, 20_000, seed=5)
    pool = pool_of(n)
    policy, dispatch = sticky_with(pool, epsilon), Dispatcher()
    rng = random.Random(9)
    in_flight: list[W] = []
    at_owner = 0
    for key in requests:
        if len(in_flight) == window:
            done = in_flight.pop(rng.randrange(window))
            done.outstanding -= 1
        w = dispatch(policy.choose(pool, key))
        in_flight.append(w)
        at_owner += w.id == policy.ring.owner(key)
        total = sum(x.outstanding for x in pool)
        assert max(x.outstanding for x in pool) <= math.ceil((1 + epsilon) * total / n)
    print(f"\ndepartures, N={n}, eps={epsilon}: {at_owner / len(requests):.3f} of requests at their key's owner")
    assert at_owner / len(requests) > 0.5


def test_sticky_capacity():
    pool = [W("a", outstanding=3), W("b", outstanding=1), W("c"), W("d")]
    assert Sticky(epsilon=0.25).capacity(pool) == math.ceil(1.25 * 5 / 4) == 2
    assert Sticky(epsilon=1.0).capacity(pool) == math.ceil(2.0 * 5 / 4) == 3
    assert Sticky(epsilon=0.25).capacity(pool_of(4)) == 1  # idle: each may take one


def test_sticky_invalid_epsilon():
    for bad in (0, -0.5):
        with pytest.raises(ValueError):
            Sticky(epsilon=bad)


def _ring_order(policy: Sticky, key: str) -> list[str]:
    return list(policy.ring.walk(key))


def test_sticky_key_keeps_its_worker_under_the_bound_and_spills_clockwise():
    pool = pool_of(4)
    by_id = {w.id: w for w in pool}
    policy = sticky_with(pool)
    key = "session-1"
    first, second, third, fourth = (by_id[i] for i in _ring_order(policy, key))

    # Its owner holds 1 of 5 (with this one): capacity ceil(1.25 * 5 / 4) = 2, 1 < 2: it stays.
    for w, load in ((first, 1), (second, 1), (third, 1), (fourth, 1)):
        w.outstanding = load
    assert policy.choose(pool, key) is first
    # Its owner at the bound: ceil(1.25 * (2 + 1 + 1 + 1 + 1) / 4) = 2, 2 is not < 2: the next clockwise.
    first.outstanding = 2
    assert policy.capacity(pool) == 2
    assert policy.choose(pool, key) is second
    # The next clockwise at the bound too: the one after it, although the fourth is less loaded.
    second.outstanding, third.outstanding, fourth.outstanding = 2, 1, 0
    assert policy.capacity(pool) == 2
    assert policy.choose(pool, key) is third
    # Back under the bound: the key returns to its owner.
    first.outstanding = second.outstanding = third.outstanding = fourth.outstanding = 3
    assert policy.choose(pool, key) is first


def test_sticky_spills_past_a_worker_without_a_credit_or_not_in_the_pool():
    pool = pool_of(4)
    by_id = {w.id: w for w in pool}
    policy = sticky_with(pool)
    key = "session-2"
    first, second, third, _ = (by_id[i] for i in _ring_order(policy, key))
    first.credits = 0  # under the bound, but no free credit
    assert policy.choose(pool, key) is second
    # The second on the ring is not in the pool (not ready): skipped.
    assert policy.choose([w for w in pool if w is not second], key) is third


def test_sticky_falls_back_to_least_loaded_when_every_ring_worker_is_at_its_credits():
    pool = pool_of(3, credits=2)
    policy = sticky_with(pool)
    for w in pool:
        w.outstanding = 2
    assert policy.choose(pool, "k") is None
    pool[1].outstanding = 1  # the only free credit, wherever the key's owner is
    assert policy.choose(pool, "k") is pool[1]


def test_sticky_without_a_key_is_least_loaded():
    rng = random.Random(4)
    policy = sticky_with(pool_of(6))
    for _ in range(300):
        pool = [W(f"w{i:02d}", outstanding=rng.randrange(4), credits=rng.randrange(1, 5),
                  dispatch_seq=rng.randrange(100)) for i in range(6)]
        assert policy.choose(pool, None) is LeastLoaded().choose(pool, None)
    # Idle: a keyless stream rotates like least-loaded, whatever the ring says.
    pool, dispatch = pool_of(4), Dispatcher()
    picks = Counter(dispatch(policy.choose(pool, None), stays=False).id for _ in range(400))
    assert picks == {w.id: 100 for w in pool}


def test_sticky_with_an_empty_ring_is_least_loaded():
    pool = [W("a", outstanding=2), W("b", outstanding=1)]
    assert Sticky().choose(pool, "session-1") is pool[1]
    assert Sticky().choose([], "session-1") is None


def test_sticky_join_and_leave_are_idempotent():
    pool = pool_of(6)
    once = sticky_with(pool)
    twice = sticky_with(pool)
    for w in pool:
        twice.join(w.id)
    assert len(twice.ring) == 6
    assert owners(once, pool, KEYS[:2000]) == owners(twice, pool, KEYS[:2000])
    once.leave("w03")
    once.leave("w03")
    once.leave("never-joined")
    rest = [w for w in pool if w.id != "w03"]
    expected = owners(sticky_with(rest), rest, KEYS[:2000])
    assert owners(once, rest, KEYS[:2000]) == expected
    once.join("w03")  # back: the original mapping exactly
    assert owners(once, pool, KEYS[:2000]) == owners(twice, pool, KEYS[:2000])


def test_sticky_worker_that_left_but_is_still_in_the_pool():
    """What the code does (pinned): a worker off the ring is never reached by a key's walk, so keyed
    requests go to ring members while one of them is under the bound with a credit; it is still part
    of the pool for the average, and it can be chosen by the least-loaded fallback (every ring member
    at the bound or full) and for requests without a key. The broker keeps the two in step: the pool
    is its ready workers, the ring its registered ready workers."""
    pool = pool_of(4)
    policy = sticky_with(pool)
    policy.leave("w00")
    for key in KEYS[:2000]:
        assert policy.choose(pool, key).id != "w00"  # even though w00 is idle and first in the pool
    assert policy.choose(pool, None).id == "w00"  # keyless: least-loaded over the pool
    for w in pool[1:]:
        w.outstanding, w.credits = 1, 1  # every ring member full
    assert policy.choose(pool, "session-1").id == "w00"  # the fallback


# --- hash ring --------------------------------------------------------------------------------


def test_stable_hash_is_pinned():
    """BLAKE2b, 8 bytes, big-endian: the same in every process (Python's hash() is salted)."""
    assert stable_hash("session-42") == 0x28BD467CBC4B1AAC
    assert stable_hash("") == 16476032584258269876
    assert 0 <= stable_hash("x" * 1000) < 1 << 64


def test_ring_ownership_is_pinned():
    """The same members give the same owners in every broker, across processes and restarts."""
    ring = HashRing()
    for member in ("w0", "w1", "w2"):
        ring.add(member)
    assert [ring.owner(k) for k in ("a", "b", "session-1")] == ["w2", "w0", "w2"]


def test_ring_walk_yields_every_member_once_starting_with_the_owner():
    ring = HashRing(vnodes=16)
    members = [f"m{i}" for i in range(10)]
    for m in members:
        ring.add(m)
    for key in KEYS[:500]:
        walk = list(ring.walk(key))
        assert sorted(walk) == sorted(members)
        assert walk[0] == ring.owner(key)
        assert walk == list(ring.walk(key))


def test_ring_walk_is_clockwise_order():
    """Removing members leaves the others' walk order unchanged: the next clockwise takes over."""
    ring = HashRing()
    for m in ("a", "b", "c", "d", "e"):
        ring.add(m)
    for key in KEYS[:300]:
        walk = list(ring.walk(key))
        smaller = HashRing()
        for m in walk[1:]:
            smaller.add(m)
        assert smaller.owner(key) == walk[1]
        assert list(smaller.walk(key)) == walk[1:]


def test_ring_single_member_and_empty():
    ring = HashRing()
    assert len(ring) == 0 and list(ring.walk("k")) == [] and ring.owner("k") is None
    ring.add("only")
    assert "only" in ring and list(ring.walk("k")) == ["only"] and ring.owner("k") == "only"
    ring.remove("only")
    assert len(ring) == 0 and "only" not in ring and ring.owner("k") is None


def test_ring_add_remove_idempotent():
    ring = HashRing()
    for m in ("a", "b", "c", "a"):
        ring.add(m)
    assert len(ring) == 3
    before = [ring.owner(k) for k in KEYS[:500]]
    ring.add("b")
    ring.remove("zz")
    assert [ring.owner(k) for k in KEYS[:500]] == before
    ring.remove("b")
    ring.remove("b")
    assert len(ring) == 2 and "b" not in ring
    assert set(ring.owner(k) for k in KEYS[:500]) == {"a", "c"}


def test_ring_vnodes_spread_keys():
    ring = HashRing(vnodes=128)
    for i in range(8):
        ring.add(f"w{i}")
    counts = Counter(ring.owner(k) for k in KEYS)
    assert max(counts.values()) / (len(KEYS) / 8) < 1.4 and min(counts.values()) / (len(KEYS) / 8) > 0.6


def test_ring_invalid_vnodes():
    with pytest.raises(ValueError):
        HashRing(vnodes=0)

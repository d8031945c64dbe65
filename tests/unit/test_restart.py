"""Unit tests for inferd.restart: the decider, RetryWindow, Backoff, Intensity, SupervisionPolicy.

Everything is pure logic: the clock is the ``now`` argument and the random source
is an injected ``random.Random`` (or a stub), so nothing here sleeps.
"""

from __future__ import annotations

import random

import pytest

from inferd.failures import Failure
from inferd.restart import (
    DECIDER,
    FAIL,
    RESTART_AFTER,
    SHUTDOWN,
    Backoff,
    Decision,
    Directive,
    Intensity,
    Limits,
    RetryWindow,
    SupervisionPolicy,
    decide,
)


class StubRng:
    """A ``random.Random`` stand-in whose ``random()`` returns fixed values, in turn."""

    def __init__(self, *values: float):
        self.values = list(values)
        self.calls = 0

    def random(self) -> float:
        value = self.values[self.calls % len(self.values)]
        self.calls += 1
        return value


# --- decider ----------------------------------------------------------------------------------


@pytest.mark.parametrize("failure, directive", [
    (Failure.CONTEXT_POISONED, Directive.RESTART),
    (Failure.OUT_OF_MEMORY, Directive.RESUME),
    (Failure.UNRECOVERABLE, Directive.STOP),
    (Failure.UNKNOWN, Directive.ESCALATE),
])
def test_decider_maps_each_failure_to_its_directive(failure, directive):
    assert decide(failure) is directive
    assert DECIDER[failure] is directive


def test_decider_covers_every_failure_and_nothing_else():
    assert set(DECIDER) == set(Failure)
    assert len(DECIDER) == 4
    for failure in Failure:
        assert isinstance(decide(failure), Directive)


def test_directive_values():
    assert [d.value for d in Directive] == ["restart", "resume", "stop", "escalate"]


def test_action_constants():
    assert (RESTART_AFTER, FAIL, SHUTDOWN) == ("restart", "fail", "shutdown")


# --- RetryWindow ------------------------------------------------------------------------------


def test_window_allows_max_then_refuses_without_recording():
    w = RetryWindow(3, 60)
    assert [w.allow(t) for t in (0, 1, 2)] == [True, True, True]
    assert len(w) == 3
    assert w.allow(3) is False
    assert len(w) == 3  # the refused attempt is not recorded
    assert w.allow(30) is False
    assert w.allow(59.999) is False
    assert len(w) == 3
    assert list(w._times) == [0, 1, 2]


def test_window_boundary_is_inclusive_an_entry_at_0_leaves_at_exactly_60():
    w = RetryWindow(3, 60)
    for t in (0, 1, 2):
        assert w.allow(t)
    # At t=59.999 the entry at 0 is still inside (0 > 59.999 - 60).
    assert w.allow(59.999) is False
    # allow() drops entries with t <= now - within_s: at exactly 60 the entry at 0 has left.
    assert w.allow(60) is True
    assert list(w._times) == [1, 2, 60]
    # The entry at 1 leaves at exactly 61, not before.
    assert w.allow(60.5) is False
    assert w.allow(61) is True
    assert list(w._times) == [2, 60, 61]
    assert w.allow(61.999) is False
    assert w.allow(62) is True
    assert list(w._times) == [60, 61, 62]


def test_window_refused_attempts_do_not_extend_the_window():
    # Hammering while refused must not push the reopening time further out.
    w = RetryWindow(2, 10)
    assert w.allow(0) and w.allow(5)
    for t in range(6, 10):
        assert w.allow(t) is False
    assert w.allow(10) is True   # the entry at 0 leaves at 10, however many refusals came in between
    assert w.allow(14) is False
    assert w.allow(15) is True


def _reference_allow(accepted: list[float], now: float, max_restarts: int, within_s: float) -> bool:
    """Brute force: count every accepted time still inside (now - within_s, now]."""
    inside = [t for t in accepted if not t <= now - within_s]
    if len(inside) >= max_restarts:
        return False
    accepted.append(now)
    return True


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_restarts, within_s", [(3, 60.0), (1, 10.0), (5, 7.5), (10, 100.0)])
def test_window_slides_like_a_brute_force_model(seed, max_restarts, within_s):
    rng = random.Random(seed)
    w = RetryWindow(max_restarts, within_s)
    accepted: list[float] = []
    now = 0.0
    outcomes = []
    for _ in range(2000):
        # Steps that often land exactly on the boundaries, and some arbitrary ones.
        if rng.random() < 0.7:   # bursts: often more than max_restarts within the window
            step = rng.choice([0.0, 0.5, rng.uniform(0, within_s / max_restarts)])
        else:
            step = rng.choice([1.0, within_s / 2, within_s, within_s - 0.5, within_s + 0.5, within_s * 3,
                               rng.uniform(0, within_s)])
        now += step
        expected = _reference_allow(accepted, now, max_restarts, within_s)
        assert w.allow(now) is expected, (now, accepted[-max_restarts - 1:])
        outcomes.append(expected)
        assert len(w) == sum(1 for t in accepted if not t <= now - within_s)
        assert len(w) <= max_restarts
    # The sequence exercised both answers.
    assert True in outcomes and False in outcomes


def test_window_zero_max_refuses_everything():
    w = RetryWindow(0, 60)
    assert [w.allow(t) for t in (0, 1, 60, 1e6)] == [False] * 4
    assert len(w) == 0


def test_window_clear_empties_it():
    w = RetryWindow(2, 60)
    assert w.allow(0) and w.allow(1)
    assert w.allow(2) is False
    w.clear()
    assert len(w) == 0
    assert w.allow(3) is True
    assert w.allow(4) is True
    assert w.allow(5) is False


# --- Backoff ----------------------------------------------------------------------------------


def test_backoff_without_jitter_doubles_from_min_to_max():
    b = Backoff(min_s=0.5, max_s=30.0, reset_after_s=300.0, jitter=0.0, rng=random.Random(1))
    delays = [b.next_delay(uptime_s=1.0) for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert b.attempt == 10


def test_backoff_max_not_a_power_of_two_multiple_is_hit_exactly():
    b = Backoff(min_s=1.0, max_s=5.0, reset_after_s=60.0, jitter=0.0, rng=random.Random(0))
    assert [b.next_delay(0.0) for _ in range(6)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def _base(b: Backoff, n: int) -> float:
    return min(b.max_s, b.min_s * 2 ** n)


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_backoff_jitter_stays_within_base_and_base_times_one_plus_jitter(jitter):
    rng = random.Random(1234)
    seen_low = seen_high = False
    for _ in range(300):
        b = Backoff(min_s=0.25, max_s=20.0, reset_after_s=1e9, jitter=jitter, rng=rng)
        for n in range(12):
            base = _base(b, n)
            d = b.next_delay(uptime_s=0.0)
            assert base <= d < base * (1 + jitter), (n, base, d)
            seen_low |= d < base * (1 + jitter * 0.1)
            seen_high |= d > base * (1 + jitter * 0.9)
    # The jitter is actually used: samples fall near both ends of the range.
    assert seen_low and seen_high


def test_backoff_jitter_matches_the_formula_for_a_seeded_rng():
    b = Backoff(min_s=1.0, max_s=8.0, reset_after_s=1e9, jitter=0.5, rng=random.Random(42))
    ref = random.Random(42)
    expected = [min(8.0, 2.0 ** n) * (1 + 0.5 * ref.random()) for n in range(6)]
    assert [b.next_delay(0.0) for _ in range(6)] == expected


def test_backoff_jitter_stub_rng_pins_both_ends():
    low = Backoff(min_s=1.0, max_s=8.0, reset_after_s=1e9, jitter=0.5, rng=StubRng(0.0))
    assert [low.next_delay(0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]

    high = Backoff(min_s=1.0, max_s=8.0, reset_after_s=1e9, jitter=0.5, rng=StubRng(0.999999))
    delays = [high.next_delay(0.0) for _ in range(5)]
    assert delays == [base * (1 + 0.5 * 0.999999) for base in (1.0, 2.0, 4.0, 8.0, 8.0)]
    assert delays[0] == pytest.approx(1.4999995, abs=1e-12)
    for base, d in zip((1.0, 2.0, 4.0, 8.0, 8.0), delays):
        assert base <= d < base * 1.5


def test_backoff_jitter_zero_does_not_depend_on_the_rng():
    b = Backoff(min_s=2.0, max_s=10.0, reset_after_s=1e9, jitter=0.0, rng=StubRng(0.999999))
    assert [b.next_delay(0.0) for _ in range(4)] == [2.0, 4.0, 8.0, 10.0]


def test_backoff_uptime_at_reset_after_resets_to_the_minimum():
    b = Backoff(min_s=1.0, max_s=60.0, reset_after_s=30.0, jitter=0.0, rng=random.Random(0))
    assert [b.next_delay(5.0) for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    # exactly reset_after_s: reset (>=)
    assert b.next_delay(30.0) == 1.0
    assert b.next_delay(0.0) == 2.0
    # well above: reset too
    assert b.next_delay(1000.0) == 1.0
    assert b.attempt == 1


def test_backoff_uptime_just_below_reset_after_does_not_reset():
    b = Backoff(min_s=1.0, max_s=60.0, reset_after_s=30.0, jitter=0.0, rng=random.Random(0))
    assert [b.next_delay(0.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert b.next_delay(29.999999) == 8.0
    assert b.next_delay(29.0) == 16.0
    assert b.attempt == 5


def test_backoff_reset():
    b = Backoff(min_s=1.0, max_s=60.0, reset_after_s=30.0, jitter=0.0, rng=random.Random(0))
    for _ in range(5):
        b.next_delay(0.0)
    assert b.attempt == 5
    b.reset()
    assert b.attempt == 0
    assert [b.next_delay(0.0) for _ in range(3)] == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("u", [0.0, 0.37, 0.999999])
def test_backoff_no_overflow_for_a_huge_attempt_count(u):
    b = Backoff(min_s=0.5, max_s=30.0, reset_after_s=1e9, jitter=0.25, rng=StubRng(u))
    expected_max = 30.0 * (1 + 0.25 * u)
    delays = [b.next_delay(0.0) for _ in range(10_000)]
    assert b.attempt == 10_000
    # From the 7th on (0.5 * 2**6 = 32 > 30), every delay is the jittered maximum.
    assert delays[:6] == [base * (1 + 0.25 * u) for base in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)]
    assert all(d == expected_max for d in delays[6:])


def test_backoff_no_overflow_with_integer_arguments():
    b = Backoff(min_s=1, max_s=30, reset_after_s=10**9, jitter=0, rng=random.Random(0))
    delays = [b.next_delay(0) for _ in range(10_000)]
    assert delays[:6] == [1, 2, 4, 8, 16, 30]
    assert set(delays[5:]) == {30}


# --- Intensity --------------------------------------------------------------------------------


def test_intensity_exceeded_after_max_escalations_within_the_window():
    i = Intensity(3, 60)
    assert [i.exceeded(t) for t in (0, 1, 2)] == [False, False, False]
    assert i.exceeded(3) is True
    assert i.exceeded(59) is True
    assert len(i) == 3  # the refused escalations are not counted


def test_intensity_recovers_after_the_window_passes():
    i = Intensity(3, 60)
    for t in (0, 1, 2):
        assert i.exceeded(t) is False
    assert i.exceeded(59.5) is True
    assert i.exceeded(60) is False       # the escalation at 0 left at exactly 60
    assert i.exceeded(60.5) is True      # 1, 2, 60 are inside
    assert i.exceeded(61) is False       # the one at 1 left
    assert list(i._times) == [2, 60, 61]
    # Long after: the window is empty again and the full budget is back.
    assert [i.exceeded(t) for t in (200, 201, 202, 203)] == [False, False, False, True]
    assert list(i._times) == [200, 201, 202]


def test_intensity_recovery_explicit():
    i = Intensity(2, 10)
    assert i.exceeded(0) is False
    assert i.exceeded(0) is False
    assert i.exceeded(0) is True
    assert i.exceeded(9.999) is True
    assert i.exceeded(10) is False
    assert len(i) == 1
    assert i.exceeded(10) is False
    assert i.exceeded(10) is True
    assert i.exceeded(100) is False
    assert len(i) == 1


# --- SupervisionPolicy ------------------------------------------------------------------------


def make_policy(limits=None, *, backoff_min_s=1.0, backoff_max_s=30.0, backoff_reset_s=300.0, jitter=0.0,
                escalation_max=3, escalation_window_s=60.0, rng=None) -> SupervisionPolicy:
    if limits is None:
        limits = {"a": Limits(3, 60.0), "b": Limits(3, 60.0)}
    return SupervisionPolicy(limits, backoff_min_s=backoff_min_s, backoff_max_s=backoff_max_s,
                             backoff_reset_s=backoff_reset_s, jitter=jitter, escalation_max=escalation_max,
                             escalation_window_s=escalation_window_s, rng=rng or random.Random(0))


def test_policy_poisoned_restarts_with_backoff_then_fails_on_the_fourth():
    p = make_policy()
    decisions = [p.on_exit("a", Failure.CONTEXT_POISONED, uptime_s=0.5, now=t) for t in (0.0, 1.0, 2.0)]
    assert decisions == [
        Decision(RESTART_AFTER, Failure.CONTEXT_POISONED, Directive.RESTART, 1.0),
        Decision(RESTART_AFTER, Failure.CONTEXT_POISONED, Directive.RESTART, 2.0),
        Decision(RESTART_AFTER, Failure.CONTEXT_POISONED, Directive.RESTART, 4.0),
    ]
    assert len(p.windows["a"]) == 3
    assert len(p.windows["b"]) == 0
    fourth = p.on_exit("a", Failure.CONTEXT_POISONED, uptime_s=0.5, now=3.0)
    assert fourth == Decision(FAIL, Failure.CONTEXT_POISONED, Directive.RESTART, 0.0,
                              reason="restarted 3 times within 60 s")
    assert fourth.action == FAIL
    assert fourth.reason == "restarted 3 times within 60 s"
    assert fourth.delay_s == 0.0
    # A refused restart does not consume the window or advance the backoff.
    assert len(p.windows["a"]) == 3
    assert p.backoffs["a"].attempt == 3
    # Restart never touches the daemon-wide intensity.
    assert len(p.intensity) == 0


def test_policy_poisoned_window_reopens_after_within_s():
    p = make_policy()
    for t in (0.0, 1.0, 2.0):
        assert p.on_exit("a", Failure.CONTEXT_POISONED, 0.5, t).action == RESTART_AFTER
    assert p.on_exit("a", Failure.CONTEXT_POISONED, 0.5, 59.9).action == FAIL
    d = p.on_exit("a", Failure.CONTEXT_POISONED, 0.5, 60.0)
    assert d == Decision(RESTART_AFTER, Failure.CONTEXT_POISONED, Directive.RESTART, 8.0)


def test_policy_backoff_resets_after_a_long_uptime():
    p = make_policy(limits={"a": Limits(100, 60.0)}, backoff_reset_s=30.0)
    delays = [p.on_exit("a", Failure.CONTEXT_POISONED, 1.0, float(t)).delay_s for t in range(4)]
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert p.on_exit("a", Failure.CONTEXT_POISONED, 30.0, 4.0).delay_s == 1.0
    assert p.on_exit("a", Failure.CONTEXT_POISONED, 29.9, 5.0).delay_s == 2.0


def test_policy_backoff_delay_uses_the_jitter_and_rng():
    p = make_policy(jitter=0.5, rng=StubRng(0.5))
    d = p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, 0.0)
    assert d.delay_s == 1.25
    d = p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, 1.0)
    assert d.delay_s == 2.5


def test_policy_unrecoverable_fails_at_once_without_window_or_intensity():
    p = make_policy()
    d = p.on_exit("a", Failure.UNRECOVERABLE, uptime_s=100.0, now=0.0)
    assert d == Decision(FAIL, Failure.UNRECOVERABLE, Directive.STOP, 0.0, reason="unrecoverable: not restarted")
    assert len(p.windows["a"]) == 0
    assert len(p.intensity) == 0
    assert p.backoffs["a"].attempt == 0
    # Even many of them never shut the daemon down.
    for t in range(10):
        assert p.on_exit("b", Failure.UNRECOVERABLE, 0.0, float(t)).action == FAIL
    assert len(p.intensity) == 0
    assert len(p.windows["b"]) == 0


def test_policy_unknown_escalates_restarts_and_counts_across_children():
    p = make_policy(limits={"a": Limits(10, 60.0), "b": Limits(10, 60.0)}, escalation_max=3,
                    escalation_window_s=60.0)
    got = [p.on_exit(child, Failure.UNKNOWN, 0.5, t) for child, t in (("a", 0.0), ("b", 1.0), ("a", 2.0))]
    assert got == [
        Decision(RESTART_AFTER, Failure.UNKNOWN, Directive.ESCALATE, 1.0),
        Decision(RESTART_AFTER, Failure.UNKNOWN, Directive.ESCALATE, 1.0),
        Decision(RESTART_AFTER, Failure.UNKNOWN, Directive.ESCALATE, 2.0),
    ]
    assert len(p.intensity) == 3
    assert len(p.windows["a"]) == 2
    assert len(p.windows["b"]) == 1
    fourth = p.on_exit("b", Failure.UNKNOWN, 0.5, 3.0)
    assert fourth == Decision(SHUTDOWN, Failure.UNKNOWN, Directive.ESCALATE, 0.0,
                              reason="more than 3 escalations within 60 s across all children")
    # The child's window is checked first (and the daemon stops anyway); its backoff is not used.
    assert len(p.windows["b"]) == 2
    assert p.backoffs["b"].attempt == 1


def test_policy_intensity_reason_formats_the_window():
    p = make_policy(escalation_max=1, escalation_window_s=2.5)
    assert p.on_exit("a", Failure.UNKNOWN, 0.0, 0.0).action == RESTART_AFTER
    d = p.on_exit("b", Failure.UNKNOWN, 0.0, 1.0)
    assert d.action == SHUTDOWN
    assert d.reason == "more than 1 escalations within 2.5 s across all children"


def test_policy_intensity_recovers_after_its_window():
    p = make_policy(limits={"a": Limits(100, 1000.0)}, escalation_max=2, escalation_window_s=10.0)
    assert p.on_exit("a", Failure.UNKNOWN, 0.0, 0.0).action == RESTART_AFTER
    assert p.on_exit("a", Failure.UNKNOWN, 0.0, 5.0).action == RESTART_AFTER
    assert p.on_exit("a", Failure.UNKNOWN, 0.0, 9.0).action == SHUTDOWN
    assert p.on_exit("a", Failure.UNKNOWN, 0.0, 10.0).action == RESTART_AFTER


def test_policy_restart_does_not_consume_intensity():
    p = make_policy(limits={"a": Limits(100, 60.0), "b": Limits(100, 60.0)}, escalation_max=3)
    for t in range(20):
        child = "a" if t % 2 else "b"
        assert p.on_exit(child, Failure.CONTEXT_POISONED, 0.0, float(t)).action == RESTART_AFTER
    assert len(p.intensity) == 0
    # The full escalation budget is still there.
    assert [p.on_exit("a", Failure.UNKNOWN, 0.0, 20.0 + k).action for k in range(4)] == \
        [RESTART_AFTER, RESTART_AFTER, RESTART_AFTER, SHUTDOWN]


def test_policy_out_of_memory_exit_is_treated_as_escalate():
    p = make_policy(escalation_max=1)
    d = p.on_exit("a", Failure.OUT_OF_MEMORY, 0.5, 0.0)
    assert d == Decision(RESTART_AFTER, Failure.OUT_OF_MEMORY, Directive.ESCALATE, 1.0)
    assert len(p.intensity) == 1
    assert len(p.windows["a"]) == 1
    d = p.on_exit("b", Failure.OUT_OF_MEMORY, 0.5, 1.0)
    assert d == Decision(SHUTDOWN, Failure.OUT_OF_MEMORY, Directive.ESCALATE, 0.0,
                         reason="more than 1 escalations within 60 s across all children")


def test_policy_escalation_refused_by_the_child_window_does_not_consume_intensity():
    # A child over its own window is stopped, not restarted: no restart to count daemon-wide, and a
    # child that is already failed cannot bring the whole daemon down.
    p = make_policy(limits={"a": Limits(1, 60.0), "b": Limits(5, 60.0)}, escalation_max=2)
    assert p.on_exit("a", Failure.UNKNOWN, 0.0, 0.0).action == RESTART_AFTER
    d = p.on_exit("a", Failure.UNKNOWN, 0.0, 1.0)
    assert d == Decision(FAIL, Failure.UNKNOWN, Directive.ESCALATE, 0.0, reason="restarted 1 times within 60 s")
    assert len(p.intensity) == 1
    assert p.on_exit("b", Failure.UNKNOWN, 0.0, 2.0).action == RESTART_AFTER
    assert p.on_exit("b", Failure.UNKNOWN, 0.0, 3.0).action == SHUTDOWN


def test_policy_clear_gives_one_child_a_fresh_window_and_backoff():
    p = make_policy()
    for t in (0.0, 1.0, 2.0):
        p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, t)
    assert p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, 3.0).action == FAIL
    for t in (0.0, 1.0):
        p.on_exit("b", Failure.CONTEXT_POISONED, 0.0, t)
    p.clear("a")
    assert len(p.windows["a"]) == 0
    assert p.backoffs["a"].attempt == 0
    # b is untouched
    assert len(p.windows["b"]) == 2
    assert p.backoffs["b"].attempt == 2
    assert p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, 4.0) == \
        Decision(RESTART_AFTER, Failure.CONTEXT_POISONED, Directive.RESTART, 1.0)
    assert p.on_exit("b", Failure.CONTEXT_POISONED, 0.0, 4.0) == \
        Decision(RESTART_AFTER, Failure.CONTEXT_POISONED, Directive.RESTART, 4.0)
    assert p.on_exit("b", Failure.CONTEXT_POISONED, 0.0, 5.0).action == FAIL


def test_policy_clear_does_not_reset_the_intensity():
    p = make_policy(escalation_max=2)
    p.on_exit("a", Failure.UNKNOWN, 0.0, 0.0)
    p.on_exit("a", Failure.UNKNOWN, 0.0, 1.0)
    p.clear("a")
    assert len(p.intensity) == 2
    assert p.on_exit("a", Failure.UNKNOWN, 0.0, 2.0).action == SHUTDOWN


def test_policy_per_child_limits_are_independent():
    p = make_policy(limits={"a": Limits(1, 60.0), "b": Limits(5, 120.0)})
    assert p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, 0.0).action == RESTART_AFTER
    d = p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, 1.0)
    assert d == Decision(FAIL, Failure.CONTEXT_POISONED, Directive.RESTART, 0.0,
                         reason="restarted 1 times within 60 s")
    # a being failed does not affect b
    got = [p.on_exit("b", Failure.CONTEXT_POISONED, 0.0, float(t)) for t in range(2, 7)]
    assert [g.action for g in got] == [RESTART_AFTER] * 5
    assert [g.delay_s for g in got] == [1.0, 2.0, 4.0, 8.0, 16.0]
    d = p.on_exit("b", Failure.CONTEXT_POISONED, 0.0, 7.0)
    assert d == Decision(FAIL, Failure.CONTEXT_POISONED, Directive.RESTART, 0.0,
                         reason="restarted 5 times within 120 s")
    assert len(p.windows["a"]) == 1
    assert len(p.windows["b"]) == 5
    # a reopens after its own 60 s, while b stays closed until 122 s
    assert p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, 60.0).action == RESTART_AFTER
    assert p.on_exit("b", Failure.CONTEXT_POISONED, 0.0, 121.9).action == FAIL
    assert p.on_exit("b", Failure.CONTEXT_POISONED, 0.0, 122.0).action == RESTART_AFTER


def test_policy_zero_max_restarts_fails_the_first_exit():
    p = make_policy(limits={"a": Limits(0, 60.0)})
    assert p.on_exit("a", Failure.CONTEXT_POISONED, 0.0, 0.0) == \
        Decision(FAIL, Failure.CONTEXT_POISONED, Directive.RESTART, 0.0, reason="restarted 0 times within 60 s")


def test_policy_backoffs_and_windows_exist_for_every_configured_child():
    p = make_policy(limits={"x": Limits(2, 5.0), "y": Limits(7, 9.0)})
    assert set(p.windows) == set(p.backoffs) == {"x", "y"}
    assert (p.windows["x"].max_restarts, p.windows["x"].within_s) == (2, 5.0)
    assert (p.windows["y"].max_restarts, p.windows["y"].within_s) == (7, 9.0)
    assert (p.intensity.max_restarts, p.intensity.within_s) == (3, 60.0)
    assert p.backoffs["x"] is not p.backoffs["y"]

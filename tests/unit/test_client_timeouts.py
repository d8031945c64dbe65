"""The AsyncClient's timeout bookkeeping, on a clock the test moves: when a request's wait is over."""

from __future__ import annotations

import time

import pytest

from inferd.client import SWEEP_S, _Inbox, _Timeouts, _Tracker


def open_request(timeouts: _Timeouts, now: float, liveness_s: float = 10.0, answer_s: float = 5.0,
                 deadline_ms: int | None = None, accepted: bool = True) -> _Inbox:
    tracker = _Tracker(deadline_ms, liveness_s, answer_s)
    # The tracker reads the real clock when made: move its times onto the test's clock.
    shift = now - tracker.last_heard
    tracker.last_heard += shift
    tracker.answer_by += shift
    tracker.give_up += shift
    tracker.accepted = accepted
    waiting = _Inbox(tracker)
    timeouts.watch(waiting, now)
    return waiting


def run(timeouts: _Timeouts, start: float, end: float, step: float = SWEEP_S,
        on_step=None) -> list[tuple[float, _Inbox]]:
    """Sweep every ``step`` from ``start`` to ``end``; (time, inbox) for each wait found over."""
    over = []
    now = start
    while now <= end + 1e-9:
        if on_step:
            on_step(now)
        over += [(now, w) for w in timeouts.expire(now)]
        now += step
    return over


def test_silence_is_noticed_between_one_and_one_and_a_quarter_liveness_after_the_last_reply():
    timeouts = _Timeouts()
    waiting = open_request(timeouts, 0.0, liveness_s=10.0)

    def replies_until_7s(now: float) -> None:
        if now <= 7.0:
            waiting.received += 1

    over = run(timeouts, 0.0, 30.0, on_step=replies_until_7s)
    assert over, "the silence after 7 s was never noticed"
    first = over[0][0]
    assert 17.0 <= first <= 7.0 + 12.5 + SWEEP_S
    assert over[0][1] is waiting


def test_a_request_hearing_steadily_is_never_over():
    timeouts = _Timeouts()
    waiting = open_request(timeouts, 0.0, liveness_s=1.0)

    def reply(now: float) -> None:
        waiting.received += 1

    assert run(timeouts, 0.0, 20.0, step=0.1, on_step=reply) == []


def test_an_unaccepted_request_is_over_at_its_answer_timeout():
    timeouts = _Timeouts()
    waiting = open_request(timeouts, 0.0, answer_s=5.0, accepted=False)
    over = run(timeouts, 0.0, 6.0)
    assert over and over[0][1] is waiting
    assert over[0][0] == pytest.approx(5.0, abs=SWEEP_S + 1e-6)


def test_the_deadline_and_its_grace_end_a_request_even_while_it_hears():
    timeouts = _Timeouts()
    waiting = open_request(timeouts, 0.0, liveness_s=10.0, deadline_ms=2000)

    def reply(now: float) -> None:
        waiting.received += 1

    over = run(timeouts, 0.0, 4.0, on_step=reply)
    assert over and over[0][0] == pytest.approx(3.0, abs=SWEEP_S + 1e-6)  # 2 s and the 1 s grace


def test_a_request_over_is_looked_at_again_a_sweep_later_and_a_closed_one_never():
    timeouts = _Timeouts()
    waiting = open_request(timeouts, 0.0, answer_s=1.0, accepted=False)
    over = run(timeouts, 0.0, 1.2)
    assert [w for _, w in over] == [waiting] * len(over) and len(over) >= 2  # until it acts
    waiting.closed = True
    assert run(timeouts, 1.25, 30.0) == []
    assert timeouts.next_due() is None


def test_requests_not_due_are_not_looked_at():
    class CountingTracker(_Tracker):
        looks = 0

        def wait_s(self, now: float) -> float:
            CountingTracker.looks += 1
            return super().wait_s(now)

    timeouts = _Timeouts()
    for _ in range(1000):
        waiting = _Inbox(CountingTracker(None, 10.0, 5.0))
        waiting.waiter = object()  # each waiting for its next reply
        timeouts.watch(waiting, time.monotonic())
    opened = CountingTracker.looks
    start = time.monotonic()
    for k in range(1, 40):  # 2 s of sweeps, before any is due (a quarter of the liveness: 2.5 s)
        assert timeouts.expire(start + k * SWEEP_S) == []
    assert CountingTracker.looks == opened

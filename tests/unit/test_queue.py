"""Unit tests for inferd.queue.BoundedPriorityQueue."""

from __future__ import annotations

import random

import pytest

from inferd.queue import BoundedPriorityQueue, QueueFull


def contents(q: BoundedPriorityQueue) -> list:
    """Pop everything (most urgent first) and return the items."""
    return list(q.drain())


# --- ordering ---------------------------------------------------------------------------------


def test_lower_number_is_more_urgent_and_fifo_within_a_level():
    q = BoundedPriorityQueue(capacity=10, levels=3)
    q.push("b1", 1)
    q.push("c1", 2)
    q.push("a1", 0)
    q.push("b2", 1)
    q.push("a2", 0)
    q.push("c2", 2)
    assert len(q) == 6
    assert [q.pop() for _ in range(6)] == ["a1", "a2", "b1", "b2", "c1", "c2"]
    assert len(q) == 0
    assert q.pop() is None


def test_peek_returns_next_without_removing():
    q = BoundedPriorityQueue(capacity=4, levels=2)
    assert q.peek() is None
    q.push("late", 1)
    q.push("urgent", 0)
    assert q.peek() == "urgent"
    assert len(q) == 2
    assert q.pop() == "urgent"
    assert q.peek() == "late"


def test_peek_skips_removed_entries():
    q = BoundedPriorityQueue(capacity=4, levels=2)
    e1, _ = q.push("x", 0)
    q.push("y", 0)
    q.remove(e1)
    assert q.peek() == "y"
    assert q.pop() == "y"
    assert q.peek() is None


def test_push_returns_live_handle_and_no_eviction_when_not_full():
    q = BoundedPriorityQueue(capacity=2, levels=2)
    entry, evicted = q.push("x", 1)
    assert evicted is None
    assert entry.item == "x"
    assert entry.priority == 1
    assert entry.alive is True
    assert q.pop() == "x"
    assert entry.alive is False


# --- the bound --------------------------------------------------------------------------------


def test_full_queue_rejects_equal_priority_newcomer():
    q = BoundedPriorityQueue(capacity=2, levels=3)
    q.push("a", 1)
    q.push("b", 1)
    with pytest.raises(QueueFull):
        q.push("c", 1)
    assert len(q) == 2
    assert contents(q) == ["a", "b"]


def test_full_queue_rejects_less_urgent_newcomer():
    q = BoundedPriorityQueue(capacity=2, levels=3)
    q.push("a", 0)
    q.push("b", 1)
    with pytest.raises(QueueFull):
        q.push("c", 2)
    # Equal to the least urgent level: still rejected, never evicts.
    with pytest.raises(QueueFull):
        q.push("d", 1)
    assert contents(q) == ["a", "b"]


def test_more_urgent_newcomer_evicts_newest_of_least_urgent_level():
    q = BoundedPriorityQueue(capacity=4, levels=3)
    q.push("mid", 1)
    old, _ = q.push("old-low", 2)
    new, _ = q.push("new-low", 2)
    q.push("urgent", 0)
    entry, evicted = q.push("more-urgent", 1)
    assert evicted is new
    assert evicted.item == "new-low"
    assert evicted.priority == 2
    assert evicted.alive is False
    assert old.alive is True
    assert entry.alive is True
    assert len(q) == 4
    assert q.depth(2) == 1
    assert q.depth(1) == 2
    assert contents(q) == ["urgent", "mid", "more-urgent", "old-low"]


def test_eviction_skips_removed_newest_entry():
    q = BoundedPriorityQueue(capacity=2, levels=3)
    older, _ = q.push("older", 2)
    newer, _ = q.push("newer", 2)
    q.remove(newer)
    q.push("filler", 2)       # now full again: older, filler (newer is dead)
    _, evicted = q.push("urgent", 0)
    assert evicted.item == "filler"
    assert older.alive
    assert contents(q) == ["urgent", "older"]


def test_eviction_only_when_strictly_more_urgent_than_least_urgent_queued():
    q = BoundedPriorityQueue(capacity=2, levels=4)
    q.push("p1", 1)
    q.push("p2", 2)
    with pytest.raises(QueueFull):
        q.push("x", 2)
    _, evicted = q.push("y", 1)
    assert evicted.item == "p2"
    # Now the least urgent level is 1; a newcomer at 1 is rejected.
    with pytest.raises(QueueFull):
        q.push("z", 1)
    _, evicted = q.push("w", 0)
    assert evicted.item == "y"   # the newest of level 1
    assert contents(q) == ["w", "p1"]


def test_rejected_push_leaves_counts_untouched():
    q = BoundedPriorityQueue(capacity=1, levels=2)
    q.push("a", 0)
    with pytest.raises(QueueFull):
        q.push("b", 0)
    with pytest.raises(QueueFull):
        q.push("c", 1)
    assert len(q) == 1
    assert q.depth(0) == 1
    assert q.depth(1) == 0


def test_removed_entries_free_capacity():
    q = BoundedPriorityQueue(capacity=2, levels=1)
    a, _ = q.push("a", 0)
    q.push("b", 0)
    assert q.remove(a) is True
    entry, evicted = q.push("c", 0)
    assert evicted is None
    assert contents(q) == ["b", "c"]


# --- remove -----------------------------------------------------------------------------------


def test_remove_returns_false_the_second_time_and_entry_is_never_popped():
    q = BoundedPriorityQueue(capacity=5, levels=2)
    a, _ = q.push("a", 0)
    b, _ = q.push("b", 0)
    c, _ = q.push("c", 1)
    assert q.remove(b) is True
    assert b.alive is False
    assert q.remove(b) is False
    assert len(q) == 2
    assert q.depth(0) == 1
    assert q.depth(1) == 1
    assert contents(q) == ["a", "c"]
    assert q.remove(a) is False  # already popped
    assert q.remove(c) is False
    assert len(q) == 0


def test_remove_last_live_entry_of_a_level():
    q = BoundedPriorityQueue(capacity=5, levels=3)
    a, _ = q.push("a", 1)
    b, _ = q.push("b", 1)
    q.push("c", 2)
    q.remove(a)
    q.remove(b)
    assert q.depth(1) == 0
    assert len(q) == 1
    assert q.ahead_of(1) == 0
    assert q.pop() == "c"
    assert q.pop() is None


def test_popped_entry_cannot_be_removed():
    q = BoundedPriorityQueue(capacity=2, levels=1)
    a, _ = q.push("a", 0)
    assert q.pop() == "a"
    assert q.remove(a) is False
    assert len(q) == 0
    assert q.depth(0) == 0


# --- requeue ----------------------------------------------------------------------------------


def test_requeue_goes_to_head_of_its_level():
    q = BoundedPriorityQueue(capacity=10, levels=3)
    q.push("u", 0)
    q.push("a", 1)
    q.push("b", 1)
    entry = q.requeue("back", 1)
    assert entry.alive and entry.priority == 1 and entry.item == "back"
    assert q.depth(1) == 3
    assert contents(q) == ["u", "back", "a", "b"]


def test_later_requeue_goes_before_earlier_requeue():
    q = BoundedPriorityQueue(capacity=10, levels=2)
    q.push("a", 1)
    q.requeue("r1", 1)
    q.requeue("r2", 1)
    assert contents(q) == ["r2", "r1", "a"]


def test_requeue_ignores_the_bound():
    q = BoundedPriorityQueue(capacity=2, levels=2)
    q.push("a", 1)
    q.push("b", 1)
    entry = q.requeue("c", 1)
    assert entry.alive
    assert len(q) == 3
    q.requeue("d", 0)
    assert len(q) == 4
    # Still full: a same-priority newcomer is rejected.
    with pytest.raises(QueueFull):
        q.push("e", 1)
    assert contents(q) == ["d", "c", "a", "b"]


def test_requeued_entry_can_be_removed():
    q = BoundedPriorityQueue(capacity=3, levels=2)
    q.push("a", 0)
    r = q.requeue("r", 0)
    assert q.remove(r) is True
    assert q.remove(r) is False
    assert contents(q) == ["a"]


# --- drain, ahead_of, depth -------------------------------------------------------------------


def test_drain_yields_everything_most_urgent_first_and_empties():
    q = BoundedPriorityQueue(capacity=10, levels=4)
    for item, prio in [("c", 2), ("a", 0), ("d", 3), ("b", 1), ("a2", 0), ("c2", 2)]:
        q.push(item, prio)
    dead, _ = q.push("dead", 1)
    q.remove(dead)
    assert list(q.drain()) == ["a", "a2", "b", "c", "c2", "d"]
    assert len(q) == 0
    assert [q.depth(p) for p in range(4)] == [0, 0, 0, 0]
    assert list(q.drain()) == []


def test_ahead_of_counts_items_served_before_newcomer():
    q = BoundedPriorityQueue(capacity=10, levels=3)
    assert q.ahead_of(0) == 0
    q.push("a", 0)
    q.push("b", 1)
    q.push("b2", 1)
    q.push("c", 2)
    assert q.ahead_of(0) == 1
    assert q.ahead_of(1) == 3
    assert q.ahead_of(2) == 4
    q.pop()
    assert q.ahead_of(0) == 0
    assert q.ahead_of(1) == 2


def test_depth_tracks_each_level():
    q = BoundedPriorityQueue(capacity=10, levels=3)
    q.push("a", 2)
    e, _ = q.push("b", 2)
    q.push("c", 0)
    assert [q.depth(p) for p in range(3)] == [1, 0, 2]
    q.remove(e)
    assert [q.depth(p) for p in range(3)] == [1, 0, 1]
    q.pop()
    assert [q.depth(p) for p in range(3)] == [0, 0, 1]


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", [-1, 3, 100])
def test_invalid_priority_raises_value_error(priority):
    q = BoundedPriorityQueue(capacity=2, levels=3)
    with pytest.raises(ValueError):
        q.push("x", priority)
    with pytest.raises(ValueError):
        q.requeue("x", priority)
    assert len(q) == 0


@pytest.mark.parametrize("capacity,levels", [(0, 1), (1, 0), (-1, 3)])
def test_invalid_construction(capacity, levels):
    with pytest.raises(ValueError):
        BoundedPriorityQueue(capacity, levels)


# --- randomized comparison with a reference model ---------------------------------------------


class Model:
    """A sorted list of (priority, seq, item); requeue uses decreasing negative seqs."""

    def __init__(self, capacity: int, levels: int):
        self.capacity = capacity
        self.levels = levels
        self.items: list[tuple[int, int, int]] = []
        self.seq = 0
        self.head_seq = 0

    def push(self, item: int, priority: int):
        evicted = None
        if len(self.items) >= self.capacity:
            worst = max(p for p, _, _ in self.items)
            if worst <= priority:
                raise QueueFull()
            newest = max((e for e in self.items if e[0] == worst), key=lambda e: e[1])
            self.items.remove(newest)
            evicted = newest[2]
        self.seq += 1
        self.items.append((priority, self.seq, item))
        self.items.sort()
        return evicted

    def requeue(self, item: int, priority: int):
        self.head_seq -= 1
        self.items.append((priority, self.head_seq, item))
        self.items.sort()

    def pop(self):
        if not self.items:
            return None
        return self.items.pop(0)[2]

    def remove(self, item: int) -> bool:
        for e in self.items:
            if e[2] == item:
                self.items.remove(e)
                return True
        return False

    def depth(self, p: int) -> int:
        return sum(1 for e in self.items if e[0] == p)

    def ahead_of(self, p: int) -> int:
        return sum(1 for e in self.items if e[0] <= p)


@pytest.mark.parametrize("seed,capacity,levels", [(1, 5, 3), (2, 1, 1), (3, 8, 4), (4, 3, 2), (5, 16, 6)])
def test_randomized_against_reference_model(seed, capacity, levels):
    rng = random.Random(seed)
    q: BoundedPriorityQueue[int] = BoundedPriorityQueue(capacity, levels)
    model = Model(capacity, levels)
    handles = {}  # item -> Entry (latest handle)
    next_item = 0
    counts = {"push": 0, "evict": 0, "full": 0, "pop": 0, "remove": 0, "requeue": 0}
    for step in range(4000):
        op = rng.random()
        if op < 0.45:
            prio = rng.randrange(levels)
            next_item += 1
            item = next_item
            try:
                evicted_model = model.push(item, prio)
            except QueueFull:
                with pytest.raises(QueueFull):
                    q.push(item, prio)
                counts["full"] += 1
            else:
                entry, evicted = q.push(item, prio)
                handles[item] = entry
                counts["push"] += 1
                if evicted_model is None:
                    assert evicted is None, step
                else:
                    counts["evict"] += 1
                    assert evicted is not None, step
                    assert evicted.item == evicted_model, step
                    assert evicted.alive is False
        elif op < 0.70:
            got = q.pop()
            assert got == model.pop(), step
            counts["pop"] += 1
        elif op < 0.92:
            if not handles:
                continue
            item = rng.choice(list(handles))
            expected = model.remove(item)
            assert q.remove(handles[item]) is expected, step
            assert q.remove(handles[item]) is False
            counts["remove"] += int(expected)
        elif op < 0.97:
            prio = rng.randrange(levels)
            next_item += 1
            item = next_item
            handles[item] = q.requeue(item, prio)
            model.requeue(item, prio)
            counts["requeue"] += 1
        elif op < 0.985:
            assert list(q.drain()) == [e[2] for e in model.items], step
            model.items.clear()
        else:
            assert q.peek() == (model.items[0][2] if model.items else None)
        assert len(q) == len(model.items), step
        for p in range(levels):
            assert q.depth(p) == model.depth(p), (step, p)
            assert q.ahead_of(p) == model.ahead_of(p), (step, p)
    # The run exercised every path.
    assert counts["push"] > 100 and counts["pop"] > 100 and counts["remove"] > 0
    if capacity > 1 or levels > 1:
        assert counts["full"] > 0
    if levels > 1:
        assert counts["evict"] > 0
    assert list(q.drain()) == [e[2] for e in model.items]

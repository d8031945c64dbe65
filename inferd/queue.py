"""A bounded priority queue with eviction of the least urgent entry.

Semantics (docs/architecture.md, "Queueing"):

* A lower priority number is more urgent; entries are FIFO within a level.
* The bound is on admission. When the queue is full, a newcomer is rejected,
  unless it is strictly more urgent than the least urgent queued entry: that
  entry (the newest of the least urgent level, the one that has waited least)
  is evicted to make room. This is SGLang's rule, and Triton's strict levels.
* Entries can be removed from the middle (cancel, deadline expiry) in O(1):
  removal marks the handle dead and the dead entry is skipped later.
* :meth:`requeue` puts an already admitted entry back at the head of its level
  (a request whose worker died before starting it). It never fails and is not
  subject to the bound, because refusing an accepted request would break the
  "exactly one final reply" promise in a worse way than a brief overshoot,
  which is itself bounded by the credits the lost worker held.

Pure logic: no clock, no sockets.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """The newcomer was not admitted."""


class Entry(Generic[T]):
    """A handle on a queued item; ``alive`` goes False once popped or removed."""

    __slots__ = ("item", "priority", "alive")

    def __init__(self, item: T, priority: int):
        self.item = item
        self.priority = priority
        self.alive = True


class BoundedPriorityQueue(Generic[T]):
    def __init__(self, capacity: int, levels: int):
        if capacity < 1 or levels < 1:
            raise ValueError("capacity and levels must be >= 1")
        self.capacity = capacity
        self.levels = levels
        self._levels: list[deque[Entry[T]]] = [deque() for _ in range(levels)]
        self._live = [0] * levels
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def depth(self, priority: int) -> int:
        return self._live[priority]

    def push(self, item: T, priority: int) -> tuple[Entry[T], Entry[T] | None]:
        """Admit ``item``. Returns its handle and the evicted entry, if any.

        Raises :class:`QueueFull` when the queue is full and nothing less
        urgent than ``priority`` is queued.
        """
        self._check_priority(priority)
        evicted = None
        if self._len >= self.capacity:
            worst = self._least_urgent_level()
            if worst is None or worst <= priority:
                raise QueueFull()
            evicted = self._pop_newest(worst)
        entry = Entry(item, priority)
        self._levels[priority].append(entry)
        self._live[priority] += 1
        self._len += 1
        return entry, evicted

    def requeue(self, item: T, priority: int) -> Entry[T]:
        """Put an admitted item back at the head of its level, ignoring the bound."""
        return self._admitted(item, priority, head=True)

    def append(self, item: T, priority: int) -> Entry[T]:
        """Put an admitted item at the tail of its level, ignoring the bound: a reload moving
        queued items to a smaller queue keeps them all, and only newcomers are refused."""
        return self._admitted(item, priority, head=False)

    def _admitted(self, item: T, priority: int, head: bool) -> Entry[T]:
        self._check_priority(priority)
        entry = Entry(item, priority)
        (self._levels[priority].appendleft if head else self._levels[priority].append)(entry)
        self._live[priority] += 1
        self._len += 1
        return entry

    def pop(self) -> T | None:
        """Remove and return the most urgent, oldest item; None when empty."""
        if not self._len:
            return None
        for level, dq in enumerate(self._levels):
            if not self._live[level]:
                continue
            while dq:
                entry = dq.popleft()
                if entry.alive:
                    self._kill(entry)
                    return entry.item
        raise AssertionError("live count out of step with the levels")  # pragma: no cover

    def peek(self) -> T | None:
        for level, dq in enumerate(self._levels):
            if not self._live[level]:
                continue
            while dq and not dq[0].alive:
                dq.popleft()
            return dq[0].item
        return None

    def remove(self, entry: Entry[T]) -> bool:
        """Remove a queued entry in O(1). False if it had already left."""
        if not entry.alive:
            return False
        self._kill(entry)
        return True

    def drain(self) -> Iterator[T]:
        """Remove and yield every item, most urgent first."""
        while self._len:
            yield self.pop()  # type: ignore[misc]

    def ahead_of(self, priority: int) -> int:
        """How many queued items would be served before a newcomer at ``priority``."""
        return sum(self._live[: priority + 1])

    def _kill(self, entry: Entry[T]) -> None:
        entry.alive = False
        self._live[entry.priority] -= 1
        self._len -= 1
        dq = self._levels[entry.priority]
        if not self._live[entry.priority]:
            dq.clear()  # drop dead handles so removed entries cannot pile up

    def _least_urgent_level(self) -> int | None:
        for level in range(self.levels - 1, -1, -1):
            if self._live[level]:
                return level
        return None

    def _pop_newest(self, level: int) -> Entry[T]:
        dq = self._levels[level]
        while dq:
            entry = dq.pop()
            if entry.alive:
                self._kill(entry)
                return entry
        raise AssertionError("live count out of step with the levels")  # pragma: no cover

    def _check_priority(self, priority: int) -> None:
        if not 0 <= priority < self.levels:
            raise ValueError(f"priority {priority} outside 0..{self.levels - 1}")

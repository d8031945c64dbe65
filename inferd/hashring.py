"""A consistent-hash ring, the substrate of sticky routing with bounded loads.

Each member owns ``vnodes`` points on a 64-bit ring; a key belongs to the
first point clockwise of its hash. Adding or removing one of N members moves
only the keys of that member's arcs, about 1/N of them, where hash-mod-N
moves almost all. The hash is BLAKE2b, stable across processes and restarts
(Python's ``hash`` is salted per process), so a key maps to the same member in
every broker that has the same members.

Pure logic: no sockets, no clock.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Iterator


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, vnodes: int = 128):
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.vnodes = vnodes
        self._members: set[str] = set()
        self._hashes: list[int] = []
        self._owners: list[str] = []

    def __contains__(self, member: str) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: str) -> None:
        if member in self._members:
            return
        self._members.add(member)
        for i in range(self.vnodes):
            point = stable_hash(f"{member}#{i}")
            at = bisect.bisect_left(self._hashes, point)
            self._hashes.insert(at, point)
            self._owners.insert(at, member)

    def remove(self, member: str) -> None:
        if member not in self._members:
            return
        self._members.discard(member)
        keep = [(h, m) for h, m in zip(self._hashes, self._owners) if m != member]
        self._hashes = [h for h, _ in keep]
        self._owners = [m for _, m in keep]

    def walk(self, key: str) -> Iterator[str]:
        """Every member once, in ring order from the key's position: its owner first."""
        if not self._hashes:
            return
        start = bisect.bisect_right(self._hashes, stable_hash(key)) % len(self._hashes)
        seen: set[str] = set()
        n = len(self._hashes)
        for i in range(n):
            member = self._owners[(start + i) % n]
            if member not in seen:
                seen.add(member)
                yield member
                if len(seen) == len(self._members):
                    return

    def owner(self, key: str) -> str | None:
        return next(self.walk(key), None)

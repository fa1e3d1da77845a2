"""Many timers in one structure: keys with a due time each, popped in due order a bounded
number at a time -- the agent's unacknowledged messages (each with its next retry or its
deadline), so that a loop turn touches only the due ones, never all of them.  The NIC
worker's jobs (``nic/timers.py``) pop it a slice per turn."""
from __future__ import annotations

import heapq
import math

INF = float("inf")


class DeadlineQueue:
    """Keys with a due time each, popped in due order at most `limit` at a time.

    A timer wheel without a fixed size: keys sit in buckets of `resolution` seconds (a
    key is due at its bucket's end, at most one resolution late), the buckets that hold
    keys in a heap (one entry per bucket, not per key).  ``set(key, due)`` (re)schedules
    a key, ``discard`` forgets it, both O(1) and leaving nothing stale behind: an
    acknowledgement costs a dict operation, and a pop touches only due keys.  Keys need
    not be comparable; within a bucket their order is unspecified."""

    __slots__ = ("_res", "_where", "_buckets", "_heap")

    def __init__(self, resolution: float = 0.001):
        self._res = float(resolution)
        self._where: dict = {}  # key -> bucket
        self._buckets: dict = {}  # bucket -> {key: None}
        self._heap: list = []  # buckets present in self._buckets, each once

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def _bucket(self, due: float) -> int:
        # (a due time on a bucket's edge stays in that bucket, float noise aside)
        return math.ceil(due / self._res - 1e-6) if due < INF else _FAR

    def set(self, key, due: float) -> None:
        b = self._bucket(due)
        old = self._where.get(key)
        if old is not None:
            if old == b:
                return
            del self._buckets[old][key]  # an emptied bucket leaves the heap when it comes up
        self._where[key] = b
        bk = self._buckets.get(b)
        if bk is None:
            bk = self._buckets[b] = {}
            heapq.heappush(self._heap, b)
        bk[key] = None

    def advance_all(self, due: float) -> None:
        """Every key due at `due` at the latest (keys due later are moved to `due`): whole
        buckets merged with C-speed dict updates, no key looked at one by one."""
        b0 = self._bucket(due)
        h, bks, where = self._heap, self._buckets, self._where
        later = [b for b in h if b > b0]
        if not later:
            return
        bk0 = bks.get(b0)
        if bk0 is None:
            bk0 = bks[b0] = {}
        for b in later:
            bk = bks.pop(b)
            bk0.update(bk)
            where.update(dict.fromkeys(bk, b0))
        self._heap = [b for b in h if b <= b0 and b != b0] + [b0]
        heapq.heapify(self._heap)

    def discard(self, key) -> None:
        b = self._where.pop(key, None)
        if b is not None:
            del self._buckets[b][key]

    def due_of(self, key):
        """When `key` is due (its bucket's end), None if not queued."""
        b = self._where.get(key)
        return None if b is None else (INF if b == _FAR else b * self._res)

    @property
    def next_due(self) -> float:
        """The earliest time a key is due (inf: none); drops emptied buckets on top."""
        h, bks = self._heap, self._buckets
        while h:
            b = h[0]
            if bks[b]:
                return INF if b == _FAR else b * self._res
            heapq.heappop(h)
            del bks[b]
        return INF

    def pop_due(self, now: float, limit: int) -> list:
        """Up to `limit` keys due by `now`, earliest bucket first (forgotten: ``set`` them
        again to keep them)."""
        h, bks, where = self._heap, self._buckets, self._where
        last = math.floor(now / self._res + 1e-6)
        out = []
        while h and len(out) < limit:
            b = h[0]
            if b > last:
                break
            bk = bks[b]
            while bk and len(out) < limit:
                key = bk.popitem()[0]
                del where[key]
                out.append(key)
            if not bk:
                heapq.heappop(h)
                del bks[b]
        return out


_FAR = 1 << 62  # the bucket of keys due never

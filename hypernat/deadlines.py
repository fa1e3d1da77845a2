"""Many timers in one structure: keys with a due time each, popped in due order a bounded
number at a time -- the agent's unacknowledged messages (each with its next retry or its
deadline), so that a loop turn touches only the due ones, never all of them.  A heap with
lazy removal: ``set`` again moves a key (the old entry goes stale), ``discard`` forgets it,
stale entries are dropped as they come up.  The NIC worker's jobs (``nic/timers.py``)
pop it a slice per turn."""
from __future__ import annotations

import heapq
import itertools

INF = float("inf")


class DeadlineQueue:
    """Keys with a due time each, popped in due order at most `limit` at a time.

    ``set(key, due)`` (re)schedules a key (its earlier entry becomes stale), ``discard``
    forgets it; stale heap entries are dropped when they come up (counted against a
    pop's limit at a quarter of a live one).  Keys need not be comparable."""

    __slots__ = ("_heap", "_due", "_n")

    def __init__(self):
        self._heap: list = []
        self._due: dict = {}
        self._n = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key) -> bool:
        return key in self._due

    def set(self, key, due: float) -> None:
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._n), key))

    def discard(self, key) -> None:
        self._due.pop(key, None)

    def due_of(self, key):
        return self._due.get(key)

    @property
    def next_due(self) -> float:
        """The earliest live due time (inf: none); drops stale entries on top."""
        h, d = self._heap, self._due
        while h:
            due, _, key = h[0]
            if d.get(key) == due:
                return due
            heapq.heappop(h)
        return INF

    def pop_due(self, now: float, limit: int) -> list:
        """Up to `limit` keys due by `now`, earliest first (forgotten: ``set`` them again
        to keep them)."""
        h, d = self._heap, self._due
        out = []
        work = 4 * max(1, limit)  # stale entries cost 1, live ones 4
        pop = heapq.heappop
        while h and len(out) < limit and work > 0:
            due, _, key = h[0]
            if due > now:
                break
            pop(h)
            if d.get(key) == due:
                del d[key]
                out.append(key)
                work -= 4
            else:
                work -= 1
        return out

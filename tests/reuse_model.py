"""The readable reference of ``hypernat.nat._reuse.EndpointReuse``: the reuse-delay queue,
the holds and the parked endpoints as a deque and two dicts (the code BlockPool ran
before it was compiled), with the compiled one's interface (arrays in, arrays out).
``tests/test_reuse.py`` checks that both make the same decisions."""
from __future__ import annotations

import collections

import numpy as np

from hypernat.nat._expire import ENDED_DTYPE
from hypernat.nat._reuse import ENDPOINT_DTYPE, HOLD_DTYPE, PARKED_DTYPE


class ReuseModel:
    def __init__(self):
        self._reuse = collections.deque()  # (release_at, ekey, block, pidx, offset)
        self._holds = {}  # ekey -> leases outstanding
        self._held = {}  # ekey -> (block, pidx, offset): delay passed, holds remain

    def defer(self, ended) -> None:
        self._reuse.extend(tuple(int(v) for v in r) for r in ended.tolist())

    def due(self, now: int, budget: int) -> tuple:
        q, n, free = self._reuse, 0, []
        while q and q[0][0] <= now and n < budget:
            w = q.popleft()
            n += 1
            if self._holds.get(w[1]):
                self._held[w[1]] = w[2:]
            else:
                free.append(w[2:])
        return n, np.array(free, ENDPOINT_DTYPE)

    def hold(self, ekeys) -> None:
        for k in np.asarray(ekeys, np.uint64).tolist():
            self._holds[k] = self._holds.get(k, 0) + 1

    def release(self, ekeys):
        out = []
        for k in np.asarray(ekeys, np.uint64).tolist():
            c = self._holds.get(k, 0) - 1
            if c > 0:
                self._holds[k] = c
                continue
            self._holds.pop(k, None)
            w = self._held.pop(k, None)
            if w is not None:
                out.append(w)
        return np.array(out, ENDPOINT_DTYPE)

    def holds(self, ekey: int) -> int:
        return self._holds.get(ekey, 0)

    def __len__(self):
        return len(self._reuse)

    def stats(self) -> dict:
        return {"ports_waiting_reuse": len(self._reuse), "endpoints_held": len(self._held),
                "holds": sum(self._holds.values())}

    def waiting(self):
        return np.array(list(self._reuse), ENDED_DTYPE)

    def hold_counts(self):
        return np.array(list(self._holds.items()), HOLD_DTYPE)

    def held(self):
        return np.array([(k, *v) for k, v in self._held.items()], PARKED_DTYPE)

    def snapshot(self):
        return self.waiting(), self.hold_counts(), self.held()

    def restore(self, queue, holds, parked) -> None:
        self.__init__()
        self.defer(queue)
        self._holds = {k: c for k, c in holds.tolist() if c > 0}
        self._held = {k: (g, pi, off) for k, g, pi, off in parked.tolist()}

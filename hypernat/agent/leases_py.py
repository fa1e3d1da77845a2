"""The owner's leases, in plain Python: the reference of ``_leases.pyx``.

A lease is a (session, holder) pair with an end ("until", the owner's clock, grace
included): the holder NIC may keep a clone of the session until then, and the owner
keeps the session's external endpoint held (``RuleBuilder.hold``) while any lease on it
runs.  ``LeaseTable`` keeps them indexed by session identity (proto, I, Ip, E, Ep, R,
Rp) and holder, by external endpoint (``at``: ``hypernat ctl rule``) and by end (a
timer heap popped a slice per turn: ``due``).  Every operation takes a batch: grants
for a batch of served fetches or renewals (``grant``), the ACTIVITY records of one
message checked for a lease of their sender (``held``).  ``RuleAgent`` holds and
releases the endpoints in the builder from what these return.

The compiled table (``hypernat.agent._leases``) has the same interface and answers;
``tests/test_pending_table.py`` checks them against each other.
"""
from __future__ import annotations

import heapq
import itertools

import numpy as np

from ..nat.records import WIRE_KEY_FIELDS, WIRE_OF_SESSION


class LeaseTable:
    """Leases granted: session identity -> {holder: until} (dicts and a heap)."""

    def __init__(self, capacity: int = 1024):
        self._l: dict = {}  # sk -> {holder: until}
        self._at: dict = {}  # (proto, E, Ep) -> {sk: None}
        self._ends: list = []  # heap of (until, n, sk, holder), one per lease granted
        self._n = itertools.count()
        self.n_leases = 0
        self.walks = 0

    def grant(self, recs, idx, holder: int, until: float) -> list:
        """A lease for `holder` on the session of each record of `recs` (any layout that
        names a session: SESSION_DTYPE, RULE, ACTIVITY) selected by `idx` (record
        indexes; None: all), ending at `until` (a lease held already: its end moves).
        Returns the external endpoint of each new lease (the endpoints to hold), in order,
        as the block pool keys them: proto << 48 | E << 16 | Ep (uint64 array)."""
        from ..clones_py import _selection, _sessions

        every = _sessions(recs)
        sks = [every[x] for x in _selection(idx, len(recs))]
        new = []
        for sk in sks:
            sk = tuple(sk)
            hs = self._l.get(sk)
            if hs is None:
                self._l[sk] = {holder: until}
                self._at.setdefault((sk[0], sk[3], sk[4]), {})[sk] = None
            elif holder in hs:  # a renewal: the end moves, its timer finds out when due
                hs[holder] = until
                continue
            else:
                hs[holder] = until
            heapq.heappush(self._ends, (until, next(self._n), sk, holder))
            new.append(sk[0] << 48 | sk[3] << 16 | sk[4])
        self.n_leases += len(new)
        return np.array(new, np.uint64)

    def end(self, sk, holder: int) -> bool:
        """End `holder`'s lease on `sk` (True: it ran; release its endpoint)."""
        sk = tuple(sk)
        hs = self._l.get(sk)
        if hs is None or holder not in hs:
            return False
        del hs[holder]
        self.n_leases -= 1
        if not hs:
            del self._l[sk]
            k = (sk[0], sk[3], sk[4])
            at = self._at[k]
            del at[sk]
            if not at:
                del self._at[k]
        return True

    def leases_of(self, recs) -> tuple:
        """The leases on the sessions the records `recs` name (any layout naming
        sessions: SESSION_DTYPE, RULE, ACTIVITY, KEY), as parallel arrays (index of the
        record: int64, holder: int64, until: float64), records in order."""
        from ..clones_py import _sessions

        ix, hs, us = [], [], []
        for k, sk in enumerate(_sessions(recs)):
            for h, until in self._l.get(tuple(sk), {}).items():
                ix.append(k)
                hs.append(h)
                us.append(until)
        return np.array(ix, np.int64), np.array(hs, np.int64), np.array(us, np.float64)

    def end_records(self, recs, idx, holders) -> np.ndarray:
        """End the leases of `holders` (one holder, or one per record selected) on the
        sessions the records `recs` selected by `idx` (None: all) name, as ``end`` does
        for each.  Returns the external endpoints of the leases that ran (the endpoints
        to release), in order, as the block pool keys them (uint64 array)."""
        from ..clones_py import _selection, _sessions

        every = _sessions(recs)
        sel = list(_selection(idx, len(recs)))
        hs = [int(holders)] * len(sel) if np.ndim(holders) == 0 else [int(h) for h in holders]
        if len(hs) != len(sel):
            raise ValueError(f"{len(hs)} holders for {len(sel)} records")
        out = []
        for x, h in zip(sel, hs):
            sk = tuple(every[x])
            if self.end(sk, h):
                out.append(sk[0] << 48 | sk[3] << 16 | sk[4])
        return np.array(out, np.uint64)

    def due(self, now: float, limit: int):
        """Leases whose end passed by `now`, ended: their endpoint keys (proto << 48 |
        E << 16 | Ep, a uint64 array, one per lease, in the order they ended: what the
        builder's ``release_many`` takes), looking at most `limit` timers (a lease
        renewed meanwhile is queued again under its end)."""
        out = []
        ends = self._ends
        while ends and now >= ends[0][0] and limit > 0:
            limit -= 1
            _, _, sk, h = heapq.heappop(ends)
            hs = self._l.get(sk)
            until = hs.get(h) if hs is not None else None
            if until is None:
                continue  # ended already (acknowledged REVOKE)
            if until <= now:
                self.end(sk, h)
                out.append(sk[0] << 48 | sk[3] << 16 | sk[4])
            else:  # renewed meanwhile
                heapq.heappush(ends, (until, next(self._n), sk, h))
        return np.array(out, np.uint64)

    @property
    def next_due(self) -> float:
        """The earliest end queued (inf: none)."""
        return self._ends[0][0] if self._ends else float("inf")

    def held(self, recs, holder: int) -> list:
        """For each ACTIVITY record: does `holder` hold a lease on its session? (bool array)"""
        import numpy as np

        out = []
        for sk in zip(*(recs[f].tolist() for f in WIRE_KEY_FIELDS)):
            hs = self._l.get(sk)
            out.append(hs is not None and holder in hs)
        return np.array(out, bool)

    # -- lookups --------------------------------------------------------------------------
    def get(self, sk, default=None):
        """{holder: until} of `sk` (a copy), or `default`."""
        try:
            hs = self._l.get(tuple(sk))
        except TypeError:
            return default
        return default if hs is None else dict(hs)

    def __getitem__(self, sk):
        got = self.get(sk)
        if got is None:
            raise KeyError(sk)
        return got

    def __contains__(self, sk):
        return self.get(sk) is not None

    def __len__(self):
        return len(self._l)

    def __bool__(self):
        return bool(self._l)

    def at(self, proto: int, eaddr: int, eport: int) -> list:
        """[(sk, {holder: until})] on one external endpoint."""
        return [(sk, dict(self._l[sk])) for sk in self._at.get((proto, eaddr, eport), ())]

    def items(self):
        """Every session with a lease, [(sk, {holder: until})]: a walk (counted)."""
        self.walks += 1
        return [(sk, dict(hs)) for sk, hs in self._l.items()]

    def keys(self):
        return [sk for sk, _ in self.items()]

    def values(self):
        return [hs for _, hs in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def timers(self) -> list:
        """[(due, sk, holder)] queued (an entry whose lease ended or moved is stale)."""
        return [(d, sk, h) for d, _, sk, h in self._ends]


# ------------------------------------------------------------------------------------------
# The owner's answer to one ACTIVITY message: record conversions
# ------------------------------------------------------------------------------------------
def activity_sessions(recs, tick: int, owner: int):
    """The sessions of ACTIVITY records as the owner merges them (SESSION_DTYPE): their
    identity and rule_id, last_seen `tick` less the whole seconds idle (clipped to the
    tick range), both directions (activity either way keeps both entries alive), the TCP
    flags per direction (a SYN seen one way only leaves the session half-open), `owner`."""
    import numpy as np

    from .. import messages as M
    from ..nat.records import SESSION_DTYPE

    if not isinstance(recs, np.ndarray) or recs.dtype != M.ACTIVITY_DTYPE:
        raise TypeError(f"ACTIVITY records expected, not {getattr(recs, 'dtype', type(recs))}")
    sess = np.zeros(len(recs), SESSION_DTYPE)
    for f_w, f_s in WIRE_OF_SESSION:
        sess[f_s] = recs[f_w]
    idle = (recs["idle_ms"] // 1000).astype(np.int64)
    sess["last_seen"] = np.clip(int(tick) - idle, 0, 0xFFFFFFFF)
    sess["dirs"] = 3  # DIR_BIT_OUT | DIR_BIT_IN
    sess["tcp_out"], sess["tcp_in"] = M.activity_tcp_dirs(recs)
    sess["owner"] = owner
    return sess


def lease_records(recs, idx, owner: int, lease_ms: int):
    """LEASE records (the RULE layout) renewing the sessions of the ACTIVITY records
    `recs` selected by `idx` (None: all): identity, rule_id, `owner`, `lease_ms`."""
    import numpy as np

    from .. import messages as M
    from ..clones_py import _selection

    if not isinstance(recs, np.ndarray) or recs.dtype != M.ACTIVITY_DTYPE:
        raise TypeError(f"ACTIVITY records expected, not {getattr(recs, 'dtype', type(recs))}")
    r = recs[_selection(idx, len(recs))]
    out = np.zeros(len(r), M.RULE_DTYPE)
    for f in WIRE_KEY_FIELDS + ("rule_id",):
        out[f] = r[f]
    out["owner"], out["lease_ms"] = owner, lease_ms
    return out

"""The holder side of cloning: other NICs' sessions held here as clone entries.

A clone is an entry with F_CLONE in this NIC's flow tables, carrying the owner's rule
id; the owner granted a lease on it (``lease`` in the slot: the low 16 bits of the
clock second it runs out, 0 = the agent tracks it).  ``CloneHolder`` owns the
operations on those entries:

    install       a batch of records (RULE answers / PUSHes, or SESSION_DTYPE) -> entries
                  (hypernat._clones, compiled, read in place; hypernat.clones_py over the
                  pure-Python FlowTable): an owned entry in the way, or an endpoint this
                  NIC owns, refuses the record
    remove        REVOKE: clone entries deleted (owned entries never touched)
    renew         LEASE: their lease moved
    activity      clone entries hit since the last call (F_ACTIVE), as ACTIVITY records,
                  in bounded slices (a cursor per table)

Leases running out are the expiry's (``hypernat.nat.expiry``); refusals are counted by
the RuleBuilder from what ``install`` returns.
"""
from __future__ import annotations

import numpy as np

from .. import layout
from .records import DIR_BIT_IN, DIR_BIT_OUT, DIR_BITS_BOTH, SESSION_DTYPE, record_keys, slot_records

_F_OCC, _F_CLONE, _F_ACTIVE = layout.F_OCCUPIED, layout.F_CLONE, layout.F_ACTIVE


class CloneHolder:
    """Clone entries in NIC `nic`'s flow tables `out` / `inn`; `part` the Partition
    (who owns an external endpoint)."""

    def __init__(self, out, inn, part, nic: int):
        self.out = out
        self.inn = inn
        self._part = part
        self._nic = int(nic)
        self._act_cur = [0, 0]

    def install(self, records, now: int, lease: int, dirs=DIR_BITS_BOTH, idx=None, own=None) -> tuple:
        """The records `records` selected by `idx` (None: all) installed as clones at
        clock `now` with 16-bit `lease` (``lease16``): `records` a RULE / PUSH message's
        (``messages.RULE_DTYPE``) or SESSION_DTYPE, read in place by the compiled install
        (``hypernat._clones.install_records``); `dirs` the entries (DIR_BIT_*, scalar or
        per record); `own` the owner NIC of each record's external endpoint if the
        caller knows it (per record; None: the partition is asked).  Returns (entries
        installed per selected record (int8), records refused as bad, inserts refused for
        want of room).  A batch is exactly the records installed one by one, in order."""
        if own is None:
            own = self._owners(records, idx)
        return _clone_installer(self.out)(self.out, self.inn, records, idx, dirs, own, self._nic, now, lease)

    def _owners(self, records, idx) -> np.ndarray:
        """The owner of each record's external endpoint (per record; the unselected: -1)."""
        n = len(records)
        names = records.dtype.names or ()
        ea, ep = ("eaddr", "eport") if "eaddr" in names else ("ext_addr", "ext_port")
        own = np.full(n, -1, np.int64)
        sel = np.arange(n) if idx is None else np.asarray(idx, np.int64).reshape(-1)
        if len(sel) <= 4:  # one connection's clone (the passive install's common case):
            for x in sel.tolist():  # partition arithmetic on ints, not ~25 us of numpy
                own[x] = self._part.owner(int(records[ea][x]), int(records[ep][x]))
        elif len(sel):
            own[sel] = self._part.owners(records[ea][sel].astype(np.int64), records[ep][sel].astype(np.int64))
        return own

    def _entries(self, records):
        """Yield (table, key) for the clone entries named by records (`dirs`, 0 = both)."""
        for rec in np.asarray(records).reshape(-1):
            ok, ik = record_keys(rec)
            d = int(rec["dirs"]) or DIR_BITS_BOTH
            if d & DIR_BIT_OUT:
                yield self.out, ok
            if d & DIR_BIT_IN:
                yield self.inn, ik

    def remove(self, records) -> int:
        """Delete the clone entries `records` name; returns entries deleted."""
        n = 0
        for tbl, key in self._entries(records):
            j = tbl.lookup(*key)
            if j >= 0 and tbl.slots["flags"][j] & _F_CLONE:
                n += tbl.delete(*key)
        return n

    def renew(self, records, lease: int) -> int:
        """Set the 16-bit `lease` of the clone entries `records` name; returns entries."""
        n = 0
        for tbl, key in self._entries(records):
            j = tbl.lookup(*key)
            if j >= 0 and tbl.slots["flags"][j] & _F_CLONE:
                tbl.slots["lease"][j] = lease
                n += 1
        return n

    def activity(self, clear=True, max_slots=None) -> np.ndarray:
        """Clone entries hit since the last call, as SESSION_DTYPE records (one per
        entry, `dirs` = its direction, `owner` = the owning NIC, its TCP state).  Clears
        F_ACTIVE when `clear`.  `max_slots` bounds the scan per table (a cursor continues
        next call); None scans the whole tables."""
        parts = []
        for t, tbl in enumerate((self.out, self.inn)):
            slots = tbl.slots
            ns = len(slots)
            if max_slots is None or max_slots >= ns:
                lo, hi = 0, ns
            else:
                lo = self._act_cur[t] % ns
                hi = min(lo + max_slots, ns)
                self._act_cur[t] = hi % ns
            fl = slots["flags"][lo:hi]
            sel = np.flatnonzero((fl & (_F_OCC | _F_CLONE | _F_ACTIVE)) == (_F_OCC | _F_CLONE | _F_ACTIVE)) + lo
            if not len(sel):
                continue
            r = slot_records(slots[sel], DIR_BIT_OUT if t == 0 else DIR_BIT_IN, self._part, with_tcp=True)
            if clear:
                slots["flags"][sel] &= ~np.uint8(_F_ACTIVE)
            parts.append(r)
        return np.concatenate(parts) if parts else np.zeros(0, SESSION_DTYPE)


def lease16(lease_until) -> int:
    """A lease's end (clock seconds; 0 = none) as the slot's 16-bit field (never 0)."""
    if not lease_until:
        return 0
    v = int(lease_until) & 0xFFFF
    return v or 1


def _clone_installer(table):
    """The clone install for this kind of flow table: compiled over the compiled
    FlowTable (through its .pxd), the plain-Python reference over fastpath_py's."""
    global _CLONES_C
    if _CLONES_C is None:
        try:
            from .. import _clones
            from .._fastpath import FlowTable as _CFlowTable
            _CLONES_C = (_CFlowTable, _clones.install_records)
        except ImportError:
            _CLONES_C = (None, None)
    if _CLONES_C[0] is not None and type(table) is _CLONES_C[0]:
        return _CLONES_C[1]
    from ..clones_py import install_records
    return install_records


_CLONES_C = None

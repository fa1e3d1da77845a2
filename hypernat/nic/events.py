"""An optional event log for a NIC worker: when did a connection's packet arrive, when was
its rule built or its clone installed, when was the held packet sent.

The paper's Table I times a first packet and a later one *inside* the gateway (arrival
at the 1st NIC, rule installed there, ACK at the 2nd NIC, rule installed there).  The
worker can record exactly those moments, per batch, into a bounded ring:

    port.recv ──t_rx──► translate ──► misses ──► RuleBuilder ──t──► RULE_BUILT ──► replay ──t──► REPLAY_SENT
        │                  │                       └─► fetch ──t──► FETCH_SENT
        │                  └─ (hits, only with hits=True) ──► RX_HIT at t_rx
        └─ RX_MISS at t_rx for every frame that missed
    RuleAgent (RULE / PUSH from the owner) ──► install ──► on_installed ──t──► CLONE_INSTALLED

Cost.  Off (``NicWorker(events=None)``, the default) the worker pays two tests of a
local against None per batch and nothing else.  On, it pays one clock read per
batch and a vectorised copy of the keys of the frames that missed (the slow path: a
miss costs tens of microseconds anyway); hit frames are recorded only with
``hits=True`` (an experiment that sends one connection at a time and wants the arrival
of a later packet), again as one numpy copy per batch, never a Python loop per packet.

Clock.  ``time.monotonic_ns()`` (CLOCK_MONOTONIC): one system-wide clock, so the events of
the emulated deployment's NIC processes and the sender's own timestamps (taken with the
same function) compare directly.  A batch's frames share its receive time.

Keys.  Each event carries the lookup key of the frame as the NIC saw it, before any
rewrite: outgoing (OUT) ``(proto, internal, remote)``, incoming (IN) ``(proto, remote,
external)``.  A clone install carries the key of each direction it installs, in the same
form, so "the reply's key on NIC j" finds its RX_MISS, CLONE_INSTALLED and REPLAY_SENT.

The ring keeps the last ``capacity`` events (``dropped`` counts what it overwrote).
"""
from __future__ import annotations

import time

import numpy as np

# event kinds
RX_MISS = 1  # a frame that missed both tables arrived (its batch's receive time)
RX_HIT = 2  # a frame that hit arrived (only with hits=True)
RULE_BUILT = 3  # the RuleBuilder returned with the frame's rule in place (built, or found: replay next)
FETCH_SENT = 4  # the frame was queued on a FETCH to the owner (the message leaves at the turn's flush)
CLONE_INSTALLED = 5  # a clone entered the tables (RULE answer, PUSH, revalidation)
REPLAY_SENT = 6  # a held or rebuilt frame went out after its rule was installed
KIND_NAMES = {RX_MISS: "rx_miss", RX_HIT: "rx_hit", RULE_BUILT: "rule_built", FETCH_SENT: "fetch_sent",
              CLONE_INSTALLED: "clone_installed", REPLAY_SENT: "replay_sent"}

EVENT_DTYPE = np.dtype([("t_ns", "<i8"), ("kind", "u1"), ("dir", "u1"), ("proto", "u1"), ("saddr", "<u4"),
                        ("sport", "<u2"), ("daddr", "<u4"), ("dport", "<u2")])

now_ns = time.monotonic_ns


class EventLog:
    """A bounded ring of EVENT_DTYPE records (see the module docstring)."""

    def __init__(self, capacity: int = 65536, hits: bool = False):
        if capacity < 1:
            raise ValueError(f"event log capacity must be >= 1, not {capacity}")
        self.capacity = int(capacity)
        self.hits = bool(hits)
        self.ring = np.zeros(self.capacity, EVENT_DTYPE)
        self.total = 0  # events ever added

    @property
    def dropped(self) -> int:
        return max(0, self.total - self.capacity)

    def __len__(self) -> int:
        return min(self.total, self.capacity)

    def add_keys(self, kind: int, direction: int, t_ns: int, keys) -> None:
        """One event per key (a KEY_DTYPE array, or any array with proto/saddr/sport/
        daddr/dport fields), all at time t_ns: one vectorised write."""
        m = len(keys)
        if m == 0:
            return
        if m > self.capacity:
            keys = keys[m - self.capacity:]
            self.total += m - self.capacity
            m = self.capacity
        pos = (self.total + np.arange(m)) % self.capacity
        r = self.ring
        r["t_ns"][pos] = t_ns
        r["kind"][pos] = kind
        r["dir"][pos] = direction
        for f in ("proto", "saddr", "sport", "daddr", "dport"):
            r[f][pos] = keys[f]
        self.total += m

    def add_clones(self, records, dirs, installed, t_ns: int) -> None:
        """CLONE_INSTALLED for the records `installed` names (their indexes: what the
        RuleAgent's ``on_installed`` is told), one event per direction installed (`dirs`:
        scalar or per record, DIR_BIT_OUT | DIR_BIT_IN), each with that direction's
        lookup key.  `records` SESSION_DTYPE or the wire RULE layout (a RULE / PUSH
        message's records)."""
        from ..rules import DIR_BIT_IN, DIR_BIT_OUT
        from ..verdicts import IN, OUT

        r = np.asarray(records).reshape(-1)
        sel = np.asarray(installed, np.int64).reshape(-1)
        if not len(sel):
            return
        dirs = np.broadcast_to(np.asarray(dirs, dtype=np.uint8), (len(r),))[sel]
        r = r[sel]
        i, ip, e, ep, rr, rp = (("iaddr", "iport", "eaddr", "eport", "raddr", "rport") if "iaddr" in r.dtype.names
                                else ("int_addr", "int_port", "ext_addr", "ext_port", "rem_addr", "rem_port"))
        for d, bit, (sa, sp, da, dp) in ((OUT, DIR_BIT_OUT, (i, ip, rr, rp)), (IN, DIR_BIT_IN, (rr, rp, e, ep))):
            x = r[(dirs & bit) != 0]
            if len(x):
                k = np.zeros(len(x), EVENT_DTYPE)
                k["proto"], k["saddr"], k["sport"], k["daddr"], k["dport"] = x["proto"], x[sa], x[sp], x[da], x[dp]
                self.add_keys(CLONE_INSTALLED, d, t_ns, k)

    def snapshot(self) -> np.ndarray:
        """The events kept, oldest first (a copy)."""
        n = len(self)
        if self.total <= self.capacity:
            return self.ring[:n].copy()
        s = self.total % self.capacity
        return np.concatenate([self.ring[s:], self.ring[:s]])


def find(events: np.ndarray, kind: int, proto: int, saddr: int, sport: int, daddr: int, dport: int,
         after_ns: int = 0) -> int | None:
    """The time of the first event of `kind` for this key at or after `after_ns`, or None."""
    e = events
    m = ((e["kind"] == kind) & (e["proto"] == proto) & (e["saddr"] == saddr) & (e["sport"] == sport)
         & (e["daddr"] == daddr) & (e["dport"] == dport) & (e["t_ns"] >= after_ns))
    idx = np.flatnonzero(m)
    return int(e["t_ns"][idx[0]]) if len(idx) else None

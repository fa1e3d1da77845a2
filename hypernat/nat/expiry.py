"""Expiry: idle sessions of the owner and clones whose lease ran out, in bounded steps.

    RuleBuilder.sweep(now) ──► Expiry.sweep(builder, now)
        1. endpoints whose reuse delay passed, quarantines that ended   builder.release_due
        2. out table, the next ``sweep_step`` slots from a cursor:
             numpy over the raw slot words: occupied and idle for the shortest timeout
             per candidate (Python, at most ``sweep_max_expire`` or ``sweep_budget_us``):
               clone entry            dropped if its lease ran out (``drain_lease_expired``)
               owned entry            both directions merged (the in entry's last_seen and
                                      TCP state), ``timeout_for``; idle: both entries
                                      deleted, the session's bookkeeping  builder.end_session
        3. in table (only once a clone has a lease): clones whose lease ran out

``Expiry`` owns the timeouts, the two cursors, the lease-expired clones not yet drained
and its counters (``EXPIRY_EVENTS``, ``lease_expired``), which the builder takes with
``drain``.  It reads and deletes flow-table entries; everything else about a session
that ends (mapping, endpoint, translation log, REVOKE records) is the builder's
``end_session``.  The builder is reached only through ``SessionOwner``.
"""
from __future__ import annotations

import dataclasses
import time as _time
import typing

import numpy as np

from .. import layout
from ..verdicts import SLOW_PATH_REASON_NAMES
from .records import DIR_BIT_IN, DIR_BIT_OUT, SESSION_DTYPE, slot_records

PROTO_ICMP, PROTO_TCP, PROTO_UDP = layout.PROTO_ICMP, layout.PROTO_TCP, layout.PROTO_UDP
_SYN, _FIN, _RST = layout.TCP_SYN, layout.TCP_FIN, layout.TCP_RST
_F_OCC, _F_CLONE = layout.F_OCCUPIED, layout.F_CLONE
_R_LEASE = SLOW_PATH_REASON_NAMES.index("lease_expired")

# Sessions expired by the sweep, by protocol and TCP state (timeout_for's classes): the
# first events of ``hypernat.rules.EVENT_NAMES``.
EXPIRY_EVENTS = ("expired_tcp_established", "expired_tcp_transitory", "expired_udp", "expired_icmp")


@dataclasses.dataclass
class SweepResult:
    scanned: int = 0  # slots examined
    expired: int = 0  # sessions removed
    mappings_removed: int = 0
    clones_dropped: int = 0  # clone entries whose lease ran out
    endpoints_released: int = 0  # external endpoints back in the free pool
    wrapped: bool = False  # the cursor passed the end of the table


class SessionOwner(typing.Protocol):
    """What the expiry needs of the builder whose sessions it expires."""

    out: typing.Any  # FlowTable: the out entries (owned and clones)
    inn: typing.Any  # FlowTable: the in entries
    maps: typing.Any  # hypernat.nat._mappings.Mappings (``matches``)
    part: typing.Any  # hypernat.partition.Partition (``owners``)

    def end_session(self, rid: int, raddr: int, rport: int, now: int, last_seen: int = 0, tcp_out: int = 0,
                    tcp_in: int = 0) -> bool: ...  # fmt: skip

    def release_due(self, now: int, budget: int) -> int: ...

    def flush_log(self) -> None: ...


class Expiry:
    """Timeouts (``config.timeouts``) and sweep limits (``config.limits``) of one NIC."""

    def __init__(self, timeouts, limits):
        self.configure(timeouts, limits)
        self.lease_clones = False  # set once a clone is installed with a lease to watch
        self._lease_expired = []
        self._cur_out = 0
        self._cur_in = 0
        self._events = dict.fromkeys(EXPIRY_EVENTS, 0)
        self._lease_n = 0

    def configure(self, timeouts, limits) -> None:
        """New timeouts and sweep limits (SIGHUP): from the next step on."""
        t = timeouts
        self.t_udp, self.t_est, self.t_trans, self.t_icmp = t.udp, t.tcp_established, t.tcp_transitory, t.icmp
        self._t_tcp_min = min(t.tcp_transitory, t.tcp_established)
        self._t_floor = min(self._t_tcp_min, t.udp, t.icmp)  # no session expires sooner
        self.sweep_step = limits.sweep_step
        self.sweep_max_expire = limits.sweep_max_expire
        self.sweep_budget_us = limits.sweep_budget_us

    def drain(self, counters: list, events: dict) -> None:
        """Add the counts since the last call to the builder's: ``lease_expired`` into
        `counters` (by SLOW_PATH_REASON_NAMES index), the EXPIRY_EVENTS into `events`."""
        if self._lease_n:
            counters[_R_LEASE] += self._lease_n
            self._lease_n = 0
        ev = self._events
        for k, v in ev.items():
            if v:
                events[k] += v
                ev[k] = 0

    def drain_lease_expired(self) -> np.ndarray:
        """Clone sessions the sweep dropped because their lease ran out."""
        if not self._lease_expired:
            return np.zeros(0, SESSION_DTYPE)
        out = np.concatenate(self._lease_expired)
        self._lease_expired = []
        return out

    def cursors(self) -> list:
        """[out, in]: where the next step starts in each table (snapshots keep them)."""
        return [self._cur_out, self._cur_in]

    def set_cursors(self, cursors) -> None:
        self._cur_out, self._cur_in = cursors

    def timeout_for(self, proto: int, tcp_out: int, tcp_in: int) -> int:
        """Idle timeout of a session from its protocol and the TCP flags seen each way.

        TCP: RST or FIN seen -> transitory (RFC 5382 REQ-5; a RST keeps the session for
        the transitory timeout, RFC 7857 2.2); SYN both ways and nothing else ->
        established; SYN one way only -> transitory (partially open); no flag seen (picked
        up mid-stream, e.g. restored) -> established.  UDP / ICMP: their own timeouts.
        """
        if proto == PROTO_TCP:
            st = tcp_out | tcp_in
            if st & (_RST | _FIN):
                return self.t_trans
            if tcp_out & _SYN and tcp_in & _SYN:
                return self.t_est
            if st & _SYN:
                return self.t_trans
            return self.t_est
        if proto == PROTO_UDP:
            return self.t_udp
        return self.t_icmp

    def sweep(self, owner: SessionOwner, now, max_slots=None, max_expire=None, budget_us=None) -> SweepResult:
        """One bounded expiry step: examine the next `max_slots` slots of each table
        (default ``limits.sweep_step``), expire idle sessions until `max_expire` of
        them (default ``limits.sweep_max_expire``) or `budget_us` microseconds of
        expiry work (default ``limits.sweep_budget_us``; at least one session per step)
        are spent -- the cursor stops after the last one handled, so a mass expiry is
        spread over steps -- drop lease-expired clones, release endpoints whose reuse
        delay passed.  Call once per batch (an idle loop may call it with larger
        budgets).  `owner` is the builder whose tables and sessions these are."""
        now = int(now)
        step = self.sweep_step if max_slots is None else int(max_slots)
        budget = max(1, self.sweep_max_expire if max_expire is None else int(max_expire))
        bus = self.sweep_budget_us if budget_us is None else budget_us
        res = SweepResult()
        res.endpoints_released = owner.release_due(now, max(budget, 16))
        out, inn = owner.out, owner.inn
        # -- out table: owned sessions (both directions merged) and clones.  First a
        # cheap filter over the raw slot words (idle for at least the shortest timeout,
        # occupied), then the exact per-protocol test on the few slots that pass.
        w = out.slots.view(np.uint32).reshape(-1, 8)
        ns = len(w)
        lo = self._cur_out if self._cur_out < ns else 0
        hi = min(lo + step, ns)
        sel = np.zeros(0, np.intp)
        if now >= self._t_floor:
            word3 = w[lo:hi, 3]  # proto | flags << 8 | new_port << 16
            m = w[lo:hi, 6] <= now - self._t_floor  # last_seen
            m &= (word3 & (_F_OCC << 8)) != 0
            sel = np.flatnonzero(m)
            if len(sel) > 4 * budget:  # a mass expiry: look at a few at a time
                sel = sel[: 4 * budget]
                hi = lo + int(sel[-1]) + 1
            if len(sel):
                w3 = word3[sel]
                pr = w3 & 0xFF
                thr = np.where(pr == PROTO_TCP, self._t_tcp_min, np.where(pr == PROTO_UDP, self.t_udp, self.t_icmp))
                keep = (now - w[lo:hi, 6][sel].astype(np.int64)) >= thr
                keep &= (w3 & (_F_CLONE << 8)) == 0  # clones: the agent's (leases), not idleness
                sel = sel[keep]
        if self.lease_clones:
            w7 = w[lo:hi, 7]  # tcp_state | user << 8 | lease << 16
            lease = (w7 >> 16).astype(np.int32)
            cexp = ((w[lo:hi, 3] & (_F_CLONE << 8)) != 0) & (lease != 0)
            cexp &= (((now & 0xFFFF) - lease) & 0xFFFF) < 0x8000
            csel = np.flatnonzero(cexp)
            if len(csel):
                sel = np.union1d(sel, csel)
        if len(sel) > budget:
            sel = sel[:budget]
            hi = lo + int(sel[-1]) + 1
        if len(sel):
            slots = out.slots
            recs = slots[sel + lo]
            stop = self._expire_out(owner, recs, now, res, slots, sel + lo, _time.perf_counter() + bus * 1e-6)
            if stop is not None:
                hi = stop  # out of time: resume at the first candidate not handled
        res.scanned = hi - lo
        self._cur_out = hi if hi < ns else 0
        res.wrapped = hi >= ns
        # -- in table: clones with leases only (owned in-entries go with their out entry)
        if not self.lease_clones:
            return res
        w = inn.slots.view(np.uint32).reshape(-1, 8)
        ns = len(w)
        lo = self._cur_in if self._cur_in < ns else 0
        hi = min(lo + step, ns)
        lease = (w[lo:hi, 7] >> 16).astype(np.int32)
        cexp = ((w[lo:hi, 3] & ((_F_OCC | _F_CLONE) << 8)) == ((_F_OCC | _F_CLONE) << 8)) & (lease != 0)
        cexp &= (((now & 0xFFFF) - lease) & 0xFFFF) < 0x8000
        sel = np.flatnonzero(cexp)
        if len(sel) > budget:
            sel = sel[:budget]
            hi = lo + int(sel[-1]) + 1
        self._cur_in = hi if hi < ns else 0
        if len(sel):
            recs = inn.slots[sel + lo]
            inn.delete_batch(recs)
            self._note_lease_expired(owner.part, recs, DIR_BIT_IN)
            res.clones_dropped += len(recs)
        return res

    def _expire_out(self, owner, recs, now, res: SweepResult, slots, where, deadline=float("inf")):
        """Expire the idle ones among candidate out entries (copies `recs`, slot indices
        `where`); returns None, or the slot index to resume at if the deadline cut the
        work short."""
        out, inn = owner.out, owner.inn
        clone = (recs["flags"] & _F_CLONE) != 0
        if clone.any():
            c = recs[clone]
            out.delete_batch(c)
            self._note_lease_expired(owner.part, c, DIR_BIT_OUT)
            res.clones_dropped += len(c)
            recs, where = recs[~clone], where[~clone]
        if not len(recs):
            return None
        stop = None
        clock = _time.perf_counter
        so_ls = slots["last_seen"]
        si_ls, si_st, si_fl = inn.slots["last_seen"], inn.slots["tcp_state"], inn.slots["flags"]
        dead_out, dead_in = [], []
        ev = self._events
        matches = owner.maps.matches
        end_session = owner.end_session
        timeout_for = self.timeout_for
        lookup = inn.lookup
        cols = zip(
            recs["proto"].tolist(), recs["saddr"].tolist(), recs["sport"].tolist(), recs["daddr"].tolist(),
            recs["dport"].tolist(), recs["new_addr"].tolist(), recs["new_port"].tolist(), recs["rule_id"].tolist(),
            recs["last_seen"].tolist(), recs["tcp_state"].tolist(), where.tolist(),
        )
        for p, ia, ip, ra, rp, ea, ep, rid, ls_o, st_o, w in cols:
            if dead_out and clock() > deadline:
                stop = w
                break
            if p == PROTO_ICMP:
                rr = 0
                ik = (p, ra, ep, ea, ep)
            else:
                rr = rp
                ik = (p, ra, rp, ea, ep)
            j = lookup(*ik)
            if j >= 0:
                ls_i, st_i = int(si_ls[j]), int(si_st[j])
                last = ls_o if ls_o >= ls_i else ls_i
            else:
                ls_i = st_i = 0
                last = ls_o
            tmo = timeout_for(p, st_o, st_i)
            if now - last < tmo:
                so_ls[w] = last  # remember the merged activity: not a candidate again soon
                continue
            dead_out.append((p, ia, ip, ra, rp))
            if j >= 0 and not si_fl[j] & _F_CLONE:
                dead_in.append(ik)
            if not matches(rid, ia, ip, ea, ep):
                continue  # an orphan entry (no bookkeeping): just delete it
            res.expired += 1
            ev[_expiry_event(p, st_o, st_i)] += 1
            if end_session(rid, ra, rr, now, last, st_o, st_i):
                res.mappings_removed += 1
        if dead_out:
            out.delete_batch(_keys_array(dead_out))
        if dead_in:
            inn.delete_batch(_keys_array(dead_in))
        owner.flush_log()
        return stop

    def _note_lease_expired(self, part, slots_recs, direction_bit) -> None:
        self._lease_n += len(slots_recs)
        self._lease_expired.append(slot_records(slots_recs, direction_bit, part, with_tcp=False))


def _expiry_event(p, tcp_out, tcp_in) -> str:
    """EXPIRY_EVENTS key of an expired session (the classes of ``timeout_for``)."""
    if p == PROTO_TCP:
        st = tcp_out | tcp_in
        if st & (_RST | _FIN) or (st & _SYN and not (tcp_out & _SYN and tcp_in & _SYN)):
            return "expired_tcp_transitory"
        return "expired_tcp_established"
    return "expired_udp" if p == PROTO_UDP else "expired_icmp"


def _keys_array(keys) -> np.ndarray:
    a = np.array(keys, dtype=np.int64)
    k = np.zeros(len(a), layout.KEY_DTYPE)
    k["proto"], k["saddr"], k["sport"], k["daddr"], k["dport"] = a.T
    return k

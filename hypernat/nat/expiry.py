"""Expiry: idle sessions of the owner and clones whose lease ran out, in bounded steps.

    RuleBuilder.sweep(now) ──► Expiry.sweep(builder, now)
        1. endpoints whose reuse delay passed, quarantines that ended   builder.release_due
        2. out table, the next ``sweep_step`` slots from a cursor:
             C over the slots (``out_candidates``): occupied and idle for the shortest
             timeout of their protocol, or a clone whose lease ran out
             per candidate (at most ``sweep_max_expire`` or ``sweep_budget_us``):
               clone entry            dropped if its lease ran out (``drain_lease_expired``)
               owned entry            compiled (hypernat.nat._expire.expire_out): both
                                      directions merged (the in entry's last_seen and TCP
                                      state), the timeout class; idle: both entries deleted,
                                      the session's bookkeeping: the builder's
                                      ``session_end()`` (``SessionEnd``, C)
           builder.flush_log: what the step ended, drained once (reuse delays, REVOKE
           records, the translation log's "remove" lines)
        3. in table (only once a clone has a lease): clones whose lease ran out

``Expiry`` owns the timeouts, the two cursors, the lease-expired clones not yet drained
and its counters (``EXPIRY_EVENTS``, ``lease_expired``), which the builder takes with
``drain``.  It reads and deletes flow-table entries; everything else about a session
that ends (mapping, endpoint, translation log, REVOKE records) is the builder's
``SessionEnd`` (compiled, drained by ``flush_log``).  The builder is reached only through
``SessionOwner``.
"""
from __future__ import annotations

import dataclasses
import typing

import numpy as np

from .. import layout
from ..verdicts import SLOW_PATH_REASON_NAMES
from ._expire import expire_out, out_candidates, timeout_class
from .records import DIR_BIT_IN, DIR_BIT_OUT, SESSION_DTYPE, slot_records

_F_OCC, _F_CLONE = layout.F_OCCUPIED, layout.F_CLONE
_R_LEASE = SLOW_PATH_REASON_NAMES.index("lease_expired")

# Sessions expired by the sweep, by protocol and TCP state (timeout_for's classes, in the
# order of hypernat.nat._expire's: TCP_ESTABLISHED, TCP_TRANSITORY, UDP, ICMP): the first
# events of ``hypernat.rules.EVENT_NAMES``.
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
    part: typing.Any  # hypernat.partition.Partition (``owners``)

    def session_end(self) -> typing.Any: ...  # hypernat.nat._expire.SessionEnd, bound and current

    def release_due(self, now: int, budget: int) -> int: ...

    def flush_log(self) -> None: ...  # drains the SessionEnd (once per step)


class Expiry:
    """Timeouts (``config.timeouts``) and sweep limits (``config.limits``) of one NIC."""

    def __init__(self, timeouts, limits):
        self.configure(timeouts, limits)
        self.lease_clones = False  # set once a clone is installed with a lease to watch
        self._lease_expired = []
        self._cur_out = 0
        self._cur_in = 0
        self._events = dict.fromkeys(EXPIRY_EVENTS, 0)
        self._counts = np.zeros(len(EXPIRY_EVENTS), np.int64)  # expire_out's, by class
        self._lease_n = 0

    def configure(self, timeouts, limits) -> None:
        """New timeouts and sweep limits (SIGHUP): from the next step on."""
        t = timeouts
        self.t_udp, self.t_est, self.t_trans, self.t_icmp = t.udp, t.tcp_established, t.tcp_transitory, t.icmp
        self._t_tcp_min = min(t.tcp_transitory, t.tcp_established)
        self._t_floor = min(self._t_tcp_min, t.udp, t.icmp)  # no session expires sooner
        self._t_class = (t.tcp_established, t.tcp_transitory, t.udp, t.icmp)  # by timeout class
        self._tmo = np.array(self._t_class, np.float64)
        self.sweep_step = limits.sweep_step
        self.sweep_max_expire = limits.sweep_max_expire
        self.sweep_budget_us = limits.sweep_budget_us

    def drain(self, counters: list, events: dict) -> None:
        """Add the counts since the last call to the builder's: ``lease_expired`` into
        `counters` (by SLOW_PATH_REASON_NAMES index), the EXPIRY_EVENTS into `events`."""
        if self._lease_n:
            counters[_R_LEASE] += self._lease_n
            self._lease_n = 0
        ev, c = self._events, self._counts
        if c.any():
            for k, v in zip(EXPIRY_EVENTS, c.tolist()):
                ev[k] += v
            c[:] = 0
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
        return self._t_class[timeout_class(proto, tcp_out, tcp_in)]

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
        # -- out table: owned sessions (both directions merged) and clones whose lease
        # ran out, picked in C over the next `step` slots (``out_candidates``)
        ns = len(out.slots)
        lo = self._cur_out if self._cur_out < ns else 0
        own, clones, hi = out_candidates(out, lo, min(lo + step, ns), now, self._t_floor, self._t_tcp_min,
                                         self.t_udp, self.t_icmp, budget, self.lease_clones)  # fmt: skip
        if len(own) or len(clones):
            stop = self._expire_out(owner, now, res, own, clones, bus * 1e-6)
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

    def _expire_out(self, owner, now, res: SweepResult, own, clones, budget_s):
        """Expire the idle ones among the owned candidate out entries at slot indices
        `own`, in at most `budget_s` seconds (at least one), and drop the clones at
        `clones` (their lease ran out); returns None, or the slot index to resume at if
        the time ran out.  The clones go after the owned entries (a deletion moves later
        entries of its cluster: the compiled loop reads the candidates where they lie)."""
        out = owner.out
        stop = -1
        if len(own):
            stop, expired, removed = expire_out(owner.session_end(), out, owner.inn, own, now, self._tmo, budget_s,
                                                self._counts)  # fmt: skip
            res.expired += expired
            res.mappings_removed += removed
            owner.flush_log()
        if len(clones):
            c = out.slots[clones]
            out.delete_batch(c)
            self._note_lease_expired(owner.part, c, DIR_BIT_OUT)
            res.clones_dropped += len(c)
        return None if stop < 0 else stop

    def _note_lease_expired(self, part, slots_recs, direction_bit) -> None:
        self._lease_n += len(slots_recs)
        self._lease_expired.append(slot_records(slots_recs, direction_bit, part, with_tcp=False))


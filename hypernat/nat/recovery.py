"""Crash recovery: sessions this NIC owned before a crash, re-created from clones.

    journal after a crash ──► RuleBuilder.quarantine_blocks ──► BlockPool.quarantine
                              (blocks and their hosts)          Recovery.set_hosts (the window)
    first packet of such a host while ``recovering`` ──► held (RuleBuilder._out: ``holds``)
    ACTIVITY / peer reports ──► RuleBuilder.recover_sessions ──► Recovery.recover(builder, ...)
         per report: the endpoint's block quarantined or with reserved ports?  the host
         the journal named?  the internal endpoint still free?  ──► the builder re-creates
         the mapping and session (``RecoveryOwner``), the block back to its host

``Recovery`` owns the recovery window (``recovering``, the hosts the journal names), the
external endpoints of recovered mappings (while their blocks have reserved ports: a
later report of another session of one of them joins it), its counters
(``RECOVERY_EVENTS``, taken by the builder with ``drain``) and its log line.  Blocks,
quarantines and reserved ports are the pool's (``hypernat.nat.pool``); mappings,
sessions, the journal and the translation log the builder's.
"""
from __future__ import annotations

import logging
import time as _time
import typing

import numpy as np

from .. import layout
from .records import SESSION_KEY_FIELDS, record_keys

PROTO_ICMP = layout.PROTO_ICMP
_PIDX = {layout.PROTO_TCP: 0, layout.PROTO_UDP: 1, layout.PROTO_ICMP: 2}

# Counted by the crash recovery (``hypernat.rules.EVENT_NAMES`` lists them in this order).
RECOVERY_EVENTS = (
    "recovered_sessions", "recovered_mappings", "recovered_blocks",
    "recovery_lost_host_mismatch",  # the journal gave the block to another host
    "recovery_lost_conflict",  # the internal or external endpoint is bound otherwise now
    "recovery_lost_table_full",
    "recovery_lost_invalid",  # not an internal address / protocol, or a host owned elsewhere
)  # fmt: skip

log = logging.getLogger("hypernat.rules")


class RecoveryOwner(typing.Protocol):
    """What the recovery needs of the builder whose sessions it re-creates."""

    maps: typing.Any  # hypernat.nat._mappings.Mappings
    blocks: typing.Any  # hypernat.nat._ports.PortBlocks
    hosts: typing.Any  # hypernat.nat._hosts.Hosts
    pool: typing.Any  # hypernat.nat.pool.Pool
    out: typing.Any  # FlowTable
    inn: typing.Any  # FlowTable

    def begin_batch(self) -> None: ...
    def session_room(self) -> int: ...
    def is_internal(self, addr: int) -> bool: ...
    def claim_block(self, g: int, iaddr: int) -> None: ...
    def make_mapping(self, p: int, iaddr: int, iport: int, g: int, off: int) -> int: ...
    def add_session(self, rid: int, raddr: int, rport: int, now: int) -> None: ...
    def flush(self, now: int) -> None: ...


class Recovery:
    """The crash recovery of NIC `nic` (partition `part`, `eim`: endpoint-independent
    mapping); `log_interval`: at most one info line per interval (losses always)."""

    def __init__(self, nic: int, part, eim: bool, log_interval: float):
        self._nic = int(nic)
        self._part = part
        self._eim = eim
        self.log_interval = log_interval
        # Crash recovery window (set by the worker after a crash restart): a new mapping
        # for a host the journal names is not made while the clones' reports may still
        # bring its old one back (that would bind it otherwise: recovery_lost_conflict);
        # the frame is held and the worker replays it when a report arrived or the window
        # closed.  A FETCH asking this NIC to allocate for such a host is refused as
        # "recovering" (NACK unavailable: the holder's client retries).
        self.recovering = False
        self.hosts = frozenset()  # the hosts the journal names
        self._ekeys = set()  # external endpoints of recovered mappings (while blocks are reserved)
        self.tracking = False  # _ekeys is not empty: a mapping that ends must be ``forget``-ed
        self._events = dict.fromkeys(RECOVERY_EVENTS, 0)
        self._last_log = float("-inf")

    # -- the window and the recovered endpoints ---------------------------------------------
    def set_hosts(self, hosts) -> None:
        """The hosts the journal names (``BlockPool.quarantine``'s answer)."""
        self.hosts = frozenset(hosts)

    def holds(self, iaddr: int) -> bool:
        """A new mapping for `iaddr` waits: the window is open and the journal names it."""
        return self.recovering and iaddr in self.hosts

    def forget(self, ekey: int) -> None:
        """The mapping of external endpoint `ekey` ended."""
        self._ekeys.discard(ekey)
        self.tracking = bool(self._ekeys)

    def quarantine_over(self) -> None:
        """No block is quarantined or reserved any more: nothing left to join."""
        self._ekeys.clear()
        self.tracking = False

    def recovered_endpoints(self) -> frozenset:
        """External endpoints (ekeys) of mappings recovered in the current quarantine."""
        return frozenset(self._ekeys)

    def restore_endpoints(self, ekeys) -> None:
        self._ekeys = set(int(x) for x in ekeys)
        self.tracking = bool(self._ekeys)

    def drain(self, events: dict) -> None:
        """Add the counts since the last call into the builder's `events`."""
        ev = self._events
        for k, v in ev.items():
            if v:
                events[k] += v
                ev[k] = 0

    # -- reports ------------------------------------------------------------------------------
    def recover(self, owner: RecoveryOwner, records, now) -> np.ndarray:
        """Re-adopt sessions this NIC owned before a crash, from a clone holder's report.

        After a SIGKILL the NIC's tables are gone, but other NICs still hold clones of
        its sessions (the direction the switch sent them).  When the NIC comes back,
        every holder reports each clone of it (``RuleAgent.peer_restarted``, as
        ACTIVITY), and ordinary ACTIVITY reports keep arriving.  `records`
        (SESSION_DTYPE; the owner's view: iaddr/iport, eaddr/eport, raddr/rport, proto,
        last_seen, tcp_out/tcp_in) are those reports.  Each one whose external
        endpoint lies in a block quarantined since the crash is re-created here as if
        it had never gone: the block is given back to its host (the host the journal
        names, when the journal was passed to ``quarantine_blocks``), the endpoint is
        marked in use, the mapping and the session get both flow-table entries.

            crash ─► journal: blocks B1 B2 quarantined until T (longest timeout)
            holder reports (E1:p, ...) in B1 ─► B1 leaves quarantine, back to its host:
                 port p  live again (mapping + session, both entries)
                 other ports of B1  stay reserved until T (a lost session may still
                                     receive there), then free
            B2: nobody reports ─► quarantined until T, then free (counted, logged)

        So a block's quarantine ends when its rules are recovered (for those
        endpoints) or its timeout passed, never earlier: an endpoint nobody vouched
        for is never handed out before T.  A report is refused (counted under
        ``recovery_lost_*``, logged) if the journal gave the block to another host,
        if the internal endpoint (EIM) or the session (APDM) is bound to another
        external endpoint since the restart, if the tables are full, or if the
        internal address is not internal / the host is owned by another NIC.  Reports
        of blocks not quarantined (the normal case: a session that expired here) are
        left alone: it is cheap to call this on every ACTIVITY.

        Returns bool[n]: the session is live here through recovery (this call or an
        earlier one in the same quarantine) -- the agent then grants the reporting
        holder a lease.  Recovered mappings get new rule ids (the holder's clone keeps
        the old one; clones are matched by endpoints, not ids).
        """
        recs = np.asarray(records).reshape(-1)
        n = len(recs)
        ok = np.zeros(n, bool)
        pool = owner.pool
        if n == 0 or not pool.in_quarantine():
            return ok
        now = int(now)
        part = self._part
        me = self._nic
        owner.begin_batch()
        maps, bl, hs = owner.maps, owner.blocks, owner.hosts
        ev = self._events
        before = dict(ev)
        rec_ekeys = self._ekeys
        fresh = []  # records whose session this call created
        cols = zip(*(recs[f].tolist() for f in SESSION_KEY_FIELDS))
        for i, (p, ia, ip, ea, ep, ra, rp) in enumerate(cols):
            if p not in _PIDX:
                continue
            r = 0 if p == PROTO_ICMP else rp
            ekey = p << 48 | ea << 16 | ep
            rid = maps.by_external(p, ea, ep)
            if rid:
                if ekey not in rec_ekeys or not maps.matches(rid, ia, ip, ea, ep):
                    continue  # a mapping built since the restart: ordinary activity
                if not maps.has_session(rid, ra, r):  # another session of a recovered mapping
                    if owner.session_room() <= 0:
                        ev["recovery_lost_table_full"] += 1
                        continue
                    owner.add_session(rid, ra, r, now)
                    ev["recovered_sessions"] += 1
                    fresh.append(i)
                ok[i] = True
                continue
            if part.owner(ea, ep) != me:
                continue
            g = part.block_of(ea, ep)
            if not pool.is_quarantined(g) and not pool.has_reserved_ports(g):
                continue  # not from before the crash: a session that expired here
            if not owner.is_internal(ia) or (self._eim and part.eim_owner(ia) != me):
                ev["recovery_lost_invalid"] += 1
                continue
            have = g in bl
            want = bl.host(g) if have else pool.quarantine_host(g, ia)
            if want != ia:
                ev["recovery_lost_host_mismatch"] += 1
                continue
            if maps.by_out_key(p, ia, ip, ra, r):
                ev["recovery_lost_conflict"] += 1
                continue
            if owner.session_room() <= 0:
                ev["recovery_lost_table_full"] += 1
                continue
            if not have:
                owner.claim_block(g, ia)
                ev["recovered_blocks"] += 1
            pi = _PIDX[p]
            off = ep - bl.lo(g)
            if not pool.take_reserved_port(g, pi, off):
                ev["recovery_lost_conflict"] += 1  # the port is live or waiting for reuse
                continue
            # (it stays marked used in the block: now by the mapping)
            hs.add_ports(bl.host(g), pi, 1)
            rid = owner.make_mapping(p, ia, ip, g, off)
            owner.add_session(rid, ra, r, now)
            rec_ekeys.add(ekey)
            self.tracking = True
            ev["recovered_mappings"] += 1
            ev["recovered_sessions"] += 1
            fresh.append(i)
            ok[i] = True
        owner.flush(now)
        if fresh:  # the entries were inserted at `now`: the holder's last_seen and TCP state instead
            out, inn = owner.out, owner.inn
            so, si = out.slots, inn.slots
            for i in fresh:
                rec = recs[i]
                okk, ikk = record_keys(rec)
                ls = min(int(rec["last_seen"]), now)
                for tbl, sl, key, tcp in ((out, so, okk, "tcp_out"), (inn, si, ikk, "tcp_in")):
                    j = tbl.lookup(*key)
                    if j >= 0:
                        sl["last_seen"][j] = ls
                        sl["tcp_state"][j] |= int(rec[tcp]) & layout.TCP_STATE_MASK
        done = {k: ev[k] - v for k, v in before.items() if ev[k] != v}
        if done:
            ps = pool.stats()
            t = _time.monotonic()
            lost = sum(v for k, v in done.items() if k.startswith("recovery_lost"))
            if lost or t - self._last_log >= self.log_interval:
                self._last_log = t
                log.log(logging.WARNING if lost else logging.INFO,
                        "nic%d: crash recovery from clones: %s; %d block(s) still quarantined, %d reserved",
                        me, ", ".join(f"{k} +{v}" for k, v in sorted(done.items())), ps["blocks_quarantined"],
                        ps["blocks_reserved"])
        return ok

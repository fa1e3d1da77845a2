"""RuleBuilder: allocation, sessions, filtering, hairpinning, expiry, translation log.

One ``RuleBuilder`` per NIC.  It owns the mappings and sessions whose external endpoint
lies in the NIC's partition E_i (see ``hypernat.partition``) and the port blocks it has
handed to internal hosts.  The fast path never calls it: the NIC loop passes each
batch's misses in, gets a *decision* per frame back, and acts on it.

    fast path ──verdicts+keys──► RuleBuilder.handle_misses(direction, verdicts, keys, now)
                                   │
           ┌───────────────────────┼───────────────────────────┬──────────────────┐
        REPLAY                   DROP                        FETCH              NONE
   session installed in      counted under a             owner is NIC k:      not a miss
   this NIC's tables: run    SLOW_PATH_REASON name       the RuleAgent asks   (frame was
   the frame through the     (``reason`` = index)        k for ``fetch_key``  sent or dropped
   fast path again                                        (``fetch_dir``)     by the fast path)

Vocabulary
----------
*mapping*  an internal endpoint (proto, I addr, I port) bound to an external endpoint
           (E addr, E port).  Endpoint-independent mapping (EIM, the default): one mapping
           per internal endpoint, shared by every remote.  Address-and-port-dependent
           mapping (APDM): one mapping per session.  Never port overloading: an external
           endpoint belongs to at most one internal endpoint at a time (invariant 1).
*session*  a mapping plus one remote endpoint (R addr, R port).  It is two flow-table
           entries, both carrying the mapping's ``rule_id``:
               out table  (proto, I, Ip, R, Rp) -> (E, Ep)
               in table   (proto, R, Rp, E, Ep) -> (I, Ip)
           The owner always holds both entries of its sessions (even when the packets
           go through other NICs' clones: holders report activity to it).
*rule_id*  the handle in the slots' ``rule_id`` field: the mapping's index in this
           builder's mapping arrays (1-based; 0 = none), unique within the owner.  Clones
           keep the owner's rule_id; (owner, rule_id) names a rule across NICs.
*block*    ``limits.port_block_size`` consecutive ports of one external address; hosts
           receive ports in blocks (one address per host: paired pooling, RFC 4787
           REQ-2), a random free port inside a block (RFC 6056).  A block's assignment is
           journaled before its first port is used (crash recovery) and is the unit of
           the translation log in ``per-block`` mode.

Who allocates (DESIGN.md "Ownership"): with EIM all mappings of internal host h belong
to NIC ``partition.eim_owner(h)``; with APDM the NIC that sees the first outgoing packet
allocates from its own E_i.  An incoming miss belongs to ``partition.owner(E, Ep)``.  A
miss this NIC cannot decide comes back as FETCH with the owner's id and the key to ask
for; the owner answers with ``serve_fetches`` and the asker installs the answer with
``install_clones`` (the RULE records as received).

Lifecycle: the fast path writes ``last_seen``/``tcp_state``/``F_ACTIVE`` in the slots;
``sweep(now)`` walks a bounded range of the out table per call (numpy over the slot
range), merges the session's two directions and expires idle sessions per protocol and
TCP state.  A freed external endpoint waits ``timeouts.reuse_delay`` (RFC 6888 REQ-8)
and until every hold (a lease the RuleAgent granted on it, ``hold_many``/``release_many``)
is gone before it can be handed out again (invariant 3).

Crash recovery (invariant 6): a NIC killed without a snapshot comes back with empty
tables; the blocks its journal lists are quarantined until their longest timeout
(``quarantine_blocks``).  Other NICs still hold clones of its sessions and report them
(ACTIVITY) when they see it back; ``recover_sessions`` re-creates each reported session
whose endpoint lies in a quarantined block -- for the host the journal gave the block
to -- and the block rejoins its host.  Its unreported ports stay reserved until the
quarantine's end (a lost session may still receive there), so a block's quarantine
ends, endpoint by endpoint, when its rules are recovered or its timeout passed, never
earlier.  Sessions that had no clone (both directions through the crashed NIC) are lost;
the quarantines that end with nothing recovered are counted (``recovery_blocks_expired``).

Refusals are not moves: a host whose address has no free block is refused (paired
pooling, RFC 4787 REQ-2), counted as ``ports_exhausted`` / ``exhausted_host_address``
and logged; an unsolicited inbound SYN is dropped silently (RFC 5382 REQ-4a, see
hypernat.config).  ``counters_dict`` reports the slow-path reasons and the events of
EVENT_NAMES (expiries by protocol and TCP state, exhaustion causes, recovery).

Per-host ports: a host holds at most ceil(ports_per_host / B) blocks and at most
ports_per_host live mappings per protocol; ports waiting out their reuse delay still
occupy their block, so a host that churns connections fast meets its cap sooner (as
with cloud NATs' ports per VM).  External endpoints are per protocol (TCP port 5000 and
UDP port 5000 are different endpoints).

Cost: the port blocks (``blocks``: hypernat.nat._ports.PortBlocks), the hosts (``hosts``:
hypernat.nat._hosts.Hosts), the per-host connection rate (hypernat.nat._rate) and the
mappings and sessions (``maps``: hypernat.nat._mappings.Mappings) are C records: no
Python object per block, host, mapping or session.  A first packet's common case is
decided in C over the batch's arrays (``_mappings.OutSetup``): outgoing (a known host,
its mapping or a port in one of its blocks, the session), incoming (the endpoint's
owner -- a fetch queued if it is another NIC's --, the mapping, filtering, the
session), and the refusals that do not log, counted there; fetch serving runs the same
code over the FETCH records and writes the RULE records in C (``OutSetup.serve``).
Python runs per miss only for what that leaves (a new host or block, an EIM host owned elsewhere, the refusals that log,
per-rule log lines and PUSH records, hairpin misses and outgoing ICMP errors).  The sessions a call adds reach the flow tables in one pass at its end
(``Mappings.flush``) -- see docs/per-connection.md.  The sweep's scan is numpy over a slot range; its
per-session work (in-entry lookup, bookkeeping) is bounded by ``sweep_max_expire``, so a
mass expiry is spread over many steps instead of stalling one batch.

Public interface (stable; extended, never broken)
-------------------------------------------------
Records and constants:
    SESSION_DTYPE        one session as a plain 32-byte record (export, clone, activity);
                         ICMP query sessions carry rport 0 (their keys use the identifier:
                         out (1, I, Ip, R, Ip), in (1, R, Ep, E, Ep)) -- use
                         out_key / in_key / record_keys rather than building keys by hand
    DIR_BIT_OUT/IN       ``dirs`` bits of a record: which entries it covers / were active
    ACT_NONE/REPLAY/DROP/FETCH   per-frame actions in ``Decisions.action``
    REASON               {slow-path reason name: index} (``verdicts.SLOW_PATH_REASON_NAMES``)
    Decisions            per-frame arrays: action, reason, owner, fetch_dir, fetch_key
    Misses               one batch's decisions as arrays (``decide_misses``): replay, fetches, idx, res
    SweepResult          what one ``sweep`` step did

RuleBuilder(config, nic_id, out_table, in_table, *, partition=None, rng=None,
            translog=None, journal=None)
  packets
    handle_misses(direction, verdicts, keys, now) -> Decisions
    decide_misses(direction, verdicts, keys, now, n=None) -> Misses(replay, fetches, idx, res)
        the same decisions as arrays (what the NIC loop calls: replay frame indexes,
        fetches as layout.FETCH_ROW_DTYPE records, every miss's index and result)
  owner side of cloning (called by the RuleAgent)
    serve_fetches(recs, now, lease_ms=0) -> (RULE records, refused indices, their reason
        indices)   (recs: FETCH records, messages.KEY_DTYPE; arrays in, arrays out)
    export_rule(proto, eaddr, eport) -> SESSION_DTYPE array (all sessions of a mapping)
    lookup_external(proto, eaddr, eport) -> dict | None
    merge_activity(records, now=None) -> int
    hold_many(ekeys) / release_many(ekeys)   (endpoint keys proto << 48 | eaddr << 16 | eport;
        hold / release_hold: one endpoint, for tests and tools)
    drain_created() / drain_removed() -> SESSION_DTYPE arrays (for PUSH / REVOKE; recorded
        while .track_created (install: active) / .track_removed (more than one NIC))
  holder side of cloning
    install_clones(records, now, dirs, lease_until=0, idx=None, owners=None) -> int8 (entries
        per selected record; records: RULE / PUSH records as received, or SESSION_DTYPE)
    install_clone(records, now, dirs=DIR_BIT_OUT|DIR_BIT_IN, lease_until=0) -> int (the sum)
    remove_clone(records) -> int
    renew_clones(records, lease_until) -> int
    collect_activity(clear=True, max_slots=None) -> SESSION_DTYPE array (active clone
        entries, one record per entry: dirs = its direction, tcp_out or tcp_in set)
    drain_lease_expired() -> SESSION_DTYPE array (clones the sweep dropped)
  lifecycle and state
    sweep(now, max_slots=None, max_expire=None, budget_us=None) -> SweepResult
    timeout_for(proto, tcp_out, tcp_in) -> seconds
    utilisation() -> float;  counters_dict() -> {reason or event: n};  stats() -> dict
    snapshot() -> dict (plain data);  restore(state)
    lend_block() -> block id | None;  adopt_block(block);  return_block(block)
    quarantine_blocks(blocks, until);  journal_state() -> [record] (the live blocks, a checkpoint)
    recover_sessions(records, now) -> bool[n] (live here through crash recovery)
    blocks, hosts, maps  the C state (PortBlocks, Hosts, Mappings): read them, do not change them
    pool                 the free blocks, reuse queue, holds, loans, quarantine
                         (hypernat.nat.pool.BlockPool): read its views, do not change it
    expiry, holder, recovery   the other concerns, one module each in hypernat/nat/
                         (expiry.Expiry, holder.CloneHolder, recovery.Recovery): the
                         methods above delegate to them (docs/per-connection.md)
    mappings() -> [MappingView];  mapping(rule_id) -> MappingView | None   (copies, for
        tests and tools: a walk over every mapping)
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time as _time
import typing

import numpy as np

from . import layout
from .nat._activity import merge_activity as _merge_activity
from .nat._events import MAPPING as _EV_MAPPING
from .nat._events import SESSION as _EV_SESSION
from .nat._expire import SessionEnd
from .nat._hosts import Hosts
from .nat._mappings import Mappings, OutSetup
from .nat._ports import PortBlocks
from .nat._rate import HostRate
from .nat._reuse import ENDPOINT_DTYPE
from .nat.expiry import EXPIRY_EVENTS, Expiry, SweepResult  # (SweepResult re-exported)
from .nat.holder import CloneHolder
from .nat.holder import lease16 as _lease16  # (tests import it from here)
from .nat.pool import BlockPool, Pool
from .nat.recovery import RECOVERY_EVENTS, Recovery
from .nat.records import (  # (re-exported: public names)
    DIR_BIT_IN, DIR_BIT_OUT, DIR_BITS_BOTH, SESSION_DTYPE, in_key, out_key, record_keys,
)
from .nat.records import ip_text as _ip
from .verdicts import IN, OUT, SLOW_PATH_REASON_NAMES, VERDICT

# ---------------------------------------------------------------------------------------
# Records

# SESSION_DTYPE, DIR_BIT_OUT / DIR_BIT_IN / DIR_BITS_BOTH: hypernat.nat.records (imported above)

# Per-frame actions.
ACT_NONE = 0  # not a miss: nothing to do
ACT_REPLAY = 1  # a session was installed here: translate the frame again
ACT_DROP = 2  # refused; Decisions.reason says why (counted already)
ACT_FETCH = 3  # owned by NIC Decisions.owner: fetch Decisions.fetch_key (fetch_dir)
ACT_HOLD = 4  # crash recovery window: keep the frame, translate it again later (``recovering``)

REASON = {name: i for i, name in enumerate(SLOW_PATH_REASON_NAMES)}


class Misses(typing.NamedTuple):
    """``RuleBuilder.decide_misses``'s answer for one batch, as arrays.

    replay   intp[r]   frames to translate again (a session is installed here), ascending
    fetches  layout.FETCH_ROW_DTYPE[f]  the fetches to start, in frame order (``frame``:
                       the frame's index; ``owner``: the NIC to ask; the key oriented like
                       ``fetch_dir``'s table)
    idx      int32[m]  every miss's frame index, ascending
    res      int32[m]  its result: -1 replay, -2 fetch, -3 hold, else the drop reason
    """

    replay: np.ndarray
    fetches: np.ndarray
    idx: np.ndarray
    res: np.ndarray


_NO_FRAMES = np.empty(0, np.intp)
_NO_FRAMES.flags.writeable = False


@dataclasses.dataclass
class Decisions:
    """The slow path's answer for one batch, one entry per frame.

    action     uint8[n]   ACT_*
    reason     int16[n]   index into verdicts.SLOW_PATH_REASON_NAMES for ACT_DROP, else -1
    owner      int16[n]   the owning NIC for ACT_FETCH, else -1
    fetch_dir  uint8[n]   verdicts.OUT: ask the owner to allocate / return the session of
                          an out key (proto, I, Ip, R, Rp); verdicts.IN: the session of an
                          in key (proto, R, Rp, E, Ep)
    fetch_key  KEY_DTYPE[n]  the key to fetch (kind = KIND_ICMP_ERROR: lookup only, an
                          ICMP error never creates a session)
    """

    action: np.ndarray
    reason: np.ndarray
    owner: np.ndarray
    fetch_dir: np.ndarray
    fetch_key: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Decisions":
        return cls(
            action=np.zeros(n, np.uint8),
            reason=np.full(n, -1, np.int16),
            owner=np.full(n, -1, np.int16),
            fetch_dir=np.zeros(n, np.uint8),
            fetch_key=np.zeros(n, layout.KEY_DTYPE),
        )

    def indices(self, action: int) -> np.ndarray:
        """Frame indices with this action."""
        return np.flatnonzero(self.action == action)


# ---------------------------------------------------------------------------------------
# Session keys (one place that knows the ICMP twist)


# out_key, in_key, record_keys: hypernat.nat.records (imported above)
_NO_SESSIONS = np.zeros(0, SESSION_DTYPE)
_NO_SESSIONS.flags.writeable = False


# ---------------------------------------------------------------------------------------
# Internal state objects

PROTO_ICMP, PROTO_TCP, PROTO_UDP = layout.PROTO_ICMP, layout.PROTO_TCP, layout.PROTO_UDP
_PIDX = {PROTO_TCP: 0, PROTO_UDP: 1, PROTO_ICMP: 2}
_V_MISS_OUT = VERDICT["miss_out"]
_V_MISS_IN = VERDICT["miss_in"]
_V_MISS_ICMP_ERROR = VERDICT["miss_icmp_error"]
_V_MISS_HAIRPIN = VERDICT["miss_hairpin"]
_SYN, _ACK = layout.TCP_SYN, layout.TCP_ACK
_F_CLONE = layout.F_CLONE

_R_TABLE_FULL = REASON["table_full"]
_R_EXHAUSTED = REASON["ports_exhausted"]
_R_CAP = REASON["host_port_cap"]
_R_FILTERED = REASON["filtered"]
_R_USYN = REASON["unsolicited_syn"]
_R_NOT_IN_POOL = REASON["not_in_pool"]
_R_NOT_INTERNAL = REASON["not_internal"]
_R_BAD = REASON["bad_message"]
_R_NO_MAPPING = REASON["no_mapping"]
_R_RECOVERING = REASON["recovering"]
_R_ICMP_NO_SESSION = REASON["icmp_error_no_session"]
_R_NOT_OWNER = REASON["not_owner"]
_R_HAIRPIN_OFF = REASON["hairpin_disabled"]
_EXHAUSTION = (_R_TABLE_FULL, _R_EXHAUSTED, _R_CAP)
_R_JOURNAL = REASON["journal_unavailable"]
_R_RATE = REASON["host_rate_limited"]
_JOURNAL_DOWN = object()  # _take_block: a block was free but could not be journaled
JOURNAL_RETRY_S = 0.5  # a reserve refill that failed (disk full) is tried again this long after

# Events counted beside the slow-path reasons (``counters_dict`` reports both; every name
# is always present, so metrics see a zero before the first event).
EVENT_NAMES = EXPIRY_EVENTS + (
    # (EXPIRY_EVENTS: sessions expired by the sweep, by protocol and TCP state -- hypernat.nat.expiry)
    # refusals of a new mapping, by cause (all also counted as ports_exhausted):
    "exhausted_host_address",  # the host's address has no free block (paired pooling: not moved)
    "exhausted_pool",  # a new host: no address has a free block
) + RECOVERY_EVENTS + (  # crash recovery (recover_sessions: hypernat.nat.recovery)
    "recovery_blocks_expired",  # quarantines that ran out with nothing recovered
    "recovery_held",  # first packets of a journaled host held in the recovery window
    "journal_errors",  # journal writes that failed (disk full, I/O error); new blocks refused meanwhile
)  # fmt: skip

# Outcome codes of the per-frame helpers: >= 0 a reason (drop); these are the others.
_OK = -1
_FETCH = -2
_HOLD = -3  # crash recovery: the host's rules may come back from other NICs' clones; wait

log = logging.getLogger("hypernat.rules")


_NEED_PY = -4  # OutSetup: the compiled common case left this packet to the general path


class MappingView(collections.namedtuple("MappingView", "rule_id proto iaddr iport eaddr eport block remotes")):
    """A copy of one mapping (``RuleBuilder.mappings``): remotes are its sessions'
    remote endpoints as ints (R << 16 | Rp), ascending."""

    __slots__ = ()


class RuleBuilder:
    """Per-NIC allocator and session keeper (see the module docstring).

    config       hypernat.config.Config
    nic_id       this NIC's id (index into config.nics)
    out_table, in_table   this NIC's FlowTables (hypernat.fastpath)
    partition    hypernat.partition.Partition (default: built from config)
    rng          numpy Generator for port choice (tests pass a seeded one)
    translog     hypernat.translog.TransLog or None (default: built from config)
    journal      callable(record: dict) called, and must have persisted the record,
                 before a port block's first port is used (crash recovery).  If the
                 callable (or the object it is a bound method of, a
                 ``hypernat.nic.journal.Journal``) has ``append_many(records)`` and
                 ``append_lazy(records)``, those are used: every block is journaled as
                 {"op": "reserve", "block": g, ...} (durable: ``reserve_blocks`` ahead of
                 need, or at the miss with the next few of its address, one fsync)
                 before it is taken; then {"op": "assign", "block": g, "host":
                 "a.b.c.d", ...} lazily (no fsync), {"op": "release", "block": g} when
                 it is free again.  A journal that raises ``OSError`` refuses the block
                 (``journal_unavailable``, logged once per interval); ``journal_state``
                 is what a checkpoint holds.
    """

    def __init__(self, config, nic_id, out_table, in_table, *, partition=None, rng=None, translog=None, journal=None):
        from .partition import Partition
        from .translog import TransLog

        self.config = config
        self.nic = int(nic_id)
        self.out = out_table
        self.inn = in_table
        self.part = partition if partition is not None else Partition.from_config(config)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.translog = translog if translog is not None else TransLog.from_config(config, nic_id)
        self.journal = journal
        lim, t = config.limits, config.timeouts
        self._eim = config.mapping == "endpoint-independent"
        self._filter = config.filtering
        self._hairpin = config.hairpinning
        self._preserve = config.allocation.port_preservation
        self._parity = config.allocation.port_parity
        self._cap = lim.ports_per_host
        self._bs = self.part.block_size
        self._max_blocks = -(-self._cap // self._bs)
        self._internal = [(int(n.network_address), int(n.netmask)) for n in config.internal]
        self.reuse_delay = t.reuse_delay
        # idle and lease expiry in bounded steps: timeouts, cursors, lease-expired clones
        self.expiry = Expiry(t, lim)
        self._log_interval = lim.exhaustion_log_interval
        self._last_log = [float("-inf")] * len(SLOW_PATH_REASON_NAMES)
        self._last_log_host = float("-inf")
        # active install pushes every new session to the NIC the switch sends its other
        # direction to: with one NIC there is none (each session through Python for a
        # list thrown away made the one-NIC one pass ~1.7x slower under active install)
        self.track_created = config.install == "active" and config.n_nics > 1
        self.track_removed = config.n_nics > 1
        self.counters = [0] * len(SLOW_PATH_REASON_NAMES)

        # mappings and sessions, by rule id and indexed (C: hypernat.nat._mappings)
        self.maps = Mappings(self._eim, self._index_capacity(), self._filter == "address-dependent")
        self.hosts = Hosts()  # internal hosts with blocks here: address, blocks, live mappings (C)
        # The blocks assigned to hosts here and their used ports (per protocol: live or
        # waiting for reuse), in C; port choice (RFC 6056, parity) is its ``pick``.
        self.blocks = PortBlocks(self._bs, self._parity, int(self.rng.integers(0, 1 << 63)))
        # new connections per internal host: a token bucket each (None: no limit)
        self._rate = HostRate(lim.host_connection_rate, lim.host_connection_burst) if lim.host_connection_rate > 0 else None
        # an outgoing first packet's common case, compiled (the rest: _out)
        self._setup = OutSetup(self.maps, self._internal, REASON, VERDICT)
        # the mappings and sessions created in a call (the per-rule log's lines, PUSH
        # records), compiled path and general path alike: drained once per call (_flush)
        self._events = self._setup.events
        self._bind_setup()
        # free blocks per address, the reuse queue, holds, loans, quarantine, reserves
        self.pool: Pool = BlockPool(self.part, self.nic, self._index_capacity())
        self.events = dict.fromkeys(EVENT_NAMES, 0)
        # crash recovery: the recovery window, the hosts the journal names, the endpoints
        # of recovered mappings (``recovering``: set by the worker after a crash restart)
        self.recovery = Recovery(self.nic, self.part, self._eim, self._log_interval)
        # Blocks journaled ahead of need ("reserve" records, fsync'ed by reserve_blocks
        # off the packet path, or by _take_block when none was): taking one is durable
        # already (a crash quarantines it), so its "assign" record goes into _jlazy and
        # is written without an fsync.  Which blocks: the pool's (``reserve_plan``).
        self._jlazy = []
        self._journal_retry = 0.0  # after a failed reserve: the next one not before (monotonic s)
        self._created = []  # SESSION_DTYPE arrays drained from the event ring, not yet taken
        self._removed = []  # SESSION_DTYPE arrays drained from the SessionEnd, not yet taken
        self._ending = None  # SessionEnd: the bookkeeping of sessions that end (session_end)
        # clone entries of other NICs' sessions held here (install, revoke, renew, activity)
        self.holder = CloneHolder(self.out, self.inn, self.part, self.nic)

    # -- helpers ------------------------------------------------------------------------
    def _refuse(self, reason: int) -> int:
        self.counters[reason] += 1
        if reason in _EXHAUSTION:
            t = _time.monotonic()
            if t - self._last_log[reason] >= self._log_interval:
                self._last_log[reason] = t
                log.warning(
                    "nic%d: %s (%d so far); utilisation %.1f%%, %d mappings, %d sessions",
                    self.nic, SLOW_PATH_REASON_NAMES[reason], self.counters[reason],
                    100.0 * self.utilisation(), len(self.maps), self.maps.n_sessions,
                )
        return reason

    def _index_capacity(self) -> int:
        """What the mapping/session indexes are sized for: every session is an entry in
        both flow tables, so no more than they hold."""
        return max(16, min(self.out.capacity, self.inn.capacity))

    def _bind_setup(self) -> None:
        """Give the compiled setup the current host table, blocks, rate and cap, and for
        incoming misses this NIC, the filtering behaviour and the partition's geometry
        (``Partition.geometry``, whose loans the partition keeps current)."""
        self._setup.bind(self.hosts, self.blocks, self._rate, self._cap, self._preserve)
        self._setup.bind_in(self.nic, self._filter, self.part.geometry)

    def _begin(self) -> None:
        """Per call that may add sessions: the room left in the tables, and which new
        mappings / sessions the event ring records (the per-rule log's lines: a mapping
        each, or with ``remote`` a session each; PUSH records: a session each)."""
        su = self._setup
        su.room = min(self.out.capacity - len(self.out), self.inn.capacity - len(self.inn))
        tl = self.translog
        per_rule = tl is not None and not tl.per_block
        ev = self._events
        ev.mappings = per_rule and not tl.remote
        ev.sessions = self.track_created or (per_rule and tl.remote)
        su.recovering = self.recovery.recovering

    def _is_internal(self, addr: int) -> bool:
        for net, mask in self._internal:
            if addr & mask == net:
                return True
        return False

    # -- packets ------------------------------------------------------------------------
    def handle_misses(self, direction, verdicts, keys, now) -> Decisions:
        """Decide every miss of one batch translated in `direction` (verdicts.OUT/IN).

        `verdicts` uint8[n] and `keys` KEY_DTYPE[n] as the Translator wrote them; `now`
        the same clock ticks (seconds) given to translate.  Frames whose verdict is not a
        miss get ACT_NONE.  Outgoing misses allocate (or reuse the mapping) and install a
        session; incoming misses owned here are filtered per the filtering behaviour;
        hairpin misses build both halves; ICMP-error misses never create anything.
        (``decide_misses``'s arrays as per-frame Decisions: what tests and the pcap
        replay read; the NIC loop calls ``decide_misses``.)
        """
        verdicts = np.asarray(verdicts)
        dec = Decisions.empty(len(verdicts))
        m = self.decide_misses(direction, verdicts, keys, now)
        if not len(m.idx):
            return dec
        r = m.res
        dec.action[m.idx] = np.where(r == _OK, ACT_REPLAY, np.where(r == _FETCH, ACT_FETCH,
                                                                 np.where(r == _HOLD, ACT_HOLD, ACT_DROP)))
        dec.reason[m.idx] = np.where(r >= 0, r, -1)
        f = m.fetches
        if len(f):
            fi = f["frame"]
            dec.owner[fi] = f["owner"]
            dec.fetch_dir[fi] = f["fetch_dir"]
            for name in ("saddr", "daddr", "sport", "dport", "proto", "kind", "tcp_flags"):
                dec.fetch_key[name][fi] = f[name]
        return dec

    def decide_misses(self, direction, verdicts, keys, now, n=None) -> Misses:
        """``handle_misses`` as arrays (the NIC loop's call).  Frames 0..n-1 (n: all of
        `verdicts`).

        Returns ``Misses(replay, fetches, idx, res)``: the frame indices to translate
        again (ACT_REPLAY, intp), the fetches (ACT_FETCH, a layout.FETCH_ROW_DTYPE array
        in frame order: the key in `fetch_dir`'s table, kind, tcp_flags, the frame's
        index and the owner asked), every miss's frame index (int32) and its result
        (int32: -1 replay, -2 fetch, -3 hold (``recovering``), else the drop reason,
        counted already).

        The misses' common case runs compiled over the arrays (``OutSetup.run``:
        outgoing, a known host, its mapping or a port in its blocks, the session;
        incoming, the owner, filtering, the session, or the fetch of another NIC's
        endpoint), writing into the arrays, until a miss needs more -- a new host or
        block, an EIM host owned elsewhere, a refusal that logs, a hairpin or outgoing
        ICMP-error miss -- which takes the general path here (appending to the same
        arrays); then the compiled run goes on from the next frame.  One pass, in frame
        order; no Python object per frame on the common case."""
        if n is None:
            n = len(verdicts)
        vb = np.ascontiguousarray(verdicts[:n], dtype=np.uint8)
        kb = np.ascontiguousarray(keys[:n])
        if kb.dtype != layout.KEY_DTYPE:
            kb = kb.astype(layout.KEY_DTYPE)
        kbytes = kb.view(np.uint8).reshape(-1)
        now = int(now)
        self._begin()
        idx = np.empty(n, np.int32)
        res = np.empty(n, np.int32)
        fet = np.empty(n, layout.FETCH_ROW_DTYPE)
        cnt = np.zeros(2, np.int64)  # [answers, fetches] written so far
        out_, in_ = self._out, self._in
        icmp_kind = layout.KIND_ICMP_ERROR
        run = self._setup.run
        inbound = direction == IN
        j = 0
        while True:
            j = run(vb, kbytes, j, now, idx, res, fet, cnt, inbound)
            if j >= n:
                break
            v = int(vb[j])
            s, d, sp, dp, p, kind, fl, _ = kb[j].tolist()
            if v == _V_MISS_OUT:
                r = out_(p, s, sp, d, dp, fl, now)
                fkey = (OUT, p, s, sp, d, dp, kind)
            elif v == _V_MISS_HAIRPIN:
                r, fkey = self._hairpin_miss(p, s, sp, d, dp, fl, now)
            elif v == _V_MISS_ICMP_ERROR and direction == OUT:
                r = out_(p, s, sp, d, dp, fl, now, kind == icmp_kind)
                fkey = (OUT, p, s, sp, d, dp, kind)
            else:
                # an incoming miss the compiled run left: this NIC's endpoint (run queued
                # the fetches), a session that needs the caller or a refusal that logs
                r = in_(p, s, sp, d, dp, fl, now, kind == icmp_kind)
                fkey = (IN, p, s, sp, d, dp, kind)
            a, nf = cnt.tolist()
            idx[a] = j
            res[a] = r
            cnt[0] = a + 1
            if r == _FETCH:
                fd, fp, fs, fsp, fdd, fdp, fk = fkey
                fet[nf] = (fs, fdd, fsp, fdp, fp, fk, fl, fd, j, self._fetch_owner)
                cnt[1] = nf + 1
            j += 1
        a, nf = cnt.tolist()
        if not a:
            return Misses(_NO_FRAMES, fet[:0], idx[:0], res[:0])
        idx, res = idx[:a], res[:a]
        self._setup.drain(self.counters)
        self._flush(now)
        return Misses(idx[res == _OK].astype(np.intp), fet[:nf], idx, res)

    def _out(self, p, iaddr, iport, raddr, rport, fl, now, icmp_error=False, serving=False) -> int:
        """An outgoing first packet (or an ICMP error from inside): allocate or find.
        The common case is compiled (``OutSetup.out``: a known host, its mapping or a
        port in its blocks, the session); the rest is decided here."""
        r = self._setup.out(p, iaddr, iport, raddr, rport, now, icmp_error)
        if r != _NEED_PY:
            if r == _OK:
                self._last = self._setup.last
                return _OK
            return self._refuse(r)
        # the rare events: a host not known here, a new block, the port cap, the
        # recovery window
        known = iaddr in self.hosts
        if self._eim:
            # a host with blocks here is owned here (EIM hosts exist only at their owner)
            if not known:
                o = self.part.eim_owner(iaddr)
                if o != self.nic:
                    if serving:
                        return self._refuse(_R_NOT_OWNER)
                    self._fetch_owner = o
                    return _FETCH
        if p not in _PIDX:
            return self._refuse(_R_BAD)
        r = 0 if p == PROTO_ICMP else rport  # the session's remote port (ICMP: none)
        maps = self.maps
        rid = maps.by_out_key(p, iaddr, iport, raddr, r)
        if rid and maps.has_session(rid, raddr, r):
            self._last = rid
            return _OK  # the session exists (pending in this batch, or a fetch of it)
        if icmp_error:
            return self._refuse(_R_ICMP_NO_SESSION)
        if self._setup.room <= 0:
            return self._refuse(_R_TABLE_FULL)
        if not rid and self.recovery.holds(iaddr):
            if serving:
                return self._refuse(_R_RECOVERING)
            self.events["recovery_held"] += 1
            return _HOLD  # (takes no token: the frame comes back)
        if self._rate is not None and not self._rate.take(iaddr, now):
            return self._refuse(_R_RATE)  # a new connection beyond the host's rate (hypernat.nat._rate)
        if not rid:
            rid, why = self._new_mapping(p, iaddr, iport, now, known)
            if not rid:
                return why
        self._add_session(rid, raddr, r, now)
        self._last = rid
        return _OK

    def _in(self, p, raddr, rport, eaddr, eport, fl, now, icmp_error=False, serving=False) -> int:
        """An incoming packet without a session here: fetch, filter or admit.  The
        common case is compiled (``OutSetup.in_``: the owner, the mapping, filtering,
        the session); the rest is decided here."""
        su = self._setup
        r = su.in_(p, raddr, rport, eaddr, eport, fl, icmp_error, now)
        if r == _OK:
            self._last = su.last
            return _OK
        if r == _FETCH:
            if serving:
                return self._refuse(_R_NOT_OWNER)
            self._fetch_owner = su.fetch_owner
            return _FETCH
        if r == _NEED_PY:  # (only before bind_in, which __init__ calls)
            raise RuntimeError("OutSetup.bind_in was not called")
        return self._refuse(r)

    def _hairpin_miss(self, p, iaddr, iport, daddr, dport, fl, now):
        """Inside host A to an external endpoint of this gateway (RFC 4787 REQ-9).

        Half 1: A's own session toward (daddr, dport), allocated like any outgoing one.
        Half 2: the target mapping's session for the remote (A's external endpoint), as
        if A's packet had arrived from the Internet: the filtering behaviour applies.
        """
        fkey = (OUT, p, iaddr, iport, daddr, dport, layout.KIND_PLAIN)
        if not self._hairpin:
            return self._refuse(_R_HAIRPIN_OFF), fkey
        ok = out_key(p, iaddr, iport, daddr, dport)
        j = self.out.lookup(*ok)
        if j >= 0:
            ea, ep = int(self.out.slots["new_addr"][j]), int(self.out.slots["new_port"][j])
        else:
            r = self._out(p, iaddr, iport, daddr, dport, fl, now)
            if r != _OK:
                return r, fkey
            _, _, _, ea, ep, _ = self.maps.get(self._last)
        ik = in_key(p, ea, ep, daddr, dport)
        if self.inn.lookup(*ik) >= 0:
            return _OK, fkey
        r = self._in(p, ea, ep, daddr, dport, fl, now)
        return r, (IN, ik[0], ik[1], ik[2], ik[3], ik[4], layout.KIND_PLAIN)

    # -- allocation -----------------------------------------------------------------------
    def _new_mapping(self, p, iaddr, iport, now, known):
        """Allocate an external endpoint for (p, iaddr, iport): (rule id, -1), or (0,
        the refusal's reason).  `known`: the host has a record here (``hosts``)."""
        pi = _PIDX[p]
        hs = self.hosts
        if not known:
            a = self.pool.pick_address()  # round-robin: new hosts spread
            if a < 0:
                self.events["exhausted_pool"] += 1
                return 0, self._refuse(_R_EXHAUSTED)
            hs.add(iaddr, a, self.part.address_at(a))
        if hs.nports(iaddr, pi) >= self._cap:
            return 0, self._refuse(_R_CAP)
        g, off = hs.allocate(iaddr, pi, iport, self._preserve, self.blocks)
        if g < 0:
            nb = hs.nblocks(iaddr)
            if nb >= self._max_blocks:
                return 0, self._refuse(_R_CAP)
            g = self._take_block(iaddr, now)
            if g is _JOURNAL_DOWN:
                if not nb:
                    hs.remove(iaddr)
                return 0, self._refuse(_R_JOURNAL)
            if g is None:
                if not nb:
                    hs.remove(iaddr)
                    self.events["exhausted_pool"] += 1
                else:
                    self._host_address_full(iaddr)
                return 0, self._refuse(_R_EXHAUSTED)
            bl = self.blocks
            off = bl.pick_exact(g, pi, iport) if self._preserve else -1
            if off < 0:
                off = bl.pick(g, pi, iport)
            if off < 0:  # parity impossible in a 1-port block (the block stays with the host)
                return 0, self._refuse(_R_EXHAUSTED)
            hs.set_cur(iaddr, nb)
        hs.add_ports(iaddr, pi, 1)
        return self._make_mapping(p, iaddr, iport, g, off, now), -1

    def _make_mapping(self, p, iaddr, iport, g, off, now=0) -> int:
        """The mapping of (p, iaddr, iport) to port `off` of block `g` (already marked
        used): its rule id (the indexes: ``maps``), its event (the translation log's line)."""
        ea, lo, _ = self.blocks.span(g)
        ep = lo + off
        rid = self.maps.new(p, iaddr, iport, ea, ep, g)
        self._events.record(_EV_MAPPING, p, iaddr, iport, ea, ep, 0, 0, rid, int(now) & 0xFFFFFFFF)
        return rid

    def _host_address_full(self, iaddr: int) -> None:
        """A host with blocks whose address has no free block left: its new connection
        is refused, not moved to another address.  Paired pooling (RFC 4787 REQ-2: all
        of a host's mappings on one external address) is what EIM peers rely on, and a
        connection from a second address would break applications that compare
        addresses (STUN, games, some VPNs).  Counted (ports_exhausted and
        ``exhausted_host_address``) and logged at most every exhaustion_log_interval;
        spill-over (a block borrowed on the same address, ``by-port`` partitions) or the
        host's own sessions expiring make room."""
        self.events["exhausted_host_address"] += 1
        t = _time.monotonic()
        if t - self._last_log_host >= self._log_interval:
            self._last_log_host = t
            log.warning("nic%d: host %s: no free port block left on its address %s (paired pooling): new "
                        "connection refused, not moved (%d so far); it holds %d block(s)", self.nic, _ip(iaddr),
                        _ip(self.hosts.addr(iaddr)), self.events["exhausted_host_address"], self.hosts.nblocks(iaddr))

    def _take_block(self, iaddr: int, now: int):
        """A free block on the host's address (the pool's choice), journaled before use:
        its id; None if none; _JOURNAL_DOWN if the journal could not write."""
        aidx = self.hosts.aidx(iaddr)
        pool = self.pool
        g = pool.take(aidx, self.blocks)
        if g < 0:
            return None
        addr, lo, hi = self.part.block_span(g)
        if self.journal is not None:
            if not pool.is_reserved(g) and not self._reserve_now(aidx, g):
                pool.give_back(g, aidx)  # free still: taken again once the journal writes
                return _JOURNAL_DOWN
            pool.use_reserve(g)  # durable: its host's record need not be (no fsync)
            self._jlazy.append({"op": "assign", "block": g, "host": _ip(iaddr), "external": _ip(addr),
                                "ports": [lo, hi], "t": now})  # fmt: skip
        self.blocks.add(g, aidx, addr, lo, hi - lo + 1, iaddr)
        if self.translog is not None and self.translog.per_block:
            self.translog.block("block", iaddr, addr, lo, hi)
        self.hosts.append_block(iaddr, g)
        return g

    def _free_block(self, g: int) -> None:
        bl = self.blocks
        addr, lo, size = bl.span(g)
        iaddr, a = bl.host(g), bl.aidx(g)
        hs = self.hosts
        if iaddr in hs:
            hs.remove_block(iaddr, g)
            hs.set_cur(iaddr, 0)
            if self.translog is not None and self.translog.per_block:
                self.translog.block("block-free", iaddr, addr, lo, lo + size - 1)
            if hs.idle(iaddr):
                hs.remove(iaddr)
        bl.remove(g)
        if self.journal is not None:  # losing it (a power cut) only quarantines the block after a crash
            self._journal_lazy([{"op": "release", "block": g}])
        self.pool.give_back(g, a)

    def _add_session(self, rid: int, raddr: int, r: int, now: int) -> None:
        """Session (mapping `rid`, R, Rp) added (its entries pending until ``_flush``),
        its event recorded where the per-rule log with ``remote`` or PUSH records are on."""
        if not self.maps.add_session(rid, raddr, r):
            return
        self._setup.room -= 1
        ev = self._events
        if ev.sessions:
            p, ia, ip, ea, ep, _ = self.maps.get(rid)
            ev.record(_EV_SESSION, p, ia, ip, ea, ep, raddr, r, rid, int(now) & 0xFFFFFFFF)  # (uint32, as in C)

    def _drain_events(self) -> None:
        """The event ring's records since the last drain, once per call: the per-rule
        log's lines (``TransLog.rules``: one clock reading, one write) and the created
        sessions for ``drain_created`` (one SESSION_DTYPE array)."""
        ev = self._events
        if not len(ev):
            return
        a = ev.drain()
        tl = self.translog
        if tl is not None and not tl.per_block:
            k = a[a["kind"] == (_EV_SESSION if tl.remote else _EV_MAPPING)]
            if len(k):
                tl.rules("create", k)
        if self.track_created:
            k = a[a["kind"] == _EV_SESSION]
            if len(k):
                c = np.zeros(len(k), SESSION_DTYPE)
                for f in ("iaddr", "eaddr", "raddr", "iport", "eport", "rport", "proto", "rule_id"):
                    c[f] = k[f]
                c["dirs"] = DIR_BITS_BOTH
                c["last_seen"] = k["now"]
                c["owner"] = self.nic
                self._created.append(c)

    def _journal_method(self, name: str):
        """The journal's method `name` (self.journal may be a bound ``append``), or None."""
        return getattr(self.journal, name, None) or getattr(getattr(self.journal, "__self__", None), name, None)

    def reserve_blocks(self) -> int:
        """Journal, with one fsync, the blocks the next new blocks will be taken from.

        A block must be on disk before its first port is used (crash recovery
        quarantines what the journal lists).  Journaling it at that moment puts an
        fsync — hundreds of microseconds on a disk — between a new host's first packet
        and its rule.  Instead the worker calls this off the packet path (its timers,
        no fetch waiting): the blocks the next reserve_per_address x
        reserve_addresses new hosts will take (one each, on the addresses of the
        round-robin in turn; ``BlockPool.reserve_plan``) are journaled as
        ``{"op": "reserve"}``.  When one is taken its "assign" record
        (the host, for crash recovery) is written without an fsync (``append_lazy``:
        it survives a process crash; after a power loss the block is still quarantined,
        only its host is unknown).  Refills when half the reservations are used; the
        price is that a crash quarantines up to reserve_per_address x
        reserve_addresses unused blocks too.  Returns blocks newly journaled."""
        pool = self.pool
        if self.journal is None or pool.reserve_per_address <= 0 or _time.monotonic() < self._journal_retry:
            return 0
        blocks = pool.reserve_plan(self.blocks)
        if not blocks:
            return 0
        recs = pool.reserve_records(blocks)
        many = self._journal_method("append_many")
        try:
            if many is not None and getattr(getattr(many, "__self__", None), "background", False):
                # fsync'ed off the loop's thread: the blocks join the reserve only once
                # they are on disk (the journal's poll() runs this); until then a new host
                # taking one of them reserves it the synchronous way
                def durable():
                    pool.reserve_durable(blocks, self.blocks)

                def failed():
                    pool.reserve_failed(blocks)

                many(recs, on_durable=durable, on_failed=failed)
                pool.reserving(blocks)
                return len(recs)
            self._journal_durable(recs)
        except OSError as exc:
            self._journal_failed(exc)
            self._journal_retry = _time.monotonic() + JOURNAL_RETRY_S
            return 0
        pool.reserved(blocks)
        return len(recs)

    @property
    def reserve_per_address(self) -> int:
        """Blocks kept journaled ahead, per address (0: off) -- the pool's setting."""
        return self.pool.reserve_per_address

    @reserve_per_address.setter
    def reserve_per_address(self, v) -> None:
        self.pool.reserve_per_address = int(v)

    @property
    def reserve_addresses(self) -> int:
        """Blocks are journaled ahead on at most this many addresses -- the pool's setting."""
        return self.pool.reserve_addresses

    @reserve_addresses.setter
    def reserve_addresses(self, v) -> None:
        self.pool.reserve_addresses = int(v)

    def _reserve_now(self, a: int, g: int) -> bool:
        """Block `g` (of address index `a`) is about to be taken and no durable reserve
        names it: journal it now, with the next ones of its address the pool names
        (``BlockPool.urgent_reserve``), on disk before this returns.  False if the
        journal failed."""
        pool = self.pool
        blocks = pool.urgent_reserve(a, g, self.blocks)
        try:
            self._journal_durable(pool.reserve_records(blocks))
        except OSError as exc:
            self._journal_failed(exc)
            return False
        pool.reserved(blocks, sync=True)
        return True

    def _journal_durable(self, recs) -> None:
        """recs on disk before this returns (one group commit when the journal has one)."""
        many = self._journal_method("append_many")
        if many is not None:
            many(recs)
        else:
            for r in recs:
                self.journal(r)

    def _journal_lazy(self, recs) -> None:
        """recs written without waiting for the disk; a failure costs detail, not safety
        (counted, logged): an "assign" lost leaves its block quarantined without a host
        after a crash, a "release" lost leaves it quarantined."""
        lazy = self._journal_method("append_lazy")
        try:
            if lazy is not None:
                lazy(recs)
            else:
                for r in recs:
                    self.journal(r)
        except OSError as exc:
            self._journal_failed(exc)

    def _journal_failed(self, exc) -> None:
        self.events["journal_errors"] += 1
        t = _time.monotonic()
        if t - self._last_log[_R_JOURNAL] >= self._log_interval:
            self._last_log[_R_JOURNAL] = t
            log.error("nic%d: block journal write failed (%s): new port blocks are refused until it writes "
                      "again (%d refused, %d journal errors so far); established mappings go on", self.nic, exc,
                      self.counters[_R_JOURNAL], self.events["journal_errors"])

    def journal_state(self) -> list:
        """The live blocks as journal records (what a checkpoint holds): each block in
        use ("assign", its host), quarantined ("quarantine", the host the journal named,
        if any) or journaled ahead of need ("reserve")."""
        bl = self.blocks
        recs = [{"op": "assign", "block": g, "host": _ip(bl.host(g))} for g in sorted(bl.ids())]
        return recs + self.pool.journal_records(bl)

    def _flush(self, now: int) -> None:
        """Insert the sessions built during this call into both tables, in one batch
        (every block they use is durable in the journal already: its "assign" record,
        the host, is written here without an fsync)."""
        if self._jlazy:
            recs, self._jlazy = self._jlazy, []
            self._journal_lazy(recs)
        self._drain_events()
        if self.translog is not None:
            self.translog.flush()
        self.maps.flush(self.out, self.inn, now)

    # -- removal --------------------------------------------------------------------------
    def session_end(self) -> SessionEnd:
        """The compiled bookkeeping of sessions that end, bound to this builder's tables
        and settings (hypernat.nat.expiry.SessionOwner); what it records leaves through
        ``flush_log``."""
        se = self._ending
        if se is None or not se.bound_to(self.maps, self.hosts, self.blocks):
            if se is not None and se.pending():
                self._drain_ended()
            se = self._ending = SessionEnd(self.maps, self.hosts, self.blocks)
        tl = self.translog
        per_rule = tl is not None and not tl.per_block
        se.events.mappings = per_rule and not tl.remote  # a "remove" line per mapping
        se.events.sessions = per_rule and tl.remote  # ... per session
        se.revoke = self.track_removed
        se.reuse_delay = self.reuse_delay
        se.nic = self.nic
        return se

    def _drain_ended(self) -> None:
        """What the SessionEnd recorded, once per step: the ended mappings' endpoints into
        the reuse delay (``BlockPool.defer``; the recovery forgets them), the
        translation log's "remove" lines (one ``TransLog.rules``), the REVOKE records."""
        se = self._ending
        if se is None or not se.pending():
            return
        ended, removed, events = se.drain()
        if len(ended):
            rec = self.recovery
            if rec.tracking:
                for ekey in ended["ekey"].tolist():
                    rec.forget(ekey)
            self.pool.defer(ended)
        tl = self.translog
        if len(events) and tl is not None and not tl.per_block:
            tl.rules("remove", events[events["kind"] == (_EV_SESSION if tl.remote else _EV_MAPPING)])
        if len(removed):
            self._removed.append(removed)

    def _release_endpoints(self, eps) -> None:
        """The endpoints `eps` (hypernat.nat._reuse.ENDPOINT_DTYPE: block, pidx, offset)
        are free again: one compiled ``PortBlocks.release_many``; the blocks left empty
        (rare) are freed here."""
        if len(eps):
            for g in self.blocks.release_many(eps["block"], eps["pidx"], eps["offset"]).tolist():
                self._free_block(g)

    # -- owner side ---------------------------------------------------------------------
    def serve_fetches(self, recs, now, lease_ms: int = 0):
        """Answer FETCHes from other NICs (the RuleAgent calls it once per batch):
        `recs` are validated FETCH records (messages.KEY_DTYPE); returns (RULE records
        of the answered ones, in order -- owner this NIC, `lease_ms`, tcp_state both
        entries' TCP flags --, the indices of the refused ones, their reason indices:
        the NACKs).

        FETCH_BY_INTERNAL: allocate (or find) the session of the out key (p, I, Ip, R,
        Rp), exactly as a local outgoing miss would; FETCH_BY_EXTERNAL: the session of
        the in key (p, R, Rp, E, Ep), created if the mapping exists and the filtering
        behaviour admits the remote.  Records flagged FETCH_F_ICMP_ERROR or
        FETCH_F_REVALIDATE only look up.  The compiled ``OutSetup.serve`` answers the
        records in order until one needs the general path (``_out`` / ``_in``), which
        answers that one through the same writer (``OutSetup.answer``), and so on; the
        sessions reach the flow tables (``_flush``), then ``Mappings.rule_records``
        writes the RULE records.  The caller (the agent) then grants the leases
        (``hold_many``)."""
        su = self._setup
        recs = np.ascontiguousarray(recs)
        rules, status = su.serve_arrays(recs)  # (a TypeError for anything but FETCH records)
        now = int(now)
        n = len(status)
        self._begin()
        i = 0
        while True:
            i = su.serve(recs, i, now, rules, status)
            if i >= n:
                break
            fd, s, d, sp, dp, p, icmp = su.fetch_row(recs, i)
            if p not in _PIDX:
                r = self._refuse(_R_BAD)
            elif fd == IN:
                r = self._in(p, s, sp, d, dp, 0, now, icmp, serving=True)
            else:
                r = self._out(p, s, sp, d, dp, 0, now, icmp, serving=True)
            su.answer(recs, i, rules, status, r, self._last if r == _OK else 0)
            i += 1
        su.drain(self.counters)
        self._flush(now)
        return self.maps.rule_records(rules, status, self.out, self.inn, self.nic, lease_ms)

    def _session_tuples(self, found, dirs: int) -> list:
        """SESSION_DTYPE tuples of found = [(index, rule id, raddr, rport)], with the
        entries' last_seen (the later of both) and TCP state (``Mappings.session_rows``)."""
        return self.maps.session_rows(found, self.out, self.inn, dirs, self.nic)

    def export_rule(self, proto, eaddr, eport) -> np.ndarray:
        """All sessions of the mapping holding (proto, eaddr, eport), as SESSION_DTYPE."""
        rid = self.maps.by_external(int(proto), int(eaddr), int(eport))
        if not rid:
            return np.zeros(0, SESSION_DTYPE)
        found = [(0, rid, x >> 16, x & 0xFFFF) for x in self.maps.remotes(rid)]
        return np.array(self._session_tuples(found, DIR_BITS_BOTH), SESSION_DTYPE)

    def lookup_external(self, proto, eaddr, eport):
        """The mapping holding an external endpoint: dict(rule_id, proto, iaddr, iport,
        eaddr, eport, sessions, holds) or None (free, or reusable only later)."""
        p, ea, ep = int(proto), int(eaddr), int(eport)
        rid = self.maps.by_external(p, ea, ep)
        if not rid:
            return None
        _, ia, ip, _, _, _ = self.maps.get(rid)
        return dict(rule_id=rid, proto=p, iaddr=ia, iport=ip, eaddr=ea, eport=ep, sessions=self.maps.nsessions(rid),
                    holds=self.pool.holds(p << 48 | ea << 16 | ep), owner=self.nic)  # fmt: skip

    def mappings(self) -> list:
        """Every mapping held here, as MappingView copies, by rule id (a walk over all
        of them: for tests, tools and checks, not for the packet path)."""
        maps = self.maps
        return [MappingView(rid, *maps.get(rid), tuple(maps.remotes(rid))) for rid in maps.rule_ids()]

    def mapping(self, rule_id):
        """One mapping as a MappingView, or None."""
        m = self.maps.get(int(rule_id)) if 0 <= int(rule_id) <= 0xFFFFFFFF else None
        return None if m is None else MappingView(int(rule_id), *m, tuple(self.maps.remotes(int(rule_id))))

    def merge_activity(self, records, now=None) -> int:
        """Fold a clone holder's ACTIVITY records into the owner's entries: last_seen =
        max, tcp_state |= reported bits, per direction in `dirs`.  Unknown sessions are
        ignored (they expired here: the agent revokes).  Returns sessions updated
        (``hypernat.nat._activity``: compiled, one C lookup per record and direction)."""
        return _merge_activity(self.out, self.inn, records)

    def hold(self, proto, eaddr, eport) -> None:
        """``hold_many`` of one endpoint (tests, tools)."""
        self.hold_many(np.array([int(proto) << 48 | int(eaddr) << 16 | int(eport)], np.uint64))

    def hold_many(self, ekeys) -> None:
        """Count one lease granted on the external endpoint of each key of `ekeys`
        (proto << 48 | eaddr << 16 | eport, an integer array: the new leases' endpoints as
        ``LeaseTable.grant`` returns them, when FETCHes are answered or a PUSH is sent):
        one compiled call."""
        self.pool.hold(ekeys)

    def release_hold(self, proto, eaddr, eport) -> None:
        """``release_many`` of one endpoint (tests, tools)."""
        self.release_many(np.array([int(proto) << 48 | int(eaddr) << 16 | int(eport)], np.uint64))

    def release_many(self, ekeys) -> None:
        """One lease ran out or its revoke was acknowledged on the endpoint of each key of
        `ekeys` (proto << 48 | eaddr << 16 | eport, an integer array: the leases
        ``LeaseTable.end_records`` or ``LeaseTable.due`` ran out).  A freed endpoint is
        reusable only once its reuse delay passed AND its hold count is zero: those
        waiting for these holds go back to their blocks (compiled, both steps)."""
        self._release_endpoints(self.pool.release_holds(ekeys))

    def drain_created(self) -> np.ndarray:
        """Sessions created since the last call (for active install: PUSH).  Recorded
        only while ``track_created`` is true (default: install mode active, more than one NIC)."""
        if len(self._events):
            self._drain_events()
        c = self._created
        if not c:
            return _NO_SESSIONS  # (every loop turn asks: no array built for nothing)
        self._created = []
        return c[0] if len(c) == 1 else np.concatenate(c)

    def drain_removed(self) -> np.ndarray:
        """Sessions removed by expiry since the last call (for REVOKE to lease holders).
        Recorded only while ``track_removed`` is true (default: more than one NIC)."""
        self._drain_ended()
        r = self._removed
        if not r:
            return _NO_SESSIONS  # (every loop turn asks: no array built for nothing)
        self._removed = []
        return r[0] if len(r) == 1 else np.concatenate(r)

    # -- holder side --------------------------------------------------------------------
    def install_clone(self, records, now, dirs=DIR_BITS_BOTH, lease_until=0) -> int:
        """``install_clones``, the entries installed in all (tests, one-off callers)."""
        return int(self.install_clones(records, now, dirs, lease_until).sum())

    def install_clones(self, records, now, dirs=DIR_BITS_BOTH, lease_until=0, idx=None, owners=None) -> np.ndarray:
        """Install other NICs' sessions as clones (F_CLONE) in this NIC's tables: the one
        install operation (RULE answers, PUSHes, revalidation answers, tests).

        `records`: a RULE / PUSH message's records (``messages.RULE_DTYPE``, as received)
        or SESSION_DTYPE; `idx` the indexes of the records to install (None: all);
        `dirs` the entries (DIR_BIT_*, scalar or per record; a SESSION record's own
        `dirs` field is not read); `lease_until` (clock seconds, 0 = the agent tracks
        the lease itself) lets the sweep drop the clone when the lease runs out;
        `owners` the owner NIC of each record's external endpoint when the caller knows
        it (per record; None: the partition is asked).  A record whose external endpoint
        this NIC owns, or whose entry would replace an owned one, is refused (counted as
        bad_message); an insert refused for room counts as table_full.  Returns the
        entries installed per selected record (int8, 0 = refused or no room)::

            records ──▶ CloneHolder.install ──▶ hypernat._clones.install_records
                        (compiled, records read in place, no GIL; clones_py without the
                        extensions): per entry one C lookup (an owned entry in the way
                        refuses it), one C insert, tcp_state / lease where non-zero

        A batch is exactly the records installed one by one, in order (a later record
        for the same key replaces the earlier clone entry)."""
        records = np.asarray(records).reshape(-1)
        lease = _lease16(lease_until)
        if lease:
            self.expiry.lease_clones = True
        got, bad, full = self.holder.install(records, int(now) & 0xFFFFFFFF, lease, dirs, idx, owners)
        if bad:
            self.counters[_R_BAD] += bad  # _refuse(_R_BAD) each: bad_message is no exhaustion
        for _ in range(full):
            self._refuse(_R_TABLE_FULL)
        return got

    def remove_clone(self, records) -> int:
        """Remove clone entries (REVOKE); the records' `dirs` say which (0 = both).
        Owned entries are never touched."""
        return self.holder.remove(records)

    def renew_clones(self, records, lease_until) -> int:
        """Extend the lease of clone entries (LEASE renewal)."""
        lease = _lease16(lease_until)
        if lease:
            self.expiry.lease_clones = True
        return self.holder.renew(records, lease)

    def collect_activity(self, clear=True, max_slots=None) -> np.ndarray:
        """Clone entries hit since the last call, as records for ACTIVITY (one record per
        entry, `dirs` = its direction, `owner` = the owning NIC).  Clears F_ACTIVE when
        `clear`.  `max_slots` bounds the scan per table (a cursor continues next call);
        None scans the whole tables."""
        return self.holder.activity(clear, max_slots)

    def drain_lease_expired(self) -> np.ndarray:
        """Clone sessions the sweep dropped because their lease ran out."""
        return self.expiry.drain_lease_expired()

    # -- lifecycle ------------------------------------------------------------------------
    def timeout_for(self, proto: int, tcp_out: int, tcp_in: int) -> int:
        """Idle timeout of a session from its protocol and the TCP flags seen each way
        (``Expiry.timeout_for``)."""
        return self.expiry.timeout_for(proto, tcp_out, tcp_in)

    # Settings a running NIC may change on SIGHUP; everything else (addresses, partition,
    # NICs, table sizes, mapping) changes only with a restart.
    LIVE_SETTINGS = ("timeouts", "limits.ports_per_host", "limits.sweep_step", "limits.sweep_max_expire",
                     "limits.sweep_budget_us", "limits.exhaustion_log_interval", "translation_log",
                     "limits.host_connection_rate", "limits.host_connection_burst")

    def apply_live(self, config) -> None:
        """Take the LIVE_SETTINGS of `config` (already validated and checked by the
        caller to differ from the running one only in those).  Existing sessions keep
        their state; new timeouts apply from the next sweep, a lower host cap to new
        ports only, a new translation log from the next line, a new per-host connection
        rate from the next new connection (every host starting with a full bucket)."""
        t, lim = config.timeouts, config.limits
        self.reuse_delay = t.reuse_delay
        self.expiry.configure(t, lim)
        self._cap = lim.ports_per_host
        self._max_blocks = -(-self._cap // self._bs)
        old = self.config.limits
        if (lim.host_connection_rate, lim.host_connection_burst) != (old.host_connection_rate, old.host_connection_burst):
            # a new rate starts every host with a full bucket
            self._rate = HostRate(lim.host_connection_rate, lim.host_connection_burst) if lim.host_connection_rate > 0 else None
        self._log_interval = lim.exhaustion_log_interval
        self.recovery.log_interval = lim.exhaustion_log_interval
        if config.translation_log != self.config.translation_log:
            from .translog import TransLog

            if self.translog is not None:
                self.translog.close()
            self.translog = TransLog.from_config(config, self.nic)
        self.config = config
        self._bind_setup()

    def sweep(self, now, max_slots=None, max_expire=None, budget_us=None) -> SweepResult:
        """One bounded expiry step (``Expiry.sweep``: the next `max_slots` slots of each
        table, at most `max_expire` sessions or `budget_us` of expiry work; lease-expired
        clones dropped; endpoints whose reuse delay passed released).  Call once per
        batch (an idle loop may call it with larger budgets)."""
        ex = self.expiry
        res = ex.sweep(self, now, max_slots, max_expire, budget_us)
        if res.expired or res.clones_dropped:  # (what the expiry counts)
            ex.drain(self.counters, self.events)
        return res

    # the expiry's settings, read-only here (they were the builder's public fields)
    sweep_step = property(lambda self: self.expiry.sweep_step, doc="slots of each table a sweep step examines")
    sweep_max_expire = property(lambda self: self.expiry.sweep_max_expire)
    sweep_budget_us = property(lambda self: self.expiry.sweep_budget_us)
    t_udp = property(lambda self: self.expiry.t_udp)
    t_est = property(lambda self: self.expiry.t_est)
    t_trans = property(lambda self: self.expiry.t_trans)
    t_icmp = property(lambda self: self.expiry.t_icmp)

    # -- what the expiry asks of its owner (hypernat.nat.expiry.SessionOwner) ---------------
    def release_due(self, now: int, budget: int) -> int:
        """Endpoints whose reuse delay passed and no lease holds go back to their blocks,
        at most `budget`; quarantines whose time has come end.  Returns endpoints that
        left the delay queue."""
        n, free, quarantine = self.pool.due(now, budget)
        self._release_endpoints(free)  # (frees blocks: no quarantine changes)
        if quarantine:
            self._mature_quarantine(now)
        return n

    def flush_log(self) -> None:
        """After an expiry step: what its sessions' ends recorded (``_drain_ended``), and
        the translation log's buffered lines out."""
        self._drain_ended()
        if self.translog is not None:
            self.translog.flush()

    def _mature_quarantine(self, now: int) -> None:
        """Quarantines whose time has come: an unrecovered block becomes free again; a
        recovered block releases the ports nobody reported (their sessions, if any,
        were lost with the crash and their longest timeout has now passed)."""
        expired, ports = self.pool.mature(now)
        if expired and self.journal is not None:  # free again: the journal stops naming them
            self._journal_lazy([{"op": "release", "block": g} for g in expired])
        if expired:
            self.events["recovery_blocks_expired"] += len(expired)
            log.info("nic%d: %d quarantined port block(s) released after their longest timeout: nothing in them "
                     "was recovered from clones", self.nic, len(expired))
        if ports:
            self._release_endpoints(np.array(ports, ENDPOINT_DTYPE))
        if not self.pool.in_quarantine():
            self.recovery.quarantine_over()

    # -- gauges ---------------------------------------------------------------------------
    def utilisation(self) -> float:
        """Fraction of E_i (plus borrowed blocks) in use or waiting for reuse: the
        larger of blocks handed to hosts / blocks and, per protocol, ports / ports."""
        nb, ports = self.pool.capacity(self._bs)
        if nb <= 0:
            return 1.0
        ports = max(1, ports)
        used = max(self.blocks.total_used(pi) for pi in range(3))
        return min(1.0, max(len(self.blocks) / nb, used / ports))

    def counters_dict(self) -> dict:
        """{name: count}: every slow-path reason (SLOW_PATH_REASON_NAMES), then every
        event of EVENT_NAMES (expiries by protocol/state, exhaustion causes, crash
        recovery)."""
        d = dict(zip(SLOW_PATH_REASON_NAMES, self.counters))
        d.update(self.events)
        return d

    def stats(self) -> dict:
        """Gauges: mappings, sessions, clones, hosts, blocks in use, ports in use, ports
        waiting for reuse, held endpoints, utilisation."""
        return {
            "mappings": len(self.maps),
            "sessions": self.maps.n_sessions,
            "entries_out": len(self.out),
            "entries_in": len(self.inn),
            "hosts": len(self.hosts),
            "blocks_in_use": len(self.blocks),
            "ports_in_use": sum(self.blocks.total_used(pi) for pi in range(3)),
            **self.pool.stats(),  # ports_waiting_reuse, endpoints_held, holds, blocks_quarantined / reserved / borrowed / lent
            "utilisation": self.utilisation(),
        }

    # -- state ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The builder's state as plain data (JSON-able).  Table contents are not in it:
        the NIC daemon saves the FlowTables' slots beside it."""
        mp, bl, hs = self.maps, self.blocks, self.hosts
        maps = [[rid, *mp.get(rid), mp.remotes(rid)] for rid in mp.rule_ids()]
        ps = self.pool.snapshot()
        return {
            "version": 1,
            "nic": self.nic,
            "mappings": maps,
            "free_ids": mp.free_id_list(),
            "n_ids": mp.n_ids,
            "hosts": [[ia, hs.aidx(ia), hs.blocks(ia), hs.cur(ia)] for ia in sorted(hs.ids())],
            "blocks": [[g, [bl.used_mask(g, pi) for pi in range(3)], [bl.n_used(g, pi) for pi in range(3)]]
                       for g in sorted(bl.ids())],
            "addr": ps["addr"],
            "avail": ps["avail"],
            "adopted": ps["adopted"],
            "lent": ps["lent"],
            "qblocks": ps["qblocks"],
            "qskipped": ps["qskipped"],
            "reuse": ps["reuse"],
            "holds": ps["holds"],
            "held": ps["held"],
            "counters": list(self.counters),
            "cursors": self.expiry.cursors(),
            "events": dict(self.events),
            "qhosts": ps["qhosts"],
            "reserved": ps["reserved"],
            "rec_ekeys": sorted(self.recovery.recovered_endpoints()),
        }

    def restore(self, state) -> None:
        """Load a snapshot() into a fresh builder whose tables hold the saved slots."""
        if not state:
            return
        if state.get("version") != 1:
            raise ValueError(f"unknown rules snapshot version {state.get('version')!r}")
        self.pool.restore(state)
        self.hosts = hs = Hosts()
        self.blocks = bl = PortBlocks(self._bs, self._parity, int(self.rng.integers(0, 1 << 63)))
        used = {int(g): (u, nu) for g, u, nu in state["blocks"]}
        for iaddr, aidx, bids, cur in state["hosts"]:
            hs.add(iaddr, aidx, self.part.address_at(aidx))
            hs.set_cur(iaddr, cur)
            for g in bids:
                addr, lo, hi = self.part.block_span(g)
                bl.add(g, aidx, addr, lo, hi - lo + 1, iaddr)
                for pi in range(3):
                    bl.set_mask(g, pi, int(used[g][0][pi]))
                hs.append_block(iaddr, g)
        self.maps = mp = Mappings(self._eim, self._index_capacity(), self._filter == "address-dependent")
        mp.load(int(state["n_ids"]), state["free_ids"])
        for rid, p, ia, ip, ea, ep, g, rems in state["mappings"]:
            mp.put(rid, p, ia, ip, ea, ep, g)
            hs.add_ports(bl.host(g), _PIDX[p], 1)
            for x in rems:
                mp.add_session(rid, x >> 16, x & 0xFFFF)
        mp.clear_pending()  # the tables hold the saved slots already
        self._setup = OutSetup(mp, self._internal, REASON, VERDICT)
        self._bind_setup()
        self.counters = [int(x) for x in state["counters"]] + [0] * (len(SLOW_PATH_REASON_NAMES) - len(state["counters"]))
        self.expiry.set_cursors(state.get("cursors", [0, 0]))
        self.events = dict.fromkeys(EVENT_NAMES, 0)
        self.events.update({k: int(v) for k, v in state.get("events", {}).items() if k in self.events})
        self.recovery.restore_endpoints(state.get("rec_ekeys", ()))

    @property
    def recovering(self) -> bool:
        """The crash recovery window is open (the worker sets it after a crash restart,
        clears it when the window closes): new mappings of the hosts the journal names
        wait (ACT_HOLD), a FETCH asking to allocate for one is refused as "recovering"."""
        return self.recovery.recovering

    @recovering.setter
    def recovering(self, v) -> None:
        self.recovery.recovering = bool(v)

    @property
    def recovery_hosts(self) -> frozenset:
        """The hosts the journal names (their first packets wait while ``recovering``)."""
        return self.recovery.hosts

    # -- spill-over and crash recovery ------------------------------------------------------
    def lend_block(self):
        """Give away a free native block of E_i for spill-over; None if there is none.
        The caller records the loan in the Partition (``lend``) once BORROW is acked."""
        return self.pool.lend(self.blocks)

    def adopt_block(self, block) -> None:
        """Start allocating from a block lent by another NIC (after BORROW succeeded);
        the lender also calls it when its lent block comes back."""
        self.pool.adopt(int(block))

    def return_block(self, block) -> bool:
        """Hand a borrowed block back once it is idle (no live or quarantined port):
        True if it was removed from this builder (the agent then sends RETURN)."""
        return self.pool.give_up(int(block), self.blocks)

    def quarantine_blocks(self, blocks, until) -> None:
        """Journaled blocks found after a crash: not allocatable before `until` (the
        sweep lets them go when the time has come), unless ``recover_sessions``
        re-adopts them first.  `blocks`: block ids, or the journal's live map {block:
        host "a.b.c.d" (or int) or None} (``Journal.load``); with a host, a block is
        recovered only for the host it was assigned to.  Unreadable hosts are ignored."""
        self.recovery.set_hosts(self.pool.quarantine(blocks, until))

    def recover_sessions(self, records, now) -> np.ndarray:
        """Re-adopt sessions this NIC owned before a crash, from a clone holder's report
        (SESSION_DTYPE, the owner's view).  Each one whose external endpoint lies in a
        block quarantined since the crash is re-created here, for the host the journal
        named; its block's other ports stay reserved until the quarantine's end (see
        ``hypernat.nat.recovery.Recovery.recover``).  Returns bool[n]: the session is
        live here through recovery (the agent then grants the holder a lease)."""
        ok = self.recovery.recover(self, records, now)
        self.recovery.drain(self.events)
        return ok

    # -- what the crash recovery asks of its owner (hypernat.nat.recovery.RecoveryOwner) ----
    def begin_batch(self) -> None:
        """Before a call that may add sessions (the tables' room, per-rule logs, PUSH)."""
        self._begin()

    def session_room(self) -> int:
        """Sessions that may still be added in this call (both tables' room)."""
        return self._setup.room

    def is_internal(self, addr: int) -> bool:
        """`addr` lies in the internal prefixes."""
        return self._is_internal(addr)

    def make_mapping(self, p: int, iaddr: int, iport: int, g: int, off: int) -> int:
        """The mapping of (p, iaddr, iport) to port `off` of block `g` (marked used)."""
        return self._make_mapping(p, iaddr, iport, g, off)

    def add_session(self, rid: int, raddr: int, rport: int, now: int) -> None:
        """Session (mapping `rid`, R, Rp) added; in the tables at ``flush``."""
        self._add_session(rid, raddr, rport, now)

    def flush(self, now: int) -> None:
        """The sessions added since ``begin_batch`` into both flow tables."""
        self._flush(now)

    def claim_block(self, g: int, iaddr: int) -> None:
        """A quarantined block goes back to the host it was assigned to before the
        crash; all its ports are reserved (marked used) until the quarantine's end,
        and each recovered session takes its own port out of the reservation."""
        a = g // self.part.bpa
        addr, lo, hi = self.part.block_span(g)
        hs = self.hosts
        if iaddr not in hs:
            hs.add(iaddr, a, addr)
        elif hs.aidx(iaddr) != a:  # the host got an address since the restart: both stay in use
            log.warning("nic%d: host %s: recovered block %d is on %s, its new mappings use %s", self.nic,
                        _ip(iaddr), g, _ip(addr), _ip(hs.addr(iaddr)))
        size = hi - lo + 1
        self.pool.claim(g, size)  # out of quarantine, every port reserved (_free_block gives it back)
        self.blocks.add(g, a, addr, lo, size, iaddr, full=True)
        hs.append_block(iaddr, g)
        if self.journal is not None:  # quarantined with its host already: now in use by it
            self._jlazy.append({"op": "assign", "block": g, "host": _ip(iaddr), "external": _ip(addr),
                                "ports": [lo, hi]})  # fmt: skip
        if self.translog is not None and self.translog.per_block:
            self.translog.block("block", iaddr, addr, lo, hi)


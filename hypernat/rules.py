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
for; the owner answers with ``serve_fetch`` and the asker installs the answer with
``install_clone``.

Lifecycle: the fast path writes ``last_seen``/``tcp_state``/``F_ACTIVE`` in the slots;
``sweep(now)`` walks a bounded range of the out table per call (numpy over the slot
range), merges the session's two directions and expires idle sessions per protocol and
TCP state.  A freed external endpoint waits ``timeouts.reuse_delay`` (RFC 6888 REQ-8)
and until every hold (a lease the RuleAgent granted on it, ``hold``/``release_hold``)
is gone before it can be handed out again (invariant 3).

Public interface (stable; extended, never broken)
-------------------------------------------------
Records and constants:
    SESSION_DTYPE        one session as a plain 32-byte record (export, clone, activity)
    DIR_BIT_OUT/IN       ``dirs`` bits of a record: which entries it covers / were active
    ACT_NONE/REPLAY/DROP/FETCH   per-frame actions in ``Decisions.action``
    REASON               {slow-path reason name: index} (``verdicts.SLOW_PATH_REASON_NAMES``)
    Decisions            per-frame arrays: action, reason, owner, fetch_dir, fetch_key
    SweepResult          what one ``sweep`` step did

RuleBuilder(config, nic_id, out_table, in_table, *, partition=None, rng=None,
            translog=None, journal=None)
  packets
    handle_misses(direction, verdicts, keys, now) -> Decisions
  owner side of cloning (called by the RuleAgent)
    serve_fetch(fetch_dir, keys, now) -> (records, status)   status 0 = ok, else reason index
    export_rule(proto, eaddr, eport) -> SESSION_DTYPE array (all sessions of a mapping)
    lookup_external(proto, eaddr, eport) -> dict | None
    merge_activity(records, now=None) -> int
    hold(proto, eaddr, eport) / release_hold(proto, eaddr, eport)
    drain_created() / drain_removed() -> SESSION_DTYPE arrays (for PUSH / REVOKE)
  holder side of cloning
    install_clone(records, now, dirs=DIR_BIT_OUT|DIR_BIT_IN, lease_until=0) -> int
    remove_clone(records) -> int
    renew_clones(records, lease_until) -> int
    collect_activity(clear=True) -> SESSION_DTYPE array (active clone entries)
    drain_lease_expired() -> SESSION_DTYPE array (clones the sweep dropped)
  lifecycle and state
    sweep(now, max_slots=None) -> SweepResult
    utilisation() -> float;  counters_dict() -> {reason: n};  stats() -> dict
    snapshot() -> dict (plain data);  restore(state)
    lend_block() -> block id | None;  adopt_block(block);  return_block(block)
    quarantine_blocks(blocks, until)
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import layout
from .verdicts import SLOW_PATH_REASON_NAMES

# ---------------------------------------------------------------------------------------
# Records

SESSION_DTYPE = np.dtype(
    [
        ("iaddr", "<u4"),  # internal endpoint
        ("eaddr", "<u4"),  # external endpoint (the owner's partition, or a block it lent)
        ("raddr", "<u4"),  # remote endpoint
        ("iport", "<u2"),  # (ICMP query: the identifier, in all three port fields)
        ("eport", "<u2"),
        ("rport", "<u2"),
        ("proto", "u1"),
        ("dirs", "u1"),  # DIR_BIT_OUT | DIR_BIT_IN: entries covered / active
        ("rule_id", "<u4"),  # the owner's handle
        ("last_seen", "<u4"),  # latest activity over the directions in `dirs`
        ("tcp_out", "u1"),  # TCP FIN|SYN|RST seen outgoing (layout.TCP_*)
        ("tcp_in", "u1"),  # ... and incoming
        ("owner", "u1"),  # owning NIC id
        ("flags", "u1"),  # reserved (0)
    ]
)
assert SESSION_DTYPE.itemsize == 32

DIR_BIT_OUT = 1
DIR_BIT_IN = 2
DIR_BITS_BOTH = DIR_BIT_OUT | DIR_BIT_IN

# Per-frame actions.
ACT_NONE = 0  # not a miss: nothing to do
ACT_REPLAY = 1  # a session was installed here: translate the frame again
ACT_DROP = 2  # refused; Decisions.reason says why (counted already)
ACT_FETCH = 3  # owned by NIC Decisions.owner: fetch Decisions.fetch_key (fetch_dir)

REASON = {name: i for i, name in enumerate(SLOW_PATH_REASON_NAMES)}


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


@dataclasses.dataclass
class SweepResult:
    scanned: int = 0  # slots examined
    expired: int = 0  # sessions removed
    mappings_removed: int = 0
    clones_dropped: int = 0  # clone entries whose lease ran out
    endpoints_released: int = 0  # external endpoints back in the free pool
    wrapped: bool = False  # the cursor passed the end of the table


class RuleBuilder:
    """Per-NIC allocator and session keeper (see the module docstring).

    config       hypernat.config.Config
    nic_id       this NIC's id (index into config.nics)
    out_table, in_table   this NIC's FlowTables (hypernat.fastpath)
    partition    hypernat.partition.Partition (default: built from config)
    rng          numpy Generator for port choice (tests pass a seeded one)
    translog     hypernat.translog.TransLog or None (default: built from config)
    journal      callable(record: dict) called, and must have persisted the record,
                 before a port block's first port is used (crash recovery)
    """

    def __init__(self, config, nic_id, out_table, in_table, *, partition=None, rng=None, translog=None, journal=None):
        raise NotImplementedError

    # -- packets ------------------------------------------------------------------------
    def handle_misses(self, direction, verdicts, keys, now) -> Decisions:
        """Decide every miss of one batch translated in `direction` (verdicts.OUT/IN).

        `verdicts` uint8[n] and `keys` KEY_DTYPE[n] as the Translator wrote them; `now`
        the same clock ticks (seconds) given to translate.  Frames whose verdict is not a
        miss get ACT_NONE.  Outgoing misses allocate (or reuse the mapping) and install a
        session; incoming misses owned here are filtered per the filtering behaviour;
        hairpin misses build both halves; ICMP-error misses never create anything.
        """
        raise NotImplementedError

    # -- owner side ---------------------------------------------------------------------
    def serve_fetch(self, fetch_dir, keys, now):
        """Answer FETCHes from other NICs: (records SESSION_DTYPE[n], status int16[n]).

        fetch_dir verdicts.OUT: allocate (or find) the session of the out key, exactly as
        a local outgoing miss would; verdicts.IN: the session of the in key, created if
        the mapping exists and the filtering behaviour admits the remote.  Keys of kind
        KIND_ICMP_ERROR only look up.  status[i] == 0: records[i] is the session (both
        entries, dirs = DIR_BITS_BOTH); else status[i] is the refusal's reason index (the
        NACK) and records[i] is zeroed.  `fetch_dir` is a scalar or uint8[n].
        """
        raise NotImplementedError

    def export_rule(self, proto, eaddr, eport) -> np.ndarray:
        """All sessions of the mapping holding (proto, eaddr, eport), as SESSION_DTYPE."""
        raise NotImplementedError

    def lookup_external(self, proto, eaddr, eport):
        """The mapping holding an external endpoint: dict(rule_id, proto, iaddr, iport,
        eaddr, eport, sessions, holds) or None (free, or reusable only later)."""
        raise NotImplementedError

    def merge_activity(self, records, now=None) -> int:
        """Fold a clone holder's ACTIVITY records into the owner's entries: last_seen =
        max, tcp_state |= reported bits, per direction in `dirs`.  Unknown sessions are
        ignored (they expired here: the agent revokes).  Returns sessions updated."""
        raise NotImplementedError

    def hold(self, proto, eaddr, eport) -> None:
        """Count one lease granted on this external endpoint (the agent calls it when a
        FETCH is answered or a PUSH is sent)."""
        raise NotImplementedError

    def release_hold(self, proto, eaddr, eport) -> None:
        """One lease ran out or its revoke was acknowledged.  A freed endpoint is reusable
        only once its reuse delay passed AND its hold count is zero."""
        raise NotImplementedError

    def drain_created(self) -> np.ndarray:
        """Sessions created since the last call (for active install: PUSH)."""
        raise NotImplementedError

    def drain_removed(self) -> np.ndarray:
        """Sessions removed by expiry since the last call (for REVOKE to lease holders)."""
        raise NotImplementedError

    # -- holder side --------------------------------------------------------------------
    def install_clone(self, records, now, dirs=DIR_BITS_BOTH, lease_until=0) -> int:
        """Install other NICs' sessions as clones (F_CLONE) in this NIC's tables.
        `dirs` selects the entries; `lease_until` (clock seconds, 0 = the agent tracks
        the lease itself) lets the sweep drop the clone when the lease runs out.
        Returns entries installed (a refused insert is counted as table_full)."""
        raise NotImplementedError

    def remove_clone(self, records) -> int:
        """Remove clone entries (REVOKE).  Owned entries are never touched."""
        raise NotImplementedError

    def renew_clones(self, records, lease_until) -> int:
        """Extend the lease of clone entries (LEASE renewal)."""
        raise NotImplementedError

    def collect_activity(self, clear=True) -> np.ndarray:
        """Clone entries hit since the last call, as records for ACTIVITY (dirs = the
        active directions).  Clears F_ACTIVE when `clear`."""
        raise NotImplementedError

    def drain_lease_expired(self) -> np.ndarray:
        """Clone sessions the sweep dropped because their lease ran out."""
        raise NotImplementedError

    # -- lifecycle and state ------------------------------------------------------------
    def sweep(self, now, max_slots=None) -> SweepResult:
        """One bounded expiry step: examine the next `max_slots` out-table slots (default
        ``limits.sweep_step``), expire idle sessions, drop lease-expired clones, release
        endpoints whose reuse delay passed.  Call once per batch."""
        raise NotImplementedError

    def utilisation(self) -> float:
        """Fraction of E_i (plus borrowed blocks) in use or waiting for reuse: the gauge
        that shows exhaustion coming."""
        raise NotImplementedError

    def counters_dict(self) -> dict:
        """{slow-path reason name: count} for every name in SLOW_PATH_REASON_NAMES."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Gauges: mappings, sessions, clones, hosts, blocks in use, ports in use, ports
        waiting for reuse, held endpoints, utilisation."""
        raise NotImplementedError

    def snapshot(self) -> dict:
        """The builder's state as plain data (JSON-able).  Table contents are not in it:
        the NIC daemon saves the FlowTables' slots beside it."""
        raise NotImplementedError

    def restore(self, state) -> None:
        """Load a snapshot() into a fresh builder whose tables hold the saved slots."""
        raise NotImplementedError

    def lend_block(self):
        """Give away a free block of E_i for spill-over; None if there is none."""
        raise NotImplementedError

    def adopt_block(self, block) -> None:
        """Start allocating from a block lent by another NIC (after BORROW succeeded)."""
        raise NotImplementedError

    def return_block(self, block) -> bool:
        """Hand a borrowed block back once it is idle (no live or quarantined port)."""
        raise NotImplementedError

    def quarantine_blocks(self, blocks, until) -> None:
        """Journaled blocks recovered after a crash: not allocatable before `until`."""
        raise NotImplementedError

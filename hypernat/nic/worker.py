"""The NIC worker loop: one run-to-completion loop per NIC (NAT + RuleBuilder + RuleAgent).

One process (or, in tests, one object) per NIC.  It owns two ports (inside toward the
VPC, outside toward the Internet), the NIC's two flow tables, its RuleBuilder and its
RuleAgent, and one ZeroMQ DEALER to the coordinator.  Every turn of the loop:

          poll(2): inside fd │ outside fd │ DEALER's ZMQ_FD   (one wait, no busy loop)
                        │            │           │
    inside.recv() ──► translate(OUT) ──► hits ──► outside.send()      hairpins ──► inside
    outside.recv() ─► translate(IN) ──► hits ──► inside.send()
                        │ misses (verdict MISS_*, key per frame)
                        ▼
              RuleBuilder.decide_misses ──► REPLAY: translate again where the frames lie
                                                    (Batch.select: no copy), send from the batch
                                        ──► DROP: counted by reason
                                        ──► FETCH: RuleAgent queues a copy of the frame, asks
                                                   the owner (sent at once: not at the end of
                                                   the turn); replayed from copies once answered
    DEALER ──► RuleAgent.on_message (RULE, NACK, FETCH, PUSH, LEASE, REVOKE, ACTIVITY, acks);
               a FETCH's RULE / NACK is sent as soon as it is built, before the owner's lease
               bookkeeping
    Scheduler.run (nic/_timers.pyx): every periodic job that is due, a slice each (a message
      that waits -- or a packet after a quiet turn -- ends the turn's jobs after the one running) --
      the agent's retries, retransmissions, lease ends, activity │ RuleBuilder.sweep: one
      expiry step │ RuleBuilder.reserve_blocks + Journal.sync: port blocks journaled ahead
      of need; Journal.checkpoint when the log passed its bound │ heartbeat, stats, ...
    Outbox ──► DEALER.send(NOBLOCK) — a full or absent coordinator queues, never blocks

Per-packet work happens only inside ``Translator.translate``; per batch the loop does a
few numpy operations, and hands a batch's misses to the builder in one call (its common
cases compiled, hypernat/nat/).  A turn takes up to TURN_BATCHES batches' worth of frames
from its two ports, however they split between them.  The coordinator is
never waited for: established traffic keeps flowing while it is away (invariant 7),
unsent control messages wait in a bounded backlog and the agent's retries resend what
mattered.  HELLO on start, HEARTBEAT every interval, and HELLO again whenever the
coordinator says it does not know us (UNDELIVERABLE not_registered) or shows a new
incarnation — then everything unanswered is sent again (invariant 6).

``NicWorker`` is a library class: ``hypernat-nic`` (``nic/__main__.py``) is a thin shell
around it, the emulated deployment runs it in child processes, tests drive it
in-process with ``run_once()``.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import math
import os
import select
import signal
import time

import numpy as np
import zmq

from .. import layout
from .. import messages as M
from .. import zmqio
from ..agent import AgentParams, RuleAgent
from ..fastpath import FlowTable, FragTable, Translator
from ..io.base import Batch, Frames
from ..partition import Partition
from ..rules import _HOLD as _R_HOLD
from ..rules import RuleBuilder
from ..verdicts import IN, MISS_VERDICTS, N_VERDICTS, OUT, VERDICT
from .events import FETCH_SENT as EV_FETCH_SENT
from .events import REPLAY_SENT as EV_REPLAY_SENT
from .events import RULE_BUILT as EV_RULE_BUILT
from .events import RX_HIT as EV_RX_HIT
from .events import RX_MISS as EV_RX_MISS
from .events import now_ns as _now_ns
from .journal import Journal, JournalError
from ._timers import Scheduler  # compiled; nic/timers.py is its reference
from .timers import INF

log = logging.getLogger("hypernat.nic")
_LONG_WAIT_MS = 10  # a wait this long asks ZMQ_EVENTS first, whatever the socket did

_V_TRANSLATED = VERDICT["translated"]
_V_HAIRPIN = VERDICT["hairpin"]
_V_NOT_NAT = VERDICT["not_nat"]
_MISS_LUT = np.zeros(256, dtype=bool)
_MISS_LUT[list(MISS_VERDICTS)] = True
_MISS_LIST = tuple(sorted(MISS_VERDICTS))  # read from a batch's verdict counts (.item: no numpy call)
_V_MISS_HAIRPIN = VERDICT["miss_hairpin"]


# Frames a loop turn takes from its ports at most, in batches: 8 x 256 = 2048 frames,
# four rounds of both ports when both are busy, seven batches when one is.
TURN_BATCHES = 8

# Decisions a hairpinned first packet may take: half 1 fetched, half 2 fetched, and one
# more for a half that a race removed in between.
HAIRPIN_ROUNDS = 3

# Loop counters beyond the fast path's verdicts and the builder's reasons.
LOOP_COUNTERS = (
    "batches", "replayed", "replay_miss", "tx_drops", "coord_sent", "coord_backlog_dropped",
    "coord_recv", "coord_bad_message", "hellos", "undeliverable", "queries", "slow_path_errors",
    "slow_turns", "reloads", "reloads_refused",
    # hairpinning on any NIC: first packets re-decided after a fetch, and those given up
    "hairpin_replayed", "hairpin_unresolved",
    # frames the fast path made itself (ICMP errors, fragments), sent per batch
    "generated",
)

# How often the loop moves every object alive into the GC's permanent generation
# (gc.freeze).  Rules and sessions are long-lived and not cyclic garbage; without this
# each full collection walks every one of them (~50 ms per 100k rules here, stalling the
# loop), and rule setups run 25-35% slower.
GC_FREEZE_INTERVAL = 1.0
# ... and the young generation is collected after 10k net new container objects, not
# Python's default 700: a burst of new connections allocates a few objects per record
# (pending fetches, clones, sessions), almost none of them cyclic, and every young
# collection walks all of them again (clone installs in a burst: 98-102k/s at 700,
# 105-107k/s at 10k, no better at 100k).  10k bounds one young collection's pause to a
# fraction of a millisecond.  Process-wide, set when a worker is created; None leaves
# the interpreter's setting.
GC_THRESHOLDS = (10_000, 50, 100)
# After a crash restart, how long new mappings for the hosts the journal names wait for
# the other NICs' reports of their clones (rules.RuleBuilder.recovering).  The reports
# leave the holders as soon as the coordinator announces the new incarnation (a few ms);
# a held first packet waits at most this long.
RECOVERY_WAIT_S = 0.5


def _numeric(v):
    """A counter value as an int, or None for anything that is not a number (bool and
    numeric strings count; NaN, text, None and containers do not)."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return int(v) if np.isfinite(v) else None
    if isinstance(v, (str, bytes)):
        try:
            return int(v)
        except ValueError:
            return None
    return None


def agent_params(config) -> AgentParams:
    """The agent's tunables from the configuration."""
    lim = config.limits
    # limits.fetch_timeout_ms is how long the first attempt waits before a retry; each
    # retry waits twice as long as the one before (at most 4x): a FETCH that is merely
    # queued behind a burst on a loaded host is not sent again and again (every resend
    # is served again by the owner, which lengthens the queue it is waiting in), while
    # a lost one is still resent quickly.  The fetch gives up (drops its frames, counts
    # fetch_timeout) when its last retry's wait has passed: 50 ms and 2 retries -> the
    # attempts at 0, 50, 150 ms and the give-up at 350 ms, within TCP's 1 s SYN timeout.
    retry = lim.fetch_timeout_ms / 1000.0
    retry_max = retry * 4
    deadline = sum(min(retry * 2 ** k, retry_max) for k in range(lim.fetch_retries + 1))
    return AgentParams(
        lease_s=float(lim.lease_duration),
        lease_margin_s=min(1.0, lim.lease_duration / 10.0),
        activity_interval_s=max(0.05, min(2.0, lim.lease_duration / 4.0)),
        fetch_timeout_s=deadline,
        retry_s=retry,
        retry_max_s=retry_max,
        queue_per_flow=lim.pending_per_flow,
        queue_total=lim.pending_total,
        negative_ttl_s=lim.negative_cache_s,
        fetch_rate=float(lim.fetch_rate_per_source),
        fetch_burst=float(lim.fetch_rate_per_source),
        active_install=config.install == "active",
        switch_hash=config.switch.hash,
        switch_seed=config.switch.seed,
        switch_fields=config.switch.fields,
        **loop_slices(config.loop),
    )


def loop_slices(loop) -> dict:
    """The agent's slices of periodic work per loop turn from the config's ``loop:``
    (at start, and again on a reload: ``RuleAgent.set_slices``)."""
    return {"retransmit_slice": loop.retransmit_slice, "lease_end_slice": loop.lease_end_slice,
            "activity_slots": loop.activity_slots, "activity_entries": loop.activity_entries}


class NicWorker:
    """One NIC: ports, tables, builder, agent, coordinator link; ``run()`` until ``stop()``.

    config      hypernat.config.Config (the whole gateway; this NIC's part is nic_id)
    inside, outside   hypernat.io.base.Port
    endpoint    coordinator endpoint (default config.coordinator.endpoint); None and
                ``standalone=True`` runs without a coordinator (single NIC, tests)
    clock       float seconds, monotonic (leases, retries); ticks = int(clock())
    batch_size  frames per recv
    state_dir   where snapshot and journal live (default config.state_dir/nic<id>)
    events      None (default: nothing recorded, two local ``is None`` tests per batch) or a
                ``nic.events.EventLog``: arrivals of missed frames (and of hits with
                ``hits=True``), rules built, fetches, clones installed, replays sent,
                each with its flow key and a CLOCK_MONOTONIC time (Table I)
    """

    def __init__(self, config, nic_id: int, inside, outside, *, endpoint: str | None = None,
                 standalone: bool = False, clock=time.monotonic, batch_size: int = 256,
                 state_dir: str | None = None, context: zmq.Context | None = None,
                 params: AgentParams | None = None, rng=None, restore: bool = True,
                 journal: bool = True, arp: dict | None = None, events=None):
        from .snapshot import Snapshot

        self.config = config
        self.nic_id = nic_id
        self.n_nics = config.n_nics
        self.inside, self.outside = inside, outside
        self.clock = clock
        self.batch_size = batch_size
        self.partition = Partition.from_config(config)
        cap = config.limits.flow_table_capacity
        self.out_table = FlowTable(cap)
        self.in_table = FlowTable(cap)
        self._prefault_tables()
        if GC_THRESHOLDS is not None:
            gc.set_threshold(*GC_THRESHOLDS)
        fl = config.limits.fragments
        self.frag = FragTable(fl.entries, fl.bytes, fl.timeout)
        self.translator = Translator(self.out_table, self.in_table, pool=config.pool_ranges, frag=self.frag)
        self.set_links()  # the config's router settings; hypernat-nic adds the interfaces' MTUs and address
        self.state_dir = state_dir or os.path.join(config.state_dir, f"nic{nic_id}")
        # fsyncs on a thread of their own: the loop never waits for the disk (journal.py)
        self.journal = Journal(os.path.join(self.state_dir, "blocks.journal"), background=True,
                               max_log_bytes=config.limits.journal_log_bytes) if journal else None
        self.snapshot = Snapshot(os.path.join(self.state_dir, "snapshot"))
        self.rules = RuleBuilder(config, nic_id, self.out_table, self.in_table, partition=self.partition,
                                 rng=rng, journal=self.journal.append if self.journal else None)
        self.outbox = M.Outbox()
        self._backlog: collections.deque = collections.deque()
        self._backlog_max = 100_000
        self.agent = RuleAgent(nic_id, self.n_nics, self.rules, self._queue_msg, self._owner_of,
                               self._replay, params or agent_params(config), clock=clock,
                               tick_clock=self.ticks, partition=self.partition, seq_start=None,
                               on_installed=None if events is None else self._clones_installed)
        self.counters = collections.Counter({k: 0 for k in LOOP_COUNTERS})
        # ARP on real links where the kernel does not see the frames (AF_XDP): one
        # l2.ArpResponder per port (keyed "inside" / "outside"); None: ARP frames are
        # not_nat drops (PACKET_MMAP: the kernel answers for its own addresses)
        self.arp = {id(inside): (arp or {}).get("inside"), id(outside): (arp or {}).get("outside")}
        self._verdicts = np.zeros(max(batch_size, 1024), np.uint8)
        self._keys = np.zeros(max(batch_size, 1024), layout.KEY_DTYPE)
        self._all = np.arange(max(batch_size, 1024), dtype=np.intp)  # "send every frame"
        self._rv = np.zeros(max(batch_size, 1024), np.uint8)  # _replay's verdicts and keys
        self._rk = np.zeros(max(batch_size, 1024), layout.KEY_DTYPE)
        self._stop = False
        self.incarnation = M.new_incarnation()
        self.coord_incarnation = None
        self.registered = False
        self._last_hello = -1.0
        self._reload_requested = False
        self.loan_rebroadcast_interval = 5.0  # seconds: lent blocks announced again
        self._exhausted_seen = 0
        self.sweep_interval = 0.005  # seconds between two bounded expiry steps
        self.sweep_defer_max = 0.1  # ... postponed at most this long while fetches are pending
        self._sweep_held = None  # when the sweep due began to wait for fetches in flight
        self.journal_interval = 0.005  # seconds between two checks of the reserved blocks
        self.journal_sync_interval = 0.05  # ... and between two fsyncs of lazily written records
        self.slow_turn_s = 0.02  # a loop turn longer than this is counted (loop_slow_turns) and logged
        self._hb_seq = 0
        self.peers: dict[int, tuple] = {}
        self.sock = None
        self.standalone = standalone
        self._make_predicates()
        # one poll(2) per turn (what zmq_poll does, without its ZMQ_EVENTS per socket and
        # call): the ports' fds (readable while frames wait) and the coordinator socket's
        # ZMQ_FD, which tells of changes only -- after any operation on the socket
        # (_zmq_dirty) and before a long wait, ZMQ_EVENTS says whether a message waits
        self.poller = select.poll()
        self._rx_fds = (inside.fileno(), outside.fileno())  # a port is read when the poll says so
        for fd in set(self._rx_fds):
            self.poller.register(fd, select.POLLIN)
        self._zfd = -1  # the coordinator socket's ZMQ_FD
        self._zmq_dirty = False  # an operation on the socket since ZMQ_EVENTS was last asked
        self._tx_waiting = 0  # frames the ports' devices refused, waiting to be sent again
        self._quiet_ports = True  # the turn took no frames (_waiting)
        if not standalone:
            self._ctx = context or zmq.Context.instance()
            self._connect(endpoint or config.coordinator.endpoint)
        # -- event log (optional, Table I): None costs two local tests per batch -------------
        self.events = events
        self.recovery = {}
        self._held: list = []  # (direction, frame) waiting out the crash recovery window
        self._recovery_end = 0.0
        self._recovered_seen = 0
        self.timers = self._make_timers(config)
        if restore:
            self.recovery = self._restore()
        if self.journal is not None:
            self.rules.reserve_blocks()  # before the first packet: no fsync on its path
            self.journal.wait()  # ... and on disk before it
            if self.journal.waiting:
                self.timers.due_now("journal_poll")

    def _clones_installed(self, records, idx, dirs) -> None:
        """Event log only (the agent's ``on_installed``: every clone it installs, RULE
        answers, PUSHes, revalidation): each installed clone logged with the time its
        install returned."""
        self.events.add_clones(records, dirs, idx, _now_ns())

    # -- setup -----------------------------------------------------------------------------
    def _connect(self, endpoint: str) -> None:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, M.nic_identity(self.nic_id))
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        nc = self.config.nic(self.nic_id)
        cc = self.config.coordinator
        if nc.curve_secret_key and cc.curve_public_key:
            from ..auth import client_curve

            client_curve(s, nc.curve_secret_key, cc.curve_public_key)
        s.connect(endpoint)
        self.sock = s
        self.endpoint = endpoint
        self._zfd = s.getsockopt(zmq.FD)
        self.poller.register(self._zfd, select.POLLIN)
        self._zmq_dirty = True

    def _prefault_tables(self) -> None:
        """Touch every page of both flow tables once, now, before the NIC serves traffic.

        The tables are fresh anonymous mappings advised for transparent huge pages: the
        kernel backs a page only when it is first written, and with THP defrag "madvise"
        that first write may compact memory to find a 2 MiB page — tens of milliseconds
        on a loaded host.  Untouched, those faults land on the first burst of new
        connections (the first inserts at the owner, the first clone installs at the
        holder) and every FETCH of the burst waits behind them: on the testbed a loop
        turn of 136-165 ms at start, fetches answered after 50-200 ms, retried, timed
        out.  Reading and writing back one byte per 4 KiB keeps the contents (a restored
        snapshot is untouched)."""
        for t in (self.out_table, self.in_table):
            try:
                raw = t.slots.view(np.uint8).reshape(-1)
            except (AttributeError, ValueError):
                continue  # a table without a plain slot array: nothing to prefault
            raw[::4096] |= 0

    def _restore(self) -> dict:
        """Graceful restart: reload the snapshot.  Crash restart (journal but no clean
        snapshot): quarantine every block the journal names until its longest timeout
        passed.  Either way the journal is then checkpointed from the builder's state
        (every block in use, with its host, and every quarantine), on disk before the
        first new block is handed out; only then is the snapshot discarded (a crash from
        there on is a crash, and the journal names everything the snapshot held)."""
        now = self.clock()
        info = {"snapshot": False, "quarantined_blocks": 0}
        snap = self.snapshot.load()
        if snap is not None:
            out_slots, in_slots, state = snap
            self.out_table.load_slots(out_slots)
            self.in_table.load_slots(in_slots)
            clones = self._strip_clones()
            self.rules.restore(state.get("rules", {}))
            self.agent.restore(state.get("agent", {}), now)
            info.update(snapshot=True, rules=int(len(self.out_table)), clones_to_revalidate=int(clones))
            if self.journal is not None:
                try:
                    self.journal.checkpoint(self.rules.journal_state(), wait=True)
                except JournalError as exc:  # the snapshot stays: a restart once the disk is fixed reads it
                    raise JournalError(exc.errno, f"nic{self.nic_id}: cannot start: the blocks restored from "
                                       f"{self.snapshot.path} cannot be journaled ({exc}); the snapshot is kept"
                                       ) from exc  # fmt: skip
            self.snapshot.discard()  # used once: a crash from here on is a crash
            log.info("nic%d: restored snapshot: %s", self.nic_id, info)
            return info
        if self.journal is not None:
            live = self.journal.load()
            if live:
                t = self.config.timeouts
                # a remote may still send to an endpoint until the session's longest idle
                # timeout (or a clone's lease, if longer) and the reuse delay have passed
                longest = max(t.udp, t.tcp_established, t.tcp_transitory, t.icmp,
                              self.config.limits.lease_duration) + t.reuse_delay
                until = self.ticks() + longest
                # crash recovery (rules.py): the journal names each block's host, so that
                # recover_sessions re-adopts a block only for the host it was assigned to
                self.rules.quarantine_blocks(live, until)
                info["quarantined_blocks"] = len(live)
                if self.rules.recovery_hosts:  # their old mappings may come back: wait first
                    self.rules.recovering = True
                    self._recovery_end = self.clock() + RECOVERY_WAIT_S
                    self.timers.enable("recovery")
                    info["recovery_wait_s"] = RECOVERY_WAIT_S
                self.counters["blocks_quarantined"] += len(live)
                log.warning("nic%d: restarted after a crash: %d journaled port block(s) quarantined for %ds; "
                            "their sessions are recovered from other NICs' clones as those report them, "
                            "the rest are lost", self.nic_id, len(live), longest)
            try:
                self.journal.checkpoint(self.rules.journal_state(), wait=True)
            except JournalError as exc:  # the old checkpoint and logs stay and name the same blocks
                log.error("nic%d: journal not compacted at start (%s); retried later", self.nic_id, exc)
        return info

    def _strip_clones(self) -> int:
        """Remove clone entries read back from a snapshot; the agent revalidates them."""
        n = 0
        for t in (self.out_table, self.in_table):
            idx = t.occupied()
            if len(idx) == 0:
                continue
            sl = t.slots[idx]
            clones = sl[(sl["flags"] & layout.F_CLONE) != 0]
            if len(clones):
                t.delete_batch(clones.copy())
                n += len(clones)
        return n

    # -- helpers ------------------------------------------------------------------------------
    def ticks(self) -> int:
        return int(self.clock()) & 0xFFFFFFFF

    def _owner_of(self, eaddr: int, eport: int):
        o = self.partition.owner(eaddr, eport)
        return None if o < 0 else o

    # Answers someone's first packet waits for (a FETCH's RULE or NACK) leave as soon as
    # the agent makes them, with whatever was queued before them (in order), not at the
    # end of the delivery: the owner's lease bookkeeping and the rest of the turn's
    # messages come after the answer, off the asker's critical path.
    _ANSWERS = frozenset((M.T_RULE, M.T_NACK))

    def _queue_msg(self, target: int, mtype: int, recs) -> None:
        self.outbox.add_many(M.nic_identity(target), mtype, recs)
        if mtype in self._ANSWERS:
            self._flush()

    def _send_coord(self, mtype: int, payload: bytes) -> None:
        self._send_frames([M.COORD, M.TYPE_FRAME[mtype], payload])

    def _send_frames(self, frames) -> None:
        if self.sock is None:
            return
        if self._backlog:
            if len(self._backlog) >= self._backlog_max:
                self.counters["coord_backlog_dropped"] += 1
                return
            self._backlog.append(frames)
            return
        self._zmq_dirty = True
        try:
            zmqio.send_multipart(self.sock, frames, zmqio.NOBLOCK)
            self.counters["coord_sent"] += 1
        except zmq.Again:
            self._backlog.append(frames)
        except zmq.ZMQError as exc:
            self.counters["coord_backlog_dropped"] += 1
            log.debug("nic%d: send failed: %s", self.nic_id, exc)

    def _flush(self) -> None:
        if self._backlog:
            self._zmq_dirty = True
        while self._backlog:
            try:
                zmqio.send_multipart(self.sock, self._backlog[0], zmqio.NOBLOCK)
                self._backlog.popleft()
                self.counters["coord_sent"] += 1
            except zmq.Again:
                break
            except zmq.ZMQError:
                self._backlog.popleft()
                self.counters["coord_backlog_dropped"] += 1
        if self.outbox:
            if self.sock is None:
                for _ in self.outbox.drain():
                    self.counters["coord_backlog_dropped"] += 1
                return
            for target, mtype, payload in self.outbox.drain():
                self._send_frames([target, M.TYPE_FRAME[mtype], payload])

    # -- the gateway as a router (ICMP errors, fragments, MSS clamping: the fast path's) --------
    def router_settings(self, inside_mtu: int = 0, outside_mtu: int = 0, inside_address: int = 0) -> dict:
        """The fast path's router settings (``Translator.set_router``): what the config
        says, else what the interfaces say (arguments: their MTUs and the inside one's
        IPv4 address, read at start; 0 = unknown).  ICMP errors toward the Internet come
        from ``icmp.outside_source``, else from the first pool address this NIC owns."""
        nc, ic = self.config.nic(self.nic_id), self.config.icmp
        if ic.outside_source is not None:
            outside_address = M.ip_int(ic.outside_source)
        else:
            mine = self.partition.nic_address_indices(self.nic_id)
            outside_address = self.partition.address_at(mine[0]) if len(mine) else 0
        return {
            "inside_mtu": nc.inside_mtu or inside_mtu,
            "outside_mtu": nc.outside_mtu or outside_mtu,
            "inside_address": M.ip_int(ic.inside_source) if ic.inside_source is not None else inside_address,
            "outside_address": outside_address,
            # the worker's clock ticks are seconds: the bucket holds a second's worth
            "icmp_rate": ic.rate_limit,
            "mss_clamp": self.config.tcp_mss_clamp,
        }

    def set_links(self, inside_mtu: int = 0, outside_mtu: int = 0, inside_address: int = 0) -> dict:
        """Apply ``router_settings`` to the fast path; returns them.  The interfaces'
        values are kept: a reload that drops a configured MTU falls back to them."""
        self._links = (inside_mtu, outside_mtu, inside_address)
        settings = self.router_settings(inside_mtu, outside_mtu, inside_address)
        self.translator.set_router(**settings)
        return settings

    def _send_made(self) -> None:
        """Right after every translate (the next one reuses the area): the frames the fast
        path made besides the batch -- the router's ICMP errors and fragments, and the
        early fragments the fragment table released -- all in the translator's one output
        area, out of the port on each one's exit side: one send per side, no Python per
        frame."""
        tr = self.translator
        n = tr.out_count
        if not n:
            return
        self.counters["generated"] += n
        b = Batch(tr.out_buf, tr.out_offsets, tr.out_lengths, n)
        exits = tr.out_exits[:n]
        for d, port in ((OUT, self.outside), (IN, self.inside)):
            idx = np.flatnonzero(exits == d)
            if len(idx):
                self.counters["tx_drops"] += len(idx) - port.send(b, idx)

    # -- packets ------------------------------------------------------------------------------
    def _process(self, port, direction: int, other) -> int:
        b = port.recv(self.batch_size)
        if b is None:
            return 0
        try:
            return self._process_batch(b, port, direction, other)
        finally:
            port.release(b)

    def _process_batch(self, b, port, direction: int, other) -> int:
        """Translate one batch received on `port`, send what hit to `other`, hairpins back
        to `port`, misses to the slow path."""
        ev = self.events
        t_rx = _now_ns() if ev is not None else 0
        n = b.n
        if n > len(self._verdicts):
            self._verdicts = np.zeros(n, np.uint8)
            self._keys = np.zeros(n, layout.KEY_DTYPE)
        v = self._verdicts[:n]
        k = self._keys[:n]
        now = self.ticks()
        self.translator.translate(b.buf, b.offsets[:n], b.lengths[:n], direction, now, v, k, b.partial, b.meta)
        self._send_made()
        self.counters["batches"] += 1
        counts = self._send_verdicts(b, v, direction, port, other)
        if counts is None:  # the common case: everything hit
            if ev is not None and ev.hits:
                ev.add_keys(EV_RX_HIT, direction, t_rx, k)
            return n
        if ev is not None:
            if ev.hits:
                ev.add_keys(EV_RX_HIT, direction, t_rx, k[v == _V_TRANSLATED])
            ev.add_keys(EV_RX_MISS, direction, t_rx, k[_MISS_LUT[v]])
        if counts[_V_NOT_NAT] and self.arp[id(port)] is not None:
            self._arp(port, b, np.flatnonzero(v == _V_NOT_NAT))
        if any(map(counts.item, _MISS_LIST)):
            try:
                self._misses(b, direction, v, k, now)
            except Exception:  # noqa: BLE001 - a slow-path bug drops this batch's misses, not the NIC
                self.counters["slow_path_errors"] += 1
                log.exception("nic%d: slow path failed on a batch (misses dropped)", self.nic_id)
        return n

    def _send_verdicts(self, b, v, direction: int, port, other):
        """Send the frames of `b` the fast path translated (verdicts `v`) out of `other`,
        and those it hairpinned (OUT only) back out of `port`.  Returns None when every
        frame was translated (the common case: one count, one send), else the batch's
        count of each verdict (one ``bincount``: what else the batch holds, without a
        pass over it per kind)."""
        n = b.n
        c = self.counters
        send = v == _V_TRANSLATED
        nsend = int(np.count_nonzero(send))
        if nsend == n:
            if n > len(self._all):
                self._all = np.arange(n, dtype=np.intp)
            c["tx_drops"] += n - other.send(b, self._all[:n])
            return None
        counts = np.bincount(v, minlength=N_VERDICTS)
        if nsend:
            c["tx_drops"] += nsend - other.send(b, np.flatnonzero(send))
        if counts[_V_HAIRPIN]:
            hp = np.flatnonzero(v == _V_HAIRPIN)
            c["tx_drops"] += len(hp) - port.send(b, hp)
        return counts

    def _arp(self, port, b, idx) -> None:
        """ARP frames among the not_nat ones: learn, answer for our addresses."""
        resp = self.arp[id(port)]
        for i in idx:
            f = b.frame(int(i))
            if f[12:14] != b"\x08\x06":
                continue
            reply = resp.handle(f)
            self.counters["arp_frames"] += 1
            if reply is not None:
                self.counters["arp_replies"] += 1
                port.send_frames([reply])

    def set_l2(self, inside_mac: bytes, inside_next_hop: bytes, outside_mac: bytes, outside_next_hop: bytes) -> None:
        """MAC addresses of frames the NIC sends: toward the Internet from the outside
        port to its next hop, toward the VPC from the inside port to its next hop."""
        self.translator.set_l2(OUT, outside_mac, outside_next_hop)
        self.translator.set_l2(IN, inside_mac, inside_next_hop)

    def _misses(self, b, direction, v, k, now, rounds: int = 0) -> None:
        """The slow path of a batch's misses (verdicts `v`, keys `k` of batch `b`; `rounds`:
        hairpin decisions its frames have had already), decided in one call.  A frame
        whose miss became a session here is translated again where it lies, in `b`
        (``Batch.select``: no copy, sent from `b`'s buffer); only frames that outlive
        the batch -- held under crash recovery, queued behind a fetch -- are copied."""
        replay, fetches, idx, res = self.rules.decide_misses(direction, v, k, now)
        if self.rules.recovering:
            held = idx[res == _R_HOLD]
            if len(held):
                self._hold(direction, b.frames(held))
        ev = self.events
        if len(replay):
            if ev is not None:
                ev.add_keys(EV_RULE_BUILT, direction, _now_ns(), k[replay])
            self._translate_again(direction, b.select(replay))
        if len(fetches):  # the batch's fetches as records; one FETCH message per owner
            fidx = fetches["frame"]
            tags = self._hairpin_frames(fidx, v, rounds) if direction == OUT else None
            self.agent.fetch_rows(fetches, b.frames_of(fidx, tags), self.clock())
            if ev is not None:
                ev.add_keys(EV_FETCH_SENT, direction, _now_ns(), k[fidx])
            # the FETCH leaves now, not at the end of the turn: the rest of the turn (more
            # batches on both ports, timers) would sit between the miss and the owner
            # (~100 us a turn on a loaded host, on the critical path of the first reply)
            self._flush()
        # ACT_DROP: the builder counted the reason already

    def _hold(self, direction: int, frames) -> None:
        """Keep first packets of hosts under crash recovery (bounded like the fetch
        queues: limits.pending_total); ``_recovery_step`` sends them through again."""
        room = max(0, self.config.limits.pending_total - len(self._held))
        if len(frames) > room:
            self.counters["recovery_hold_dropped"] += len(frames) - room
            frames = frames[:room]
        self._held.extend((direction, f) for f in frames)

    def _recovery_step(self, now: float) -> None:
        """While the crash recovery window is open: when a report recovered sessions, or
        when the window closes, every held frame goes through the NIC again (a recovered
        session translates it; otherwise a new mapping is made once the window closed,
        or it is held again)."""
        got = self.rules.events["recovered_sessions"]
        closing = now >= self._recovery_end
        if closing:
            self.rules.recovering = False
            self.timers.enable("recovery", False)
            log.info("nic%d: crash recovery window closed (%d sessions recovered, %d first packets held)",
                     self.nic_id, got, self.rules.events["recovery_held"])
        if self._held and (closing or got != self._recovered_seen):
            held, self._held = self._held, []
            for d, port, other in ((OUT, self.inside, self.outside), (IN, self.outside, self.inside)):
                frames = [f for x, f in held if x == d]
                if frames:
                    self._process_batch(Batch.from_frames(frames), port, d, other)
        self._recovered_seen = got

    @staticmethod
    def _hairpin_frames(fidx, v, rounds: int):
        """The tags of the frames `fidx` (an index array) queued behind fetches: a
        hairpinned frame (inside host -> an external endpoint of the pool) tagged with its
        hairpin decisions so far (``rounds`` + 1), the others 0 (None: no hairpin among
        them; one numpy pass).  Its two halves -- the sender's mapping and the
        destination's session -- may be owned by two other NICs, so it may take two
        fetches, and the fetch of the second half is an *incoming* key whose answer the
        agent replays as IN: the tag, kept with the frame in the fetch table's arena,
        tells ``_replay`` to run it as the outgoing frame it is, and to decide it again
        while the other half is missing (at most ``HAIRPIN_ROUNDS`` decisions)."""
        hp = v[fidx] == _V_MISS_HAIRPIN
        if not hp.any():
            return None
        return hp.view(np.uint8) * np.uint8(min(rounds + 1, 255))

    def _replay_hairpins(self, frames) -> None:
        """Hairpinned frames (``Frames``, every tag non-zero) whose fetch was answered:
        translated as the outgoing frames they are (whatever direction the fetched half
        was); one whose other half is still missing is decided again -- found here, built
        here, or fetched from its owner -- up to HAIRPIN_ROUNDS decisions in all.  One
        batch per number of decisions so far (numpy: no Python step per frame)."""
        c = self.counters
        tags = frames.tags[:frames.n]
        for rounds in np.unique(tags).tolist():
            b = frames.select(np.flatnonzero(tags == rounds)).batch()
            n = b.n
            v = np.zeros(n, np.uint8)  # scratch of its own: _misses below may _replay
            k = np.zeros(n, layout.KEY_DTYPE)
            now = self.ticks()
            self.translator.translate(b.buf, b.offsets[:n], b.lengths[:n], OUT, now, v, k)
            self._send_made()
            c["hairpin_replayed"] += n
            hp = np.flatnonzero(v == _V_HAIRPIN)
            if len(hp):
                c["tx_drops"] += len(hp) - self.inside.send(b, hp)
            miss = v == _V_MISS_HAIRPIN
            if miss.any():
                if rounds >= HAIRPIN_ROUNDS:
                    c["hairpin_unresolved"] += int(miss.sum())
                else:
                    self._misses(b, OUT, v, k, now, rounds)

    def _replay(self, direction: int, frames) -> None:
        """Frames that outlived their batch (``io.base.Frames``: copies out of the fetch
        table's arena, the agent's callback) translated again once their rule is
        installed: one batch of them over their buffer; the tagged ones (hairpinned) as
        the outgoing frames they are (``_replay_hairpins``)."""
        if not isinstance(frames, Frames):
            frames = Frames.of(frames)
        tags = frames.tags
        if tags is not None:
            hp = tags[:frames.n] != 0
            if hp.any():
                self._replay_hairpins(frames.select(np.flatnonzero(hp)))
                rest = np.flatnonzero(~hp)
                if not len(rest):
                    return
                frames = frames.select(rest)
        if frames.n:
            self._translate_again(direction, frames.batch())

    def _translate_again(self, direction: int, b) -> None:
        """Translate the frames of `b` again now that their rules are in place, send what
        translates (hairpins back inside), count what misses again (replay_miss): the
        one replay, for a batch's own misses (a selection of it) and for copies."""
        n = b.n
        if n > len(self._rv):
            self._rv = np.zeros(n, np.uint8)
            self._rk = np.zeros(n, layout.KEY_DTYPE)
        v = self._rv[:n]  # scratch of its own: a replay runs inside _process (_misses)
        k = self._rk[:n]
        self.translator.translate(b.buf, b.offsets[:n], b.lengths[:n], direction, self.ticks(), v, k,
                                  b.partial, b.meta)
        self._send_made()  # a replayed first fragment releases its datagram's held ones
        c = self.counters
        c["replayed"] += n
        port, other = (self.inside, self.outside) if direction == OUT else (self.outside, self.inside)
        counts = self._send_verdicts(b, v, direction, port, other)
        if counts is not None:
            c["replay_miss"] += sum(map(counts.item, _MISS_LIST))
        if self.events is not None:
            self.events.add_keys(EV_REPLAY_SENT, direction, _now_ns(), k[(v == _V_TRANSLATED) | (v == _V_HAIRPIN)])

    # -- coordinator ---------------------------------------------------------------------------
    def _hello(self, now: float) -> None:
        rec = M.records(M.T_HELLO, 1)
        rec["version"], rec["nic"], rec["n_nics"] = M.PROTOCOL_VERSION, self.nic_id, self.n_nics
        rec["incarnation"] = self.incarnation
        rec["heartbeat_ms"] = int(self.config.coordinator.heartbeat_interval * 1000)
        self._send_coord(M.T_HELLO, rec.tobytes())
        self.counters["hellos"] += 1
        self._last_hello = now
        self.timers.set_due("hello", now + 0.5)  # until HELLO_ACK

    def _heartbeat(self, now: float) -> None:
        self._hb_seq += 1
        rec = M.records(M.T_HEARTBEAT, 1)
        rec["seq"], rec["incarnation"], rec["time_ns"] = self._hb_seq, self.incarnation, time.monotonic_ns()
        self._send_coord(M.T_HEARTBEAT, rec.tobytes())

    # Consecutive messages of these types from one sender are handed to the agent as one
    # batch: a burst of one-record FETCHes is served with one vectorised lookup and one
    # RULE answer, a burst of RULEs installed in one pass.
    _COALESCE = frozenset((M.T_FETCH, M.T_RULE, M.T_NACK))

    def _recv_coord(self, now: float, limit: int = 1000) -> None:
        held = []  # [sender, mtype, [recs, ...]]: validated, not yet handed to the agent
        self._zmq_dirty = True
        try:
            self._recv_coord_into(held, now, limit)
        finally:
            self._deliver(held, now)

    def _deliver(self, held, now: float) -> None:
        while held:
            sender, mtype, parts = held.pop(0)
            recs = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if len(parts) > 1:
                self.counters["coord_coalesced"] += len(parts) - 1
            try:
                self.agent.on_message(sender, mtype, recs, now)
            except Exception:  # noqa: BLE001 - a message that trips the agent is dropped, counted
                self.counters["coord_bad_message"] += 1
                self.agent.count("bad_message_handler_error")
                log.exception("nic%d: %s from nic%d could not be handled", self.nic_id,
                              M.TYPE_NAMES.get(mtype, mtype), sender)

    def _recv_coord_into(self, held, now: float, limit: int) -> None:
        sock, recv, counters = self.sock, zmqio.recv_multipart, self.counters
        for i in range(limit):
            # the poller woke us for the first; after it, ask before receiving (a receive
            # that finds nothing raises zmq.Again, which costs twice as much)
            if i and not zmqio.readable(sock):
                return
            try:
                parts = recv(sock, zmqio.NOBLOCK)
            except zmq.Again:
                return
            counters["coord_recv"] += 1
            if len(parts) != 3:
                counters["coord_bad_message"] += 1
                continue
            src, tframe, payload = parts
            if src == M.COORD:
                self._deliver(held, now)  # in order: PEERS etc. after what came before
                try:
                    self._from_coord(tframe, payload, now)
                except Exception:  # noqa: BLE001 - never fatal
                    self.counters["coord_bad_message"] += 1
                    log.exception("nic%d: message from the coordinator could not be handled", self.nic_id)
                continue
            sender = M.parse_identity(src)
            mt = M.type_of(tframe)
            # a RETURN names a block of our native space; a FETCH may be for a block we
            # lent (the asker missed the loan notice: the agent tells it again)
            owns = self._native_owns if mt == M.T_RETURN else self._fetch_owns if mt == M.T_FETCH else self._owns
            d = M.validate(sender, tframe, payload, receiver=self.nic_id,
                           owns=owns, internal=self._internal, n_nics=self.n_nics, counts=self._drops)
            if not d.ok or sender is None or d.mtype not in M.ROUTED_TYPES:
                self.counters["coord_bad_message"] += 1
                self.agent.count("bad_message")
                if d.ok:
                    self._drops[M.REASON["wrong_direction"]] += 1
                M.drain_drops(self._drops, self.agent.count)  # bad_message_<reason>
                continue
            last = held[-1] if held else None
            if (last is not None and last[0] == sender and last[1] == d.mtype and d.mtype in self._COALESCE
                    and sum(len(r) for r in last[2]) + len(d.recs) <= M.MAX_RECORDS):
                last[2].append(d.recs)
                continue
            self._deliver(held, now)
            held.append([sender, d.mtype, [d.recs]])

    def _make_predicates(self) -> None:
        """The validation predicates, compiled (``messages.Owns`` over the partition's
        geometry, which follows its loans; ``messages.Prefixes``): answered in C per record."""
        geo = self.partition.geometry
        self._owns, self._fetch_owns, self._native_owns = (M.Owns(geo, m) for m in ("now", "now-or-native", "native"))
        self._internal = M.Prefixes(self.config.internal)
        self._drops = M.drop_counts()  # validation drops by reason (M.validate counts them)

    def _from_coord(self, tframe, payload, now) -> None:
        d = M.validate(None, tframe, payload)
        if not d.ok:
            self.counters["coord_bad_message"] += 1
            return
        t = d.mtype
        if t == M.T_HELLO_ACK:
            inc = int(d.recs[0]["incarnation"])
            fresh = not self.registered or (self.coord_incarnation not in (None, inc))
            self.coord_incarnation = inc
            self.registered = True
            self.timers.set_due("hello", INF)
            if fresh:
                self.agent.resend_all(now)
                self.timers.due_now("loans")  # loans announced again at once (NICs may have missed them)
        elif t == M.T_HEARTBEAT:
            inc = int(d.recs[0]["incarnation"])
            if self.coord_incarnation is not None and inc and inc != self.coord_incarnation and inc != self.incarnation:
                log.info("nic%d: coordinator restarted: HELLO again", self.nic_id)
                self.registered = False
                self._hello(now)
        elif t == M.T_UNDELIVERABLE:
            u = M.unpack_undeliverable(d.recs)
            self.counters["undeliverable"] += 1
            if u is not None:
                orig, reason, target, _ = u
                self.counters["undeliverable_" + reason] += 1
                if reason == "not_registered" and now - self._last_hello >= 0.1:
                    self.registered = False
                    self._hello(now)
        elif t == M.T_PEERS:
            for r in d.recs:
                nic, state, inc = int(r["nic"]), int(r["state"]), int(r["incarnation"])
                prev = self.peers.get(nic)
                self.peers[nic] = (state, inc)
                if state == M.PEER_DOWN and nic != self.nic_id:
                    self.agent.fail_target(nic, now)
                if prev is not None and prev[1] != inc and nic != self.nic_id:
                    self.agent.peer_restarted(nic, now)
        elif t == M.T_QUERY:
            self._answer_query(d.recs)
        else:
            self.counters["coord_bad_message"] += 1

    def _answer_query(self, q: dict) -> None:
        self.counters["queries"] += 1
        op = q.get("op")
        try:
            if op == "rule":
                a = q.get("args", {})
                addr = M.ip_int(a["addr"]) if isinstance(a.get("addr"), str) else int(a["addr"])
                result = self._rule_info(addr, int(a["port"]), int(a["proto"]) if "proto" in a else None)
            elif op == "counters":
                result = self.counters_dict()
            elif op == "status":
                result = self.status()
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"id": q.get("id"), "ok": True, "result": result}
        except Exception as exc:  # noqa: BLE001 - a bad query gets an error reply, not a crash
            reply = {"id": q.get("id"), "ok": False, "error": str(exc)}
        self._send_coord(M.T_REPLY, M.pack_json(reply))

    def _rule_info(self, addr: int, port: int, proto=None) -> list:
        """What this NIC knows of an external endpoint: the mapping it owns (with the
        leases it granted on it) and the clones it holds (with their owner and lease).
        Both come from indexes by endpoint: a query costs what it finds, not the tables."""
        now = self.clock()
        out, held = [], []
        for p in ([proto] if proto is not None else [6, 17, 1]):
            leases, clones = self.agent.endpoint(p, addr, port)
            held.extend(clones)
            m = self.rules.lookup_external(p, addr, port)
            if m is not None:
                m = dict(m, role="owner", iaddr=M.ip_str(m["iaddr"]), eaddr=M.ip_str(m["eaddr"]))
                m["leases"] = [{"holder": f"nic{h}", "remote": f"{M.ip_str(sk[5])}:{sk[6]}",
                                "left_s": round(until - now, 1)}
                               for sk, hs in leases for h, until in hs.items()]
                out.append(m)
        for sk, owner, rule_id, dirs, expires in held:
            out.append({"role": "clone", "owner": f"nic{owner}", "rule_id": rule_id, "proto": sk[0],
                        "internal": f"{M.ip_str(sk[1])}:{sk[2]}", "remote": f"{M.ip_str(sk[5])}:{sk[6]}",
                        "dirs": dirs, "lease_left_s": round(expires - now, 1)})
        return out

    def _stats(self) -> None:
        self._send_coord(M.T_STATS, M.pack_json({"seq": self._hb_seq, "counters": self.counters_dict(),
                                                 "gauges": self.gauges()}))

    # -- the loop --------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Nothing in flight: no fetch or unacknowledged message in the agent, no
        message waiting to be sent (a harness waits for this between passes)."""
        return not (self.agent.busy or self._backlog or len(self.outbox))

    def run_once(self, timeout_ms: int = 100) -> int:
        """One turn: wait for packets or messages (at most timeout_ms), handle them, run
        timers.  Returns frames processed.

        What a turn does is what the poll and the timers say: a port is read when its
        fd is readable (and again while it gives frames), the coordinator's socket when
        it is, each periodic job when due (``nic/_timers.pyx``); the jobs that follow
        events are made due by them (the agent's pushes and revocations by the turn's
        packets and messages, SIGHUP's reload by the signal, the journal's callbacks by
        its fsyncs).  A turn with nothing to do makes one poll(2), reads the clocks and
        asks the owners of the agent's timers when they are due: no job runs, no port
        or socket is asked, nothing is built but the poll's empty answer."""
        queued = self._backlog or self.outbox
        if queued:
            timeout_ms = min(timeout_ms, 5)
        if self._tx_waiting:  # a device refused frames: ask it again soon
            timeout_ms = min(timeout_ms, 1)
        timers = self.timers
        if timeout_ms > 0:  # no longer than until the next timer job is due
            wait = timers.next_due() - self.clock()
            if wait < timeout_ms / 1000.0:
                timeout_ms = math.ceil(wait * 1000.0) if wait > 0 else 0
        coord = rx_in = rx_out = False
        sock = self.sock
        if sock is not None and (self._zmq_dirty or timeout_ms >= _LONG_WAIT_MS):
            self._zmq_dirty = False  # (ZMQ_EVENTS takes in the socket's pending changes)
            coord = zmqio.readable(sock)
            if coord:
                timeout_ms = 0
        ready = self.poller.poll(timeout_ms)  # [(fd, events)]: what is readable
        t0 = time.perf_counter()
        now = self.clock()
        if ready:
            in_fd, out_fd = self._rx_fds
            for fd, _ in ready:
                if fd == self._zfd:  # something changed on the socket: ask what
                    if not coord:
                        coord = zmqio.readable(sock)
                else:  # (one port on both sides: both read)
                    rx_in = rx_in or fd == in_fd
                    rx_out = rx_out or fd == out_fd
        if coord:
            self._recv_coord(now)
            if self._backlog or self.outbox:
                self._flush()  # what the messages made leaves before this turn's packets (RULE / NACK
                # answers to FETCHes left already, as soon as they were built: _queue_msg)
        t1 = time.perf_counter() if coord else t0
        # batches from both ports in turn, up to TURN_BATCHES batches' worth of frames
        # however they split between the ports (one busy direction gets the whole turn;
        # the turn's fixed costs -- poll, timers -- spread over as many frames as when
        # both are busy); a port is read while it gives frames (new ones make its fd
        # readable for the next turn's poll); the poller keeps it fair
        n = 0
        rx = rx_in or rx_out
        if rx:
            inside, outside = self.inside, self.outside
            stop = (TURN_BATCHES - 2) * self.batch_size  # room left for one more round of two
            for _ in range(TURN_BATCHES):
                a = self._process(inside, OUT, outside) if rx_in else 0
                b = self._process(outside, IN, inside) if rx_out else 0
                rx_in, rx_out = a > 0, b > 0
                n += a + b
                if not (rx_in or rx_out) or n > stop:
                    break
        # frames a device refused (they wait in a transmit ring) are sent again every
        # turn, whether or not new ones arrived
        self._tx_waiting = self.inside.flush() + self.outside.flush()
        t2 = time.perf_counter() if rx else t1
        if (queued or coord or rx) and (self._backlog or self.outbox):
            self._flush()  # answers and fetches leave before any housekeeping
        if n or coord:  # what this turn's packets and messages built or ended: pushed, revoked
            timers.due_now("agent_created")
        self._quiet_ports = not n  # (_waiting: packets that come after a quiet turn end its jobs too)
        if timers.run(now, self._waiting) and (self._backlog or self.outbox):
            self._flush()
        t3 = time.perf_counter()
        if t3 - t0 >= self.slow_turn_s:  # everything waiting (fetches too) waited this long
            self._slow_turn(t1 - t0, t2 - t1, t3 - t2, n)
        return n

    def _waiting(self) -> bool:
        """Between two periodic jobs (``Scheduler.run``): does a coordinator message wait
        -- or a packet, after a turn that took none?  Then the jobs still due wait a
        turn and the loop goes back to its poll: a FETCH that reaches the owner while it
        runs its expiry, journal and stats jobs is answered after the job in progress,
        not after all of them (under a flood of packets the turn budget alone shares the
        turn, as before).  One poll(2) that does not wait; when the socket was used since
        ZMQ_EVENTS was last asked (its ZMQ_FD may not tell of a message that came
        meanwhile), ZMQ_EVENTS too."""
        ready = self.poller.poll(0)
        if ready and (self._quiet_ports or any(fd == self._zfd for fd, _ in ready)):
            return True
        if self._zmq_dirty and self.sock is not None:
            if zmqio.readable(self.sock):
                return True  # (still dirty: the next turn asks before its poll)
            self._zmq_dirty = False
        return False

    @property
    def last_jobs(self) -> list:
        """[(job, seconds)] the last turn ran, in the order they ran."""
        return self.timers.last_ran()

    def _slow_turn(self, coord_s: float, packets_s: float, rest_s: float, frames: int) -> None:
        """Count a loop turn that took longer than slow_turn_s, and say (rate-limited:
        the 1st, 2nd, 4th, 8th, ...) where its time went."""
        self.counters["slow_turns"] += 1
        c = self.counters["slow_turns"]
        if c & (c - 1) == 0:
            top = sorted(self.last_jobs, key=lambda x: -x[1])[:3]
            log.warning("nic%d: a loop turn took %.1f ms (coordinator messages %.1f, %d frames %.1f, "
                        "flush+timers %.1f: %s); %d slow turns so far", self.nic_id,
                        (coord_s + packets_s + rest_s) * 1e3, coord_s * 1e3, frames, packets_s * 1e3,
                        rest_s * 1e3, ", ".join(f"{n} {d * 1e3:.1f}" for n, d in top) or "no job", c)

    # -- timers: every periodic job, in one scheduler (nic/timers.py) ------------------------
    def _make_timers(self, config) -> Scheduler:
        """The loop's periodic jobs: what runs when, each a bounded slice per turn."""
        t = Scheduler(turn_budget_s=_turn_budget_s(config.loop))
        for name, step, due in self.agent.steps():  # retries, retransmissions, lease ends, activity
            if due is None:  # the pushes / revocations of what a turn built or ended: made due by
                # the turn's packets and messages (run_once) and by the jobs that build or end
                # sessions (sweep, recovery); every sweep interval besides, whatever else did
                t.add(name, step, self.sweep_interval, budgeted=False)
            else:
                t.add(name, step, 0.0, due=due)
        # what the turn itself brought runs that turn, whatever the budget
        t.add("recovery", self._job_recovery, 0.0, budgeted=False)  # while the crash recovery window is open
        t.enable("recovery", False)
        t.add("reload", self._job_reload, INF, first=INF, budgeted=False)  # due when SIGHUP says so
        t.add("gc_freeze", self._job_gc_freeze, GC_FREEZE_INTERVAL)
        t.add("sweep", self._job_sweep, self.sweep_interval)
        t.add("frag_expire", self._job_frag_expire, self.sweep_interval)
        if self.journal is not None:
            t.add("journal_poll", self._job_journal_poll, 0.0, first=INF, budgeted=False)  # while fsyncs run
            t.add("journal", self._job_journal, self.journal_interval)
            t.add("journal_sync", self._job_journal_sync, self.journal_sync_interval)
        if self.sock is not None:
            t.add("spill", self._job_spill, 0.2)
            t.add("loans", self._job_loans, self.loan_rebroadcast_interval)
            t.add("hello", self._job_hello, 0.5)
            t.add("heartbeat", self._job_heartbeat, config.coordinator.heartbeat_interval)
            t.add("stats", self._job_stats, 1.0)
        return t

    @property
    def _journal_due(self) -> float:
        return self.timers.job("journal").next_due

    @_journal_due.setter
    def _journal_due(self, t: float) -> None:
        self.timers.set_due("journal", t)

    def _job_recovery(self, now: float) -> None:
        if self.rules.recovering:
            self._recovery_step(now)
            self.timers.due_now("agent_created")  # (what its replays built)

    def _job_reload(self, now: float):
        """SIGHUP's reload (the handler sets the flag and makes this job due)."""
        if self._reload_requested:
            self._reload_requested = False
            self.reload()
        return -INF if self._reload_requested else None  # another SIGHUP meanwhile: again

    def _job_gc_freeze(self, now: float) -> None:
        gc.freeze()

    def _job_sweep(self, now: float):
        """Expiry: a bounded step; while fetches are in flight (a burst of new connections)
        it waits, up to sweep_defer_max, so that it never sits between a FETCH and its
        answer."""
        if self.agent.pending:
            if self._sweep_held is None:
                self._sweep_held = now
            if now < self._sweep_held + self.sweep_defer_max:
                return min(self._sweep_held + self.sweep_defer_max, now + self.sweep_interval)
        self._sweep_held = None
        self.rules.sweep(self.ticks())
        self.timers.due_now("agent_created")  # (the sessions it ended: revoked)
        return None

    def _job_frag_expire(self, now: float) -> None:
        self.frag.expire(self.ticks())  # datagrams whose first fragment never came (bounded)

    # the journal, off the packet path: blocks journaled ahead of need, the "assign"
    # records written since fsync'ed; never while a fetch waits for its answer (fsyncs run
    # on the journal's thread; poll() takes in the reserved blocks whose fsync completed)
    def _job_journal_poll(self, now: float):
        """The callbacks of completed fsyncs; due every turn while fsyncs with callbacks
        are in flight (the journal job starts them), idle otherwise."""
        self.journal.poll()
        return now if self.journal.waiting else INF

    def _job_journal(self, now: float):
        if self.agent.pending:
            return now + self.journal_interval
        if self.journal.due():  # the log passed its bound: compact it (written on the journal's thread)
            try:
                self.journal.checkpoint(self.rules.journal_state())
            except JournalError:
                pass  # counted and logged by the journal; the old files still name every block
        self.rules.reserve_blocks()
        if self.journal.waiting:
            self.timers.due_now("journal_poll")
        return None

    def _job_journal_sync(self, now: float):
        if self.agent.pending:
            return now + self.journal_interval
        self.journal.sync()
        return None

    def _job_spill(self, now: float) -> None:
        exhausted = self.rules.counters_dict().get("ports_exhausted", 0)
        util = self.rules.utilisation()
        if exhausted > self._exhausted_seen or util >= 0.95:
            self.agent.want_block(now)
        elif self.agent.borrowed and util < 0.5:
            self.agent.return_idle(now)
        self._exhausted_seen = exhausted

    def _job_loans(self, now: float) -> None:
        if self.registered:
            self.agent.rebroadcast_loans(now)

    def _job_hello(self, now: float):
        if self.sock is None or self.registered:
            return INF  # HELLO_ACK came; a coordinator restart or UNDELIVERABLE asks again
        self._hello(now)
        return now + 0.5

    def _job_heartbeat(self, now: float) -> None:
        if self.sock is not None:
            self._heartbeat(now)

    def _job_stats(self, now: float) -> None:
        if self.sock is not None:
            self._stats()

    def run(self, duration: float | None = None) -> None:
        """Loop until stop() (or a signal handler calls it), or for `duration` seconds."""
        end = None if duration is None else self.clock() + duration
        self._stop = False
        while not self._stop:
            self.run_once()
            if end is not None and self.clock() >= end:
                break

    def stop(self) -> None:
        self._stop = True

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT: stop the loop (then ``shutdown`` writes the snapshot).
        SIGHUP: re-read the config file at the next loop turn (``reload``)."""
        def h(signum, frame):
            self.stop()

        def hup(signum, frame):
            self._reload_requested = True
            self.timers.due_now("reload")

        signal.signal(signal.SIGTERM, h)
        signal.signal(signal.SIGINT, h)
        signal.signal(signal.SIGHUP, hup)

    def reload(self, path: str | None = None):
        """Re-read the config (SIGHUP) and apply what may change while running:
        ``RuleBuilder.LIVE_SETTINGS`` (timeouts, per-host cap, sweep limits, translation
        log), the fast path's router settings (``ROUTER_LIVE_SETTINGS``: MSS clamp,
        ICMP generation, per-link MTUs; from the next batch on) and the loop's slices
        of periodic work and turn budget (``loop:``; from the next turn on).  A file that does not
        load, or that changes anything else (addresses, partition, NICs, table sizes,
        mapping, coordinator, ...), is refused with a logged reason naming the keys and
        the running config stays.  Returns (applied, reason)."""
        from .. import config as cfgmod

        path = path or self.config.path
        try:
            new = cfgmod.load(path)
        except (OSError, cfgmod.ConfigError) as exc:
            return self._refuse_reload(f"{exc}")
        changed = _changed_settings(self.config, new)
        frozen = [c for c in changed if not _live_setting(c)]
        if frozen:
            return self._refuse_reload(f"{path}: {', '.join(frozen)} cannot change while running "
                                       "(restart the NIC workers)")
        self.rules.apply_live(new)
        if new.loop != self.config.loop:  # the slices and the turn budget, from the next turn
            self.agent.set_slices(**loop_slices(new.loop))
            self.timers.turn_budget_s = _turn_budget_s(new.loop)
        self.config = new
        self.set_links(*self._links)  # the router's settings as the new config says
        self.counters["reloads"] += 1
        log.info("nic%d: reloaded %s (%s)", self.nic_id, path, ", ".join(changed) or "nothing changed")
        return True, ", ".join(changed)

    def _refuse_reload(self, reason: str):
        self.counters["reloads_refused"] += 1
        log.error("nic%d: reload refused, running config kept: %s", self.nic_id, reason)
        return False, reason

    def shutdown(self, snapshot: bool = True) -> dict:
        """Graceful stop: write the snapshot (tables + builder + agent), close the socket."""
        info = {}
        if snapshot:
            now = self.clock()
            state = {"rules": self.rules.snapshot(), "agent": self.agent.snapshot(now),
                     "nic": self.nic_id, "written": time.time()}
            self.snapshot.save(self.out_table.slots, self.in_table.slots, state)
            info = {"snapshot": self.snapshot.path, "rules": len(self.out_table)}
            log.info("nic%d: snapshot written: %s", self.nic_id, info)
        self.close()
        return info

    def close(self) -> None:
        if self.sock is not None:
            try:
                self._flush()
            except zmq.ZMQError:
                pass
            self.poller.unregister(self._zfd)
            self._zfd = -1
            self.sock.close(0)
            self.sock = None
        if self.journal is not None:
            self.journal.close()  # waits for an fsync in flight

    # -- introspection -----------------------------------------------------------------------------
    def counters_dict(self) -> dict:
        out = {}
        tc = self.translator.counters_dict()
        for dname, vals in tc.items():
            for k, v in vals.items():
                if v:
                    out[f"fastpath_{dname}_{k}"] = int(v)
        for dname, vals in self.translator.router_events_dict().items():
            for k, v in vals.items():
                if v:
                    out[f"router_{dname}_{k}"] = int(v)
        for k, v in self.rules.counters_dict().items():
            out[f"rules_{k}"] = int(v)
        for k, v in self.frag.counters_dict().items():
            if v:
                out[f"fastpath_{k}"] = int(v)
        for k, v in self.agent.counters.items():
            out[f"agent_{k}"] = int(v)
        for p in (self.inside, self.outside):
            try:
                stats = p.stats()
            except Exception as exc:  # noqa: BLE001 - a backend's stats must not break metrics
                log.debug("nic%d: %s stats unavailable: %s", self.nic_id, p.name, exc)
                self.counters["port_stats_errors"] += 1
                continue
            for k, v in stats.items():
                n = _numeric(v)
                if n is not None:  # a port may report text (mode, driver): not a counter
                    out[f"port_{p.name}_{k}"] = n
        for k, v in self.counters.items():
            out[f"loop_{k}"] = int(v)
        if self.journal is not None:
            for k, v in self.journal.counters().items():
                out[f"journal_{k}"] = v
        return out

    def gauges(self) -> dict:
        g = {"out_entries": len(self.out_table), "in_entries": len(self.in_table),
             "backlog": len(self._backlog), "utilisation": float(self.rules.utilisation()),
             "frag_datagrams": len(self.frag), "frag_chunks_held": self.frag.held}
        g.update({f"agent_{k}": v for k, v in self.agent.state().items()})
        if self.journal is not None:
            g.update({f"journal_{k}": v for k, v in self.journal.gauges().items()})
        return g

    def status(self) -> dict:
        import hypernat

        from ..fastpath import IMPL

        return {"nic": self.nic_id, "registered": self.registered, "gauges": self.gauges(),
                "recovery": self.recovery, "timers": self.timers.stats(), "fast_path": IMPL, "compiled": list(hypernat.compiled_modules())}

    def __repr__(self) -> str:
        return f"NicWorker(nic{self.nic_id}, out={len(self.out_table)}, in={len(self.in_table)})"


# What a reload applies to the fast path's router (Translator.set_router) while running
# (a reload takes them from the next batch on; the ICMP token bucket keeps its tokens unless its rate changed):
# the config's keys, and the per-link MTU keys of any NIC entry.
ROUTER_LIVE_SETTINGS = ("tcp_mss_clamp", "icmp")
LOOP_LIVE_SETTINGS = ("loop",)  # the slices of periodic work and the turn budget


def _turn_budget_s(loop):
    """The scheduler's turn budget (seconds; None: no bound) from ``loop.turn_budget_us``."""
    return loop.turn_budget_us / 1e6 if loop.turn_budget_us > 0 else None
ROUTER_LIVE_NIC_FIELDS = ("inside_mtu", "outside_mtu")


def _live_setting(name: str) -> bool:
    """May the dotted config name change on a reload (worker.reload)?"""
    if any(name == k or name.startswith(k + ".") for k in RuleBuilder.LIVE_SETTINGS + ROUTER_LIVE_SETTINGS + LOOP_LIVE_SETTINGS):
        return True
    head, _, field = name.partition("].")
    return head.startswith("nics[") and field in ROUTER_LIVE_NIC_FIELDS


def _changed_settings(old, new, prefix: str = "") -> list:
    """Dotted names of the config fields that differ (``path`` aside); entries of a
    list of records of the same length are compared one by one (``nics[1].outside_mtu``)."""
    out = []
    for f in dataclasses.fields(old):
        if not prefix and f.name == "path":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        name = prefix + f.name
        if _record(a) and _record(b):
            out += _changed_settings(a, b, name + ".")
        elif (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a != b
              and all(_record(x) and type(x) is type(y) for x, y in zip(a, b))):
            for k, (x, y) in enumerate(zip(a, b)):
                out += _changed_settings(x, y, f"{name}[{k}].")
        elif a != b:
            out.append(name)
    return out


def _record(x) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def spin(workers, cond, timeout: float = 5.0, poll_ms: int = 5) -> bool:
    """Drive in-process workers round-robin (one ``run_once`` each per round) until
    ``cond()`` is true or `timeout` seconds pass; returns whether it came true.  For
    tests and benchmarks that run several NICs in one thread."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for w in workers:
            w.run_once(poll_ms)
        if cond():
            return True
    return False

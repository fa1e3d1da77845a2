"""RuleAgent: how a rule built on one NIC reaches the NIC that sees the other direction.

The switch hashes each direction of a connection independently, so the reply to a
connection that NIC i translated usually arrives at another NIC j.  Every rule has one
*owner* (the NIC whose partition holds its external endpoint); any other NIC that must
translate the connection holds a *clone* under a *lease*.  The agent is the part of a
NIC that moves rules between NICs, through the coordinator:

      NIC j (holder)                  coordinator                 NIC i (owner)
   miss_in (R→E) ─┐
   queue frame    │  FETCH(key) ──────► route ──────────────────► rules.serve_fetches
                  │                                                rules.hold_many(E), lease[j]
   install clone ◄┴─ RULE(session, L) ◄── route ◄──────────────── RULE
   replay queue through the fast path, in arrival order
   …every activity_interval:
   ACTIVITY(clones hit, tcp flags) ──► route ──────────────────► rules.merge_activity
   lease renewed  ◄──────────────────── LEASE(L), ACTIVITY_ACK ◄─
                                                                   session expires:
   drop clone, REVOKE_ACK ──────────────► route ───────────────► rules.release_many(E)
                       ◄───────────────── REVOKE ◄──────────── (retried until acked or
                                                                 the lease ran out)

*Passive install* (the default, the paper's) fetches on a miss: an incoming miss, an
ICMP error whose embedded flow misses, or — with endpoint-independent mapping — a first
outgoing packet of a host whose mappings another NIC owns.  Frames wait in a queue that
is bounded per flow and in total; a NACK or a timeout drops them and counts why.  A NACK
for an endpoint nobody maps is remembered briefly (negative cache; a *filtered* NACK is
not: the owner's filter opens with the inside host's next outbound packet, on whatever
NIC it leaves, so a cached refusal would outlive it and break hole punching) and
fetches are rate-limited per remote source, so a port scan of the external space
cannot become a FETCH storm.

The per-source limit charges *misses that turn out to have no rule*, not fetches: a
token bucket per remote source address (rate and burst ``fetch_rate_per_source``); a
fetch takes a token on the way out and gets it back when the rule arrives::

    incoming miss from R ── bucket[R] empty? ── yes ──► drop (fetch_rate_limited)
                                 │ no: take 1 (provisional)
                                 ▼
                               FETCH ──► RULE  : token refunded  (a legitimate reply)
                                     ──► NACK  : token kept      (a probe: scan)
                                     ──► timeout / owner unavailable: refunded

So a busy remote (a VPC's clients all talking to one service: every new connection's
first reply fetches) is never throttled however many connections it has, unless more
than ``burst`` of its fetches are in flight at the same instant; a scanner spends a
token per probe that misses, and its burst of probes is cut at ``burst`` in flight
even before the first NACK returns.

*Active install* (option): in the loop turn that built them, the owner predicts the
return NIC of every new session with the switch's hash (``predict_nics``, compiled, one
call for the turn: sha1 as the paper's testbed, crc32, nftables' jhash, RSS toeplitz)
and PUSHes them there, one PUSH message per NIC under one seq (acknowledged, retried
and installed as a whole; a repeat is idempotent).  A push that loses the race with the
reply, or a wrong prediction, just falls back to passive install.

*Leases* make Invariant 3 hold: a holder drops a clone whose lease ran out (with a
safety margin on its own clock, on an exact timer), the owner renews leases on
ACTIVITY, and an external endpoint is reused only after every lease granted on it ran
out (owner's view: + ``LEASE_GRACE_MS``) or was revoked with a REVOKE_ACK — the agent
holds the endpoint in the RuleBuilder (``hold_many`` / ``release_many``, endpoint keys).  Everything that
matters (FETCH, PUSH, REVOKE, ACTIVITY, BORROW, RETURN) is retried until answered and
handled idempotently (a duplicate RULE refreshes a clone, a duplicate FETCH is answered
again, a REVOKE of an unknown clone is acknowledged), so a coordinator restart loses
nothing; ``resend_all`` sends everything pending at once after a re-HELLO.

*Every answer is checked against its question* before it is acted on: a RULE or NACK
completes a fetch only if it comes from the NIC the fetch was sent to, about the key
that was asked, under the fetch's seq (retries reuse the seq, so an invalid answer
leaves the fetch in place for the real one); an acknowledgement completes only a
message of its own type sent to its sender; a LEASE or REVOKE acts only on a clone of
the sender's; an ACTIVITY is merged and renewed only from a NIC holding a lease on the
session; a loan answer counts only from the NIC asked.  Anything else changes nothing
and is counted under its reason (``DROP_REASONS``).  A daemon's seqs start at a random
number, so the answers to a previous incarnation's messages find nothing in flight.

*Spill-over*: a NIC whose E_i is exhausted BORROWs a port block from a neighbour; the
lender answers with a BORROW_ACK that it also sends to every other NIC as a loan notice,
so all of them route fetches for that block to the borrower; an idle borrowed block is
RETURNed (and the lender's BORROW_ACK to itself as borrower undoes the notice).

The agent never touches packets one by one in the fast path's place: it keeps frames
that wait for a rule, installs clones in the flow tables (through the RuleBuilder), and
hands frames back to the worker (``replay``) which runs them through
``Translator.translate`` like any batch.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from .. import fastpath as _fastpath
from .. import layout
from .. import messages as M
from .. import switchhash as _sh
from ..deadlines import DeadlineQueue
from ..io.base import Frames
from ..nat.records import SESSION_KEY_FIELDS, WIRE_KEY_FIELDS, WIRE_OF_SESSION
from ..rules import DIR_BIT_IN, DIR_BIT_OUT, SESSION_DTYPE, in_key, out_key
from ..verdicts import SLOW_PATH_REASON_NAMES

try:  # the clone table in C (_clones.pyx), with the fast path
    if _fastpath.IMPL != "cython":
        raise ImportError("the fast path runs on its reference")
    from .._clones import CloneTable
    from .._switchhash import predict_nics
    from ._leases import LeaseTable, activity_sessions, lease_records
    from ._pending import FetchQueue, PendingTable
except ImportError:  # their plain-Python reference
    from ..clones_py import CloneTable
    from ..switchhash import predict_nics
    from .leases_py import LeaseTable, activity_sessions, lease_records
    from .pending_py import FetchQueue, PendingTable

log = logging.getLogger("hypernat.agent")
_INF = float("inf")
_EPS = 1e-6  # seconds: a timer popped at its due time is due (float noise aside)


def _seq_run(seq0: int, n: int):
    """The `n` seqs ``_next_seq`` hands out from `seq0` (0 skipped at the wrap)."""
    if seq0 + n <= 0x100000000:
        return range(seq0, seq0 + n)
    return [(seq0 - 1 + k) % 0xFFFFFFFF + 1 for k in range(n)]

# Directions of a fetch (same numbers as verdicts.OUT / verdicts.IN).
OUT = 0
IN = 1

# The switch's hash (which NIC a packet lands on) lives in hypernat.switchhash, shared
# with the emulated switch and the testbed's nftables steering; re-exported here.
switch_hash = _sh.switch_hash
predict_nic = _sh.predict_nic


# ---------------------------------------------------------------------------------------
# Record conversions: the fast path's keys, the builder's sessions, the wire records.
# ---------------------------------------------------------------------------------------
def skey(r) -> tuple:
    """A session's identity: (proto, I, Ip, E, Ep, R, Rp), from any record that has
    the fields under the builder's names (SESSION_DTYPE) or the wire's (int_/ext_/rem_)."""
    names = r.dtype.names
    if "iaddr" in names:
        return (int(r["proto"]), int(r["iaddr"]), int(r["iport"]), int(r["eaddr"]), int(r["eport"]),
                int(r["raddr"]), int(r["rport"]))
    return (int(r["proto"]), int(r["int_addr"]), int(r["int_port"]), int(r["ext_addr"]), int(r["ext_port"]),
            int(r["rem_addr"]), int(r["rem_port"]))


def session_rec(sk: tuple, owner: int = 0, rule_id: int = 0, dirs: int = 0, last_seen: int = 0,
                tcp: int = 0) -> np.ndarray:
    """One SESSION_DTYPE record from a session identity."""
    s = np.zeros(1, SESSION_DTYPE)
    p, i, ip, e, ep, r, rp = sk
    s["proto"], s["iaddr"], s["iport"], s["eaddr"], s["eport"], s["raddr"], s["rport"] = p, i, ip, e, ep, r, rp
    s["owner"], s["rule_id"], s["dirs"], s["last_seen"] = owner, rule_id, dirs, last_seen
    s["tcp_out"] = s["tcp_in"] = tcp
    return s


def _session_array(sks) -> np.ndarray:
    """Session identities (proto, I, Ip, E, Ep, R, Rp) as SESSION_DTYPE records."""
    out = np.zeros(len(sks), SESSION_DTYPE)
    if len(out):
        for f, col in zip(SESSION_KEY_FIELDS, zip(*sks)):
            out[f] = col
    return out


def _wire_endpoints(dst, i, sk) -> None:
    p, ia, ip, ea, ep, ra, rp = sk
    dst["proto"][i] = p
    dst["int_addr"][i], dst["int_port"][i] = ia, ip
    dst["ext_addr"][i], dst["ext_port"][i] = ea, ep
    dst["rem_addr"][i], dst["rem_port"][i] = ra, rp


def fetch_key_tuple(fetch_dir: int, key) -> tuple:
    """(proto, saddr, sport, daddr, dport) of a layout.KEY_DTYPE record."""
    return (int(key["proto"]), int(key["saddr"]), int(key["sport"]), int(key["daddr"]), int(key["dport"]))


def fetch_rows_of(fetch_dirs, keys, owners) -> np.ndarray:
    """layout.FETCH_ROW_DTYPE rows for misses given as columns: `keys` layout.KEY_DTYPE
    records (oriented like each one's fetch direction), `fetch_dirs` and `owners` one
    each (or one for all); ``frame`` numbers them 0, 1, ..."""
    keys = np.asarray(keys, layout.KEY_DTYPE).reshape(-1)
    rows = np.zeros(len(keys), layout.FETCH_ROW_DTYPE)
    for f in ("saddr", "daddr", "sport", "dport", "proto", "kind", "tcp_flags"):
        rows[f] = keys[f]
    rows["fetch_dir"] = fetch_dirs
    rows["owner"] = owners
    rows["frame"] = np.arange(len(keys))
    return rows


def session_key(sk: tuple, direction: int) -> tuple:
    """The flow-table key of a session in `direction`'s table, from ``rules.out_key`` /
    ``rules.in_key`` (the one place that knows the ICMP twist: an ICMP query session
    carries rport 0 and keys on the identifier in both port fields, the internal one
    going out ``(1, I, id, R, id)``, the translated one coming in ``(1, R, id', E, id')``)."""
    p, ia, ip, ea, ep, ra, rp = sk
    return out_key(p, ia, ip, ra, rp) if direction == OUT else in_key(p, ra, rp, ea, ep)


DIR_BIT = {OUT: DIR_BIT_OUT, IN: DIR_BIT_IN}

# Answered fetches by latency (counters fetch_answered_le_*: cumulative buckets are left to
# the reader; these are disjoint) — where a passive install spends its time on a live box.
_LAT_BOUNDS = ((0.001, "fetch_answered_le_1ms"), (0.01, "fetch_answered_le_10ms"),
               (0.05, "fetch_answered_le_50ms"), (0.2, "fetch_answered_le_200ms"))


def _latency_bucket(seconds: float) -> str:
    for bound, name in _LAT_BOUNDS:
        if seconds <= bound:
            return name
    return "fetch_answered_gt_200ms"


# _latency_bucket for many: the first bound >= seconds (bisect_left), or the last name
_LAT_LIMITS = tuple(b for b, _ in _LAT_BOUNDS)
_LAT_NAMES = tuple(n for _, n in _LAT_BOUNDS) + ("fetch_answered_gt_200ms",)

# builder refusal (slow-path reason) -> NACK reason
_NACK_OF = {
    "ports_exhausted": "exhausted",
    "host_port_cap": "exhausted",
    "filtered": "filtered",
    "unsolicited_syn": "filtered",
    "not_in_pool": "not_owner",
    "not_internal": "bad_request",
    "not_owner": "not_owner",
    "no_mapping": "no_rule",
    "icmp_error_no_session": "no_rule",
    "recovering": "unavailable",  # crash recovery window at the owner: try again shortly
    "journal_unavailable": "unavailable",  # the owner's block journal cannot be written now
    "table_full": "unavailable",  # the owner's flow tables have no room now: not remembered as "no rule"
}


def _nack_reason(status: int) -> int:
    """NACK reason code of a builder refusal (a SLOW_PATH_REASON_NAMES index)."""
    name = SLOW_PATH_REASON_NAMES[status] if 0 <= status < len(SLOW_PATH_REASON_NAMES) else ""
    return M.NACK[_NACK_OF.get(name, "no_rule")]


# Control records the agent drops, by reason: declared once here (every one exported,
# zero included, by the metrics endpoint; the tests name them).  A record is acted on
# only if it answers what this NIC asked, of the NIC it asked, about what it asked; a
# wrong NIC, a key or block nobody asked about, a seq no longer in flight (a stale
# incarnation's, a repeat) changes nothing here and lands in one of these.
DROP_REASONS = (
    ("bad_message", "malformed or forged record: a rule whose owner is not its sender, a loan not by the "
                    "block's native owner, an unknown message type"),
    ("rule_duplicate", "RULE answering no fetch in flight (a retry answered twice, or timed out meanwhile)"),
    ("rule_misdirected", "RULE for a seq in flight, from a NIC the fetch was not sent to"),
    ("rule_mismatched", "RULE for a seq in flight, about another key than the one asked"),
    ("nack_stale", "NACK answering no fetch in flight"),
    ("nack_misdirected", "NACK for a seq in flight, from a NIC the fetch was not sent to"),
    ("nack_mismatched", "NACK for a seq in flight, about another key than the one asked"),
    ("ack_stale", "PUSH/REVOKE/RETURN acknowledgement of nothing in flight (a repeat)"),
    ("ack_misdirected", "acknowledgement from a NIC the message was not sent to"),
    ("ack_mismatched", "acknowledgement of another message type than the one in flight under its seq"),
    ("lease_unknown", "LEASE for a clone not held here"),
    ("lease_misdirected", "LEASE from a NIC that is not the clone's owner"),
    ("revoke_unknown", "REVOKE of a clone not held here (acknowledged: a repeat is idempotent)"),
    ("revoke_misdirected", "REVOKE from a NIC that is not the clone's owner (acknowledged, clone kept)"),
    ("activity_unknown", "ACTIVITY from a NIC holding no lease on the session (acknowledged, not merged)"),
    ("borrow_misdirected", "BORROW naming another NIC as lender"),
    ("borrow_ack_misdirected", "BORROW_ACK to this NIC as borrower from a NIC it did not ask, or a refusal "
                               "meant for another borrower"),
    ("borrow_ack_stale", "refusal of a BORROW no longer in flight"),
    ("return_refused", "RETURN of a block this NIC did not lend to the sender"),
)
# ... and the messages the NIC worker drops before they reach the agent: by validation
# (messages.REASONS; each also counted as bad_message), or because handling raised
DROP_REASONS += M.DROP_COUNTERS + (
    ("bad_message_handler_error", "a message whose handling raised: dropped, logged"),)
DROP_REASON_NAMES = tuple(n for n, _ in DROP_REASONS)

# counter names per message type: rx_fetch, rx_rule, ... (no string building per message)
_RX_COUNTER = {code: "rx_" + name.lower() for code, name in M.TYPE_NAMES.items()}
_TX_COUNTER = {code: "tx_" + name.lower() for code, name in M.TYPE_NAMES.items()}


# ---------------------------------------------------------------------------------------
@dataclass
class AgentParams:
    """Tunables (the config's ``agent`` section; defaults suit one host over ipc://)."""

    lease_s: float = 30.0  # lease granted with a clone
    lease_margin_s: float = 0.5  # a holder drops a clone this much before its lease ends
    activity_interval_s: float = 1.0  # batched ACTIVITY reports at most this often
    fetch_timeout_s: float = 1.0  # a fetch unanswered this long drops its queue
    retry_s: float = 0.05  # resend an unacknowledged message after this long (doubling)
    retry_max_s: float = 0.5
    queue_per_flow: int = 16
    queue_total: int = 8192
    negative_ttl_s: float = 2.0  # no-rule NACKs remembered this long (filtered ones: not)
    negative_max: int = 65536
    fetch_rate: float = 100.0  # NACKed fetches per second per remote source (token bucket:
    fetch_burst: float = 200.0  # a fetch takes a token, its RULE gives it back) ... and burst
    active_install: bool = False
    switch_hash: str = "sha1"
    switch_seed: int = 0
    switch_fields: str = "5-tuple"
    switch_rss: object = None  # toeplitz: (key, indirection table, {queue: NIC id}) of the outside port
    # slices of periodic work per loop turn (config ``loop:``): nothing periodic costs in
    # proportion to a table's size in one turn
    retransmit_slice: int = 32  # unacknowledged messages and unanswered fetches resent or given up per turn at most
    lease_end_slice: int = 16  # lease ends handled per turn at most (owner's leases; holder's clones)
    activity_slots: int = 4096  # table slots (each table) collected for activity per turn at most
    activity_entries: int = 32  # ... and entries found reported per turn at most


_SLICES = ("retransmit_slice", "lease_end_slice", "activity_slots", "activity_entries")


class _NegativeView:
    """The negative cache of a PendingTable as a mapping (introspection, tests):
    (fetch_dir, key) -> until, oldest first."""

    __slots__ = ("_t",)

    def __init__(self, table):
        self._t = table

    def __len__(self):
        return self._t.neg_len()

    def __bool__(self):
        return self._t.neg_len() > 0

    def __contains__(self, pk):
        return self._t.neg_get(pk) is not None

    def get(self, pk, default=None):
        return self._t.neg_get(pk, default)

    def __getitem__(self, pk):
        got = self._t.neg_get(pk)
        if got is None:
            raise KeyError(pk)
        return got

    def __setitem__(self, pk, until):
        self._t.neg_set(pk, until)

    def pop(self, pk, default=None):
        got = self._t.neg_get(pk, default)
        self._t.neg_discard(pk)
        return got

    def items(self):
        return self._t.neg_items()

    def keys(self):
        return [k for k, _ in self._t.neg_items()]

    def __iter__(self):
        return iter(self.keys())


@dataclass
class _Unacked:
    target: int
    mtype: int
    rec: np.ndarray  # the message's records (one seq: PUSH, REVOKE; a restart report: its first)
    sent: float
    retry: float
    deadline: float


class RuleAgent:
    """The cloning state machine of one NIC: its holder side and its owner side.

    nic_id, n_nics   this NIC and how many there are
    rules            this NIC's ``RuleBuilder`` (owner of its sessions, keeper of its clones)
    send(target, mtype, recs)   queue records for NIC `target` (non-blocking; the worker
                     batches everything queued in one loop turn into one message)
    owner_of(eaddr, eport) -> nic | None   partition arithmetic (+ borrowed blocks)
    replay(direction, frames)   run queued frames (an io.base.Frames: one buffer, offsets,
                     lengths, a tag each) through the fast path again, send hits
    clock()          float seconds (monotonic): leases, retries, timeouts
    tick_clock()     the fast path's uint32 ticks (last_seen)
    seq_start        the first seq this agent sends; None: a random one.  A daemon passes
                     None: answers to the previous incarnation's messages (same sender
                     id, seqs from 1 again) then find nothing in flight under their seq,
                     rather than completing a new message of the same number
    on_installed(records, idx, dirs)   None, or told of every clone install (RULE answers,
                     PUSHes, revalidation answers) once it returned: the RULE-layout
                     records, the indexes of those installed, their DIR_BIT_* (scalar
                     or per record)
    """

    def __init__(self, nic_id: int, n_nics: int, rules, send, owner_of, replay,
                 params: AgentParams | None = None, clock=time.monotonic, tick_clock=None, partition=None,
                 seq_start: int | None = 1, on_installed=None):
        self.nic_id = nic_id
        self.n_nics = n_nics
        self.rules = rules
        self._send = send
        self.owner_of = owner_of
        self.replay = replay
        self.p = params or AgentParams()
        self.clock = clock
        self.tick_clock = tick_clock or (lambda: int(clock()))
        self._seq = (seq_start if seq_start is not None else int.from_bytes(os.urandom(4), "little")) & 0xFFFFFFFF or 1
        self._fetch_q = FetchQueue()  # the FETCH records of the batch being handled, each with its owner
        self._batching = 0  # > 0: _send_fetch gathers instead of sending
        # holder side: the fetches in flight (key, seq, owner, timing, waiting frames), the
        # negative cache and the remote sources' token buckets, in C (PendingTable)
        # The clone and lease tables are sized for the builder's flow tables (a clone or
        # a lease is an entry there): neither grows, nor rebuilds its index, on the loop
        # (an entry never used costs address space, not memory).  The fetches in flight
        # are few (a fetch lives for a round trip): their table starts small, dense in
        # cache, and grows with a burst.
        p = self.p
        cap = self._capacity(rules)
        self.pending = PendingTable(p.queue_total, p.queue_per_flow, p.retry_s, p.fetch_burst, p.fetch_rate,
                                    p.negative_ttl_s, p.negative_max, capacity=4096)
        # session identity -> clone held here (owner, rule_id, dirs, lease end), in C,
        # indexed by owner (a restart report), by external endpoint (entries whose key
        # does not name the session, ``hypernat ctl rule``) and by lease end (the holder's
        # timer); nothing periodic walks every clone
        self.clones = CloneTable(cap)
        # observer of every install: on_installed(records, idx, dirs) (the worker's event log)
        self.on_installed = on_installed
        self.negative = _NegativeView(self.pending)  # (dir, key) -> until
        # owner side
        # leases granted: (session identity, holder) -> until, in C, indexed by session, by
        # external endpoint (``hypernat ctl rule``) and by end (the owner's timer)
        self.leases = LeaseTable(cap)
        # One reliable-delivery engine for everything answered, with two timer structures:
        # the fetches in flight keep theirs in the PendingTable (in C, an indexed heap: a
        # fetch answered by RULE / NACK / PUSH, dropped or redirected takes its timer with
        # it), the messages kept until acknowledged (PUSH, REVOKE, restart ACTIVITY,
        # BORROW, RETURN: seq -> message here, one per message) theirs in a deadline
        # queue (an acknowledgement discards it).  A turn touches only the due ones, at
        # most p.retransmit_slice of them, earliest first (``step_retransmit``).
        self._unacked: dict[int, _Unacked] = {}
        self._retx = DeadlineQueue()
        self._activity_due = 0.0
        self._act_left, self._act_chunk = 0, None  # a sliced collection round: slices left, slots each
        self._act_queue, self._act_pos = None, 0  # entries collected, reported from _act_pos on
        # Lease ends (clones here, leases granted) in timer heaps, so that no loop turn
        # walks every clone or lease: an entry is checked when its time comes (a renewal
        # moved the end: queued again under the new one; the clone or lease is gone:
        # dropped), a few per turn.
        # spill-over (needs the Partition: loans override owner())
        self.partition = partition
        self.borrowed: dict[int, tuple] = {}  # block -> (lender, adopted at)
        self._borrowing: int | None = None  # seq of the BORROW in flight
        self._borrow_next = (nic_id + 1) % max(1, n_nics)
        self._borrow_refused = 0
        self._borrow_pause = 0.0
        self._grants: dict[tuple, int] = {}  # (borrower, seq) -> block lent (idempotent repeats)
        self._borrows_sent: collections.OrderedDict = collections.OrderedDict()  # seq -> lender asked
        self.counters = collections.Counter(dict.fromkeys(DROP_REASON_NAMES, 0))
        self.fetch_latencies: collections.deque = collections.deque(maxlen=4096)

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _capacity(rules) -> int:
        """Entries the agent's tables are sized for: the builder's flow-table capacity
        (1024 for a builder without flow tables: the tables grow)."""
        try:
            return max(1024, int(rules.out.capacity))
        except (AttributeError, TypeError, ValueError):
            return 1024

    def _next_seq(self) -> int:
        s = self._seq
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return s

    def _emit(self, target: int, mtype: int, recs: np.ndarray) -> None:
        self._send(target, mtype, recs)  # (an answer leaves at once: worker._queue_msg)
        self.counters[_TX_COUNTER[mtype]] += len(recs)

    def count(self, reason: str, n: int = 1) -> None:
        self.counters[reason] += n

    def _track(self, target, mtype, rec, now, deadline) -> None:
        seq = int(rec["seq"][0])
        self._unacked[seq] = _Unacked(target, mtype, rec, now, self.p.retry_s, deadline)
        self._retx.set(seq, min(now + self.p.retry_s, deadline))

    def _acked(self, seq: int):
        """Forget an acknowledged message (None: not in flight)."""
        self._retx.discard(seq)
        return self._unacked.pop(seq, None)

    # -- holder side: misses ---------------------------------------------------------------
    def fetch(self, fetch_dir: int, key, owner: int, frame: bytes | None, now: float) -> bool:
        """Queue `frame` behind a fetch of `key` (a layout.KEY_DTYPE record, oriented like
        `fetch_dir`'s table) from NIC `owner`: ``fetch_rows`` of one.  Returns False, and
        counts why, when the frame is dropped instead."""
        return self.fetch_rows(fetch_rows_of(fetch_dir, key, owner), None if frame is None else Frames.of([frame]),
                               now) == 1

    def fetch_rows(self, rows: np.ndarray, frames, now: float) -> int:
        """The fetches of a batch's misses: `rows` layout.FETCH_ROW_DTYPE (fetch_dir, the
        key in fetch_dir's table, kind -- KIND_ICMP_ERROR: an ICMP error's lookup --, the
        owner; ``RuleBuilder.decide_misses``'s ``fetches``), `frames` the frame of each
        (``io.base.Frames``, frame j row j's, each with its tag: a view of the batch,
        ``Batch.frames_of``; the table copies the frames it queues into its arena, they
        outlive the batch; None: none), record after record, in the
        PendingTable (compiled, reading the rows in place): a flow with a fetch pending
        queues the frame (per-flow and total bounds); otherwise a recent NACK drops it
        (fetch_negative_cached), an incoming fetch takes a token of its remote's bucket
        (fetch_rate_limited when empty; a RULE gives it back), and a new fetch starts
        (the frame queued unless the total bound is reached).  One FETCH message per
        owner.  Returns frames queued."""
        seq0 = self._seq
        try:
            n, started, c_neg, c_rate, c_full, self._seq = self.pending.fetch_rows(rows, frames, now, seq0,
                                                                                  self._fetch_q)
        finally:
            if not self._batching:
                self._flush_fetches()
        c = self.counters
        if started:  # (their first retry queued in the table, due together)
            c["tx_fetch"] += started
            c["fetches"] += started
        if c_neg:
            c["fetch_negative_cached"] += c_neg
        if c_rate:
            c["fetch_rate_limited"] += c_rate
        if c_full:
            c["pending_queue_full"] += c_full
        return n

    @property
    def queued_total(self) -> int:
        """Frames waiting for an answer (all fetches)."""
        return self.pending.queued

    @property
    def _by_seq(self) -> dict:
        """{seq: (fetch_dir, key)} of the fetches in flight (a walk: introspection)."""
        return self.pending.seqs()

    @property
    def _buckets(self) -> collections.OrderedDict:
        """The remote sources' token buckets, remote -> [tokens, t], least recently used
        first (a copy: introspection)."""
        return collections.OrderedDict(self.pending.source_items())

    def _start_fetch(self, fetch_dir, kt, owner, now, flags) -> None:
        """A fetch without frame or token (a clone revalidated)."""
        seq = self._next_seq()
        self.pending.start(fetch_dir, kt, owner, now, flags, seq, self._fetch_q)  # its first retry queued there
        self.counters["tx_fetch"] += 1
        self.counters["fetches"] += 1
        if not self._batching:
            self._flush_fetches()

    def _flush_fetches(self) -> None:
        """Send the FETCH records gathered in a batch: one array per owner."""
        if not self._fetch_q:
            return
        for owner, recs in self._fetch_q.take():
            self._send(owner, M.T_FETCH, recs)

    def revalidate(self, sessions: np.ndarray, now: float) -> int:
        """Clones read back from a snapshot (SESSION_DTYPE, `dirs` = entries held): not
        installed; each is fetched again from its owner, and the answer installs it."""
        n = 0
        for s in sessions:
            sk = skey(s)
            for d in (OUT, IN):
                if int(s["dirs"]) & DIR_BIT[d]:
                    kt = session_key(sk, d)
                    if (d, kt) not in self.pending:
                        self._start_fetch(d, kt, int(s["owner"]), now, M.FETCH_F_REVALIDATE)
                        n += 1
        self.count("clones_revalidating", n)
        return n

    # -- messages ------------------------------------------------------------------------
    def on_message(self, source: int, mtype: int, recs: np.ndarray, now: float) -> None:
        """Handle the (validated) records of one routed message from NIC `source`."""
        h = self._HANDLERS.get(mtype)
        if h is None:
            self.count("bad_message")
            return
        self.counters[_RX_COUNTER[mtype]] += len(recs)
        h(self, source, recs, now)

    # holder: answers to our fetches
    def _on_rule(self, source, recs, now):
        """Answers to our fetches, a batch at a time: every record checked against its
        pending fetch in compiled code (``PendingTable.answer_rules``: the fetch under
        its seq, the endpoint `source`'s, the fetch sent to `source`, the key asked),
        every accepted clone installed with one ``install_many`` (one
        ``FlowTable.insert_batch`` per table), then every queued frame of the batch
        released through the fast path in ONE replay per direction (flows in answer
        order, each flow's frames in arrival order)."""
        n = len(recs)
        if n == 0:
            return
        owners = self._owners(recs)
        acc, dirs, replay_out, replay_in, lats, lat_counts, dup, wrong, bad, bad_owner = self.pending.answer_rules(
            source, recs, owners, now, _LAT_LIMITS)
        for x in bad_owner:  # the rule's endpoint is not the sender's: counted, logged
            self._owned_by(source, int(recs["ext_addr"][x]), int(recs["ext_port"][x]), int(recs["owner"][x]),
                           int(owners[x]))
        if dup:
            self.count("rule_duplicate", dup)
        if wrong:
            self.count("rule_misdirected", wrong)
        if bad:
            self.count("rule_mismatched", bad)
        if not len(acc):
            return
        self._install_many(source, recs, acc, dirs, now, owners)
        try:
            # the fast path now has the rule for an out fetch; an in key may differ for
            # a wildcard answer (EIM), the replay resolves it either way.  The held
            # frames leave first, the latency bookkeeping after them
            if replay_out:
                self.replay(OUT, replay_out)
            if replay_in:
                self.replay(IN, replay_in)
        finally:
            self.fetch_latencies.extend(lats[-self.fetch_latencies.maxlen:].tolist())
            c = self.counters
            c["fetch_answered"] += len(acc)
            for name, k in zip(_LAT_NAMES, lat_counts):
                if k:
                    c[name] += k

    def _owners(self, recs) -> np.ndarray:
        """The owner of every record's external endpoint (partition + loans; -1 outside)."""
        if self.partition is not None and len(recs) > 4:
            return self.partition.owners(recs["ext_addr"], recs["ext_port"])
        own = [self.owner_of(a, p) for a, p in zip(recs["ext_addr"].tolist(), recs["ext_port"].tolist())]
        return np.array([-1 if o is None else o for o in own], np.int64)

    def _on_push(self, source, recs, now):
        """Rules pushed by their owner (active install), a message at a time: every
        record's endpoint checked to be the sender's (partition + loans, one lookup for
        the batch; anything else counted and logged: ``_owned_by``), the accepted ones
        installed with one ``_install_many`` -- the path RULE answers take, so a repeat
        (a PUSH retried whole because its ack was lost) only extends the clone's lease
        -- and the frames of fetches already waiting for them (the push lost the race
        with the reply) released in one replay.  Acknowledged with one PUSH_ACK record
        per message (the owner's PUSH message has one seq for all its records; a run of
        records under one seq is a message): ST_REFUSED if any of its records was."""
        if len(recs) == 0:
            return
        owners = self._owners(recs)
        ok = (owners == source) & (recs["owner"] == source)
        bad = np.flatnonzero(~ok) if np.count_nonzero(ok) < len(recs) else ()
        for x in bad:  # the endpoint is not the sender's: counted, logged
            self._owned_by(source, int(recs["ext_addr"][x]), int(recs["ext_port"][x]), int(recs["owner"][x]),
                           int(owners[x]))
        good = recs[ok] if len(bad) else recs
        if len(good):
            self._install_many(source, recs, np.flatnonzero(ok) if len(bad) else None, DIR_BIT_IN, now, owners)
            self.count("push_installed", len(good))
            if self.pending:  # fetches in flight for some of them: their frames go now
                sks = zip(*(good[f].tolist() for f in WIRE_KEY_FIELDS))
                frames = self.pending.pop_many([(IN, session_key(sk, IN)) for sk in sks])
                if frames:
                    self.replay(IN, frames)
        # one ack per message: a run of records under one seq (a payload carries whole
        # messages one after the other)
        seq = recs["seq"]
        new = np.empty(len(seq), bool)
        new[0] = True
        np.not_equal(seq[1:], seq[:-1], out=new[1:])
        ack = M.records(M.T_PUSH_ACK, int(np.count_nonzero(new)))
        ack["seq"] = seq[new]
        if len(bad):
            ack["status"][np.unique((np.cumsum(new) - 1)[bad])] = M.ST_REFUSED
        self._emit(source, M.T_PUSH_ACK, ack)

    def _on_nack(self, source, recs, now):
        """Refusals of our fetches.  A NACK echoes the FETCH record, so it is matched like
        a RULE (``PendingTable.answer_nacks``, compiled): the fetch in flight under its
        seq, sent to `source`, for the key the record names; anything else is dropped
        and counted (nack_stale, nack_misdirected, nack_mismatched) and cancels nothing.
        A refusal keeps the remote's token (what a scan pays for) unless the owner was
        unavailable; a no-rule refusal enters the negative cache, a *filtered* one does
        not: the owner's answer can change with the inside host's next outbound packet
        (hole punching: A sends to B through another NIC; B's next packet here must be
        asked about again, not dropped for negative_ttl on a refusal that no longer
        holds).  The remote's token bucket still bounds what a prober costs."""
        stale, wrong, bad, nacked, lost = self.pending.answer_nacks(source, recs, now)
        if nacked:
            self.count("fetch_nack", nacked)
        if lost:
            self.count("clones_lost_on_revalidation", lost)
        if stale:
            self.count("nack_stale", stale)
        if wrong:
            self.count("nack_misdirected", wrong)
        if bad:
            self.count("nack_mismatched", bad)

    def _on_lease(self, source, recs, now):
        """Lease renewals from `source`: the clones held of it keep their lease (one
        ``CloneTable.extend_records``, records read in place)."""
        renewed, unknown, wrong = self.clones.extend_records(recs, source, now)
        if unknown:
            self.count("lease_unknown", unknown)
        if wrong:
            self.count("lease_misdirected", wrong)
        if renewed:
            self.count("leases_renewed", renewed)

    def _on_revoke(self, source, recs, now):
        """Revocations from `source`, a message at a time: its clones named are dropped
        (one lookup and one removal over the records, in C).  Acknowledged with one
        REVOKE_ACK record per message (the owner's REVOKE has one seq for all its
        records; a run of records under one seq is a message), ST_UNKNOWN if any of its
        records named a clone not held here or held of another owner (idempotent: a
        repeat is acknowledged again)."""
        if len(recs) == 0:
            return
        held = self.clones.owned_by(recs, source)
        mine = np.flatnonzero(held > 0)
        seq = recs["seq"]
        new = np.empty(len(seq), bool)
        new[0] = True
        np.not_equal(seq[1:], seq[:-1], out=new[1:])
        ack = M.records(M.T_REVOKE_ACK, int(np.count_nonzero(new)))
        ack["seq"] = seq[new]
        if len(mine) < len(recs):
            ack["status"][np.unique((np.cumsum(new) - 1)[held <= 0])] = M.ST_UNKNOWN
            unknown = int(np.count_nonzero(held == 0))
            if unknown:
                self.count("revoke_unknown", unknown)
            if len(recs) - len(mine) - unknown:
                self.count("revoke_misdirected", len(recs) - len(mine) - unknown)
        if len(mine):
            self._drop_clones(recs, "clone_revoked", None if len(mine) == len(recs) else mine)
        self._emit(source, M.T_REVOKE_ACK, ack)

    def _on_ack(self, mtype, source, recs, now):
        """Acknowledgements of `mtype` records (PUSH, REVOKE, ACTIVITY, RETURN) this NIC
        keeps until answered: matched on the seq, the NIC it was sent to and its type."""
        unacked = self._unacked
        stale = wrong = bad = 0
        seqs = recs["seq"].tolist()
        if mtype == M.T_ACTIVITY:  # one record per record reported: only the seqs in flight are looked at
            seqs = unacked.keys() & seqs if unacked else ()
        for seq in seqs:
            u = unacked.get(seq)
            if u is None:
                # an ACTIVITY_ACK answers every record of a report; only a restart report
                # is kept (under its first seq): the others are not stale, just untracked
                stale += mtype != M.T_ACTIVITY
                continue
            if u.target != source:
                wrong += 1
                continue
            if u.mtype != mtype:
                bad += 1
                continue
            self._acked(seq)
            if mtype == M.T_REVOKE:  # the holder dropped every clone the message named
                self._end_leases(u.rec, source)
        if stale:
            self.count("ack_stale", stale)
        if wrong:
            self.count("ack_misdirected", wrong)
        if bad:
            self.count("ack_mismatched", bad)

    # owner side
    def _on_fetch(self, source, recs, now):
        """Serve a batch of FETCHes, one record or thousands alike: the builder's
        ``serve_fetches`` answers the records (compiled: FETCH records in, RULE records
        out); the answers go back as one RULE and one NACK message, the RULE before the
        leases are granted (the asker's packet waits for it, not for the bookkeeping)."""
        rule, bad, status = self.rules.serve_fetches(recs, self.tick_clock(), int(self.p.lease_s * 1000))
        if len(rule):
            self._emit(source, M.T_RULE, rule)
            self._grant_many(rule, source, now)
        if len(bad):
            out = M.records(M.T_NACK, len(bad))
            out[:] = recs[bad]
            out["reason"] = [_nack_reason(x) for x in status.tolist()]
            lent = out[out["kind"] == M.FETCH_BY_EXTERNAL]
            if len(lent):
                self._notice_lent(source, lent["ext_addr"].tolist(), lent["ext_port"].tolist())
            self._emit(source, M.T_NACK, out)
            self.count("fetch_refused", len(bad))

    def _notice_lent(self, asker: int, eaddrs, eports) -> None:
        """A FETCH for an endpoint in a block this NIC lent: the asker missed the loan
        notice.  Send it again to the asker alone (before the NACK, on the same path, so
        it arrives first): the asker re-routes the fetch to the borrower."""
        if self.partition is None:
            return
        seen = set()
        for a, p in zip(eaddrs, eports):
            g = self.partition.block_of(a, p)
            if g < 0 or g in seen or self.partition.native_owner_of_block(g) != self.nic_id:
                continue
            seen.add(g)
            borrower = self.partition.owner_of_block(g)
            if borrower != self.nic_id and borrower != asker:
                self._emit(asker, M.T_BORROW_ACK, self._loan_notice(g, borrower))
                self.count("loan_notices_resent")

    def _loan_notice(self, g: int, borrower: int, seq: int = 0) -> np.ndarray:
        addr, lo, hi = self.partition.block_span(g)
        rec = M.records(M.T_BORROW_ACK, 1)
        rec["seq"], rec["addr"], rec["port_lo"], rec["port_hi"] = seq, addr, lo, hi
        rec["lender"], rec["borrower"], rec["status"] = self.nic_id, borrower, M.ST_OK
        return rec

    def rebroadcast_loans(self, now: float) -> int:
        """Loan notices again, for every block this NIC has lent, to every NIC but the
        borrower: a NIC that missed the first notice (coordinator restart, a NIC that
        came up later) learns it within one period even if it never asks.  One message
        per NIC.  Returns the blocks announced."""
        if self.partition is None or self.n_nics < 2:
            return 0
        lent = [(g, o) for g, o in self.partition.overrides.items()
                if o != self.nic_id and self.partition.native_owner_of_block(g) == self.nic_id]
        if not lent:
            return 0
        notes = np.concatenate([self._loan_notice(g, o) for g, o in lent])
        for k in range(self.n_nics):
            if k == self.nic_id:
                continue
            mine = notes[notes["borrower"] != k]
            if len(mine):
                self._emit(k, M.T_BORROW_ACK, mine)
        self.count("loan_rebroadcasts")
        return len(lent)

    def _on_activity(self, source, recs, now):
        tick = self.tick_clock()
        ack = M.records(M.T_ACTIVITY_ACK, len(recs))
        ack["seq"] = recs["seq"]
        self._emit(source, M.T_ACTIVITY_ACK, ack)
        # the sessions as the builder merges them: both directions kept alive, the TCP
        # flags per direction (a SYN seen one way only leaves the session half-open)
        sess = activity_sessions(recs, tick, self.nic_id)
        # crash recovery (rules.py): sessions this owner lost in a crash come back from
        # the holder's report; the holder then gets a lease on them like any other
        recovered = np.asarray(self.rules.recover_sessions(sess, tick), bool)
        # only a holder's report counts: activity from a NIC holding no lease on the
        # session (a wrong NIC, or a lease that ran out or was revoked here) is
        # acknowledged but neither merged nor renewed (let the session expire)
        known = np.flatnonzero(self.leases.held(recs, source) | recovered)
        unknown = len(recs) - len(known)
        if unknown:
            self.count("activity_unknown", unknown)
        if not len(known):
            return
        self.rules.merge_activity(sess if not unknown else sess[known], tick)
        sel = known if unknown else None
        self._grant_many(recs, source, now, idx=sel)
        self._emit(source, M.T_LEASE, lease_records(recs, sel, self.nic_id, int(self.p.lease_s * 1000)))

    _HANDLERS = {
        M.T_RULE: _on_rule,
        M.T_PUSH: _on_push,
        M.T_NACK: _on_nack,
        M.T_LEASE: _on_lease,
        M.T_REVOKE: _on_revoke,
        M.T_FETCH: _on_fetch,
        M.T_ACTIVITY: _on_activity,
        M.T_PUSH_ACK: lambda self, *a: self._on_ack(M.T_PUSH, *a),
        M.T_REVOKE_ACK: lambda self, *a: self._on_ack(M.T_REVOKE, *a),
        M.T_ACTIVITY_ACK: lambda self, *a: self._on_ack(M.T_ACTIVITY, *a),
        M.T_BORROW: lambda self, *a: self._on_borrow(*a),
        M.T_BORROW_ACK: lambda self, *a: self._on_borrow_ack(*a),
        M.T_RETURN: lambda self, *a: self._on_return(*a),
        M.T_RETURN_ACK: lambda self, *a: self._on_ack(M.T_RETURN, *a),
    }

    # -- spill-over: borrow a port block from a neighbour, give it back when idle ------------
    #
    #   borrower k (E_k exhausted)        lender l                        every other NIC
    #   BORROW(seq) ───────────────────►  rules.lend_block() -> g
    #                                     partition.lend(g, k)
    #   adopt g, partition.lend(g, k) ◄── BORROW_ACK(g, k) ──────────────► partition.lend(g, k)
    #   ... idle, E_k no longer tight:                                     (loan notice: FETCHes
    #   rules.return_block(g), RETURN ──► rules.adopt_block(g)              for g go to k)
    #                                ◄─── RETURN_ACK, BORROW_ACK(g, l) ──► partition.lend(g, l)
    def want_block(self, now: float) -> bool:
        """E_i is (nearly) exhausted: ask the next neighbour for a block (one request at a
        time; every neighbour refused -> pause a while).  True if a BORROW went out."""
        if self.partition is None or self.n_nics < 2 or self._borrowing is not None or now < self._borrow_pause:
            return False
        lender = self._borrow_next
        if lender == self.nic_id:
            lender = (lender + 1) % self.n_nics
        rec = M.records(M.T_BORROW, 1)
        rec["seq"], rec["lender"], rec["borrower"] = self._next_seq(), lender, self.nic_id
        rec["port_hi"] = self.partition.block_size - 1
        self._borrowing = int(rec["seq"][0])
        self._borrows_sent[self._borrowing] = lender  # which NIC may answer it (grant or refusal)
        if len(self._borrows_sent) > 64:
            self._borrows_sent.popitem(last=False)
        self._track(lender, M.T_BORROW, rec, now, now + self.p.fetch_timeout_s * 4)
        self._emit(lender, M.T_BORROW, rec)
        self.count("borrow_requests")
        return True

    def _block_of(self, r) -> int:
        return self.partition.block_of(int(r["addr"]), int(r["port_lo"])) if self.partition is not None else -1

    def _on_borrow(self, source, recs, now):
        for r in recs:
            if int(r["lender"]) != self.nic_id:
                self.count("borrow_misdirected")  # asked of another NIC: not ours to answer
                continue
            key = (source, int(r["seq"]))
            g = self._grants.get(key)
            if g is None and self.partition is not None:
                g = self.rules.lend_block()
                if g is not None:
                    self._grants[key] = g
                    self.partition.lend(g, source)
                    self.count("blocks_lent")
            out = M.records(M.T_BORROW_ACK, 1)
            out[0] = r
            out["lender"], out["borrower"] = self.nic_id, source
            if g is None:
                out["status"], out["reason"] = M.ST_REFUSED, M.NACK["exhausted"]
                self._emit(source, M.T_BORROW_ACK, out)
                self.count("borrow_refused")
                continue
            addr, lo, hi = self.partition.block_span(g)
            out["addr"], out["port_lo"], out["port_hi"], out["status"] = addr, lo, hi, M.ST_OK
            for k in range(self.n_nics):  # the borrower, and a loan notice to everyone else
                if k != self.nic_id:
                    self._emit(k, M.T_BORROW_ACK, out)

    def _on_borrow_ack(self, source, recs, now):
        for r in recs:
            borrower = int(r["borrower"])
            seq = int(r["seq"])
            ok = int(r["status"]) == M.ST_OK
            if borrower == self.nic_id and source != self.nic_id:
                # an answer to a BORROW of ours: only from the NIC it was sent to
                if self._borrows_sent.get(seq) != source:
                    self.count("borrow_ack_misdirected")
                    continue
                in_flight = seq == self._borrowing
                if in_flight:
                    self._acked(seq)
                    self._borrowing = None
                if not ok:
                    if not in_flight:
                        self.count("borrow_ack_stale")  # a repeat; we moved on already
                        continue
                    self._borrow_refused += 1
                    self._borrow_next = (source + 1) % self.n_nics
                    if self._borrow_refused >= self.n_nics - 1:  # nobody has one: wait
                        self._borrow_refused = 0
                        self._borrow_pause = now + 5.0
                    continue
            elif not ok:
                self.count("borrow_ack_misdirected")  # a refusal meant for another borrower
                continue
            g = self._block_of(r)
            if g < 0 or self.partition.native_owner_of_block(g) != source:
                self.count("bad_message")  # only a block's native owner lends it
                continue
            if self.partition.owner_of_block(g) != borrower:
                self.partition.lend(g, borrower)
                self.count("loans_applied")
            self._redirect_fetches(source, g, borrower, now)
            if borrower == self.nic_id and g not in self.borrowed:
                self.rules.adopt_block(g)
                self.borrowed[g] = (source, now)
                self._borrow_refused = 0
                self.count("blocks_borrowed")

    def _redirect_fetches(self, old_owner: int, g: int, new_owner: int, now: float) -> None:
        """Fetches in flight to `old_owner` for endpoints of block `g`, which now belongs
        to `new_owner`: ask the new owner (new seq: a NACK of the old one is ignored)."""
        if new_owner == self.nic_id or not self.pending:
            return
        for seq, (_, _, _, ea, ep) in self.pending.of_owner(old_owner, IN):
            if self.partition.block_of(ea, ep) != g:
                continue
            # (its timer moved in the table: the retry wait starts again, the deadline stays)
            self.pending.reseq(seq, new_owner, self._next_seq(), now, self.p.fetch_timeout_s, self._fetch_q)
            self.counters["tx_fetch"] += 1
            self.count("fetch_redirected")
        if not self._batching:
            self._flush_fetches()

    def return_idle(self, now: float, min_hold_s: float = 10.0) -> int:
        """Give back borrowed blocks that have no live port (call when E_i is no longer
        tight).  Returns blocks returned."""
        n = 0
        for g, (lender, since) in list(self.borrowed.items()):
            if now - since < min_hold_s or not self.rules.return_block(g):
                continue
            del self.borrowed[g]
            self.partition.return_block(g)
            addr, lo, hi = self.partition.block_span(g)
            rec = M.records(M.T_RETURN, 1)
            rec["seq"], rec["addr"], rec["port_lo"], rec["port_hi"] = self._next_seq(), addr, lo, hi
            rec["lender"], rec["borrower"] = lender, self.nic_id
            self._track(lender, M.T_RETURN, rec, now, now + 3600.0)
            self._emit(lender, M.T_RETURN, rec)
            self.count("blocks_returned")
            n += 1
        return n

    def _on_return(self, source, recs, now):
        ack = M.records(M.T_RETURN_ACK, len(recs))
        ack["seq"] = recs["seq"]
        for i, r in enumerate(recs):
            g = self._block_of(r)
            if g < 0 or self.partition.native_owner_of_block(g) != self.nic_id:
                ack["status"][i] = M.ST_REFUSED
                self.count("return_refused")
                continue
            holder = self.partition.owner_of_block(g)
            if holder != source and holder != self.nic_id:  # lent to another NIC: not the sender's to give back
                ack["status"][i] = M.ST_REFUSED
                self.count("return_refused")
                continue
            if holder == source:  # not yet taken back (a repeat finds it taken back: acknowledged)
                self.partition.return_block(g)
                self.rules.adopt_block(g)
                self.count("blocks_taken_back")
                note = M.records(M.T_BORROW_ACK, 1)
                note[0] = r
                note["lender"], note["borrower"], note["status"] = self.nic_id, self.nic_id, M.ST_OK
                for k in range(self.n_nics):
                    if k not in (self.nic_id, source):
                        self._emit(k, M.T_BORROW_ACK, note)
        self._emit(source, M.T_RETURN_ACK, ack)

    # -- installs --------------------------------------------------------------------------
    def _owned_by(self, source, eaddr: int, eport: int, claimed: int, owner=None) -> bool:
        """The rule's external endpoint is `source`'s (partition + loans), and the record
        says so too.  `owner`: the endpoint's owner if the caller looked it up already
        (-1: outside E)."""
        if owner is None:
            owner = self.owner_of(eaddr, eport)
        elif owner < 0:
            owner = None
        if owner != source or claimed != source:
            self.count("bad_message")
            log.warning("nic%d: rule for %s:%d from nic%s whose owner is nic%s: dropped", self.nic_id,
                        M.ip_str(eaddr), eport, source, owner)
            return False
        return True

    def _install_many(self, owner: int, recs, idx, dirs, now: float, owners=None) -> int:
        """Install clones of `owner`'s sessions: the RULE-layout records `recs` (a RULE or
        PUSH message's, as received) selected by `idx` (None: all), `dirs` the entries
        (DIR_BIT_*, scalar or per record), `owners` their endpoints' owners if known (per
        record).  One ``CloneTable.install`` (compiled): a clone already held with those
        entries only has its lease extended (idempotent repeat), the rest get their
        flow-table entries from the builder's ``install_clones`` in one call (records read
        in place) and become clones.  Returns the clones installed."""
        pending = self.pending
        rules, tick = self.rules, self.tick_clock()

        def install(r, todo, d):
            return rules.install_clones(r, tick, d, 0, todo, owners)

        installed, failed, done = self.clones.install(owner, recs, idx, dirs, now, self.p.lease_margin_s, install)
        if installed:  # an answer ends a negative entry for its keys
            pending.neg_discard_rules(recs, done, dirs)
        if installed and self.on_installed is not None:
            self.on_installed(recs, done, dirs)
        if failed:
            self.count("clone_install_failed", failed)
        self.count("clones_installed", installed)
        return installed

    def _drop_clone(self, sk, reason: str) -> None:
        self._drop_clones((sk,), reason)

    def _drop_clones(self, sessions, reason: str, idx=None) -> int:
        """Forget the clones held here that `sessions` name (a record array of any layout
        naming sessions, read in place, selected by `idx`, None: all; or session tuples)
        and remove their entries from the tables: one ``CloneTable.remove_records`` and
        one ``remove_clone`` call for all.  Returns how many were held."""
        if not isinstance(sessions, np.ndarray):
            sessions = _session_array(sessions)
        gone = self.clones.remove_records(sessions, idx)
        if not len(gone):
            return 0
        self.rules.remove_clone(gone)
        self.count(reason, len(gone))
        return len(gone)

    # -- owner side: leases, active install, revocation ---------------------------------------
    def _grant_many(self, sessions, holder: int, now: float, until: float | None = None, idx=None) -> None:
        """Record a lease for `holder` on each session `sessions` names (a record array
        of any layout naming sessions -- SESSION_DTYPE, RULE, ACTIVITY -- read in place,
        selected by `idx`, None: all; or session tuples), in one ``LeaseTable.grant`` (one
        lease end for all: now + the lease + grace, or `until` for a lease read back from
        a snapshot); a holder's first lease on an external endpoint holds it in the
        builder until the lease ends (``_end_leases``), all of them in one ``hold_many``."""
        if holder == self.nic_id or not len(sessions):
            return
        if not isinstance(sessions, np.ndarray):
            sessions = _session_array(sessions)
        if until is None:
            until = now + self.p.lease_s + M.LEASE_GRACE_MS / 1000.0
        new = self.leases.grant(sessions, idx, holder, until)  # endpoint keys of the new leases
        if len(new):
            self.rules.hold_many(new)

    def _end_leases(self, sessions, holders, idx=None) -> None:
        """End the leases of `holders` (one, or one per record selected) on the sessions
        `sessions` names (records of any layout naming sessions, selected by `idx`, None:
        all), in one ``LeaseTable.end_records``; the endpoints of the leases that ran are
        released in the builder (a lease already ended, e.g. by its timer, is skipped)."""
        ended = self.leases.end_records(sessions, idx, holders)
        if len(ended):
            self.rules.release_many(ended)

    def _push_created(self, now: float) -> None:
        """Active install of the sessions this turn built (``rules.drain_created``), in
        the turn that built them: the switch's hash predicts the NIC each one's return
        direction lands on (``predict_nics``, compiled: one call for the batch; -1 where
        it cannot be predicted: push_unpredictable, left to passive install), and every
        other NIC gets ONE PUSH message with all of its sessions (split at the wire's
        MAX_RECORDS), the leases granted to it in one ``_grant_many``.  A message has one
        seq for all its records: it is tracked, retried and acknowledged as a whole (the
        holder installs a repeat idempotently)."""
        created = self.rules.drain_created()
        if not self.p.active_install or self.n_nics < 2 or len(created) == 0:
            return
        p = self.p
        nics = predict_nics(p.switch_hash, self.n_nics, created["proto"], created["raddr"], created["rport"],
                            created["eaddr"], created["eport"], p.switch_seed, p.switch_fields, p.switch_rss)
        lost = int(np.count_nonzero(nics < 0))
        if lost:  # e.g. ICMP under jhash steering; toeplitz without the port's key
            self.count("push_unpredictable", lost)
        lease_ms = int(p.lease_s * 1000)  # (a PUSH says by its type that it was pushed)
        per_nic = np.bincount(nics + 1, minlength=self.n_nics + 1)[1:]  # sessions per NIC
        for j in np.flatnonzero(per_nic).tolist():
            if j == self.nic_id:
                continue
            mine = created if per_nic[j] == len(created) else created[nics == j]
            self._grant_many(mine, j, now)  # held even if lost
            for i in range(0, len(mine), M.MAX_RECORDS):
                part = mine[i:i + M.MAX_RECORDS]
                rec = M.records(M.T_PUSH, len(part))
                for f_w, f_s in WIRE_OF_SESSION:
                    rec[f_w] = part[f_s]
                rec["seq"], rec["owner"], rec["lease_ms"] = self._next_seq(), self.nic_id, lease_ms
                self._track(j, M.T_PUSH, rec, now, now + p.fetch_timeout_s)
                self._emit(j, M.T_PUSH, rec)
            self.count("pushes", len(mine))

    def _revoke_removed(self, now: float) -> None:
        """Revocation of the sessions the builder ended since (``rules.drain_removed``):
        their leases found in one ``LeaseTable.leases_of`` (records read in place, in
        C); a lease whose end passed already is just ended (no holder keeps its clone
        past it); every holder of the others gets ONE REVOKE message with all of its
        sessions (split at the wire's MAX_RECORDS) under one seq, tracked, retried and
        acknowledged as a whole (the holder drops a repeat idempotently), its deadline
        the latest lease end among its records: by then every one of them ran out, so
        a REVOKE still unanswered is given up and its leases ended (``_end_leases``)."""
        removed = self.rules.drain_removed()
        if not len(removed) or not self.leases:
            return
        ix, hs, until = self.leases.leases_of(removed)
        if not len(ix):
            return
        past = until <= now
        if past.any():
            self._end_leases(removed, hs[past], ix[past])
            keep = ~past
            ix, hs, until = ix[keep], hs[keep], until[keep]
        for h in np.unique(hs).tolist():
            mine = hs == h
            sel, ends = ix[mine], until[mine]
            for i in range(0, len(sel), M.MAX_RECORDS):
                part = removed[sel[i:i + M.MAX_RECORDS]]
                rec = M.records(M.T_REVOKE, len(part))
                for f_w, f_s in WIRE_OF_SESSION:
                    rec[f_w] = part[f_s]
                rec["seq"], rec["kind"] = self._next_seq(), M.FETCH_BY_EXTERNAL
                self._track(h, M.T_REVOKE, rec, now, float(ends[i:i + M.MAX_RECORDS].max()))
                self._emit(h, M.T_REVOKE, rec)
            self.count("revokes", len(sel))

    # -- time ---------------------------------------------------------------------------------
    @property
    def _pending_due(self) -> float:
        """When the reliable-delivery engine has something due next (inf: nothing): a
        kept message or a fetch."""
        a, b = self._retx.next_due, self.pending.next_due
        return a if a < b else b

    def tick(self, now: float) -> None:
        """Every periodic step once (``steps``); the NIC worker runs them from its timer
        scheduler instead, each when due.  Each does at most its slice."""
        for _, step, _ in self.steps():
            step(now)

    def steps(self) -> tuple:
        """The agent's periodic jobs: (name, step(now) -> True when it left work for the
        next turn, due() -> when it is due next, or None: every turn).  Retries, timeouts, lease ends, active
        install, revocation, activity; each bounded per call."""
        return (("agent_created", self.step_created, None),  # every turn: what this turn built
                ("agent_retransmit", self.step_retransmit, lambda: self._pending_due),
                ("agent_clone_leases", self.step_clone_leases, lambda: self.clones.next_due),
                ("agent_activity", self.step_activity,
                 lambda: -_INF if self._act_left or self._act_queue is not None else self._activity_due),
                ("agent_lease_ends", self.step_lease_ends,
                 lambda: self.leases.next_due))

    def step_created(self, now: float) -> None:
        """Active install and revocation of what the builder created / removed since."""
        self._push_created(now)
        self._revoke_removed(now)

    def step_retransmit(self, now: float) -> bool:
        """The reliable-delivery engine's turn: fetches and kept messages whose retry wait
        passed are sent again (the wait doubles, up to retry_max_s; fetches gathered: one
        FETCH per owner), those past their deadline are given up (a fetch drops its
        frames: fetch_timeout).  At most ``retransmit_slice`` of them, earliest first
        (the fetches' timers in the PendingTable, ``due``, the messages' in the deadline
        queue, taken in turn by due time); True if more are due."""
        retx, pending, fq = self._retx, self.pending, self._fetch_q
        live = self.p.retransmit_slice
        skip = 16 * live  # (a message's seq is discarded when acknowledged: none should be stale)
        unacked = self._unacked
        retry_max, timeout = self.p.retry_max_s, self.p.fetch_timeout_s
        c = self.counters
        again: dict = {}  # (target, type) -> records sent again: one message each
        self._batching += 1
        try:
            while live > 0 and skip > 0:
                tm, tf = retx.next_due, pending.next_due
                if tf <= tm:  # the fetches first, up to the first message due
                    if tf > now + _EPS:
                        break
                    sent, gone, dropped = pending.due(now if now < tm else tm, live, retry_max, timeout, fq)
                    if not sent + gone:
                        break  # (float noise: nothing came up after all)
                    live -= sent + gone
                    if sent:
                        c["tx_fetch"] += sent
                        c["fetch_retries"] += sent
                    if gone:  # past their deadline: their frames dropped
                        c["fetch_timeout"] += dropped
                    continue
                seqs = retx.pop_due(now if now < tf else tf, min(live, skip))
                if not seqs:
                    break
                skip -= len(seqs)
                for seq in seqs:
                    u = unacked.get(seq)
                    if u is None:
                        continue
                    live -= 1
                    if now + _EPS >= u.deadline:
                        del unacked[seq]
                        if u.mtype == M.T_REVOKE:  # the holder's leases ran out anyway
                            self._end_leases(u.rec, u.target)
                        elif u.mtype == M.T_BORROW and seq == self._borrowing:
                            self._borrowing = None
                            self._borrow_next = (u.target + 1) % self.n_nics
                        continue
                    u.sent = now
                    u.retry = min(u.retry * 2, retry_max)
                    retx.set(seq, min(now + u.retry, u.deadline))
                    again.setdefault((u.target, u.mtype), []).append(u.rec)
        finally:
            self._batching -= 1
            if not self._batching:
                self._flush_fetches()
            for (target, mtype), msgs in again.items():
                # the messages again, as few as fit whole in the wire's MAX_RECORDS each:
                # a multi-record message (PUSH) is acknowledged under its one seq, so it
                # must arrive whole (the worker's Outbox keeps an array it is given whole)
                k = 0
                while k < len(msgs):
                    j, size = k + 1, len(msgs[k])
                    while j < len(msgs) and size + len(msgs[j]) <= M.MAX_RECORDS:
                        size += len(msgs[j])
                        j += 1
                    self._emit(target, mtype, msgs[k] if j == k + 1 else
                               np.frombuffer(b"".join(r.tobytes() for r in msgs[k:j]), dtype=msgs[k].dtype))
                    k = j
                self.count("retries", len(msgs))
        return self._pending_due <= now

    def step_clone_leases(self, now: float) -> bool:
        """Holder: clones whose lease runs out (exactly on time), at most
        ``lease_end_slice``; True if more are due."""
        if now < self.clones.next_due:
            return False
        self._drop_clones(self.clones.due_now(now, self.p.lease_margin_s, self.p.lease_end_slice), "lease_expired")
        return now >= self.clones.next_due

    def step_activity(self, now: float) -> bool:
        """Activity: every activity interval a round over the builder's tables, a slice
        of ``activity_slots`` slots collected per turn, the entries found reported
        ``activity_entries`` per turn; True while a round is under way."""
        if self._act_queue is not None:  # entries collected, not reported yet: the next ones
            self._report_queued(now)
        elif self._act_left:  # a round of activity collection in progress: the next slice
            self._activity_slice(now)
        elif now >= self._activity_due:
            self._activity_due = now + min(self.p.activity_interval_s, self.p.lease_s / 4)
            self._act_left, self._act_chunk = self._activity_slices()
            if self._act_left:
                self._activity_slice(now)
            else:
                self._act_queue, self._act_pos = self.rules.collect_activity(clear=True), 0
                self._report_queued(now)
        return bool(self._act_left) or self._act_queue is not None

    def step_lease_ends(self, now: float) -> bool:
        """Owner: leases that ran out, seen from here (+ grace), at most
        ``lease_end_slice`` heap entries; True if more are due."""
        leases = self.leases
        if now < leases.next_due:
            return False
        ended = leases.due(now, self.p.lease_end_slice)  # the endpoint keys of the leases that ran out
        if len(ended):
            self.rules.release_many(ended)
        return now >= leases.next_due

    # Collecting activity reads the flags of every slot of both tables, and reporting it
    # costs per entry found (a few us each): on big tables (2 x 4M slots, 10^6 clones)
    # most of a second at once, in which every FETCH waiting at this NIC waits too.
    # Tables above p.activity_slots are collected a slice per loop turn (the builder's
    # cursor continues; a slot costs ~1 ns to scan), and what a slice found is reported
    # p.activity_entries per turn before the next slice is collected.

    def _activity_slices(self) -> tuple:
        """(slices, slots per slice) for a round over the builder's tables; (0, None) to
        collect in one go (small tables, or a builder that cannot tell its size)."""
        try:
            ns = max(len(self.rules.out.slots), len(self.rules.inn.slots))
        except AttributeError:
            return 0, None
        if ns <= self.p.activity_slots:
            return 0, None
        k = -(-ns // self.p.activity_slots)
        return k, -(-ns // k)

    def _activity_slice(self, now: float) -> None:
        self._act_left -= 1
        self._act_queue, self._act_pos = self.rules.collect_activity(clear=True, max_slots=self._act_chunk), 0
        self._report_queued(now)

    def _report_queued(self, now: float) -> None:
        """Report the next ``activity_entries`` of the entries collected."""
        q, i = self._act_queue, self._act_pos
        k = self.p.activity_entries
        if len(q) - i > k:
            self._act_pos = i + k
        else:
            self._act_queue = None
        if i < len(q):
            self.report_activity(now, q[i:i + k])

    def report_activity(self, now: float, act: np.ndarray | None = None) -> int:
        """Batched ACTIVITY to each owner for the clones hit since the last report
        (`act`: entries already collected; None collects them now, whole tables)."""
        if act is None:
            act = self.rules.collect_activity(clear=True)
        if len(act) == 0:
            return 0
        # each entry to its clone and the entries of one clone into one record, grouped
        # by owner, in C (``CloneTable.activity``: time proportional to the entries, never
        # a walk over the clones held; an ICMP entry, which does not carry the owner's
        # remote identifier, is matched among the clones on its external endpoint)
        rec, groups = self.clones.activity(act, self.tick_clock())
        for owner, first, k in groups:
            part = rec[first:first + k]
            seq0 = self._seq  # _next_seq k times
            part["seq"] = np.arange(seq0, seq0 + k) if seq0 + k <= 0x100000000 else _seq_run(seq0, k)
            self._seq = (seq0 + k - 1) % 0xFFFFFFFF + 1
            self._emit(owner, M.T_ACTIVITY, part)
        self.count("activity_reported", len(rec))
        return len(rec)

    def endpoint(self, proto: int, eaddr: int, eport: int) -> tuple:
        """What this agent knows of one external endpoint, in time proportional to what
        it finds: (leases granted, as [(sk, {holder: until})], clones held, as
        [(sk, owner, rule_id, dirs, expires)])."""
        leases = self.leases.at(proto, eaddr, eport)
        clones = [(sk, c.owner, c.rule_id, c.dirs, c.expires) for sk, c in self.clones.at(proto, eaddr, eport)]
        return leases, clones

    def resend_all(self, now: float) -> None:
        """After the coordinator restarted (or we re-HELLOed): send again everything not
        answered yet instead of waiting for the retry timers -- every seq of the
        reliable-delivery engine made due now (the messages: a bulk move of the deadline
        queue's buckets; the fetches: their timer heap capped at `now` and rebuilt, in
        C), sent again by ``step_retransmit`` a slice per turn: the first slice at once."""
        self._retx.advance_all(now)
        self.pending.advance_all(now)
        self.step_retransmit(now)

    def set_slices(self, **slices) -> None:
        """New slices of periodic work per loop turn (the config's ``loop:`` on a reload;
        names as in AgentParams: retransmit_slice, lease_end_slice, activity_slots,
        activity_entries), each at least 1; used from the next turn on.  A round of the
        activity scan under way finishes with the slot slice it started with."""
        bad = [k for k in slices if k not in _SLICES]
        if bad:
            raise ValueError(f"not a slice of periodic work: {', '.join(bad)}")
        low = [f"{k}={v}" for k, v in slices.items() if int(v) < 1]
        if low:
            raise ValueError(f"slices must be at least 1: {', '.join(low)}")
        self.p = replace(self.p, **{k: int(v) for k, v in slices.items()})

    def fail_target(self, target: int, now: float) -> None:
        """The coordinator says NIC `target` is down: fail its fetches at once."""
        n = self.pending.fail_owner(target)
        if n:
            self.count("fetch_owner_down", n)

    def peer_restarted(self, owner: int, now: float) -> None:
        """NIC `owner` came back with a new incarnation: report every clone of its rules
        at once.  An owner that restored its snapshot renews them; one that crashed
        re-adopts them from this report (crash recovery, ``rules.recover_sessions``);
        what no report brings back runs out with its lease.

        The report is the only way a crashed owner learns of an idle clone, so it is
        retried like the other messages that matter (until its ACTIVITY_ACK, the first
        record's seq, or until the clones' leases would have run out anyway); the owner
        handles a repeat idempotently."""
        rec = self.clones.owner_records(owner)  # ACTIVITY records, written in C
        if not len(rec):
            return
        # messages of at most MAX_RECORDS records (the Outbox keeps each whole), each
        # tracked under its first record's seq
        seq0 = self._seq  # _next_seq len(rec) times
        rec["seq"] = np.arange(seq0, seq0 + len(rec)) if seq0 + len(rec) <= 0x100000000 else _seq_run(seq0, len(rec))
        self._seq = (seq0 + len(rec) - 1) % 0xFFFFFFFF + 1
        for i in range(0, len(rec), M.MAX_RECORDS):
            part = rec[i:i + M.MAX_RECORDS]
            self._emit(owner, M.T_ACTIVITY, part)
            self._track(owner, M.T_ACTIVITY, part, now, now + self.p.lease_s)
        self.count("restart_reports")

    # -- snapshot -------------------------------------------------------------------------------
    def snapshot(self, now: float) -> dict:
        """Plain data: clones held (to revalidate) and leases granted (remaining seconds)."""
        return {
            "borrowed": [[g, lender] for g, (lender, _) in self.borrowed.items()],
            "overrides": [[g, o] for g, o in (self.partition.overrides.items() if self.partition else ())],
            "clones": [[list(sk), c.owner, c.rule_id, c.dirs] for sk, c in self.clones.items()],
            "leases": [[list(sk), {str(h): max(0.0, t - now) for h, t in hs.items()}]
                       for sk, hs in self.leases.items()],
        }

    def restore(self, state: dict, now: float) -> None:
        """Leases granted before the restart keep holding their endpoints; clones are
        revalidated with their owners before use (never installed from the file)."""
        for sk, hs in state.get("leases", []):
            sk = tuple(sk)
            for h, left in hs.items():
                self._grant_many((sk,), int(h), now, until=now + float(left))
        if self.partition is not None:
            for g, o in state.get("overrides", []):
                self.partition.lend(int(g), int(o))
        for g, lender in state.get("borrowed", []):
            self.borrowed[int(g)] = (int(lender), now)
        clones = state.get("clones", [])
        if clones:
            recs = np.concatenate([session_rec(tuple(sk), owner=o, rule_id=rid, dirs=d) for sk, o, rid, d in clones])
            self.revalidate(recs, now)

    # -- introspection --------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A fetch pending or a message not yet acknowledged."""
        return bool(self.pending) or bool(self._unacked)

    def state(self) -> dict:
        return {
            "pending_flows": len(self.pending),
            "queued_frames": self.queued_total,
            "clones": len(self.clones),
            "leases": self.leases.n_leases,
            "unacked": len(self._unacked),
            "negative_cache": len(self.negative),
        }

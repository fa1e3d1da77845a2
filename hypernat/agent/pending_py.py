"""The holder's fetches in flight, in plain Python: the reference of ``_pending.pyx``.

``PendingTable`` keeps, per fetch in flight, its key (the fetch direction and the
flow-table key asked for), the owner asked, its seq, its timing, its flags, the frames
waiting for the answer and the remote source whose token it holds; beside it the
negative cache (keys NACKed recently, oldest first) and the fetch token bucket of each
remote source (least recently used first).  Every operation of the fetch client on that
state is a method here, taking a whole batch: start fetches for a batch of misses
(``fetch_rows``: layout.FETCH_ROW_DTYPE rows, their FETCH records into a ``FetchQueue``), check a RULE or NACK message's records against the fetches they
answer (``answer_rules``, ``answer_nacks``), send again or give up the fetches whose
retry wait passed (``due``: each fetch's timer is kept here, under (due time, seq), so
a fetch answered leaves no timer behind), fail or redirect an owner's fetches.  The
agent (``core.RuleAgent``) keeps the counters and the timers of the messages it keeps
until acknowledged.

The compiled table (``hypernat.agent._pending``) has the same interface and answers;
``tests/test_pending_table.py`` runs both on the same operation sequences (hypothesis).
This one is used when the extensions are not built (``HYPERNAT_NO_EXTENSIONS=1``).
"""
from __future__ import annotations

import collections
import heapq
import itertools
from bisect import bisect_left

import numpy as np

from .. import messages as M
from ..io.base import NO_FRAME, Frames
from ..layout import FETCH_ROW_DTYPE, KIND_ICMP_ERROR

IN = 1  # fetch direction (verdicts.IN); OUT = 0
DIR_BIT_OUT, DIR_BIT_IN = 1, 2  # rules.DIR_BIT_*
PROTO_ICMP = 1
MAX_SOURCES = 65536  # remote sources with a token bucket (least recently used dropped)
_KEY_PACK = M.KEY_STRUCT.pack
_RULE_HEAD = M.RULE_DTYPE.names[:11]
assert _RULE_HEAD == ("seq", "rule_id", "lease_ms", "int_addr", "ext_addr", "rem_addr", "int_port", "ext_port",
                      "rem_port", "owner", "proto")
_NACK_UNAVAILABLE = M.NACK["unavailable"]
_NACK_FILTERED = M.NACK["filtered"]
_INF = float("inf")


def _frames(pairs) -> Frames:
    """(frame, tag) pairs as one ``Frames``."""
    return Frames.of([f for f, _ in pairs], [t for _, t in pairs])


class Pending(tuple):
    """A fetch in flight as the table holds it (a copy)."""

    __slots__ = ()
    _fields = ("fetch_dir", "key", "owner", "seq", "first", "sent", "retry", "flags", "frames", "charged", "due")
    fetch_dir = property(lambda self: self[0])
    key = property(lambda self: self[1])  # (proto, saddr, sport, daddr, dport) in fetch_dir's table
    owner = property(lambda self: self[2])
    seq = property(lambda self: self[3])
    first = property(lambda self: self[4])
    sent = property(lambda self: self[5])
    retry = property(lambda self: self[6])
    flags = property(lambda self: self[7])
    frames = property(lambda self: self[8])  # the frames waiting, in arrival order (a list copy)
    charged = property(lambda self: self[9])  # remote source whose token it holds (-1: none)
    due = property(lambda self: self[10])  # when its timer comes up: its next retry, or its deadline


def fetch_record(fetch_dir: int, key: tuple, seq: int, flags: int) -> bytes:
    """The FETCH record (messages.KEY_DTYPE) asking for `key`, packed."""
    p, sa, sp, da, dp = key
    if fetch_dir == IN:  # (p, R, Rp, E, Ep)
        return _KEY_PACK(seq, 0, p, M.FETCH_BY_EXTERNAL, 0, flags, 0, da, sa, 0, dp, sp, 0)
    return _KEY_PACK(seq, 0, p, M.FETCH_BY_INTERNAL, 0, flags, sa, 0, da, sp, 0, dp, 0)  # (p, I, Ip, R, Rp)


def group_by_owner(owners: np.ndarray, recs: np.ndarray) -> list:
    """[(owner, its records)] of FETCH records `recs` queued for `owners` (one each):
    owners in the order of their first record, each one's records in order (copies)."""
    if not len(recs):
        return []
    o0 = int(owners[0])
    if (owners == o0).all():  # the common case: one owner
        return [(o0, recs.copy())]
    uniq, first = np.unique(owners, return_index=True)
    return [(int(uniq[u]), recs[owners == uniq[u]]) for u in np.argsort(first, kind="stable")]


class FetchQueue:
    """The FETCH records waiting to be sent (messages.KEY_DTYPE), each with the owner it
    goes to: what a batch's fetches, retries and redirects write (``PendingTable``), one
    message per owner at the end of the batch (``take``)."""

    def __init__(self):
        self._owners: list = []
        self._recs: list = []

    def push(self, owner: int, rec: bytes) -> None:
        self._owners.append(owner)
        self._recs.append(rec)

    def __len__(self):
        return len(self._owners)

    def __bool__(self):
        return bool(self._owners)

    def view(self) -> tuple:
        """(owners int32[n], records KEY_DTYPE[n]) queued, in order (copies)."""
        return (np.array(self._owners, np.int32),
                np.frombuffer(b"".join(self._recs), M.KEY_DTYPE).copy())

    def take(self) -> list:
        """[(owner, KEY_DTYPE records)], ``group_by_owner``; the queue is left empty."""
        owners, recs = self.view()
        self._owners, self._recs = [], []
        return group_by_owner(owners, recs)


class PendingTable:
    """Fetches in flight, the negative cache and the per-source token buckets (dicts)."""

    def __init__(self, queue_total: int, queue_per_flow: int, retry_s: float, fetch_burst: float,
                 fetch_rate: float, negative_ttl_s: float, negative_max: int, capacity: int = 1024,
                 max_sources: int = MAX_SOURCES):
        self.src_max = int(max_sources)
        self.qmax, self.qflow, self.retry_s = int(queue_total), int(queue_per_flow), float(retry_s)
        self.burst, self.rate = float(fetch_burst), float(fetch_rate)
        self.neg_ttl, self.neg_max = float(negative_ttl_s), int(negative_max)
        # (fetch_dir, key) -> [fd, key, owner, seq, first, sent, retry, flags, frames, charged, due, stamp]
        self._p: dict = {}
        self._s: dict = {}  # seq -> (fetch_dir, key)
        self._neg: collections.OrderedDict = collections.OrderedDict()  # (fetch_dir, key) -> until
        self._src: collections.OrderedDict = collections.OrderedDict()  # remote -> [tokens, t]
        # the fetches' timers: (due, seq, stamp), a heap; an item whose fetch is gone or
        # was queued again since (another stamp) is skipped when it comes up, and the
        # heap is rebuilt from the live fetches when such items outnumber them
        self._h: list = []
        self._stamps = itertools.count()
        self.queued = 0
        self.walks = 0

    # -- lookups ------------------------------------------------------------------------
    def __len__(self):
        return len(self._p)

    def __bool__(self):
        return bool(self._p)

    def __contains__(self, pk):
        return pk in self._p

    def get(self, pk, default=None):
        r = self._p.get(pk)
        return default if r is None else Pending(r[:8] + [[f for f, _ in r[8]], r[9], r[10]])

    def __getitem__(self, pk):
        got = self.get(pk)
        if got is None:
            raise KeyError(pk)
        return got

    def items(self):
        """Every fetch, [((fetch_dir, key), Pending)]: a walk (counted in `walks`)."""
        self.walks += 1
        return [(pk, Pending(r[:8] + [[f for f, _ in r[8]], r[9], r[10]])) for pk, r in self._p.items()]

    def keys(self):
        return [pk for pk, _ in self.items()]

    def values(self):
        return [p for _, p in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def seqs(self) -> dict:
        """{seq: (fetch_dir, key)} of every fetch (a walk)."""
        self.walks += 1
        return dict(self._s)

    # -- internals ------------------------------------------------------------------------
    def _remove(self, pk) -> list:
        r = self._p.pop(pk)
        del self._s[r[3]]
        self.queued -= len(r[8])
        return r

    def _refund(self, r) -> None:
        if r[9] >= 0:
            b = self._src.get(r[9])
            if b is not None:
                t = b[0] + 1.0
                b[0] = t if t < self.burst else self.burst
            r[9] = -1

    def _set_due(self, r, due: float) -> None:
        """Fetch record `r`'s timer (re)queued to `due` (an older item of it goes stale)."""
        r[10], r[11] = due, next(self._stamps)
        h = self._h
        if len(h) > 64 and len(h) > 2 * len(self._p):  # mostly stale: rebuilt from the live ones
            h[:] = [(q[10], q[3], q[11]) for q in self._p.values() if q is not r]
            heapq.heapify(h)
        heapq.heappush(h, (due, r[3], r[11]))

    def _top(self):
        """The heap's first live item (stale ones on top dropped), or None."""
        h, p, s = self._h, self._p, self._s
        while h:
            d, seq, stamp = h[0]
            pk = s.get(seq)
            if pk is not None and p[pk][11] == stamp:
                return h[0]
            heapq.heappop(h)
        return None

    @staticmethod
    def _queue(fq: FetchQueue, r) -> None:
        fq.push(r[2], fetch_record(r[0], r[1], r[3], r[7]))

    # -- the fetch client's operations -----------------------------------------------------
    def fetch_rows(self, rows, frames, now: float, seq: int, fq: FetchQueue) -> tuple:
        """Misses `rows` (layout.FETCH_ROW_DTYPE: fetch_dir, key, kind, owner), in order,
        `frames` the frame of each (``io.base.Frames``, frame j row j's, its tag kept
        with it -- a sequence of bytes / None is taken through ``Frames.of`` --, or None:
        none); a queued frame is a copy (it outlives the batch).  A flow
        with a fetch pending queues the frame (per-flow and total bounds: full);
        otherwise a recent NACK drops it (negative), an incoming fetch takes a token of
        its remote's bucket (rate when empty), and a new fetch starts under the next seq
        (its FETCH record into `fq`, for its owner; the frame queued unless the total
        bound is reached; kind KIND_ICMP_ERROR: flagged FETCH_F_ICMP_ERROR).  Returns
        (frames queued, fetches started, negative, rate, full, next seq)."""
        n = started = c_neg = c_rate = c_full = 0
        p, s, neg, src = self._p, self._s, self._neg, self._src
        burst, rate = self.burst, self.rate
        if getattr(rows, "dtype", None) != FETCH_ROW_DTYPE:
            raise TypeError("rows must be a layout.FETCH_ROW_DTYPE array")
        if frames is None:
            frames = [None] * len(rows)
        else:
            fr = Frames.of(frames)
            if len(fr) != len(rows):
                raise ValueError(f"{len(fr)} frames for {len(rows)} rows")
            b = fr.buf
            pos = list(zip(fr.offsets[:fr.n].tolist(), fr.lengths[:fr.n].tolist()))
            for j, (o, ln) in enumerate(pos):  # every frame inside the buffer, before anything changes
                if o != NO_FRAME and o + ln > len(b):
                    raise ValueError(f"frame {j} ({o}+{ln}) outside a buffer of {len(b)} bytes")
            frames = [None if o == NO_FRAME else (b[o:o + ln].tobytes(), t) for (o, ln), t in zip(pos, fr.tag_list())]
        for (sa, da, sp, dp, proto, kind, _fl, fd, _j, owner), frame in zip(rows.tolist(), frames):
            fd = IN if fd else 0
            kt = (proto, sa, sp, da, dp)
            icmp = kind == KIND_ICMP_ERROR
            pk = (fd, kt)
            r = p.get(pk)
            if r is not None:
                if frame is not None:
                    if self.queued >= self.qmax or len(r[8]) >= self.qflow:
                        c_full += 1
                        continue
                    r[8].append(frame)
                    self.queued += 1
                    n += 1
                continue
            until = neg.get(pk)
            if until is not None:
                if until > now:
                    c_neg += 1
                    continue
                del neg[pk]
            charged = -1
            if fd == IN:
                remote = kt[1]
                b = src.get(remote)
                if b is None:
                    b = src[remote] = [burst, now]
                    if len(src) > self.src_max:
                        src.popitem(last=False)
                else:
                    src.move_to_end(remote)
                    t = b[0] + (now - b[1]) * rate
                    b[0] = t if t < burst else burst  # min(burst, t), NaN included
                    b[1] = now
                if b[0] < 1.0:
                    c_rate += 1
                    continue
                b[0] -= 1.0
                charged = remote
            if frame is not None and self.queued >= self.qmax:
                c_full += 1
                frame = None  # the fetch still goes out: later packets will find the rule
            r = [fd, kt, owner, seq, now, now, self.retry_s, M.FETCH_F_ICMP_ERROR if icmp else 0,
                 [] if frame is None else [frame], charged, 0.0, 0]
            p[pk] = r
            s[seq] = pk
            self._set_due(r, now + r[6])
            self._queue(fq, r)
            seq = (seq + 1) & 0xFFFFFFFF or 1
            started += 1
            if frame is not None:
                self.queued += 1
                n += 1
        return n, started, c_neg, c_rate, c_full, seq

    def start(self, fetch_dir: int, key: tuple, owner: int, now: float, flags: int, seq: int, fq: FetchQueue) -> None:
        """A fetch without frame or token (a clone revalidated): its record into `fq`."""
        r = [fetch_dir, tuple(key), owner, seq, now, now, self.retry_s, flags, [], -1, 0.0, 0]
        self._p[(fetch_dir, r[1])] = r
        self._s[seq] = (fetch_dir, r[1])
        self._set_due(r, now + r[6])
        self._queue(fq, r)

    def answer_rules(self, source: int, recs, owners, now: float, lat_limits) -> tuple:
        """RULE records (messages.RULE_DTYPE) from NIC `source`, each checked against the
        fetch in flight under its seq: none (dup), the endpoint not `source`'s by the
        record or by `owners` (its owner per record, -1 outside: bad_owner, by index),
        the fetch sent to another NIC (wrong), another key than asked (bad).  A record
        that passes completes its fetch: removed, token refunded.  Returns (the indexes
        of the records accepted (int64, in order), the dir bit of each record's fetch
        (uint8 per record, 0: not accepted), frames to replay out, in (``Frames``: flows
        in answer order, each one's frames in arrival order, with their tags), latencies
        (float64 per accepted record), latencies per bucket of `lat_limits` (+1 above), dup,
        wrong, bad, bad_owner)."""
        acc, rout, rin, lats, bad_owner = [], [], [], [], []
        dirs = np.zeros(len(recs), np.uint8)
        counts = [0] * (len(lat_limits) + 1)
        dup = wrong = bad = 0
        p, s = self._p, self._s
        rows = zip(*[recs[f].tolist() for f in _RULE_HEAD]) if len(recs) else ()
        for x, (seq, rule_id, lease_ms, ia, ea, ra, ip, ep, rp, claimed, proto) in enumerate(rows):
            pk = s.get(seq)
            if pk is None:
                dup += 1
                continue
            r = p[pk]
            if claimed != source or owners[x] != source:
                bad_owner.append(x)
                continue
            if r[2] != source:
                wrong += 1
                continue
            icmp = proto == PROTO_ICMP
            if r[0] == IN:
                fkey = (proto, ra, ep if icmp else rp, ea, ep)
                dbit = DIR_BIT_IN
            else:
                fkey = (proto, ia, ip, ra, ip if icmp else rp)
                dbit = DIR_BIT_OUT
            if fkey != r[1]:
                bad += 1
                continue
            self._remove(pk)
            self._refund(r)
            acc.append(x)
            dirs[x] = dbit
            (rin if dbit == DIR_BIT_IN else rout).extend(r[8])
            lat = now - r[4]
            lats.append(lat)
            counts[bisect_left(lat_limits, lat)] += 1
        return (np.array(acc, np.int64), dirs, _frames(rout), _frames(rin), np.array(lats, np.float64), counts, dup,
                wrong, bad, bad_owner)

    def answer_nacks(self, source: int, recs, now: float) -> tuple:
        """NACK records (messages.KEY_DTYPE, the FETCH echoed) from `source`, matched
        like RULEs: the fetch under the seq (stale), sent to `source` (wrong), for the
        key the record names (bad).  A refusal that passes drops its fetch and frames;
        its token is refunded when the owner was unavailable, kept otherwise; a no-rule
        answer (anything but unavailable and filtered) enters the negative cache.
        Returns (stale, wrong, bad, nacked frames (1 per fetch without), revalidations
        lost)."""
        stale = wrong = bad = nacked = lost = 0
        p, s = self._p, self._s
        for seq, _, proto, kind, reason, _, ia, ea, ra, ip, ep, rp, _ in M.KEY_STRUCT.iter_unpack(recs.tobytes()):
            pk = s.get(seq)
            if pk is None:
                stale += 1
                continue
            r = p[pk]
            if r[2] != source:
                wrong += 1
                continue
            asked = (IN, (proto, ra, rp, ea, ep)) if kind == M.FETCH_BY_EXTERNAL else (0, (proto, ia, ip, ra, rp))
            if asked != pk:
                bad += 1
                continue
            self._remove(pk)
            nacked += max(1, len(r[8]))
            if reason == _NACK_UNAVAILABLE:
                self._refund(r)  # the owner could not answer: not the remote's doing
            elif reason != _NACK_FILTERED:  # no rule: remembered (a filtered answer can change)
                self.neg_set(pk, now + self.neg_ttl)
            if r[7] & M.FETCH_F_REVALIDATE:
                lost += 1
        return stale, wrong, bad, nacked, lost

    def pop(self, pk):
        """Complete the fetch of `pk` out of band (a PUSH brought its rule): its frames
        (``Frames``; token refunded), or None if none is in flight."""
        if pk not in self._p:
            return None
        r = self._remove(pk)
        self._refund(r)
        return _frames(r[8])

    def pop_many(self, pks) -> Frames:
        """``pop`` of every key of `pks` in flight: their frames together, in that order."""
        out = []
        for pk in pks:
            if pk in self._p:
                r = self._remove(pk)
                self._refund(r)
                out.extend(r[8])
        return _frames(out)

    def due(self, now: float, limit: int, retry_max: float, timeout: float, fq: FetchQueue) -> tuple:
        """The fetches whose timer came up by `now`, at most `limit`, earliest first (due
        time, then seq): each one `timeout` past its start is given up (removed, token
        refunded), the others are sent again (their records into `fq`; the wait doubles
        up to `retry_max`, the next due time is min(now + wait, start + timeout)).  A
        fetch answered left nothing to look at.  Returns (sent again, given up, frames
        dropped (1 per fetch given up without))."""
        again = gone = dropped = 0
        lim = now + 1e-6
        while again + gone < limit:
            top = self._top()
            if top is None or top[0] > lim:
                break
            heapq.heappop(self._h)
            pk = self._s[top[1]]
            r = self._p[pk]
            if lim >= r[4] + timeout:  # past its deadline: given up
                self._remove(pk)
                self._refund(r)
                gone += 1
                dropped += max(1, len(r[8]))
                continue
            r[5] = now
            r[6] = min(r[6] * 2, retry_max)
            self._queue(fq, r)
            self._set_due(r, min(now + r[6], r[4] + timeout))
            again += 1
        return again, gone, dropped

    @property
    def next_due(self) -> float:
        """When the earliest fetch comes due (its retry or its deadline; inf: none)."""
        top = self._top()
        return _INF if top is None else top[0]

    @property
    def timers(self) -> int:
        """Items in the timer structure (stale ones included: at most about 2x the fetches)."""
        return len(self._h)

    def advance_all(self, now: float) -> None:
        """Every fetch due at `now` at the latest (those due later moved to `now`): after a
        coordinator restart, everything unanswered is sent again from the next ``due`` on."""
        for r in self._p.values():
            if r[10] > now:
                r[10] = now
        self._h = [(r[10], r[3], r[11]) for r in self._p.values()]
        heapq.heapify(self._h)

    def fail_owner(self, owner: int) -> int:
        """Drop every fetch sent to `owner` (tokens refunded): frames dropped (1 per fetch
        without)."""
        n = 0
        for pk in [pk for pk, r in self._p.items() if r[2] == owner]:
            r = self._remove(pk)
            self._refund(r)
            n += max(1, len(r[8]))
        return n

    def of_owner(self, owner: int, fetch_dir: int) -> list:
        """[(seq, key)] of the fetches in `fetch_dir` sent to `owner` (a walk)."""
        return [(r[3], r[1]) for r in self._p.values() if r[2] == owner and r[0] == fetch_dir]

    def reseq(self, seq: int, owner: int, new_seq: int, now: float, timeout: float, fq: FetchQueue) -> float:
        """Ask `owner` instead, under `new_seq` (a NACK of the old seq finds nothing), its
        retry wait reset: its record into `fq`; returns its next due time."""
        pk = self._s.pop(seq)
        r = self._p[pk]
        r[2], r[3], r[5], r[6] = owner, new_seq, now, self.retry_s
        self._s[new_seq] = pk
        due = min(now + r[6], r[4] + timeout)
        self._set_due(r, due)
        self._queue(fq, r)
        return due

    # -- the negative cache -------------------------------------------------------------------
    def neg_get(self, pk, default=None):
        return self._neg.get(pk, default)

    def neg_set(self, pk, until: float) -> None:
        """Remember `pk` until `until` (a key remembered keeps its place; the oldest beyond
        negative_max is forgotten)."""
        self._neg[pk] = until
        if len(self._neg) > self.neg_max:
            self._neg.popitem(last=False)

    def neg_discard(self, pk) -> None:
        self._neg.pop(pk, None)

    def neg_discard_rules(self, recs, idx, dirs) -> None:
        """Drop the negative-cache entries of the keys the RULE records `recs` selected by
        `idx` answer: per record its `dirs` (DIR_BIT_*, scalar or per record), the out key
        and / or the in key of the session (an answer ends a refusal)."""
        if not self._neg or not len(idx):
            return
        dl = np.broadcast_to(np.asarray(dirs, np.uint8), (len(recs),)).tolist()
        for x in np.asarray(idx, np.int64).reshape(-1).tolist():
            r = recs[x]
            p, ia, ip = int(r["proto"]), int(r["int_addr"]), int(r["int_port"])
            ea, ep, ra, rp = int(r["ext_addr"]), int(r["ext_port"]), int(r["rem_addr"]), int(r["rem_port"])
            icmp = p == PROTO_ICMP
            if dl[x] & DIR_BIT_OUT:
                self._neg.pop((0, (p, ia, ip, ra, ip if icmp else rp)), None)
            if dl[x] & DIR_BIT_IN:
                self._neg.pop((IN, (p, ra, ep if icmp else rp, ea, ep)), None)

    def neg_len(self) -> int:
        return len(self._neg)

    def neg_items(self) -> list:
        """[((fetch_dir, key), until)], oldest first."""
        return list(self._neg.items())

    def source_items(self) -> list:
        """[(remote, [tokens, last refill])], least recently used first."""
        return [(k, list(v)) for k, v in self._src.items()]

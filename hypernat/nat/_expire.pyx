# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Idle expiry's per-session work, compiled (issue 11: the work done once per connection,
expiry included, is compiled; Python sees what it must as arrays drained once per step).

``out_candidates`` picks one sweep step's candidates in a slice of the out table: owned
entries idle for their protocol's shortest timeout, clones whose lease ran out, at most
a budget of them (the slice ends after the last one taken).

``expire_out`` runs one sweep step's candidate out entries (``hypernat.nat.expiry.Expiry``
picks them with numpy over a bounded slice of slots): per candidate the in entry
(``FlowTable.c_find``), the merged last_seen and TCP state, the timeout class
(``tmo_class``: the one classification of a session's idle timeout and of its expiry
counter), and for an idle one its two entries deleted (at the end of the step: the
candidates' slot indices stay valid while the loop runs) and, when a live mapping owns
it (an orphan entry is just deleted), its bookkeeping: ``SessionEnd.end_c``.

``SessionEnd`` is the owner's bookkeeping of a session that ends (bound to the builder's
``Mappings``, ``Hosts`` and ``PortBlocks``): the mapping's session count
(``Mappings.end_session_c``), the translation log's "remove" event (an ``EventRing``:
a mapping each in local mode, a session each with ``remote``), the REVOKE record (while
``revoke``: ``RuleBuilder.track_removed``), and when the mapping ends with it
``Mappings.end_c``, the host's live-mapping count (``Hosts.add_ports_c``) and the
endpoint's reuse-delay entry.  ``drain`` hands Python the three as arrays, once per step
(``RuleBuilder.flush_log``: ``BlockPool.defer_many``, ``Recovery.forget``,
``TransLog.rules("remove", ...)``, ``drain_removed``).
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define hn_exp_prefetch(p) __builtin_prefetch((const void *)(p), 1, 3)
    #else
    #define hn_exp_prefetch(p) ((void)(p))
    #endif
    """
    void hn_exp_prefetch(const void *p) noexcept nogil

import numpy as np

cimport numpy as cnp

from .._fastpath cimport FlowTable, hn_flow_hash, hn_slot
from ._events cimport EV_MAPPING, EV_SESSION, EventRing
from ._hosts cimport Hosts
from ._mappings cimport MapRec, Mappings
from ._ports cimport PortBlocks

from .._fastpath import FlowTable as _FlowTable
from ..layout import SLOT_DTYPE
from .records import SESSION_DTYPE

cnp.import_array()

DEF P_ICMP = 1
DEF P_TCP = 6
DEF P_UDP = 17
DEF T_FIN = 0x01
DEF T_SYN = 0x02
DEF T_RST = 0x04
DEF F_OCC = 0x01
DEF F_CLONE = 0x02
DEF DIRS_BOTH = 3
DEF LOOKAHEAD = 4     # expire_out starts loading a candidate's lines this many ahead

# the timeout classes: indexes of Expiry's timeouts and of hypernat.nat.expiry.EXPIRY_EVENTS
TCP_ESTABLISHED, TCP_TRANSITORY, UDP, ICMP = 0, 1, 2, 3


ENDED_DTYPE = np.dtype([("release_at", "<i8"), ("ekey", "<i8"), ("block", "<i8"), ("pidx", "<i4"),
                        ("offset", "<i4")])
if SESSION_DTYPE.itemsize != sizeof(sess_rec) or ENDED_DTYPE.itemsize != sizeof(Ended):
    raise ImportError("hypernat.nat._expire: a dtype disagrees with its struct: rebuild it")


cdef inline int tmo_class(uint8_t p, uint8_t tcp_out, uint8_t tcp_in) noexcept nogil:
    """The idle-timeout class of a session from its protocol and the TCP flags seen each way.

    TCP: RST or FIN seen -> transitory (RFC 5382 REQ-5; a RST keeps the session for the
    transitory timeout, RFC 7857 2.2); SYN both ways and nothing else -> established; SYN
    one way only -> transitory (partially open); no flag seen (picked up mid-stream, e.g.
    restored) -> established.  UDP / ICMP (and any other protocol): their own."""
    cdef uint8_t st
    if p == P_TCP:
        st = tcp_out | tcp_in
        if st & (T_RST | T_FIN):
            return 1
        if tcp_out & T_SYN and tcp_in & T_SYN:
            return 0
        if st & T_SYN:
            return 1
        return 0
    if p == P_UDP:
        return 2
    return 3


def timeout_class(uint8_t p, uint8_t tcp_out, uint8_t tcp_in):
    """``tmo_class`` (TCP_ESTABLISHED, TCP_TRANSITORY, UDP, ICMP)."""
    return tmo_class(p, tcp_out, tcp_in)


cdef inline double _clock() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef class SessionEnd:
    """SessionEnd(maps, hosts, blocks): the bookkeeping of sessions that end, recorded until
    ``drain`` (see the module docstring).  Settings the owner keeps current: ``revoke``
    (record REVOKE records), ``reuse_delay``, ``nic``, and ``events.mappings`` /
    ``events.sessions`` (the per-rule log's "remove" lines: local mode / ``remote``)."""

    def __cinit__(self, Mappings maps not None, Hosts hosts not None, PortBlocks blocks not None):
        self.maps, self.hosts, self.blocks = maps, hosts, blocks
        self.events = EventRing()
        self.e = NULL
        self.r = NULL
        self.ne = self.ecap = self.nr = self.rcap = 0

    def __dealloc__(self):
        free(self.e)
        free(self.r)

    def bound_to(self, maps, hosts, blocks):
        """These are the tables it works on (a restore replaces them)."""
        return maps is self.maps and hosts is self.hosts and blocks is self.blocks

    cdef int end_c(self, uint32_t rid, uint32_t ra, uint16_t rp, int64_t now, uint32_t last, uint8_t so,
                   uint8_t si) except -2:
        """Session (rid, R, Rp) ended (its entries are being deleted): -1 if it was not
        there, 1 if its mapping ended with it, else 0."""
        cdef MapRec* m = self.maps.live_c(rid)
        if m == NULL:
            return -1
        cdef int64_t left = self.maps.end_session_c(rid, ra, rp)
        if left < 0:
            return -1
        cdef uint8_t p = m.proto
        cdef uint32_t ia = m.iaddr, ea = m.eaddr
        cdef uint16_t ip = m.iport, ep = m.eport
        cdef int64_t g = m.block
        cdef sess_rec* x
        cdef Ended* d
        self.events.record(EV_SESSION, p, ia, ip, ea, ep, ra, rp, rid, <uint32_t>now)  # (with remote)
        if self.revoke:
            if self.nr == self.rcap:
                x = <sess_rec*>realloc(self.r, (self.rcap * 2 + 64) * sizeof(sess_rec))
                if x == NULL:
                    raise MemoryError()
                self.r, self.rcap = x, self.rcap * 2 + 64
            x = &self.r[self.nr]
            x.iaddr, x.eaddr, x.raddr, x.iport, x.eport, x.rport = ia, ea, ra, ip, ep, rp
            x.proto, x.dirs, x.rule_id, x.last_seen = p, DIRS_BOTH, rid, last
            x.tcp_out, x.tcp_in, x.owner, x.flags = so, si, self.nic, 0
            self.nr += 1
        if left:
            return 0
        # the mapping ends: its endpoint stays marked used in its block until the reuse
        # delay has passed and no lease is held on it (invariant 3)
        cdef int32_t s = self.blocks.slot_of(g)
        if s < 0:
            raise KeyError(g)
        cdef int pi = 0 if p == P_TCP else (1 if p == P_UDP else 2)
        self.maps.end_c(rid)
        self.hosts.add_ports_c(ia, pi, -1)
        self.events.record(EV_MAPPING, p, ia, ip, ea, ep, 0, 0, rid, <uint32_t>now)  # (local mode)
        if self.ne == self.ecap:
            d = <Ended*>realloc(self.e, (self.ecap * 2 + 64) * sizeof(Ended))
            if d == NULL:
                raise MemoryError()
            self.e, self.ecap = d, self.ecap * 2 + 64
        d = &self.e[self.ne]
        d.release_at = now + self.reuse_delay
        d.ekey = <int64_t>p << 48 | <int64_t>ea << 16 | ep
        d.block, d.pidx, d.offset = g, pi, <int32_t>ep - <int32_t>self.blocks.s_lo[s]
        self.ne += 1
        return 1

    def end_session(self, uint32_t rid, uint32_t ra, uint16_t rp, int64_t now, uint32_t last_seen=0,
                    uint8_t tcp_out=0, uint8_t tcp_in=0):
        """``end_c``: True if the mapping ended with the session."""
        return self.end_c(rid, ra, rp, now, last_seen, tcp_out, tcp_in) == 1

    def drain(self):
        """(ended: ENDED_DTYPE, removed: SESSION_DTYPE, events: EVENT_DTYPE of kind
        MAPPING / SESSION) recorded since the last call, in order; empty after."""
        ended = np.empty(self.ne, ENDED_DTYPE)
        removed = np.empty(self.nr, SESSION_DTYPE)
        cdef uint8_t[::1] b
        if self.ne:
            b = ended.view(np.uint8)
            memcpy(&b[0], self.e, self.ne * sizeof(Ended))
        if self.nr:
            b = removed.view(np.uint8)
            memcpy(&b[0], self.r, self.nr * sizeof(sess_rec))
        self.ne = self.nr = 0
        return ended, removed, self.events.drain()

    def pending(self):
        """Anything recorded and not drained."""
        return self.ne > 0 or self.nr > 0 or len(self.events) > 0


cdef hn_slot* _slots(table, Py_ssize_t* n) except NULL:
    """The slot array of a flow table of either implementation (the compiled one, or the
    plain-Python reference hypernat.fastpath_py: both keep ``slots``, SLOT_DTYPE)."""
    cdef cnp.ndarray a = table.slots
    if a.dtype != SLOT_DTYPE or not a.flags.c_contiguous or a.ndim != 1 or a.shape[0] == 0:
        raise TypeError("a flow table's slots must be a contiguous SLOT_DTYPE array")
    n[0] = a.shape[0]
    return <hn_slot*>cnp.PyArray_DATA(a)


cdef inline void _prefetch(SessionEnd se, FlowTable inn, hn_slot* o) noexcept:
    """Start loading the lines candidate `o` reads first: its in entry's home slot (a
    compiled table: `inn` not None), its mapping's (``Mappings.prefetch_end``), its host's."""
    cdef uint8_t p = o.proto
    cdef uint16_t sp = o.new_port if p == P_ICMP else o.dport
    if inn is not None:
        hn_exp_prefetch(&inn.t.s[hn_flow_hash(p, o.daddr, sp, o.new_addr, o.new_port) & inn.t.mask])
    se.maps.prefetch_end(p, o.saddr, o.sport, o.new_addr, o.new_port, o.rule_id, o.daddr, 0 if p == P_ICMP else sp)
    se.hosts.prefetch(o.saddr)


cdef inline bint _matches(Mappings maps, hn_slot* o) noexcept:
    cdef MapRec* m = maps.live_c(o.rule_id)
    return m != NULL and m.iaddr == o.saddr and m.iport == o.sport and m.eaddr == o.new_addr \
        and m.eport == o.new_port


cdef _records(const hn_slot* r, Py_ssize_t n):
    """n slot records as a SLOT_DTYPE array (a copy)."""
    a = np.empty(n, SLOT_DTYPE)
    cdef uint8_t[::1] b
    if n:
        b = a.view(np.uint8)
        memcpy(&b[0], r, n * sizeof(hn_slot))
    return a


def out_candidates(out, int64_t lo, int64_t hi, int64_t now, double t_floor, double t_tcp,
                   double t_udp, double t_icmp, int64_t budget, bint lease_clones):
    """Candidates of one step in out-table slots [lo, hi): (the owned entries' slot
    indices, the clones', each ascending in an int64 array; where the slice ends).

    An owned entry is one if it is idle for its protocol's shortest timeout (`t_tcp`,
    `t_udp`, `t_icmp`); with `lease_clones`, a clone is one if its lease ran out (16-bit
    serial arithmetic on ``now & 0xFFFF``).  A mass expiry looks at a few at a time: past
    4 * `budget` entries idle for `t_floor` (the shortest timeout: clones and owned alike)
    the slice ends at the 4 * budget-th; past `budget` candidates it ends at the
    budget-th."""
    cdef Py_ssize_t nslots
    cdef hn_slot* t = _slots(out, &nslots)
    if lo < 0 or hi < lo or hi > nslots:
        raise ValueError(f"slots [{lo}, {hi}) outside the table")
    sel = np.empty(hi - lo, np.int64)
    cdef int64_t[::1] sv = sel
    cdef Py_ssize_t ns = 0
    cdef int64_t j, nf = 0, jcut = -1, mass = 4 * budget
    cdef bint floor = now >= t_floor
    cdef double lim = now - t_floor, thr
    cdef int64_t nl = now & 0xFFFF
    cdef hn_slot* s
    for j in range(lo, hi):
        s = &t[j]
        if floor and s.flags & F_OCC and s.last_seen <= lim:
            if jcut >= 0:  # more than 4 * budget: the slice ends at the 4 * budget-th
                hi = jcut
                while ns and sv[ns - 1] >= hi:
                    ns -= 1
                break
            nf += 1
            if nf == mass:
                jcut = j + 1
            thr = t_tcp if s.proto == P_TCP else (t_udp if s.proto == P_UDP else t_icmp)
            if not s.flags & F_CLONE and now - <int64_t>s.last_seen >= thr:
                sv[ns] = j
                ns += 1
                continue
        if lease_clones and s.flags & F_CLONE and s.lease != 0 and ((nl - s.lease) & 0xFFFF) < 0x8000:
            sv[ns] = j
            ns += 1
    if ns > budget:
        ns = budget
        hi = sv[ns - 1] + 1
    cdef Py_ssize_t k, no = 0, nc = 0
    clones = np.empty(ns, np.int64)
    cdef int64_t[::1] cv = clones
    for k in range(ns):
        if t[sv[k]].flags & F_CLONE:
            cv[nc] = sv[k]
            nc += 1
        else:
            sv[no] = sv[k]
            no += 1
    return sel[:no], clones[:nc], hi


def expire_out(SessionEnd se not None, out, inn, const int64_t[::1] where,
               int64_t now, const double[::1] timeouts, double budget_s, int64_t[::1] counts):
    """Expire the idle ones among the out entries at slot indices `where` (owned entries,
    not clones; ascending): `timeouts` by class, `counts` (by class) += the sessions
    expired; stop once `budget_s` seconds are spent (checked before each candidate once
    one entry went; at least one goes).  A candidate still active keeps the merged
    last_seen in its out entry.  Returns (the slot index to resume at, or -1 if all were
    handled, sessions expired, mappings removed).

    The tables are compiled FlowTables (C lookups and deletions), or both the plain-Python
    reference's (hypernat.fastpath_py: its ``lookup`` per candidate and ``delete_batch``
    at the end; the same slot arrays read and written)."""
    if timeouts.shape[0] != 4 or counts.shape[0] != 4:
        raise ValueError("timeouts and counts: 4 classes")
    cdef bint cc = type(out) is _FlowTable and type(inn) is _FlowTable
    cdef FlowTable ci = inn if cc else None
    cdef Py_ssize_t n_out, n_in
    cdef hn_slot* to = _slots(out, &n_out)
    cdef hn_slot* ti = _slots(inn, &n_in)
    cdef Py_ssize_t n = where.shape[0], k, nd = 0
    cdef int64_t stop = -1, j
    cdef long expired = 0, removed = 0
    cdef hn_slot* o
    cdef hn_slot* q
    cdef uint8_t p, so, si, c
    cdef uint16_t rr, sp
    cdef uint32_t last, ls_i
    cdef int ended
    cdef double deadline = _clock() + budget_s
    cdef Py_ssize_t nin = 0
    for k in range(n):
        if where[k] < 0 or where[k] >= n_out:
            raise ValueError(f"slot {where[k]} outside the out table")
    cdef hn_slot* keys = <hn_slot*>malloc((2 * n + 1) * sizeof(hn_slot))  # dead keys: out [0, n), in [n, 2n)
    if keys == NULL:
        raise MemoryError()
    try:
        for k in range(min(n, LOOKAHEAD)):
            _prefetch(se, ci, &to[where[k]])
        for k in range(n):
            if nd and _clock() > deadline:
                stop = where[k]
                break
            if k + LOOKAHEAD < n:
                _prefetch(se, ci, &to[where[k + LOOKAHEAD]])
            o = &to[where[k]]
            p = o.proto
            if p == P_ICMP:
                rr, sp = 0, o.new_port
            else:
                rr = sp = o.dport
            if cc:
                j = ci.c_find(p, o.daddr, sp, o.new_addr, o.new_port)
            else:
                j = inn.lookup(p, o.daddr, sp, o.new_addr, o.new_port)
            so = o.tcp_state
            if j >= 0:
                q = &ti[j]
                ls_i, si = q.last_seen, q.tcp_state
                last = o.last_seen if o.last_seen >= ls_i else ls_i
            else:
                si = 0
                last = o.last_seen
            c = tmo_class(p, so, si)
            if now - <int64_t>last < timeouts[c]:
                o.last_seen = last  # remember the merged activity: not a candidate again soon
                continue
            # dead: the out key, the in key (an owned in entry only)
            keys[nd] = o[0]
            nd += 1
            if j >= 0 and not ti[j].flags & F_CLONE:
                q = &keys[n + nin]
                q.proto, q.saddr, q.sport, q.daddr, q.dport = p, o.daddr, sp, o.new_addr, o.new_port
                nin += 1
            if not _matches(se.maps, o):
                continue  # an orphan entry (no bookkeeping): just delete it
            expired += 1
            counts[c] += 1
            ended = se.end_c(o.rule_id, o.daddr, rr, now, last, so, si)
            if ended == 1:
                removed += 1
        if cc:
            (<FlowTable>out)._mutating()
            ci._mutating()
            for k in range(nd):
                q = &keys[k]
                (<FlowTable>out).c_delete(q.proto, q.saddr, q.sport, q.daddr, q.dport)
            for k in range(nin):
                q = &keys[n + k]
                ci.c_delete(q.proto, q.saddr, q.sport, q.daddr, q.dport)
        else:
            out.delete_batch(_records(keys, nd))
            inn.delete_batch(_records(&keys[n], nin))
    finally:
        free(keys)
    return stop, expired, removed


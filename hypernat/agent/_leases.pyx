# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The owner's leases, compiled: ``leases_py.LeaseTable`` in C.

One ``le_entry`` per lease, a (session, holder) pair (``_leases.pxd``): no Python object
per lease.  Leases are found by session (proto, R, Rp, E, Ep), a chain of the leases
sharing that key (the internal endpoint and the holder tell them apart), and by
external endpoint, through the entry store shared with the clone table
(``_entries.pxd``), and by end through a heap (``_heap.pxd``).  ``grant`` takes a batch of served sessions (records read in place),
``held`` the records of one ACTIVITY message (read in place, ``_wire.pxd``), ``due`` a
slice of the timers.  ``leases_py`` is the plain-Python reference with the same
interface; ``tests/test_pending_table.py`` checks them against each other.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from .._entries cimport (en_add, en_chain, en_find, en_full, en_head, en_init, en_on_endpoint, en_realloc,
                         en_reindex, en_release, en_unlink)
from .._heap cimport heap_free, heap_init, heap_pop, heap_push
from .._wire cimport wire_activity, wire_rule
from .._clones cimport rec_selection, rec_u16, rec_u32, rec_view, rec_view_of
from ..nat._records cimport sess_rec

cimport numpy as cnp

import numpy as np

from .._fastpath import FlowTable as _FlowTable
from .. import messages as _M
from ..nat.records import SESSION_DTYPE as _SESSION

assert _M.ACTIVITY_DTYPE.itemsize == sizeof(wire_activity)
cnp.import_array()


cdef inline tuple _sk(const le_entry *c):
    return (c.k.proto, c.k.iaddr, c.k.iport, c.k.eaddr, c.k.eport, c.k.raddr, c.k.rport)


cdef inline int _gather(dict out, const le_entry *c) except -1:
    """Lease c into `out`, {sk: {holder: until}}."""
    sk = _sk(c)
    hs = out.get(sk)
    if hs is None:
        out[sk] = {c.holder: c.until}
    else:
        hs[c.holder] = c.until
    return 0


cdef class LeaseTable:
    """Leases granted: session identity -> {holder: until}, in C.  The interface and the
    answers of ``leases_py.LeaseTable``."""

    def __cinit__(self):
        en_init(&self.s, sizeof(le_entry))
        self.e = NULL
        heap_init(&self.h)
        self.nsess = 0
        self.walks = 0

    def __init__(self, int32_t capacity=1024):
        self._grow(max(16, capacity))

    def __dealloc__(self):
        en_release(&self.s)
        heap_free(&self.h)

    def _grow(self, int32_t cap):
        """Room for `cap` leases: the entry array grows, the indexes are rebuilt."""
        en_realloc(&self.s, cap)
        self.e = <le_entry *>self.s.e
        self.ids = _FlowTable(cap, hugepages=False)
        self.eps = _FlowTable(cap, hugepages=False)
        en_reindex(&self.s, self.ids, self.eps)

    # -- C level -------------------------------------------------------------------------------
    cdef int32_t find(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                      uint32_t r, uint16_t rp, int holder) noexcept:
        cdef int32_t x = en_chain(self.ids, p, e, ep, r, rp)
        cdef le_entry *c
        while x >= 0:
            c = &self.e[x]
            if c.k.iaddr == i and c.k.iport == ip and c.holder == holder:
                return x
            x = c.k.same_next
        return -1

    cdef bint has_session(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                          uint32_t r, uint16_t rp) noexcept:
        return en_find(&self.s, self.ids, p, i, ip, e, ep, r, rp) >= 0

    cdef int32_t add(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                     uint32_t r, uint16_t rp, int holder) except -2:
        if en_full(&self.s):
            self._grow(self.s.cap * 2)
        cdef int32_t x = en_add(&self.s, self.ids, self.eps, p, i, ip, e, ep, r, rp)
        self.e[x].holder = holder
        return x

    cdef void unlink(self, int32_t x) noexcept:
        cdef en_head *c = &self.e[x].k
        en_unlink(&self.s, self.ids, self.eps, x)
        if not self.has_session(c.proto, c.iaddr, c.iport, c.eaddr, c.eport, c.raddr, c.rport):
            self.nsess -= 1

    cdef dict holders(self, int32_t head, uint32_t i, uint16_t ip):
        """{holder: until} of the leases on the chain from `head` with internal (i, ip)."""
        cdef dict out = {}
        cdef int32_t x = head
        cdef le_entry *c
        while x >= 0:
            c = &self.e[x]
            if c.k.iaddr == i and c.k.iport == ip:
                out[c.holder] = c.until
            x = c.k.same_next
        return out

    # -- per batch -------------------------------------------------------------------------------
    def grant(self, recs, idx, int holder, double until):
        """``leases_py.LeaseTable.grant``: the records read in place."""
        cdef Py_ssize_t n = len(recs), m, k
        cdef rec_view v
        keep = rec_view_of(&v, recs)
        ix_a = rec_selection(idx, n, &m)
        cdef const int64_t *ix = NULL if ix_a is None else <const int64_t *>cnp.PyArray_DATA(ix_a)
        new_a = np.empty(m, np.uint64)
        cdef uint64_t *new = <uint64_t *>cnp.PyArray_DATA(new_a)
        cdef Py_ssize_t q = 0
        cdef const unsigned char *b
        cdef uint8_t p
        cdef uint32_t i, e, r
        cdef uint16_t ip, ep, rp
        cdef int32_t x
        cdef bint fresh
        for k in range(m):
            b = v.b + (k if ix == NULL else ix[k]) * v.size
            p, i, ip, e = b[v.o_p], rec_u32(b + v.o_i), rec_u16(b + v.o_ip), rec_u32(b + v.o_e)
            ep, r, rp = rec_u16(b + v.o_ep), rec_u32(b + v.o_r), rec_u16(b + v.o_rp)
            x = self.find(p, i, ip, e, ep, r, rp, holder)
            if x >= 0:  # a renewal: the end moves, its timer finds out when due
                self.e[x].until = until
                continue
            fresh = not self.has_session(p, i, ip, e, ep, r, rp)
            x = self.add(p, i, ip, e, ep, r, rp, holder)
            self.e[x].until = self.e[x].due = until
            heap_push(&self.h, until, x)
            if fresh:
                self.nsess += 1
            new[q] = <uint64_t>p << 48 | <uint64_t>e << 16 | ep
            q += 1
        return new_a[:q]

    def end(self, sk, int holder):
        """``leases_py.LeaseTable.end``."""
        p, i, ip, e, ep, r, rp = sk
        cdef int32_t x = self.find(p, i, ip, e, ep, r, rp, holder)
        if x < 0:
            return False
        self.unlink(x)
        return True

    def leases_of(self, recs):
        """``leases_py.LeaseTable.leases_of``: the records read in place."""
        cdef Py_ssize_t n = len(recs), k, q = 0, cap = max(16, len(recs))
        cdef rec_view v
        keep = rec_view_of(&v, recs)
        ix_a = np.empty(cap, np.int64)
        h_a = np.empty(cap, np.int64)
        u_a = np.empty(cap, np.float64)
        cdef int64_t *ix = <int64_t *>cnp.PyArray_DATA(ix_a)
        cdef int64_t *ho = <int64_t *>cnp.PyArray_DATA(h_a)
        cdef double *un = <double *>cnp.PyArray_DATA(u_a)
        cdef const unsigned char *b
        cdef uint32_t i
        cdef uint16_t ip
        cdef int32_t x
        cdef le_entry *c
        for k in range(n):
            b = v.b + k * v.size
            i, ip = rec_u32(b + v.o_i), rec_u16(b + v.o_ip)
            x = en_chain(self.ids, b[v.o_p], rec_u32(b + v.o_e), rec_u16(b + v.o_ep), rec_u32(b + v.o_r),
                         rec_u16(b + v.o_rp))
            while x >= 0:
                c = &self.e[x]
                if c.k.iaddr == i and c.k.iport == ip:
                    if q == cap:  # more leases than records: room doubles
                        cap *= 2
                        ix_a.resize(cap, refcheck=False)
                        h_a.resize(cap, refcheck=False)
                        u_a.resize(cap, refcheck=False)
                        ix = <int64_t *>cnp.PyArray_DATA(ix_a)
                        ho = <int64_t *>cnp.PyArray_DATA(h_a)
                        un = <double *>cnp.PyArray_DATA(u_a)
                    ix[q], ho[q], un[q] = k, c.holder, c.until
                    q += 1
                x = c.k.same_next
        return ix_a[:q].copy(), h_a[:q].copy(), u_a[:q].copy()

    def end_records(self, recs, idx, holders):
        """``leases_py.LeaseTable.end_records``: the records read in place."""
        cdef Py_ssize_t n = len(recs), m, k, q = 0
        cdef rec_view v
        keep = rec_view_of(&v, recs)
        ix_a = rec_selection(idx, n, &m)
        cdef const int64_t *ix = NULL if ix_a is None else <const int64_t *>cnp.PyArray_DATA(ix_a)
        cdef int64_t h0 = 0
        h_a = None
        if np.ndim(holders) == 0:
            h0 = int(holders)
        else:
            h_a = np.ascontiguousarray(holders, np.int64)
            if len(h_a) != m:
                raise ValueError(f"{len(h_a)} holders for {m} records")
        cdef const int64_t *hv = NULL if h_a is None else <const int64_t *>cnp.PyArray_DATA(h_a)
        out_a = np.empty(m, np.uint64)
        cdef uint64_t *out = <uint64_t *>cnp.PyArray_DATA(out_a)
        cdef const unsigned char *b
        cdef uint8_t p
        cdef uint32_t e
        cdef uint16_t ep
        cdef int32_t x
        for k in range(m):
            b = v.b + (k if ix == NULL else ix[k]) * v.size
            p, e, ep = b[v.o_p], rec_u32(b + v.o_e), rec_u16(b + v.o_ep)
            x = self.find(p, rec_u32(b + v.o_i), rec_u16(b + v.o_ip), e, ep, rec_u32(b + v.o_r),
                          rec_u16(b + v.o_rp), h0 if hv == NULL else hv[k])
            if x >= 0:
                self.unlink(x)
                out[q] = <uint64_t>p << 48 | <uint64_t>e << 16 | ep
                q += 1
        return out_a[:q]

    def due(self, double now, Py_ssize_t limit):
        """``leases_py.LeaseTable.due``."""
        cdef Py_ssize_t q = 0, m = min(limit, self.h.n) if limit > 0 else 0
        out_a = np.empty(m, np.uint64)
        cdef uint64_t *out = <uint64_t *>cnp.PyArray_DATA(out_a)
        cdef double d
        cdef int32_t x
        cdef le_entry *c
        while self.h.n and now >= self.h.d[0] and limit > 0:
            limit -= 1
            d = self.h.d[0]
            x = self.h.i[0]
            heap_pop(&self.h)
            c = &self.e[x]
            if not c.k.used or c.due != d:
                continue  # ended already (acknowledged REVOKE), or queued again since
            if c.until <= now:
                out[q] = <uint64_t>c.k.proto << 48 | <uint64_t>c.k.eaddr << 16 | c.k.eport
                q += 1
                self.unlink(x)
            else:  # renewed meanwhile
                c.due = c.until
                heap_push(&self.h, c.until, x)
        return out_a[:q]

    @property
    def next_due(self):
        """The earliest end queued (inf: none)."""
        return self.h.d[0] if self.h.n else float("inf")

    @property
    def n_leases(self):
        return self.s.n

    def held(self, recs, int holder):
        """``leases_py.LeaseTable.held``: the records read in place."""
        recs = _activity_array(recs)
        cdef Py_ssize_t k, nrec = len(recs)
        cdef const wire_activity *a = <const wire_activity *>cnp.PyArray_DATA(recs)
        out_a = np.zeros(nrec, bool)
        cdef uint8_t *out = <uint8_t *>cnp.PyArray_DATA(out_a)
        for k in range(nrec):
            if self.find(a[k].proto, a[k].int_addr, a[k].int_port, a[k].ext_addr, a[k].ext_port, a[k].rem_addr,
                         a[k].rem_port, holder) >= 0:
                out[k] = 1
        return out_a

    # -- lookups ------------------------------------------------------------------------------
    def get(self, sk, default=None):
        try:
            p, i, ip, e, ep, r, rp = sk
        except (TypeError, ValueError):
            return default
        if not (0 <= p <= 0xFF and 0 <= i <= 0xFFFFFFFF and 0 <= ip <= 0xFFFF and 0 <= e <= 0xFFFFFFFF
                and 0 <= ep <= 0xFFFF and 0 <= r <= 0xFFFFFFFF and 0 <= rp <= 0xFFFF):
            return default
        cdef dict hs = self.holders(en_chain(self.ids, p, e, ep, r, rp), i, ip)
        return hs if hs else default

    def __getitem__(self, sk):
        got = self.get(sk)
        if got is None:
            raise KeyError(sk)
        return got

    def __contains__(self, sk):
        return self.get(sk) is not None

    def __len__(self):
        return self.nsess

    def __bool__(self):
        return self.nsess > 0

    def at(self, proto, eaddr, eport):
        """[(sk, {holder: until})] on one external endpoint."""
        cdef dict out = {}
        cdef int32_t x = en_on_endpoint(self.eps, proto, eaddr, eport)
        cdef le_entry *c
        while x >= 0:
            c = &self.e[x]
            _gather(out, c)
            x = c.k.ep_next
        return list(out.items())

    def items(self):
        """Every session with a lease, [(sk, {holder: until})]: a walk (counted)."""
        self.walks += 1
        cdef dict out = {}
        cdef int32_t x
        cdef le_entry *c
        for x in range(self.s.hw):
            c = &self.e[x]
            if c.k.used:
                _gather(out, c)
        return list(out.items())

    def keys(self):
        return [sk for sk, _ in self.items()]

    def values(self):
        return [hs for _, hs in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def timers(self):
        """[(due, sk, holder)] queued (an entry whose lease ended or moved is stale)."""
        cdef int32_t k
        return [(self.h.d[k], _sk(&self.e[self.h.i[k]]), self.e[self.h.i[k]].holder) for k in range(self.h.n)
                if self.e[self.h.i[k]].k.used]


# ------------------------------------------------------------------------------------------
# The owner's answer to one ACTIVITY message, record conversions in C
# ------------------------------------------------------------------------------------------
cdef object _activity_array(recs):
    """`recs` as a C-contiguous array of ACTIVITY records (itself when it is one)."""
    if type(recs) is not np.ndarray or recs.dtype != _M.ACTIVITY_DTYPE:
        raise TypeError(f"ACTIVITY records expected, not {getattr(recs, 'dtype', type(recs))}")
    return recs if cnp.PyArray_IS_C_CONTIGUOUS(recs) else np.ascontiguousarray(recs)


def activity_sessions(recs, tick, int owner):
    """``leases_py.activity_sessions``: the records read in place."""
    recs = _activity_array(recs)
    cdef Py_ssize_t n = len(recs), k
    cdef const wire_activity *a = <const wire_activity *>cnp.PyArray_DATA(recs)
    out_a = np.zeros(n, _SESSION)
    cdef sess_rec *o = <sess_rec *>cnp.PyArray_DATA(out_a)
    cdef int64_t t = int(tick), seen
    for k in range(n):
        o[k].iaddr, o[k].eaddr, o[k].raddr = a[k].int_addr, a[k].ext_addr, a[k].rem_addr
        o[k].iport, o[k].eport, o[k].rport = a[k].int_port, a[k].ext_port, a[k].rem_port
        o[k].proto, o[k].rule_id = a[k].proto, a[k].rule_id
        seen = t - a[k].idle_ms // 1000
        o[k].last_seen = 0 if seen < 0 else (0xFFFFFFFF if seen > 0xFFFFFFFF else <uint32_t>seen)
        o[k].dirs = 3  # DIR_BIT_OUT | DIR_BIT_IN
        o[k].tcp_out, o[k].tcp_in, o[k].owner = a[k].tcp_out, a[k].tcp_in, owner
    return out_a


def lease_records(recs, idx, int owner, uint32_t lease_ms):
    """``leases_py.lease_records``: the records read in place."""
    recs = _activity_array(recs)
    cdef Py_ssize_t n = len(recs), m, k
    cdef const wire_activity *a = <const wire_activity *>cnp.PyArray_DATA(recs)
    ix_a = rec_selection(idx, n, &m)
    cdef const int64_t *ix = NULL if ix_a is None else <const int64_t *>cnp.PyArray_DATA(ix_a)
    out_a = np.zeros(m, _M.RULE_DTYPE)
    cdef wire_rule *o = <wire_rule *>cnp.PyArray_DATA(out_a)
    cdef const wire_activity *r
    for k in range(m):
        r = &a[k if ix == NULL else ix[k]]
        o[k].int_addr, o[k].ext_addr, o[k].rem_addr = r.int_addr, r.ext_addr, r.rem_addr
        o[k].int_port, o[k].ext_port, o[k].rem_port = r.int_port, r.ext_port, r.rem_port
        o[k].proto, o[k].rule_id, o[k].owner, o[k].lease_ms = r.proto, r.rule_id, owner, lease_ms
    return out_a

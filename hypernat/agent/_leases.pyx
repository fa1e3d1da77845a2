# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The owner's leases, compiled: ``leases_py.LeaseTable`` in C.

One ``le_entry`` per lease, a (session, holder) pair (``_leases.pxd``): no Python object
per lease.  Leases are found by session through a FlowTable keyed (proto, R, Rp, E, Ep)
whose slot holds the head of a chain of the leases sharing that key (the internal
endpoint and the holder tell them apart; the flow table's hashing and probing,
``_fastpath.pxd``), by external endpoint through a second FlowTable heading a list, and
by end through a heap (``_heap.pxd``).  ``grant`` takes a batch of served sessions,
``held`` the records of one ACTIVITY message (read in place, ``_wire.pxd``), ``due`` a
slice of the timers.  ``leases_py`` is the plain-Python reference with the same
interface; ``tests/test_pending_table.py`` checks them against each other.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset

from .._fastpath cimport FlowTable
from .._heap cimport heap_free, heap_init, heap_pop, heap_push
from .._wire cimport wire_activity

import numpy as np

from .._fastpath import FlowTable as _FlowTable
from .. import messages as _M

assert _M.ACTIVITY_DTYPE.itemsize == sizeof(wire_activity)


cdef inline tuple _sk(const le_entry *c):
    return (c.proto, c.iaddr, c.iport, c.eaddr, c.eport, c.raddr, c.rport)


cdef class LeaseTable:
    """Leases granted: session identity -> {holder: until}, in C.  The interface and the
    answers of ``leases_py.LeaseTable``."""

    def __cinit__(self):
        self.e = NULL
        heap_init(&self.h)
        self.cap = self.n = self.nsess = self.hw = 0
        self.free_head = -1
        self.walks = 0

    def __init__(self, int32_t capacity=1024):
        self._grow(max(16, capacity))

    def __dealloc__(self):
        free(self.e)
        heap_free(&self.h)

    def _grow(self, int32_t cap):
        """Room for `cap` leases: the entry array grows, the indexes are rebuilt."""
        cdef le_entry *ne = <le_entry *>realloc(self.e, cap * sizeof(le_entry))
        if ne == NULL:
            raise MemoryError()
        self.e = ne
        cdef int32_t x
        self.cap = cap
        self.ids = _FlowTable(cap, hugepages=False)
        self.eps = _FlowTable(cap, hugepages=False)
        for x in range(self.hw):
            if self.e[x].used:
                self._index(x)

    # -- C level -------------------------------------------------------------------------------
    cdef int32_t find(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                      uint32_t r, uint16_t rp, int holder) noexcept:
        cdef int64_t j = self.ids.c_find(p, r, rp, e, ep)
        if j < 0:
            return -1
        cdef int32_t x = <int32_t>self.ids.c_slot(j).rule_id
        while x >= 0:
            if self.e[x].iaddr == i and self.e[x].iport == ip and self.e[x].holder == holder:
                return x
            x = self.e[x].same_next
        return -1

    cdef bint has_session(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                          uint32_t r, uint16_t rp) noexcept:
        cdef int64_t j = self.ids.c_find(p, r, rp, e, ep)
        if j < 0:
            return False
        cdef int32_t x = <int32_t>self.ids.c_slot(j).rule_id
        while x >= 0:
            if self.e[x].iaddr == i and self.e[x].iport == ip:
                return True
            x = self.e[x].same_next
        return False

    cdef void _index(self, int32_t x) noexcept:
        cdef le_entry *c = &self.e[x]
        cdef int64_t j = self.ids.c_find(c.proto, c.raddr, c.rport, c.eaddr, c.eport)
        if j >= 0:
            c.same_next = <int32_t>self.ids.c_slot(j).rule_id
            self.ids.c_slot(j).rule_id = x
        else:
            c.same_next = -1
            self.ids.c_insert(c.proto, c.raddr, c.rport, c.eaddr, c.eport, 0, 0, x, 0, 0)
        j = self.eps.c_find(c.proto, c.eaddr, c.eport, 0, 0)
        c.ep_prev = -1
        if j >= 0:
            c.ep_next = <int32_t>self.eps.c_slot(j).rule_id
            self.e[c.ep_next].ep_prev = x
            self.eps.c_slot(j).rule_id = x
        else:
            c.ep_next = -1
            self.eps.c_insert(c.proto, c.eaddr, c.eport, 0, 0, 0, 0, x, 0, 0)

    cdef int32_t add(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                     uint32_t r, uint16_t rp, int holder) except -2:
        cdef int32_t x = self.free_head
        if x >= 0:
            self.free_head = self.e[x].same_next
        else:
            if self.hw == self.cap:
                self._grow(self.cap * 2)
            x = self.hw
            self.hw += 1
        cdef le_entry *c = &self.e[x]
        memset(c, 0, sizeof(le_entry))
        c.proto, c.iaddr, c.iport, c.eaddr, c.eport, c.raddr, c.rport = p, i, ip, e, ep, r, rp
        c.holder = holder
        c.used = 1
        self.n += 1
        self._index(x)
        return x

    cdef void unlink(self, int32_t x) noexcept:
        cdef le_entry *c = &self.e[x]
        cdef int64_t j = self.ids.c_find(c.proto, c.raddr, c.rport, c.eaddr, c.eport)
        cdef int32_t y
        if j >= 0:
            y = <int32_t>self.ids.c_slot(j).rule_id
            if y == x:
                if c.same_next >= 0:
                    self.ids.c_slot(j).rule_id = c.same_next
                else:
                    self.ids.c_delete(c.proto, c.raddr, c.rport, c.eaddr, c.eport)
            else:
                while y >= 0 and self.e[y].same_next != x:
                    y = self.e[y].same_next
                if y >= 0:
                    self.e[y].same_next = c.same_next
        if c.ep_prev >= 0:
            self.e[c.ep_prev].ep_next = c.ep_next
        else:
            j = self.eps.c_find(c.proto, c.eaddr, c.eport, 0, 0)
            if j >= 0:
                if c.ep_next >= 0:
                    self.eps.c_slot(j).rule_id = c.ep_next
                else:
                    self.eps.c_delete(c.proto, c.eaddr, c.eport, 0, 0)
        if c.ep_next >= 0:
            self.e[c.ep_next].ep_prev = c.ep_prev
        c.used = 0
        c.same_next = self.free_head
        self.free_head = x
        self.n -= 1
        if not self.has_session(c.proto, c.iaddr, c.iport, c.eaddr, c.eport, c.raddr, c.rport):
            self.nsess -= 1

    cdef dict holders(self, int32_t head, uint32_t i, uint16_t ip):
        """{holder: until} of the leases on the chain from `head` with internal (i, ip)."""
        cdef dict out = {}
        cdef int32_t x = head
        while x >= 0:
            if self.e[x].iaddr == i and self.e[x].iport == ip:
                out[self.e[x].holder] = self.e[x].until
            x = self.e[x].same_next
        return out

    # -- per batch -------------------------------------------------------------------------------
    def grant(self, sks, int holder, double until):
        """``leases_py.LeaseTable.grant``."""
        cdef list new = []
        cdef uint8_t p
        cdef uint32_t i, e, r
        cdef uint16_t ip, ep, rp
        cdef int32_t x
        cdef bint fresh
        for sk in sks:
            p, i, ip, e, ep, r, rp = sk
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
            new.append((p, e, ep))
        return new

    def end(self, sk, int holder):
        """``leases_py.LeaseTable.end``."""
        p, i, ip, e, ep, r, rp = sk
        cdef int32_t x = self.find(p, i, ip, e, ep, r, rp, holder)
        if x < 0:
            return False
        self.unlink(x)
        return True

    def due(self, double now, Py_ssize_t limit):
        """``leases_py.LeaseTable.due``."""
        cdef list out = []
        cdef double d
        cdef int32_t x
        cdef le_entry *c
        while self.h.n and now >= self.h.d[0] and limit > 0:
            limit -= 1
            d = self.h.d[0]
            x = self.h.i[0]
            heap_pop(&self.h)
            c = &self.e[x]
            if not c.used or c.due != d:
                continue  # ended already (acknowledged REVOKE), or queued again since
            if c.until <= now:
                out.append((_sk(c), c.holder))
                self.unlink(x)
            else:  # renewed meanwhile
                c.due = c.until
                heap_push(&self.h, c.until, x)
        return out

    @property
    def next_due(self):
        """The earliest end queued (inf: none)."""
        return self.h.d[0] if self.h.n else float("inf")

    @property
    def n_leases(self):
        return self.n

    def held(self, recs, int holder):
        """``leases_py.LeaseTable.held``: the records read in place."""
        cdef const unsigned char[::1] raw = np.ascontiguousarray(recs).view(np.uint8).reshape(-1)
        cdef Py_ssize_t k, nrec = len(recs)
        cdef const wire_activity *a
        cdef list out = [False] * nrec
        for k in range(nrec):
            a = <const wire_activity *>&raw[k * sizeof(wire_activity)]
            if self.find(a.proto, a.int_addr, a.int_port, a.ext_addr, a.ext_port, a.rem_addr, a.rem_port,
                         holder) >= 0:
                out[k] = True
        return out

    # -- lookups ------------------------------------------------------------------------------
    def get(self, sk, default=None):
        try:
            p, i, ip, e, ep, r, rp = sk
        except (TypeError, ValueError):
            return default
        if not (0 <= p <= 0xFF and 0 <= i <= 0xFFFFFFFF and 0 <= ip <= 0xFFFF and 0 <= e <= 0xFFFFFFFF
                and 0 <= ep <= 0xFFFF and 0 <= r <= 0xFFFFFFFF and 0 <= rp <= 0xFFFF):
            return default
        cdef int64_t j = self.ids.c_find(p, r, rp, e, ep)
        if j < 0:
            return default
        cdef dict hs = self.holders(<int32_t>self.ids.c_slot(j).rule_id, i, ip)
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
        cdef int64_t j = self.eps.c_find(proto, eaddr, eport, 0, 0)
        if j < 0:
            return []
        cdef int32_t x = <int32_t>self.eps.c_slot(j).rule_id
        cdef le_entry *c
        while x >= 0:
            c = &self.e[x]
            sk = _sk(c)
            hs = out.get(sk)
            if hs is None:
                out[sk] = {c.holder: c.until}
            else:
                hs[c.holder] = c.until
            x = c.ep_next
        return list(out.items())

    def items(self):
        """Every session with a lease, [(sk, {holder: until})]: a walk (counted)."""
        self.walks += 1
        cdef dict out = {}
        cdef int32_t x
        cdef le_entry *c
        for x in range(self.hw):
            c = &self.e[x]
            if c.used:
                sk = _sk(c)
                hs = out.get(sk)
                if hs is None:
                    out[sk] = {c.holder: c.until}
                else:
                    hs[c.holder] = c.until
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
                if self.e[self.h.i[k]].used]

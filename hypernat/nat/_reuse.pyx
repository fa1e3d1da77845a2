# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The reuse delay of freed external endpoints and the lease holds on them, in C.

An external endpoint whose mapping ended may be handed out again only once its reuse
delay has passed (RFC 6888 REQ-8, ``timeouts.reuse_delay``) AND no lease another NIC
holds on it is outstanding (invariant 3).  ``EndpointReuse`` keeps, with no Python
object per endpoint:

    the reuse-delay FIFO   a ring of ``_expire.Ended`` records (ENDED_DTYPE: release_at,
                           ekey, block, pidx, offset), in the order the expiry ended the
                           mappings (``defer``).  The delay is one setting, so release
                           times are queued in order; a live reload that shortens it
                           makes the records queued after the reload wait behind the
                           older ones (at most the old delay: later, never earlier --
                           as the Python deque this replaces).
    holds and parked       one FlowTable (the flow table's hashing and probing,
    endpoints              ``_fastpath.pxd``) keyed by the endpoint key ekey =
                           proto << 48 | E << 16 | Ep as the key (0, E, Ep, proto, 0);
                           the slot's fields hold the entry:
                               rule_id     leases outstanding on the endpoint
                               lease       1: parked -- its delay passed while held
                               new_addr    parked endpoint's block id, low 32 bits
                               last_seen   ... high 32 bits
                               user        ... protocol index
                               new_port    ... port offset in the block
                           An endpoint has an entry while it has holds or is parked.

``due`` takes the endpoints whose delay has passed off the queue (at most a budget):
those with holds are parked, the rest returned to be freed; ``release`` drops one
hold per key and returns the parked endpoints whose last hold that was.  Every
operation takes and returns arrays; the loops run without the GIL.  The plain-Python
reference with the same answers is ``tests/reuse_model.py`` (checked with hypothesis
in ``tests/test_reuse.py``).
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cimport numpy as cnp

import numpy as np

from .._fastpath cimport FlowTable, hn_flow_hash, hn_slot
from ._expire cimport Ended
from ._mappings cimport _room

from .._fastpath import FlowTable as _FlowTable
from ._expire import ENDED_DTYPE

cnp.import_array()

# an endpoint inside a block: what PortBlocks.release_many takes
ENDPOINT_DTYPE = np.dtype([("block", "<i8"), ("pidx", "<i4"), ("offset", "<i4")])
# leases outstanding per endpoint key (snapshots)
HOLD_DTYPE = np.dtype([("ekey", "<i8"), ("count", "<i8")])
# an endpoint parked under its key (snapshots)
PARKED_DTYPE = np.dtype([("ekey", "<i8"), ("block", "<i8"), ("pidx", "<i4"), ("offset", "<i4")])

ctypedef packed struct Endpoint:
    int64_t block
    int32_t pidx
    int32_t offset

ctypedef packed struct Hold:
    int64_t ekey
    int64_t count

ctypedef packed struct Parked:
    int64_t ekey
    int64_t block
    int32_t pidx
    int32_t offset

if (ENDPOINT_DTYPE.itemsize != sizeof(Endpoint) or HOLD_DTYPE.itemsize != sizeof(Hold)
        or PARKED_DTYPE.itemsize != sizeof(Parked)):
    raise ImportError("hypernat.nat._reuse: a dtype disagrees with its struct: rebuild it")


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define hn_reuse_prefetch(p) __builtin_prefetch((const void *)(p), 1, 3)
    #else
    #define hn_reuse_prefetch(p) ((void)(p))
    #endif
    """
    void hn_reuse_prefetch(const void *p) noexcept nogil

DEF AHEAD = 8  # a batch loads the index line of the key this many ahead


cdef inline void _prefetch(FlowTable ix, uint64_t k) noexcept nogil:
    hn_reuse_prefetch(&ix.t.s[hn_flow_hash(0, <uint32_t>(k >> 16), <uint16_t>k, <uint32_t>(k >> 48), 0) & ix.t.mask])


cdef inline int64_t _find(FlowTable ix, uint64_t k) noexcept nogil:
    return ix.c_find(0, <uint32_t>(k >> 16), <uint16_t>k, <uint32_t>(k >> 48), 0)


cdef inline bint _insert(FlowTable ix, uint64_t k, uint32_t holds) noexcept nogil:
    return ix.c_insert(0, <uint32_t>(k >> 16), <uint16_t>k, <uint32_t>(k >> 48), 0, 0, 0, holds, 0, 0)


cdef inline void _delete(FlowTable ix, uint64_t k) noexcept nogil:
    ix.c_delete(0, <uint32_t>(k >> 16), <uint16_t>k, <uint32_t>(k >> 48), 0)


cdef inline uint64_t _key_of(const hn_slot *s) noexcept nogil:
    return <uint64_t>s.daddr << 48 | <uint64_t>s.saddr << 16 | s.sport


cdef inline void _park(hn_slot *s, int64_t block, int32_t pidx, int32_t offset) noexcept nogil:
    s.lease = 1
    s.new_addr = <uint32_t>(<uint64_t>block & 0xFFFFFFFFULL)
    s.last_seen = <uint32_t>(<uint64_t>block >> 32)
    s.user = <uint8_t>pidx
    s.new_port = <uint16_t>offset


cdef inline void _parked(const hn_slot *s, Endpoint *out) noexcept nogil:
    out.block = <int64_t>(<uint64_t>s.last_seen << 32 | s.new_addr)
    out.pidx = s.user
    out.offset = s.new_port


cdef inline cnp.ndarray _keys(ekeys):
    """`ekeys` as a contiguous uint64 array (endpoint keys are never negative)."""
    return np.ascontiguousarray(ekeys, np.uint64)


cdef class EndpointReuse:
    """The reuse-delay queue, the holds and the parked endpoints of one NIC's pool (see
    the module docstring).

    EndpointReuse(capacity=1024): `capacity` endpoints with holds before the index grows.
    """

    def __cinit__(self):
        self.q = NULL
        self.head = self.n = self.cap = 0
        self.n_held = 0
        self.n_holds = 0

    def __init__(self, capacity=1024):
        self.ix = _FlowTable(max(16, int(capacity)), hugepages=False)
        self._ring_room(64)

    def __dealloc__(self):
        free(self.q)

    cdef int _ring_room(self, Py_ssize_t more) except -1:
        """Room in the ring for `more` records (a bigger ring, unwrapped)."""
        if self.n + more <= self.cap:
            return 0
        cdef Py_ssize_t cap = max(self.cap * 2, self.n + more, 64)
        cdef Ended *nq = <Ended *>malloc(cap * sizeof(Ended))
        if nq == NULL:
            raise MemoryError()
        cdef Py_ssize_t first = min(self.n, self.cap - self.head)
        if self.n:
            memcpy(nq, self.q + self.head, first * sizeof(Ended))
            memcpy(nq + first, self.q, (self.n - first) * sizeof(Ended))
        free(self.q)
        self.q, self.cap, self.head = nq, cap, 0
        return 0

    cdef int _ix_room(self, Py_ssize_t more) except -1:
        self.ix = _room(self.ix, more)
        return 0

    # -- the reuse delay ---------------------------------------------------------------------
    def defer(self, ended):
        """Queue the ended mappings' endpoints of `ended` (ENDED_DTYPE, in order: the
        expiry's ``SessionEnd.drain``); each may be freed from its release_at on, once no
        lease holds it."""
        if ended.dtype != ENDED_DTYPE:
            raise ValueError(f"defer: records of dtype {ended.dtype}, expected ENDED_DTYPE")
        cdef cnp.ndarray a = np.ascontiguousarray(ended)
        cdef Py_ssize_t m = len(a)
        if not m:
            return
        self._ring_room(m)
        cdef const Ended *src = <const Ended *>cnp.PyArray_DATA(a)
        cdef Py_ssize_t tail = (self.head + self.n) % self.cap
        cdef Py_ssize_t first = min(m, self.cap - tail)
        with nogil:
            memcpy(self.q + tail, src, first * sizeof(Ended))
            memcpy(self.q, src + first, (m - first) * sizeof(Ended))
        self.n += m

    def due(self, int64_t now, int64_t budget):
        """At most `budget` endpoints whose delay has passed by `now` off the queue:
        (how many were taken, the ones to free now as ENDPOINT_DTYPE in queue order).
        Those with holds are parked until their last ``release``."""
        cdef Py_ssize_t k = 0, cap = self.cap, h = self.head
        cdef Py_ssize_t lim = self.n if budget > self.n else (budget if budget > 0 else 0)
        while k < lim and self.q[(h + k) % cap].release_at <= now:
            k += 1
        out_a = np.empty(k, ENDPOINT_DTYPE)
        if not k:
            return 0, out_a
        cdef Endpoint *out = <Endpoint *>cnp.PyArray_DATA(out_a)
        cdef Py_ssize_t i, nf = 0, parked = 0
        cdef const Ended *w
        cdef int64_t j
        cdef hn_slot *s
        cdef FlowTable ix = self.ix
        with nogil:
            for i in range(k):
                if i + AHEAD < k:
                    _prefetch(ix, <uint64_t>self.q[(h + i + AHEAD) % cap].ekey)
                w = &self.q[(h + i) % cap]
                j = _find(ix, <uint64_t>w.ekey)
                if j >= 0 and ix.c_slot(j).rule_id > 0:
                    s = ix.c_slot(j)
                    if not s.lease:
                        parked += 1
                    _park(s, w.block, w.pidx, w.offset)
                else:
                    out[nf].block, out[nf].pidx, out[nf].offset = w.block, w.pidx, w.offset
                    nf += 1
        self.head = (h + k) % cap
        self.n -= k
        self.n_held += parked
        return k, out_a[:nf]

    # -- holds -------------------------------------------------------------------------------
    def hold(self, ekeys):
        """One lease granted on the endpoint of each key of `ekeys` (proto << 48 | E << 16
        | Ep, an integer array: ``LeaseTable.grant``'s answer)."""
        cdef cnp.ndarray a = _keys(ekeys)
        cdef Py_ssize_t m = len(a), i
        if not m:
            return
        self._ix_room(m)
        cdef const uint64_t *k = <const uint64_t *>cnp.PyArray_DATA(a)
        cdef FlowTable ix = self.ix
        cdef int64_t j
        with nogil:
            for i in range(m):
                if i + AHEAD < m:
                    _prefetch(ix, k[i + AHEAD])
                j = _find(ix, k[i])
                if j >= 0:
                    ix.c_slot(j).rule_id += 1
                else:
                    _insert(ix, k[i], 1)
        self.n_holds += m

    def release(self, ekeys):
        """One lease ran out (or its revoke was acknowledged) on the endpoint of each key
        of `ekeys`: the parked endpoints whose last hold that was, to free now
        (ENDPOINT_DTYPE, in key order).  A key without holds is passed over."""
        cdef cnp.ndarray a = _keys(ekeys)
        cdef Py_ssize_t m = len(a), i, nf = 0, gone = 0, unparked = 0
        out_a = np.empty(m, ENDPOINT_DTYPE)
        if not m:
            return out_a
        cdef Endpoint *out = <Endpoint *>cnp.PyArray_DATA(out_a)
        cdef const uint64_t *k = <const uint64_t *>cnp.PyArray_DATA(a)
        cdef FlowTable ix = self.ix
        cdef int64_t j
        cdef hn_slot *s
        with nogil:
            for i in range(m):
                if i + AHEAD < m:
                    _prefetch(ix, k[i + AHEAD])
                j = _find(ix, k[i])
                if j < 0:
                    continue
                s = ix.c_slot(j)
                if s.rule_id > 1:
                    s.rule_id -= 1
                    gone += 1
                    continue
                gone += s.rule_id
                if s.lease:
                    _parked(s, &out[nf])
                    nf += 1
                    unparked += 1
                _delete(ix, k[i])
        self.n_holds -= gone
        self.n_held -= unparked
        return out_a[:nf]

    def holds(self, uint64_t ekey):
        """Leases outstanding on one endpoint."""
        cdef int64_t j = _find(self.ix, ekey)
        return self.ix.c_slot(j).rule_id if j >= 0 else 0

    # -- gauges and state --------------------------------------------------------------------
    def __len__(self):
        """Endpoints in the reuse delay."""
        return self.n

    @property
    def capacity(self):
        """Endpoints with holds (or parked) the index takes before it grows."""
        return self.ix.t.capacity

    def stats(self):
        """{ports_waiting_reuse, endpoints_held, holds}."""
        return {"ports_waiting_reuse": self.n, "endpoints_held": self.n_held, "holds": self.n_holds}

    def waiting(self):
        """The queue, oldest first (ENDED_DTYPE, a copy)."""
        out_a = np.empty(self.n, ENDED_DTYPE)
        cdef Ended *out = <Ended *>cnp.PyArray_DATA(out_a)
        cdef Py_ssize_t first = min(self.n, self.cap - self.head)
        if self.n:
            memcpy(out, self.q + self.head, first * sizeof(Ended))
            memcpy(out + first, self.q, (self.n - first) * sizeof(Ended))
        return out_a

    def hold_counts(self):
        """Every endpoint with holds (HOLD_DTYPE, by key: a snapshot does not depend on the
        index's size)."""
        out_a = np.empty(self.ix.t.count, HOLD_DTYPE)
        cdef Hold *out = <Hold *>cnp.PyArray_DATA(out_a)
        cdef uint64_t i
        cdef Py_ssize_t q = 0
        cdef const hn_slot *s
        for i in range(self.ix.t.nslots):
            s = self.ix.c_slot(i)
            if s.flags and s.rule_id:
                out[q].ekey, out[q].count = <int64_t>_key_of(s), s.rule_id
                q += 1
        out_a = out_a[:q]
        return out_a[np.argsort(out_a["ekey"], kind="stable")]

    def held(self):
        """Every parked endpoint under its key (PARKED_DTYPE, by key)."""
        out_a = np.empty(self.n_held, PARKED_DTYPE)
        cdef Parked *out = <Parked *>cnp.PyArray_DATA(out_a)
        cdef uint64_t i
        cdef Py_ssize_t q = 0
        cdef const hn_slot *s
        cdef Endpoint e
        for i in range(self.ix.t.nslots):
            s = self.ix.c_slot(i)
            if s.flags and s.lease and q < self.n_held:
                _parked(s, &e)
                out[q].ekey, out[q].block, out[q].pidx, out[q].offset = <int64_t>_key_of(s), e.block, e.pidx, e.offset
                q += 1
        out_a = out_a[:q]
        return out_a[np.argsort(out_a["ekey"], kind="stable")]

    def snapshot(self):
        """(queue ENDED_DTYPE, holds HOLD_DTYPE, parked PARKED_DTYPE): ``restore``'s input."""
        return self.waiting(), self.hold_counts(), self.held()

    def restore(self, queue, holds, parked):
        """Replace everything with what ``snapshot`` returned (or arrays of those dtypes)."""
        if holds.dtype != HOLD_DTYPE or parked.dtype != PARKED_DTYPE:
            raise ValueError("restore: holds must be HOLD_DTYPE, parked PARKED_DTYPE")
        self.ix = _FlowTable(max(16, self.ix.t.capacity, len(holds) + len(parked)), hugepages=False)
        self.head = self.n = 0
        self.n_held = 0
        self.n_holds = 0
        self.defer(queue)
        cdef int64_t j
        cdef hn_slot *s
        for k, c in zip(holds["ekey"].tolist(), holds["count"].tolist()):
            if c > 0:
                self._ix_room(1)
                _insert(self.ix, <uint64_t>k, <uint32_t>c)
                self.n_holds += c
        for k, g, pi, off in zip(*(parked[f].tolist() for f in ("ekey", "block", "pidx", "offset"))):
            j = _find(self.ix, <uint64_t>k)
            if j < 0:
                self._ix_room(1)
                _insert(self.ix, <uint64_t>k, 0)
                j = _find(self.ix, <uint64_t>k)
            s = self.ix.c_slot(j)
            if not s.lease:
                self.n_held += 1
            _park(s, g, pi, off)


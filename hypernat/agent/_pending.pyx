# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The holder's fetches in flight, compiled: ``pending_py.PendingTable`` in C.

A fetch in flight is one ``pf_entry`` (``_pending.pxd``): no Python object per fetch
and no Python object per waiting frame either: the frames waiting for an answer sit in
a C arena (each frame's bytes copied straight out of its batch into memory of its own,
its length and tag beside it; a C "next" array chains each fetch's frames in arrival
order).  The frames of the fetches a call answers are handed back as one ``Frames``
(one buffer, offsets, lengths, tags: ``_take``).  Entries are found by
key (two FlowTables, one per fetch direction, ``_key_find`` and its kin) and by seq (a
FlowTable keyed ``(0, seq, 0, 0, 0)``), through the flow table's hashing and probing
(``_fastpath.pxd``); the entry's index is the slot's ``rule_id``.  The negative cache
and the per-source token buckets are ``KeyedLru`` tables: keyed entries on a recency
list (oldest first), indexed the same way.  Each fetch's timer (its next retry, or its
deadline) sits in an indexed heap of (due, seq) (``_heap.pxd``, ``hn_iheap``): a fetch
answered, dropped or redirected moves or removes its item where it sits, so ``due``
pops only live fetches that came due, a bounded number a call.

Every operation takes a whole batch (``fetch_rows`` over a batch's misses, the
``layout.FETCH_ROW_DTYPE`` rows read in place through ``_keys.pxd``; ``answer_rules`` /
``answer_nacks`` over a message's records, read in place through the wire structs of
``_wire.pxd``) and returns what Python acts on: the FETCH records in a ``FetchQueue`` (one
C array, each record with its owner; one KEY_DTYPE array per owner when taken), the
clones to install, the frames to replay, counts by reason.  ``pending_py`` is the
plain-Python reference with the same interface; ``tests/test_pending_table.py`` checks
them against each other.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

from .._fastpath cimport FlowTable, hn_flow_hash, hn_slot
from .._heap cimport iheap_cap, iheap_free, iheap_init, iheap_remove, iheap_reserve, iheap_set
from .._keys cimport fetch_row, keys_check
from .._wire cimport FETCH_BY_EXTERNAL, FETCH_BY_INTERNAL, wire_key, wire_rule

cimport numpy as cnp
import numpy as np

cnp.import_array()

from .._fastpath import FlowTable as _FlowTable
from .. import messages as _M
from .. import layout as _layout
from .pending_py import MAX_SOURCES, Pending, group_by_owner
from ..io.base import NO_FRAME as _NO_FRAME, Frames

keys_check("hypernat.agent._pending")
cdef object FETCH_ROW_DTYPE = _layout.FETCH_ROW_DTYPE
cdef uint8_t KIND_ICMP_ERROR = _layout.KIND_ICMP_ERROR
cdef double _INF = float("inf")
cdef object _EMPTY_U8 = np.zeros(1, np.uint8)  # the buffer of an empty Frames (never written)
cdef object _EMPTY_U32 = np.zeros(0, np.uint32)

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define hn_pend_prefetch(p) __builtin_prefetch((const void *)(p), 1, 3)
    #else
    #define hn_pend_prefetch(p) ((void)(p))
    #endif
    """
    void hn_pend_prefetch(const void *p) noexcept nogil


cdef inline void _prefetch_home(FlowTable t, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                                uint16_t dp) noexcept:
    """Start loading the index line a find / insert of the key will read first."""
    hn_pend_prefetch(&t.t.s[hn_flow_hash(p, sa, sp, da, dp) & t.t.mask])


cdef enum:
    LOOKAHEAD = 4  # fetch_rows prefetches the index lines of the row this many ahead
    D_OUT = 0
    D_IN = 1
    BIT_OUT = 1    # rules.DIR_BIT_OUT
    BIT_IN = 2     # rules.DIR_BIT_IN
    P_ICMP = 1

cdef uint8_t F_ICMP_ERROR = _M.FETCH_F_ICMP_ERROR
cdef uint8_t F_REVALIDATE = _M.FETCH_F_REVALIDATE
cdef uint8_t NACK_UNAVAILABLE = _M.NACK["unavailable"]
cdef uint8_t NACK_FILTERED = _M.NACK["filtered"]
assert _M.KEY_DTYPE.itemsize == sizeof(wire_key) and _M.RULE_DTYPE.itemsize == sizeof(wire_rule)


cdef inline FlowTable _index(uint64_t cap):
    return _FlowTable(cap, hugepages=False)


cdef inline void *_regrow(void *e, int32_t cap, size_t size) except NULL:
    """The entry array `e` (records of `size` bytes) with room for `cap`."""
    cdef void *ne = realloc(e, <size_t>cap * size)
    if ne == NULL:
        raise MemoryError()
    return ne


# Keys by fetch direction (pk_head, the first member of both entry structs): one FlowTable
# per direction, the entry's index in the slot's rule_id.  One implementation for the
# fetches in flight and the keyed LRU tables.
cdef inline int32_t _key_find(FlowTable ix0, FlowTable ix1, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp,
                              uint32_t da, uint16_t dp) noexcept:
    cdef FlowTable t = ix1 if d else ix0
    cdef int64_t j = t.c_find(p, sa, sp, da, dp)
    return <int32_t>t.c_slot(j).rule_id if j >= 0 else -1


cdef inline int32_t _pk_find(FlowTable ix0, FlowTable ix1, pk) except -2:
    """The entry keyed `pk`, (fetch_dir, (proto, saddr, sport, daddr, dport)) from Python
    (-1: none, or not such a key)."""
    try:
        d, (p, sa, sp, da, dp) = pk
    except (TypeError, ValueError):
        return -1
    if not (0 <= p <= 0xFF and 0 <= sa <= 0xFFFFFFFF and 0 <= sp <= 0xFFFF and 0 <= da <= 0xFFFFFFFF
            and 0 <= dp <= 0xFFFF):
        return -1
    return _key_find(ix0, ix1, 1 if d else 0, p, sa, sp, da, dp)


cdef inline void _key_index(FlowTable ix0, FlowTable ix1, const pk_head *k, int32_t x) noexcept:
    (ix1 if k.fetch_dir else ix0).c_insert(k.proto, k.saddr, k.sport, k.daddr, k.dport, 0, 0, x, 0, 0)


cdef inline void _key_unindex(FlowTable ix0, FlowTable ix1, const pk_head *k) noexcept:
    (ix1 if k.fetch_dir else ix0).c_delete(k.proto, k.saddr, k.sport, k.daddr, k.dport)


cdef inline void _key_reindex(const char *e, size_t size, int32_t hw, FlowTable ix0, FlowTable ix1) noexcept:
    """Every entry in use among the first `hw` (records of `size` bytes) into fresh indexes."""
    cdef int32_t x
    cdef const pk_head *k
    for x in range(hw):
        k = <const pk_head *>(e + <size_t>x * size)
        if k.used:
            _key_index(ix0, ix1, k, x)


cdef inline cnp.ndarray _contiguous(recs):
    """A message's records, in place when they are contiguous (its bytes:
    ``cnp.PyArray_DATA``; a structured array's ``.view(np.uint8)`` runs numpy's Python
    check of the view, microseconds a message)."""
    return np.ascontiguousarray(recs)


# ------------------------------------------------------------------------------------
cdef class KeyedLru:
    """Keys (fetch_dir, proto, saddr, sport, daddr, dport) with two doubles each, oldest
    first on a recency list.  The caller bounds its size (``remove(head)``)."""

    def __cinit__(self):
        self.e = NULL
        self.cap = self.n = self.hw = 0
        self.head = self.tail = self.free_head = -1

    def __init__(self, int32_t capacity=256):
        self._grow(max(16, capacity))

    def __dealloc__(self):
        free(self.e)

    def _grow(self, int32_t cap):
        self.e = <lru_entry *>_regrow(self.e, cap, sizeof(lru_entry))
        self.cap = cap
        self.ix0 = _index(cap)
        self.ix1 = _index(cap)
        _key_reindex(<const char *>self.e, sizeof(lru_entry), self.hw, self.ix0, self.ix1)

    cdef int32_t find(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                      uint16_t dp) noexcept:
        return _key_find(self.ix0, self.ix1, d, p, sa, sp, da, dp)

    cdef int32_t find_pk(self, pk) except -2:
        return _pk_find(self.ix0, self.ix1, pk)

    cdef int32_t add(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                     uint16_t dp) except -2:
        """A new key at the end of the list (the caller checked it is not there)."""
        cdef int32_t x = self.free_head
        if x >= 0:
            self.free_head = self.e[x].next
        else:
            if self.hw == self.cap:
                self._grow(self.cap * 2)
            x = self.hw
            self.hw += 1
        cdef lru_entry *c = &self.e[x]
        memset(c, 0, sizeof(lru_entry))
        c.k.fetch_dir, c.k.proto, c.k.saddr, c.k.sport, c.k.daddr, c.k.dport = d, p, sa, sp, da, dp
        c.k.used = 1
        c.prev = self.tail
        c.next = -1
        if self.tail >= 0:
            self.e[self.tail].next = x
        else:
            self.head = x
        self.tail = x
        self.n += 1
        _key_index(self.ix0, self.ix1, &c.k, x)
        return x

    cdef void _unlist(self, int32_t x) noexcept:
        cdef lru_entry *c = &self.e[x]
        if c.prev >= 0:
            self.e[c.prev].next = c.next
        else:
            self.head = c.next
        if c.next >= 0:
            self.e[c.next].prev = c.prev
        else:
            self.tail = c.prev

    cdef void remove(self, int32_t x) noexcept:
        cdef lru_entry *c = &self.e[x]
        self._unlist(x)
        _key_unindex(self.ix0, self.ix1, &c.k)
        c.k.used = 0
        c.next = self.free_head
        self.free_head = x
        self.n -= 1

    cdef void to_end(self, int32_t x) noexcept:
        if x == self.tail:
            return
        self._unlist(x)
        cdef lru_entry *c = &self.e[x]
        c.prev = self.tail
        c.next = -1
        self.e[self.tail].next = x
        self.tail = x

    def __len__(self):
        return self.n

    def items(self):
        """[((fetch_dir, (proto, saddr, sport, daddr, dport)), a, b)], oldest first."""
        cdef list out = []
        cdef int32_t x = self.head
        cdef lru_entry *c
        while x >= 0:
            c = &self.e[x]
            out.append(((c.k.fetch_dir, (c.k.proto, c.k.saddr, c.k.sport, c.k.daddr, c.k.dport)), c.a, c.b))
            x = c.next
        return out


# ------------------------------------------------------------------------------------
cdef class FetchQueue:
    """``pending_py.FetchQueue`` in C: the FETCH records waiting to be sent, each with
    its owner, in one array (no Python object per record); ``take`` hands them out as
    one messages.KEY_DTYPE array per owner."""

    def __cinit__(self):
        self.k = NULL
        self.own = NULL
        self.n = self.cap = 0

    def __dealloc__(self):
        free(self.k)
        free(self.own)

    cdef wire_key *push(self, int32_t owner) except NULL:
        """Room for one more record (zeroed), queued for `owner`."""
        cdef Py_ssize_t cap
        if self.n == self.cap:
            cap = self.cap * 2 if self.cap else 256
            self.k = <wire_key *>_regrow(self.k, <int32_t>cap, sizeof(wire_key))
            self.own = <int32_t *>_regrow(self.own, <int32_t>cap, sizeof(int32_t))
            self.cap = cap
        cdef wire_key *k = &self.k[self.n]
        memset(k, 0, sizeof(wire_key))
        self.own[self.n] = owner
        self.n += 1
        return k

    def __len__(self):
        return self.n

    def __bool__(self):
        return self.n > 0

    def view(self):
        """(owners int32[n], records KEY_DTYPE[n]) queued, in order (copies)."""
        cdef cnp.ndarray recs = np.empty(self.n, _M.KEY_DTYPE)
        cdef cnp.ndarray owners = np.empty(self.n, np.int32)
        if self.n:
            memcpy(cnp.PyArray_DATA(recs), self.k, self.n * sizeof(wire_key))
            memcpy(cnp.PyArray_DATA(owners), self.own, self.n * sizeof(int32_t))
        return owners, recs

    def take(self):
        """[(owner, KEY_DTYPE records)], ``pending_py.group_by_owner``; left empty."""
        owners, recs = self.view()
        self.n = 0
        return group_by_owner(owners, recs)


# ------------------------------------------------------------------------------------
cdef class PendingTable:
    """Fetches in flight, the negative cache and the per-source token buckets, in C.
    The interface and the answers of ``pending_py.PendingTable``."""

    def __cinit__(self):
        self.e = NULL
        self.fnx = NULL
        self.fdat = NULL
        self.flen = NULL
        self.ftag = NULL
        self.cap = self.n = self.fcap = self.hw = 0
        self.free_head = self.ffree = -1
        self.th[0] = self.th[1] = self.tt[0] = self.tt[1] = -1
        self.tn[0] = self.tn[1] = 0
        self.queued = 0
        self.walks = 0
        iheap_init(&self.tm)

    def __init__(self, queue_total, queue_per_flow, retry_s, fetch_burst, fetch_rate, negative_ttl_s,
                 negative_max, int32_t capacity=1024, max_sources=MAX_SOURCES):
        self.src_max = int(max_sources)
        self.qmax, self.qflow, self.retry_s = int(queue_total), int(queue_per_flow), float(retry_s)
        self.burst, self.rate = float(fetch_burst), float(fetch_rate)
        self.neg_ttl, self.neg_max = float(negative_ttl_s), int(negative_max)
        self.neg = KeyedLru(min(self.neg_max + 1, 1 << 20))  # at their bound: never grown
        self.src = KeyedLru(min(self.src_max + 1, 1 << 20))
        self._grow(max(16, capacity))

    def __dealloc__(self):
        cdef int32_t i
        if self.fdat != NULL:
            for i in range(self.fcap):
                free(self.fdat[i])
        free(self.fdat)
        free(self.flen)
        free(self.ftag)
        free(self.e)
        free(self.fnx)
        iheap_free(&self.tm)

    def _grow(self, int32_t cap):
        """Room for `cap` fetches: the entry array grows, the indexes are rebuilt."""
        self.e = <pf_entry *>_regrow(self.e, cap, sizeof(pf_entry))
        self.cap = cap
        iheap_reserve(&self.tm, cap)
        self.ix_out = _index(cap)
        self.ix_in = _index(cap)
        self.ix_seq = _index(cap)
        _key_reindex(<const char *>self.e, sizeof(pf_entry), self.hw, self.ix_out, self.ix_in)
        cdef int32_t x
        for x in range(self.hw):
            if self.e[x].k.used:
                self.ix_seq.c_insert(0, self.e[x].seq, 0, 0, 0, 0, 0, x, 0, 0)

    def _grow_frames(self):
        """Twice the frame slots (amortised: the frames queued are bounded by queue_total)."""
        cdef int32_t cap = max(64, self.fcap * 2)
        self.fnx = <int32_t *>_regrow(self.fnx, cap, sizeof(int32_t))
        self.fdat = <unsigned char **>_regrow(self.fdat, cap, sizeof(unsigned char *))
        self.flen = <uint32_t *>_regrow(self.flen, cap, sizeof(uint32_t))
        self.ftag = <uint8_t *>_regrow(self.ftag, cap, sizeof(uint8_t))
        cdef int32_t i
        for i in range(cap - 1, self.fcap - 1, -1):
            self.fdat[i] = NULL
            self.fnx[i] = self.ffree
            self.ffree = i
        self.fcap = cap

    # -- C level -----------------------------------------------------------------------------
    cdef int32_t find(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                      uint16_t dp) noexcept:
        return _key_find(self.ix_out, self.ix_in, d, p, sa, sp, da, dp)

    cdef int32_t by_seq(self, uint32_t seq) noexcept:
        cdef int64_t j = self.ix_seq.c_find(0, seq, 0, 0, 0)
        return <int32_t>self.ix_seq.c_slot(j).rule_id if j >= 0 else -1

    cdef int32_t add(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                     uint16_t dp) except -2:
        """A new entry for a key not in flight (seq and the rest: the caller's)."""
        cdef int32_t x = self.free_head
        if x >= 0:
            self.free_head = self.e[x].next_free
        else:
            if self.hw == self.cap:
                self._grow(self.cap * 2)
            x = self.hw
            self.hw += 1
        cdef pf_entry *c = &self.e[x]
        memset(c, 0, sizeof(pf_entry))
        c.k.fetch_dir, c.k.proto, c.k.saddr, c.k.sport, c.k.daddr, c.k.dport = d, p, sa, sp, da, dp
        c.k.used = 1
        c.fhead = c.ftail = -1
        c.charged = -1
        self.n += 1
        _key_index(self.ix_out, self.ix_in, &c.k, x)
        return x

    cdef int _set_seq(self, int32_t x, uint32_t seq, double due) except -1:
        """Fetch `x` under `seq` (indexed), its timer queued (or moved) to `due`."""
        self.e[x].seq = seq
        self.ix_seq.c_insert(0, seq, 0, 0, 0, 0, 0, x, 0, 0)
        iheap_set(&self.tm, x, due, seq)
        return 0

    cdef int add_frame(self, int32_t x, const unsigned char *p, uint32_t length, uint8_t tag) except -1:
        """A copy of the frame at `p` (`length` bytes, `tag`) at the end of fetch `x`'s."""
        cdef unsigned char *d = <unsigned char *>malloc(length if length else 1)
        if d == NULL:
            raise MemoryError()
        if self.ffree < 0:
            try:
                self._grow_frames()
            except BaseException:
                free(d)
                raise
        memcpy(d, p, length)
        cdef int32_t i = self.ffree
        self.ffree = self.fnx[i]
        self.fdat[i] = d
        self.flen[i] = length
        self.ftag[i] = tag
        self.fnx[i] = -1
        cdef pf_entry *c = &self.e[x]
        if c.ftail >= 0:
            self.fnx[c.ftail] = i
        else:
            c.fhead = i
        c.ftail = i
        c.nframes += 1
        self.queued += 1
        return 0

    cdef void release(self, int32_t x, int take) noexcept:
        """Forget fetch `x`: out of the indexes, its frames out of the arena -- dropped
        (`take` -1), or their chain appended to taken chain `take` (0, 1: handed back,
        in arrival order, by the next ``_take(take)``)."""
        cdef pf_entry *c = &self.e[x]
        cdef int32_t i = c.fhead
        _key_unindex(self.ix_out, self.ix_in, &c.k)
        self.ix_seq.c_delete(0, c.seq, 0, 0, 0)
        iheap_remove(&self.tm, x)  # its timer: gone where it sits, nothing left to skip later
        if take >= 0:
            if i >= 0:
                if self.tt[take] >= 0:
                    self.fnx[self.tt[take]] = i
                else:
                    self.th[take] = i
                self.tt[take] = c.ftail
                self.tn[take] += c.nframes
        else:
            while i >= 0:
                i = self._free_frame(i)
        self.queued -= c.nframes
        c.k.used = 0
        c.next_free = self.free_head
        self.free_head = x
        self.n -= 1

    cdef int32_t _free_frame(self, int32_t i) noexcept:
        """Frame slot `i`'s bytes freed, the slot back on the free list; returns the next
        frame of its chain."""
        cdef int32_t nx = self.fnx[i]
        free(self.fdat[i])
        self.fdat[i] = NULL
        self.fnx[i] = self.ffree
        self.ffree = i
        return nx

    cdef object _take(self, int d):
        """The frames on taken chain `d` as one ``Frames`` (copied back to back into one
        buffer; tags None when none is tagged), their slots freed; the chain left empty."""
        cdef Py_ssize_t n = self.tn[d], k = 0
        cdef int64_t total = 0
        cdef int32_t i = self.th[d]
        cdef bint tagged = False
        cdef cnp.npy_intp dim
        if n == 0:  # (answers without frames: no arrays made)
            return Frames(_EMPTY_U8, _EMPTY_U32, _EMPTY_U32, None, 0)
        while i >= 0:
            total += self.flen[i]
            tagged |= self.ftag[i] != 0
            i = self.fnx[i]
        if total >= _NO_FRAME:
            raise OverflowError("frames beyond 4 GiB")
        dim = total if total else 1
        cdef cnp.ndarray buf_a = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_UINT8, 0)
        dim = n
        cdef cnp.ndarray off_a = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_UINT32, 0)
        cdef cnp.ndarray len_a = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_UINT32, 0)
        cdef cnp.ndarray tag_a = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_UINT8, 0) if tagged else None
        cdef unsigned char *buf = <unsigned char *>cnp.PyArray_DATA(buf_a)
        cdef uint32_t *off = <uint32_t *>cnp.PyArray_DATA(off_a)
        cdef uint32_t *ln = <uint32_t *>cnp.PyArray_DATA(len_a)
        cdef uint8_t *tg = <uint8_t *>cnp.PyArray_DATA(tag_a) if tagged else NULL
        cdef uint32_t o = 0
        i = self.th[d]
        while i >= 0:
            memcpy(buf + o, self.fdat[i], self.flen[i])
            off[k] = o
            ln[k] = self.flen[i]
            if tagged:
                tg[k] = self.ftag[i]
            o += self.flen[i]
            k += 1
            i = self._free_frame(i)
        self.th[d] = self.tt[d] = -1
        self.tn[d] = 0
        return Frames(buf_a, off_a, len_a, tag_a, n)

    cdef void refund(self, int32_t x) noexcept:
        """The token fetch `x` took back to its source (if the source is still known)."""
        cdef pf_entry *c = &self.e[x]
        cdef int32_t b
        cdef double t
        if c.charged < 0:
            return
        b = self.src.find(0, 0, <uint32_t>c.charged, 0, 0, 0)
        if b >= 0:
            t = self.src.e[b].a + 1.0
            self.src.e[b].a = t if t < self.burst else self.burst
        c.charged = -1

    cdef int queue(self, FetchQueue fq, int32_t x) except -1:
        """Fetch `x`'s FETCH record (messages.KEY_DTYPE) into `fq`, for its owner."""
        cdef pf_entry *c = &self.e[x]
        cdef wire_key *k = fq.push(c.owner)
        k.seq = c.seq
        k.proto = c.k.proto
        k.flags = c.k.flags
        if c.k.fetch_dir == D_IN:  # (p, R, Rp, E, Ep)
            k.kind = FETCH_BY_EXTERNAL
            k.ext_addr, k.rem_addr, k.ext_port, k.rem_port = c.k.daddr, c.k.saddr, c.k.dport, c.k.sport
        else:  # (p, I, Ip, R, Rp)
            k.kind = FETCH_BY_INTERNAL
            k.int_addr, k.rem_addr, k.int_port, k.rem_port = c.k.saddr, c.k.daddr, c.k.sport, c.k.dport
        return 0

    cdef object _snapshot(self, int32_t x):
        cdef pf_entry *c = &self.e[x]
        cdef list frames = []
        cdef int32_t i = c.fhead
        while i >= 0:
            frames.append(self.fdat[i][:self.flen[i]])
            i = self.fnx[i]
        cdef int32_t k = self.tm.pos[x]
        return Pending((c.k.fetch_dir, (c.k.proto, c.k.saddr, c.k.sport, c.k.daddr, c.k.dport), c.owner, c.seq, c.first,
                        c.sent, c.retry, c.k.flags, frames, c.charged, self.tm.a[k].d if k >= 0 else _INF))

    cdef int32_t _find_pk(self, pk) except -2:
        return _pk_find(self.ix_out, self.ix_in, pk)

    # -- lookups ------------------------------------------------------------------------------
    def __len__(self):
        return self.n

    def __bool__(self):
        return self.n > 0

    def __contains__(self, pk):
        return self._find_pk(pk) >= 0

    def get(self, pk, default=None):
        cdef int32_t x = self._find_pk(pk)
        return self._snapshot(x) if x >= 0 else default

    def __getitem__(self, pk):
        cdef int32_t x = self._find_pk(pk)
        if x < 0:
            raise KeyError(pk)
        return self._snapshot(x)

    def items(self):
        """Every fetch, [((fetch_dir, key), Pending)]: a walk (counted in `walks`)."""
        self.walks += 1
        cdef list out = []
        cdef int32_t x
        for x in range(self.hw):
            if self.e[x].k.used:
                p = self._snapshot(x)
                out.append(((p[0], p[1]), p))
        return out

    def keys(self):
        return [pk for pk, _ in self.items()]

    def values(self):
        return [p for _, p in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def seqs(self):
        """{seq: (fetch_dir, key)} of every fetch (a walk)."""
        return {p.seq: pk for pk, p in self.items()}

    # -- the fetch client's operations ----------------------------------------------------------
    def fetch_rows(self, rows, frames, double now, seq, FetchQueue fq not None):
        """``pending_py.PendingTable.fetch_rows``: the rows read in place."""
        if type(rows) is not np.ndarray or (<cnp.ndarray>rows).descr != FETCH_ROW_DTYPE:
            raise TypeError("rows must be a layout.FETCH_ROW_DTYPE array")
        cdef cnp.ndarray keep = _contiguous(rows)
        cdef const fetch_row *rw = <const fetch_row *>cnp.PyArray_DATA(keep)
        cdef Py_ssize_t nrow = cnp.PyArray_SIZE(keep), j
        # the frames (``Frames``: frame j row j's), read in place: copied into the arena
        cdef const unsigned char *fb = NULL
        cdef const uint32_t *fo = NULL
        cdef const uint32_t *fl = NULL
        cdef const uint8_t *ft = NULL
        cdef cnp.ndarray fb_a, fo_a, fl_a, ft_a
        cdef Py_ssize_t fbn = 0
        if frames is not None:
            frames = Frames.of(frames)
            if len(frames) != nrow:
                raise ValueError(f"{len(frames)} frames for {nrow} rows")
            fb_a = cnp.PyArray_FROMANY(frames.buf, cnp.NPY_UINT8, 1, 1, cnp.NPY_ARRAY_C_CONTIGUOUS)
            fo_a = cnp.PyArray_FROMANY(frames.offsets, cnp.NPY_UINT32, 1, 1, cnp.NPY_ARRAY_C_CONTIGUOUS)
            fl_a = cnp.PyArray_FROMANY(frames.lengths, cnp.NPY_UINT32, 1, 1, cnp.NPY_ARRAY_C_CONTIGUOUS)
            if cnp.PyArray_SIZE(fo_a) < nrow or cnp.PyArray_SIZE(fl_a) < nrow:
                raise ValueError(f"offsets or lengths for fewer than {nrow} frames")
            fb = <const unsigned char *>cnp.PyArray_DATA(fb_a)
            fbn = cnp.PyArray_SIZE(fb_a)
            fo = <const uint32_t *>cnp.PyArray_DATA(fo_a)
            fl = <const uint32_t *>cnp.PyArray_DATA(fl_a)
            for j in range(nrow):  # every frame inside the buffer, before anything changes
                if fo[j] != _NO_FRAME and <Py_ssize_t>fo[j] + <Py_ssize_t>fl[j] > fbn:
                    raise ValueError(f"frame {j} ({fo[j]}+{fl[j]}) outside a buffer of {fbn} bytes")
            if frames.tags is not None:
                ft_a = cnp.PyArray_FROMANY(frames.tags, cnp.NPY_UINT8, 1, 1, cnp.NPY_ARRAY_C_CONTIGUOUS)
                if cnp.PyArray_SIZE(ft_a) < nrow:
                    raise ValueError(f"tags for fewer than {nrow} frames")
                ft = <const uint8_t *>cnp.PyArray_DATA(ft_a)
        cdef int64_t n = 0, started = 0, c_neg = 0, c_rate = 0, c_full = 0
        cdef uint32_t s = seq
        cdef uint8_t d, p
        cdef uint32_t sa, da
        cdef uint16_t sp, dp
        cdef int32_t x, b
        cdef int64_t charged
        cdef double t, burst = self.burst, rate = self.rate
        cdef KeyedLru neg = self.neg, src = self.src
        cdef pf_entry *c
        cdef lru_entry *be
        cdef const fetch_row *r
        cdef bint frame
        for j in range(nrow):
            if j + LOOKAHEAD < nrow:  # its key's index line, its remote's bucket, a seq
                r = &rw[j + LOOKAHEAD]
                _prefetch_home(self.ix_in if r.fetch_dir else self.ix_out, r.proto, r.saddr, r.sport, r.daddr,
                               r.dport)
                if r.fetch_dir:
                    _prefetch_home(src.ix0, 0, r.saddr, 0, 0, 0)
                _prefetch_home(self.ix_seq, 0, s + LOOKAHEAD, 0, 0, 0)
            r = &rw[j]
            frame = fb != NULL and fo[j] != _NO_FRAME
            d = 1 if r.fetch_dir else 0
            p, sa, sp, da, dp = r.proto, r.saddr, r.sport, r.daddr, r.dport
            x = self.find(d, p, sa, sp, da, dp)
            if x >= 0:
                if frame:
                    if self.queued >= self.qmax or self.e[x].nframes >= self.qflow:
                        c_full += 1
                        continue
                    self.add_frame(x, fb + fo[j], fl[j], ft[j] if ft != NULL else 0)
                    n += 1
                continue
            if neg.n:
                b = neg.find(d, p, sa, sp, da, dp)
                if b >= 0:
                    if neg.e[b].a > now:
                        c_neg += 1
                        continue
                    neg.remove(b)
            charged = -1
            if d == D_IN:  # the remote's token bucket
                b = src.find(0, 0, sa, 0, 0, 0)
                if b < 0:
                    b = src.add(0, 0, sa, 0, 0, 0)
                    be = &src.e[b]
                    be.a, be.b = burst, now
                    if src.n > self.src_max:
                        src.remove(src.head)
                else:
                    src.to_end(b)
                    be = &src.e[b]
                    t = be.a + (now - be.b) * rate
                    be.a = t if t < burst else burst  # min(burst, t), NaN included
                    be.b = now
                be = &src.e[b]
                if be.a < 1.0:
                    c_rate += 1
                    continue
                be.a -= 1.0
                charged = sa
            if frame and self.queued >= self.qmax:
                c_full += 1
                frame = False  # the fetch still goes out: later packets will find the rule
            x = self.add(d, p, sa, sp, da, dp)
            c = &self.e[x]
            c.owner = r.owner
            c.first = c.sent = now
            c.retry = self.retry_s
            c.k.flags = F_ICMP_ERROR if r.kind == KIND_ICMP_ERROR else 0
            c.charged = charged
            self._set_seq(x, s, now + c.retry)
            self.queue(fq, x)
            s += 1
            if s == 0:
                s = 1
            started += 1
            if frame:
                self.add_frame(x, fb + fo[j], fl[j], ft[j] if ft != NULL else 0)
                n += 1
        return n, started, c_neg, c_rate, c_full, s

    def start(self, fetch_dir, key, int owner, double now, int flags, seq, FetchQueue fq not None):
        """``pending_py.PendingTable.start``."""
        p, sa, sp, da, dp = key
        cdef int32_t x = self.add(1 if fetch_dir else 0, p, sa, sp, da, dp)
        cdef pf_entry *c = &self.e[x]
        c.owner = owner
        c.first = c.sent = now
        c.retry = self.retry_s
        c.k.flags = flags
        self._set_seq(x, seq, now + c.retry)
        self.queue(fq, x)

    def answer_rules(self, int source, recs, owners, double now, lat_limits):
        """``pending_py.PendingTable.answer_rules``: the records read in place."""
        cdef cnp.ndarray keep = _contiguous(recs)
        cdef const unsigned char *raw = <const unsigned char *>cnp.PyArray_DATA(keep)
        cdef Py_ssize_t nrec = len(recs), k
        cdef cnp.ndarray own_a = cnp.PyArray_FROMANY(owners, cnp.NPY_INT64, 0, 1,
                                                     cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_FORCECAST)
        if cnp.PyArray_SIZE(own_a) < nrec:
            raise ValueError(f"{cnp.PyArray_SIZE(own_a)} owners for {nrec} records")
        cdef const int64_t *own = <const int64_t *>cnp.PyArray_DATA(own_a)
        cdef int nlim = len(lat_limits), j
        cdef double[16] lim
        if nlim > 16:
            raise ValueError("at most 16 latency limits")
        for j in range(nlim):
            lim[j] = lat_limits[j]
        cdef list bad_owner = []
        cdef cnp.ndarray acc_a = np.empty(nrec, np.int64)
        cdef cnp.ndarray dirs_a = np.zeros(nrec, np.uint8)
        cdef cnp.ndarray lats_a = np.empty(nrec, np.float64)
        cdef int64_t *acc = <int64_t *>cnp.PyArray_DATA(acc_a)
        cdef uint8_t *dirs = <uint8_t *>cnp.PyArray_DATA(dirs_a)
        cdef double *lats = <double *>cnp.PyArray_DATA(lats_a)
        cdef Py_ssize_t na = 0
        cdef list counts = [0] * (nlim + 1)
        cdef int64_t[17] cnt
        cdef int64_t dup = 0, wrong = 0, bad = 0
        cdef const wire_rule *r
        cdef pf_entry *c
        cdef int32_t x
        cdef uint16_t fsp, fdp
        cdef uint8_t dbit
        cdef double lat
        for j in range(nlim + 1):
            cnt[j] = 0
        for k in range(nrec):
            r = <const wire_rule *>&raw[k * sizeof(wire_rule)]
            x = self.by_seq(r.seq)
            if x < 0:
                dup += 1
                continue
            c = &self.e[x]
            if r.owner != source or own[k] != source:
                bad_owner.append(k)
                continue
            if c.owner != source:
                wrong += 1
                continue
            # the key asked for (rules.in_key / out_key: ICMP queries key on the identifier)
            if c.k.fetch_dir == D_IN:
                fsp = r.ext_port if r.proto == P_ICMP else r.rem_port
                if not (c.k.proto == r.proto and c.k.saddr == r.rem_addr and c.k.sport == fsp
                        and c.k.daddr == r.ext_addr and c.k.dport == r.ext_port):
                    bad += 1
                    continue
                dbit = BIT_IN
            else:
                fdp = r.int_port if r.proto == P_ICMP else r.rem_port
                if not (c.k.proto == r.proto and c.k.saddr == r.int_addr and c.k.sport == r.int_port
                        and c.k.daddr == r.rem_addr and c.k.dport == fdp):
                    bad += 1
                    continue
                dbit = BIT_OUT
            lat = now - c.first
            self.refund(x)
            self.release(x, 1 if dbit == BIT_IN else 0)
            acc[na] = k
            lats[na] = lat
            na += 1
            dirs[k] = dbit
            j = 0
            while j < nlim and not (lat <= lim[j]):  # bisect_left: the first limit >= lat
                j += 1
            cnt[j] += 1
        for j in range(nlim + 1):
            counts[j] = cnt[j]
        rout, rin = self._take(0), self._take(1)
        return (acc_a if na == nrec else acc_a[:na]), dirs_a, rout, rin, (lats_a if na == nrec else lats_a[:na]), \
            counts, dup, wrong, bad, bad_owner

    def answer_nacks(self, int source, recs, double now):
        """``pending_py.PendingTable.answer_nacks``: the records read in place."""
        cdef cnp.ndarray keep = _contiguous(recs)
        cdef const unsigned char *raw = <const unsigned char *>cnp.PyArray_DATA(keep)
        cdef Py_ssize_t nrec = len(recs), k
        cdef int64_t stale = 0, wrong = 0, bad = 0, nacked = 0, lost = 0
        cdef const wire_key *r
        cdef pf_entry *c
        cdef int32_t x, b
        cdef bint ok
        for k in range(nrec):
            r = <const wire_key *>&raw[k * sizeof(wire_key)]
            x = self.by_seq(r.seq)
            if x < 0:
                stale += 1
                continue
            c = &self.e[x]
            if c.owner != source:
                wrong += 1
                continue
            if r.kind == FETCH_BY_EXTERNAL:
                ok = (c.k.fetch_dir == D_IN and c.k.proto == r.proto and c.k.saddr == r.rem_addr
                      and c.k.sport == r.rem_port and c.k.daddr == r.ext_addr and c.k.dport == r.ext_port)
            else:
                ok = (c.k.fetch_dir == D_OUT and c.k.proto == r.proto and c.k.saddr == r.int_addr
                      and c.k.sport == r.int_port and c.k.daddr == r.rem_addr and c.k.dport == r.rem_port)
            if not ok:
                bad += 1
                continue
            nacked += c.nframes if c.nframes > 1 else 1
            if r.reason == NACK_UNAVAILABLE:
                self.refund(x)  # the owner could not answer: not the remote's doing
            elif r.reason != NACK_FILTERED:  # no rule: remembered (a filtered answer can change)
                self._neg_set(c.k.fetch_dir, c.k.proto, c.k.saddr, c.k.sport, c.k.daddr, c.k.dport, now + self.neg_ttl)
            if c.k.flags & F_REVALIDATE:
                lost += 1
            self.release(x, -1)
        return stale, wrong, bad, nacked, lost

    def pop(self, pk):
        """``pending_py.PendingTable.pop``."""
        cdef int32_t x = self._find_pk(pk)
        if x < 0:
            return None
        self.refund(x)
        self.release(x, 0)
        return self._take(0)

    def pop_many(self, pks):
        """``pending_py.PendingTable.pop_many``."""
        cdef int32_t x
        for pk in pks:
            x = self._find_pk(pk)
            if x >= 0:
                self.refund(x)
                self.release(x, 0)
        return self._take(0)

    def due(self, double now, Py_ssize_t limit, double retry_max, double timeout, FetchQueue fq not None):
        """``pending_py.PendingTable.due``: the timers in an indexed heap (``_heap.pxd``),
        only live fetches in it (an answered fetch left it when answered)."""
        cdef int64_t again = 0, gone = 0, dropped = 0
        cdef double lim = now + 1e-6
        cdef int32_t x, nf
        cdef pf_entry *c
        while again + gone < limit and self.tm.n and self.tm.a[0].d <= lim:
            x = self.tm.a[0].x
            c = &self.e[x]
            if lim >= c.first + timeout:  # past its deadline: given up
                nf = c.nframes
                self.refund(x)
                self.release(x, -1)
                gone += 1
                dropped += nf if nf > 1 else 1
                continue
            c.sent = now
            c.retry = min(c.retry * 2, retry_max)
            self.queue(fq, x)
            iheap_set(&self.tm, x, min(now + c.retry, c.first + timeout), c.seq)
            again += 1
        return again, gone, dropped

    @property
    def next_due(self):
        """When the earliest fetch comes due (its retry or its deadline; inf: none)."""
        return self.tm.a[0].d if self.tm.n else _INF

    @property
    def frame_slots(self):
        """Slots of the frame arena (grown by doubling up to the frames queued at most)."""
        return self.fcap

    @property
    def timers(self):
        """Items in the timer structure (one per fetch in flight: none stale)."""
        return self.tm.n

    def advance_all(self, double now):
        """``pending_py.PendingTable.advance_all``: the heap rebuilt in place (O(n), in C)."""
        iheap_cap(&self.tm, now)

    def _timer_check(self):
        """The timer heap's invariants (tests): one item per fetch in flight, under its
        seq, each entry's place right, every parent before its children."""
        cdef int32_t k, x, m = 0
        assert self.tm.n == self.n, (self.tm.n, self.n)
        for k in range(self.tm.n):
            x = self.tm.a[k].x
            assert 0 <= x < self.hw and self.e[x].k.used and self.tm.pos[x] == k, (k, x)
            assert self.tm.a[k].t == self.e[x].seq, (k, x)
            if k:
                p = (k - 1) >> 1
                assert (self.tm.a[p].d, self.tm.a[p].t) < (self.tm.a[k].d, self.tm.a[k].t), (p, k)
        for x in range(self.hw):
            if self.tm.pos[x] >= 0:
                m += 1
                assert self.e[x].k.used, x
        assert m == self.n
        return True

    def fail_owner(self, int owner):
        """``pending_py.PendingTable.fail_owner``."""
        cdef int64_t n = 0
        cdef int32_t x
        for x in range(self.hw):
            if self.e[x].k.used and self.e[x].owner == owner:
                n += self.e[x].nframes if self.e[x].nframes > 1 else 1
                self.refund(x)
                self.release(x, -1)
        return n

    def of_owner(self, int owner, fetch_dir):
        """``pending_py.PendingTable.of_owner``."""
        cdef list out = []
        cdef int32_t x
        cdef uint8_t d = 1 if fetch_dir else 0
        cdef pf_entry *c
        for x in range(self.hw):
            c = &self.e[x]
            if c.k.used and c.owner == owner and c.k.fetch_dir == d:
                out.append((c.seq, (c.k.proto, c.k.saddr, c.k.sport, c.k.daddr, c.k.dport)))
        return out

    def reseq(self, seq, int owner, new_seq, double now, double timeout, FetchQueue fq not None):
        """``pending_py.PendingTable.reseq``."""
        cdef int32_t x = self.by_seq(seq)
        if x < 0:
            raise KeyError(seq)
        cdef pf_entry *c = &self.e[x]
        self.ix_seq.c_delete(0, c.seq, 0, 0, 0)
        c.owner = owner
        c.sent = now
        c.retry = self.retry_s
        cdef double due = min(now + c.retry, c.first + timeout)
        self._set_seq(x, new_seq, due)
        self.queue(fq, x)
        return due

    # -- the negative cache ---------------------------------------------------------------------
    cdef int _neg_set(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da, uint16_t dp,
                      double until) except -1:
        cdef int32_t b = self.neg.find(d, p, sa, sp, da, dp)
        if b < 0:
            b = self.neg.add(d, p, sa, sp, da, dp)
        self.neg.e[b].a = until
        if self.neg.n > self.neg_max:
            self.neg.remove(self.neg.head)
        return 0

    def neg_get(self, pk, default=None):
        cdef int32_t b = self.neg.find_pk(pk)
        return self.neg.e[b].a if b >= 0 else default

    def neg_set(self, pk, double until):
        """``pending_py.PendingTable.neg_set``."""
        d, (p, sa, sp, da, dp) = pk
        self._neg_set(1 if d else 0, p, sa, sp, da, dp, until)

    def neg_discard(self, pk):
        cdef int32_t b = self.neg.find_pk(pk)
        if b >= 0:
            self.neg.remove(b)

    def neg_discard_rules(self, recs, idx, dirs):
        """``pending_py.PendingTable.neg_discard_rules``: the records read in place."""
        if self.neg.n == 0 or len(idx) == 0:
            return
        cdef cnp.ndarray keep = _contiguous(recs)
        if keep.dtype.itemsize != sizeof(wire_rule):
            raise TypeError(f"RULE records expected, not {recs.dtype}")
        cdef const unsigned char *raw = <const unsigned char *>cnp.PyArray_DATA(keep)
        cdef Py_ssize_t n = len(recs), k, x
        cdef cnp.ndarray ix_a = cnp.PyArray_FROMANY(idx, cnp.NPY_INT64, 1, 1,
                                                    cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_FORCECAST)
        cdef cnp.ndarray d_a = cnp.PyArray_FROMANY(dirs, cnp.NPY_UINT8, 0, 1,
                                                   cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_FORCECAST)
        cdef const int64_t *ix = <const int64_t *>cnp.PyArray_DATA(ix_a)
        cdef const uint8_t *dv = <const uint8_t *>cnp.PyArray_DATA(d_a)
        cdef bint one = cnp.PyArray_NDIM(d_a) == 0
        if not one and d_a.shape[0] != n:
            raise ValueError(f"{d_a.shape[0]} dirs for {n} records")
        cdef const wire_rule *r
        cdef uint8_t d
        cdef int32_t b
        for k in range(ix_a.shape[0]):
            x = ix[k]
            if x < 0 or x >= n:
                raise IndexError(f"record index {x} out of range 0..{n - 1}")
            r = <const wire_rule *>&raw[x * sizeof(wire_rule)]
            d = dv[0] if one else dv[x]
            if d & BIT_OUT:  # rules.out_key: an ICMP query keys on the identifier
                b = self.neg.find(D_OUT, r.proto, r.int_addr, r.int_port, r.rem_addr,
                                  r.int_port if r.proto == P_ICMP else r.rem_port)
                if b >= 0:
                    self.neg.remove(b)
            if d & BIT_IN:  # rules.in_key
                b = self.neg.find(D_IN, r.proto, r.rem_addr, r.ext_port if r.proto == P_ICMP else r.rem_port,
                                  r.ext_addr, r.ext_port)
                if b >= 0:
                    self.neg.remove(b)

    def neg_len(self):
        return self.neg.n

    def neg_items(self):
        """[((fetch_dir, key), until)], oldest first."""
        return [(k, a) for k, a, _ in self.neg.items()]

    def source_items(self):
        """[(remote, [tokens, last refill])], least recently used first."""
        return [(k[1][1], [a, b]) for k, a, b in self.src.items()]

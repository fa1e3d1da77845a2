# cython: language_level=3
"""C interface of hypernat.nat._mappings (see there)."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from .._fastpath cimport FlowTable


# `t`, or a copy of it with twice its capacity if `need` more keys would not fit: a
# FlowTable used as a hash table grows (the reuse holds, ``_reuse.pyx``, grow theirs too)
cdef FlowTable _room(FlowTable t, uint64_t need=*)


cdef struct MapRec:
    uint32_t iaddr
    uint32_t eaddr
    uint16_t iport
    uint16_t eport
    uint8_t proto
    uint8_t used          # 0: a free rule id
    int64_t block         # the port block holding (eaddr, eport)
    uint32_t nsess        # its sessions
    int32_t shead         # first of its session records (-1: none)


cdef struct SessRec:
    uint32_t rid          # 0: a free record
    uint32_t raddr        # the remote endpoint (ICMP: rport 0)
    uint16_t rport
    int32_t prev          # the mapping's sessions: a doubly-linked list
    int32_t next          # ... (a free record: the next free one)


cdef struct Deferred:      # an index write a setup queued (``Mappings.defer``)
    uint8_t kind          # D_EXT: ext (p, E, Ep) -> rid; D_SESS: session (rid, R, Rp) -> record x
    uint8_t proto
    uint16_t port         # Ep / Rp
    uint32_t addr         # E / R
    uint32_t rid
    int32_t x


cdef enum:
    DQ = 16               # index writes queued (2 a new mapping): setups ahead of their writes x 2


cdef class Mappings:
    cdef readonly bint eim            # endpoint-independent mapping: one per internal endpoint
    cdef readonly bint raddr          # keep (rule id, R) counts (address-dependent filtering)
    cdef MapRec* m                    # by rule id (index 0 unused)
    cdef uint32_t mcap
    cdef uint32_t top                 # rule ids ever handed out + 1 (the next new one)
    cdef uint32_t* free_ids           # a stack: the last freed is reused first
    cdef uint32_t nfree
    cdef uint32_t fcap
    cdef readonly uint32_t count      # live mappings
    cdef SessRec* s
    cdef int32_t scap
    cdef int32_t stop                 # session records ever used (the next new one)
    cdef int32_t sfree                # freed session records: a list through .next
    cdef readonly uint64_t n_sessions
    cdef readonly uint32_t regrows    # the records copied to a larger array (only beyond the capacity)
    # indexes: FlowTables used as hash tables (the flow table's hashing and probing)
    cdef FlowTable ext                # (proto, E, Ep, 0, 0) -> rule id
    cdef FlowTable inl                # EIM: (proto, I, Ip, 0, 0) -> rule id
    cdef FlowTable outk               # APDM: (proto, I, Ip, R, Rp) -> rule id
    cdef FlowTable sess               # (1, rule id, 0, R, Rp) -> session record; (2, rule id, 0, R, 0) -> count
    # defer (OutSetup.run sets it for one call, then ``settle``s): the external-index and
    # session-index writes of a setup wait in a ring of DQ, their home slots prefetched
    # when queued, and are done DQ writes later (in order), so that their cache misses
    # overlap the next setups' work instead of stalling each; the lookups meanwhile
    # read the ring first (find_ext, has_session_c, has_raddr_c)
    cdef bint defer
    cdef Deferred dq[DQ]
    cdef int dh                       # the oldest queued
    cdef int dn                       # queued
    cdef int dn_ext                   # ... of them D_EXT
    # sessions added and not yet in the flow tables: 8 words each
    cdef uint32_t* pend
    cdef Py_ssize_t npend
    cdef Py_ssize_t pcap

    cdef _grow_m(self, uint32_t cap)
    cdef _grow_s(self, int32_t cap)
    cdef MapRec* _get(self, uint32_t rid) except NULL
    cdef MapRec* live_c(self, uint32_t rid) noexcept nogil
    cdef void prefetch_out(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ra, uint16_t r) noexcept
    cdef uint32_t find_ext(self, uint8_t p, uint32_t ea, uint16_t ep) noexcept
    cdef uint32_t find_out(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ra, uint16_t r) noexcept
    cdef bint has_session_c(self, uint32_t rid, uint32_t ra, uint16_t r) noexcept
    cdef bint has_raddr_c(self, uint32_t rid, uint32_t ra) noexcept
    cdef void prefetch_ext(self, uint8_t p, uint32_t ea, uint16_t ep) noexcept
    cdef void prefetch_end(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep, uint32_t rid,
                           uint32_t ra, uint16_t r) noexcept
    cdef int64_t new_c(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep, int64_t g) except -1
    cdef int add_session_c(self, uint32_t rid, uint32_t ra, uint16_t r) except -1
    cdef int64_t end_session_c(self, uint32_t rid, uint32_t ra, uint16_t r) except -2
    cdef int end_c(self, uint32_t rid) except -1
    cdef MapRec* session_c(self, uint32_t rid, uint32_t ra, uint16_t rp, out, inn, bint compiled,
                           uint32_t* last, uint8_t* tcp_out, uint8_t* tcp_in) except NULL
    cdef uint32_t _queued_ext(self, uint8_t p, uint32_t ea, uint16_t ep) noexcept
    cdef bint _queued_sess(self, uint32_t rid, uint32_t ra, uint16_t r, bint any_port) noexcept
    cdef int settle_c(self) except -1
    cdef int _defer(self, uint8_t kind, uint8_t p, uint32_t addr, uint16_t port, uint32_t rid, int32_t x) except -1
    cdef int _write(self, const Deferred* d) except -1
    cdef int _write_oldest(self) except -1
    cdef int _put(self, uint32_t rid, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep,
                  int64_t g) except -1

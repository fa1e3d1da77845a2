# cython: language_level=3
"""The owner's leases (``hypernat/agent/_leases.pyx``): one C record per (session, holder),
indexed by session through a FlowTable (the flow table's hashing and probing,
``_fastpath.pxd``) and by external endpoint, ordered by end in a heap (``_heap.pxd``)."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from .._fastpath cimport FlowTable
from .._heap cimport hn_heap

ctypedef struct le_entry:
    uint32_t iaddr
    uint32_t eaddr
    uint32_t raddr
    uint16_t iport
    uint16_t eport
    uint16_t rport
    uint8_t proto
    uint8_t used
    uint16_t holder
    double until            # the owner's clock, grace included
    double due              # the time this lease is queued under in the heap
    int32_t same_next       # leases sharing (proto, R, Rp, E, Ep); the free list
    int32_t ep_prev         # leases on (proto, E, Ep)
    int32_t ep_next


cdef class LeaseTable:
    cdef le_entry *e
    cdef int32_t cap
    cdef int32_t n              # leases ((session, holder) pairs)
    cdef int32_t nsess          # sessions with a lease
    cdef int32_t free_head
    cdef int32_t hw             # entries [0, hw) were ever used (those above: never touched)
    cdef FlowTable ids          # (proto, R, Rp, E, Ep) -> head of a same_next chain (rule_id = index)
    cdef FlowTable eps          # (proto, E, Ep, 0, 0) -> head of the endpoint list
    cdef hn_heap h
    cdef public uint64_t walks  # whole-table walks (items / keys / values)

    cdef int32_t find(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                      uint32_t r, uint16_t rp, int holder) noexcept
    cdef bint has_session(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                          uint32_t r, uint16_t rp) noexcept
    cdef int32_t add(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                     uint32_t r, uint16_t rp, int holder) except -2
    cdef void _index(self, int32_t x) noexcept
    cdef void unlink(self, int32_t x) noexcept
    cdef dict holders(self, int32_t head, uint32_t i, uint16_t ip)

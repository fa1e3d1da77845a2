# cython: language_level=3
"""The owner's leases (``hypernat/agent/_leases.pyx``): one C record per (session, holder),
indexed by session and by external endpoint (the entry store, ``_entries.pxd``), ordered by end in a heap (``_heap.pxd``)."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from .._fastpath cimport FlowTable
from .._entries cimport en_head, en_store
from .._heap cimport hn_heap

ctypedef struct le_entry:
    en_head k               # identity and index links (_entries.pxd): first
    uint16_t holder
    double until            # the owner's clock, grace included
    double due              # the time this lease is queued under in the heap


cdef class LeaseTable:
    cdef en_store s             # the leases, (session, holder) pairs (_entries.pxd)
    cdef le_entry *e            # s.e, typed
    cdef int32_t nsess          # sessions with a lease
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
    cdef void unlink(self, int32_t x) noexcept
    cdef dict holders(self, int32_t head, uint32_t i, uint16_t ip)

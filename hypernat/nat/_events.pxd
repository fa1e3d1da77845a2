# cython: language_level=3
"""C interface of hypernat.nat._events (see there)."""
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef packed struct EvRec:   # EVENT_DTYPE
    uint32_t iaddr
    uint32_t eaddr
    uint32_t raddr        # a mapping event: 0
    uint16_t iport
    uint16_t eport
    uint16_t rport        # a mapping event: 0
    uint8_t proto
    uint8_t kind          # EV_MAPPING, EV_SESSION
    uint32_t rule_id
    uint32_t now          # the caller's clock ticks (a session's last_seen)


cdef enum:
    EV_MAPPING = 1        # a mapping created
    EV_SESSION = 2        # a session created


@cython.final
cdef class EventRing:
    cdef EvRec* r
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef public bint mappings         # record mapping events (the per-rule log, local mode)
    cdef public bint sessions         # record session events (per-rule log with remote, PUSH)
    cpdef int record(self, uint8_t kind, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep,
                     uint32_t ra, uint16_t rp, uint32_t rid, uint32_t now) except -1

# cython: language_level=3
"""C interface of hypernat.nat._rate (see there)."""
from libc.stdint cimport int64_t, uint32_t


cdef struct Bucket:
    uint32_t host      # internal address
    uint32_t used      # 0: empty entry
    int64_t last       # time of the last refill (the caller's clock ticks)
    double tokens


cdef class HostRate:
    cdef readonly double rate         # new connections per tick per host
    cdef readonly double burst        # bucket size
    cdef Bucket* b
    cdef uint32_t mask
    cdef bint allow(self, uint32_t host, int64_t now) noexcept nogil
    cdef bint would_allow(self, uint32_t host, int64_t now) noexcept nogil

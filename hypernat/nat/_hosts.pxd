# cython: language_level=3
"""C interface of hypernat.nat._hosts (see there)."""
from libc.stdint cimport int64_t, uint64_t, uint32_t, int32_t

from ._ports cimport PortBlocks


cdef struct Host:
    uint32_t used         # 0: empty table entry
    uint32_t iaddr        # internal address (the key)
    uint32_t addr         # its external address (paired pooling: one per host)
    int32_t aidx          # ... as an index into the pool
    uint32_t nports[3]    # live mappings per protocol (TCP, UDP, ICMP)
    int32_t cur           # index in blocks of the block that last had room
    int32_t nblocks
    int32_t capb          # room in blocks
    int64_t* blocks       # its block ids, in assignment order


cdef class Hosts:
    cdef Host* t
    cdef uint64_t mask
    cdef Py_ssize_t count
    cdef Host* find(self, uint32_t iaddr) noexcept nogil
    cdef void prefetch(self, uint32_t iaddr) noexcept nogil
    cdef _rehash(self, uint64_t size)
    cdef Host* _get(self, uint32_t iaddr) except NULL
    cdef int64_t allocate_c(self, Host* h, int pi, int iport, bint preserve, PortBlocks bl, int* off) noexcept nogil
    cdef int add_ports_c(self, uint32_t iaddr, int pi, int delta) except -1

# cython: language_level=3
"""C interface of hypernat._geometry (see there): the partition's geometry and the
internal prefixes, declared once for every compiled reader (the wire validator,
hypernat.nat._mappings.OutSetup)."""
from libc.stdint cimport int32_t, int64_t, uint32_t


cdef class Geometry:
    cdef int64_t* base                # the pool's prefixes (pool order): first address,
    cdef int64_t* size                # ... addresses,
    cdef int64_t* off                 # ... pool index of the first
    cdef int nr
    cdef readonly int64_t port_min, port_max, block_size, n_nics, bpa, n_addrs
    cdef readonly bint by_port
    cdef int64_t* lblk                # loans: lent block ids, sorted ...
    cdef int32_t* lnic                # ... and the NIC holding each
    cdef Py_ssize_t nloans
    cdef object _args                 # the constructor's arguments (pickling)

    # pool index of an address, -1 outside the pool
    cdef int64_t index_c(self, uint32_t ea) noexcept nogil
    # global block id of (E, Ep), -1 outside the pool or the port range
    cdef int64_t block_c(self, uint32_t ea, uint32_t ep) noexcept nogil
    # the NIC whose space holds block g by the strategy (no loans); g a valid block id
    cdef int native_c(self, int64_t g) noexcept nogil
    # the NIC holding block g now (loans applied)
    cdef int holder_c(self, int64_t g) noexcept nogil
    # the NIC owning (E, Ep) now (loans applied), -1 outside the pool
    cdef int owner_c(self, uint32_t ea, uint32_t ep) noexcept nogil
    # the NIC owning (E, Ep) by the strategy (no loans), -1 outside the pool
    cdef int native_owner_c(self, uint32_t ea, uint32_t ep) noexcept nogil


cdef class Prefixes:
    cdef uint32_t* nets
    cdef uint32_t* masks
    cdef readonly int n
    cdef object _pairs
    # the address is inside one of the prefixes
    cdef bint has_c(self, uint32_t a) noexcept nogil

# cython: language_level=3
"""C interface of hypernat.nat._ports (see there)."""
from libc.stdint cimport int64_t, uint64_t, uint32_t, int32_t


cdef class PortBlocks:
    cdef readonly int block_size      # largest block (ports)
    cdef readonly bint parity         # RFC 4787 REQ-3: keep the internal port's parity
    cdef int words                    # 64-bit words per protocol bitmap
    cdef uint64_t rng_state           # splitmix64
    # block id -> slot: open addressing, linear probing, empty = -1
    cdef int64_t* hkeys
    cdef int32_t* hvals
    cdef uint64_t hmask
    cdef Py_ssize_t hcount
    # slots (one per assigned block)
    cdef Py_ssize_t cap
    cdef Py_ssize_t top               # slots ever used
    cdef int32_t* free_slots
    cdef Py_ssize_t n_free
    cdef int64_t* s_id
    cdef uint32_t* s_addr
    cdef uint32_t* s_lo
    cdef uint32_t* s_size
    cdef uint32_t* s_host             # internal address of the block's host
    cdef int32_t* s_aidx
    cdef uint32_t* s_nused            # [slot*3 + pi]
    cdef uint64_t* s_bits             # [(slot*3 + pi) * words + w]
    cdef uint64_t used_total[3]       # ports marked used over all blocks, per protocol

    cdef _grow(self, Py_ssize_t cap)
    cdef _rehash(self, uint64_t size)
    cdef int32_t _slot(self, int64_t g) except -2
    cdef inline uint64_t _free_word(self, uint64_t* bits, int k, int nw, uint32_t size) noexcept nogil
    cdef int32_t slot_of(self, int64_t g) noexcept nogil
    cdef uint64_t next_random(self) noexcept nogil
    cdef int take(self, int32_t s, int pi, int iport) noexcept nogil
    cdef bint take_at(self, int32_t s, int pi, int off) noexcept nogil
    cdef int release_slot(self, int32_t s, int pi, int off) noexcept nogil

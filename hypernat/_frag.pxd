# cython: language_level=3
"""The fragment table's C interface (``hypernat/_frag.pyx``): the fast path cimports
these functions and calls them for the few frames that are fragments."""

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t

from ._out cimport hn_out

cdef enum:
    FR_RANGES = 8           # disjoint byte ranges tracked per datagram (adjacent ones merge)
    FR_CHUNK = 2048         # bytes per held frame (an Ethernet frame of a 1500-byte MTU fits)
    FR_EXPIRE_PER_CALL = 64 # entries expired at most per translate call (bounded work)

ctypedef struct fr_entry:
    uint32_t saddr          # key: the fragment's addresses as it arrived
    uint32_t daddr
    uint32_t nsa            # translation, once the first fragment went through
    uint32_t nda
    uint32_t expires        # clock ticks
    uint32_t total          # payload bytes of the whole datagram (last fragment seen), else 0
    int32_t next            # hash chain
    int32_t older           # creation order (expiry): doubly linked
    int32_t newer
    int32_t held_head       # held frames, in arrival order
    int32_t held_tail
    uint32_t nheld
    uint16_t ipid
    uint8_t proto
    uint8_t dir
    uint8_t known
    uint8_t exitdir
    uint8_t nranges
    uint8_t pad
    uint32_t rs[FR_RANGES]  # received payload ranges [rs, re), sorted, coalesced
    uint32_t re[FR_RANGES]

ctypedef struct hn_frag:
    fr_entry *e
    int32_t *bucket
    uint32_t bmask
    uint32_t nentries
    uint32_t count
    int32_t free_e
    int32_t oldest
    int32_t newest
    uint8_t *arena          # nchunks * FR_CHUNK bytes: held frames
    uint32_t *clen
    uint16_t *cl3
    int32_t *cnext
    int32_t free_c
    uint32_t nchunks
    uint32_t chunks_used
    uint32_t timeout
    uint64_t *cnt           # FC_* counters (verdicts.FRAG_COUNTERS)

cdef void frag_begin(hn_frag *f, uint32_t now) noexcept nogil
cdef uint8_t frag_later(hn_frag *f, uint8_t *b, uint64_t fs, uint64_t fe, uint64_t l3, int direction,
                        uint32_t now) noexcept nogil
cdef uint8_t frag_first_check(hn_frag *f, const uint8_t *b, uint64_t l3, int direction,
                              uint32_t now) noexcept nogil
cdef void frag_first_record(hn_frag *f, const uint8_t *b, uint64_t l3, int direction, int exitdir,
                            uint32_t osa, uint32_t oda, uint32_t now, const uint8_t *mac,
                            hn_out *out) noexcept nogil

cdef class FragTable:
    cdef hn_frag f
    cdef object _arrays
    cdef object _counters
    cdef object _arena
    cdef int _busy

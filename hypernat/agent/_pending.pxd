# cython: language_level=3
"""The holder's fetches in flight (``hypernat/agent/_pending.pyx``): C records indexed by
key and by seq through FlowTables (the flow table's hashing and probing,
``_fastpath.pxd``), the waiting frames in one C arena, and two keyed LRU tables (the
negative cache, the per-source token buckets)."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from .._fastpath cimport FlowTable
from .._heap cimport hn_iheap
from .._wire cimport wire_key

ctypedef struct pk_head:        # the first member of both entry structs: a key by direction
    uint32_t saddr              # the key, as fetch_dir's flow table holds it
    uint32_t daddr
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t fetch_dir           # 0 OUT, 1 IN (0 too: the keys without a direction)
    uint8_t used
    uint8_t flags               # the table's own bits (a fetch's FETCH_F_*; KeyedLru: 0)


ctypedef struct pf_entry:       # a fetch in flight
    pk_head k                   # the key asked for
    int32_t owner               # the NIC asked
    uint32_t seq
    int32_t fhead               # frames waiting (arena indexes, a list in arrival order)
    int32_t ftail
    int32_t nframes
    int32_t next_free
    int64_t charged             # remote source whose token it holds (-1: none)
    double first
    double sent
    double retry


ctypedef struct lru_entry:      # a key with two values, on a recency list
    pk_head k
    double a                    # negative cache: until; buckets: tokens
    double b                    # buckets: last refill
    int32_t prev                # oldest first; the free list (next)
    int32_t next


cdef class KeyedLru:
    cdef lru_entry *e
    cdef int32_t cap
    cdef int32_t n
    cdef int32_t head
    cdef int32_t tail
    cdef int32_t free_head
    cdef int32_t hw             # entries [0, hw) were ever used (those above: never touched)
    cdef FlowTable ix0          # fetch_dir 0 (and the keys without a direction)
    cdef FlowTable ix1          # fetch_dir 1

    cdef int32_t find(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                      uint16_t dp) noexcept
    cdef int32_t find_pk(self, pk) except -2
    cdef int32_t add(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                     uint16_t dp) except -2
    cdef void remove(self, int32_t x) noexcept
    cdef void to_end(self, int32_t x) noexcept
    cdef void _unlist(self, int32_t x) noexcept


cdef class FetchQueue:
    cdef wire_key *k            # FETCH records waiting to be sent, in order
    cdef int32_t *own           # the owner each goes to
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    cdef wire_key *push(self, int32_t owner) except NULL


cdef class PendingTable:
    cdef pf_entry *e
    cdef int32_t cap
    cdef int32_t n
    cdef int32_t free_head
    cdef int32_t hw
    cdef FlowTable ix_out       # (proto, I, Ip, R, Rp) -> entry (rule_id)
    cdef FlowTable ix_in        # (proto, R, Rp, E, Ep) -> entry
    cdef FlowTable ix_seq       # (0, seq, 0, 0, 0) -> entry
    # the frame arena: a frame's bytes in C memory of its own (malloc), by slot
    cdef unsigned char **fdat   # its bytes (NULL: a free slot)
    cdef uint32_t *flen         # its length
    cdef uint8_t *ftag          # its tag (hairpin decisions so far; 0: not hairpinned)
    cdef int32_t *fnx           # next frame of the same fetch; the free list; a taken chain
    cdef int32_t fcap
    cdef int32_t ffree
    cdef int32_t[2] th          # frames released to be handed back (two chains: out, in)
    cdef int32_t[2] tt
    cdef int64_t[2] tn
    cdef readonly int64_t queued
    cdef public uint64_t walks  # whole-table walks (items / keys / values / seqs)
    cdef int64_t qmax
    cdef int64_t qflow
    cdef readonly double retry_s
    cdef readonly double burst
    cdef readonly double rate
    cdef readonly double neg_ttl
    cdef readonly int64_t neg_max
    cdef readonly int64_t src_max     # remote sources with a bucket (least recently used dropped)
    cdef KeyedLru neg           # (fetch_dir, key) -> until
    cdef KeyedLru src           # (0, remote, 0, 0, 0) -> tokens, last refill
    cdef hn_iheap tm            # each fetch's next retry or deadline, under (due, seq)

    cdef int32_t find(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                      uint16_t dp) noexcept
    cdef int32_t by_seq(self, uint32_t seq) noexcept
    cdef int32_t add(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da,
                     uint16_t dp) except -2
    cdef int add_frame(self, int32_t x, const unsigned char *p, uint32_t length, uint8_t tag) except -1
    cdef void release(self, int32_t x, int take) noexcept
    cdef object _take(self, int d)
    cdef int32_t _free_frame(self, int32_t i) noexcept
    cdef void refund(self, int32_t x) noexcept
    cdef int queue(self, FetchQueue fq, int32_t x) except -1
    cdef int _set_seq(self, int32_t x, uint32_t seq, double due) except -1
    cdef object _snapshot(self, int32_t x)
    cdef int32_t _find_pk(self, pk) except -2
    cdef int _neg_set(self, uint8_t d, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da, uint16_t dp,
                      double until) except -1

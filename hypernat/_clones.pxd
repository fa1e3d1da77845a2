# cython: language_level=3
"""The holder's clone table (``hypernat/_clones.pyx``): clone entries in C arrays, indexed
by session identity and by external endpoint (the entry store, ``_entries.pxd``), by
owner in linked lists, and ordered by lease end in a binary heap."""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from ._fastpath cimport FlowTable
from ._entries cimport en_head, en_store
from ._heap cimport hn_heap

ctypedef struct ce_entry:
    en_head k               # identity and index links (_entries.pxd): first
    uint32_t rule_id
    uint8_t dirs            # DIR_BIT_* installed here
    uint8_t owner
    double expires          # local clock: the lease ends here
    double due              # the time this clone is queued under in the heap
    int32_t own_prev        # clones of one owner
    int32_t own_next
    uint32_t mark           # == CloneTable.gen: already an output record of this batch ...
    int32_t out_at          # ... at this index (activity: both directions into one record)


# Records read in place: byte offsets of the fields a clone needs, from the array's dtype
# (clones_py.record_fields: SESSION_DTYPE's names or the wire layouts').
ctypedef struct rec_view:
    const unsigned char *b
    Py_ssize_t size
    Py_ssize_t o_p, o_i, o_ip, o_e, o_ep, o_r, o_rp, o_rid, o_to, o_ti   # -1: absent (0)

# SESSION_DTYPE as a C struct: hypernat/nat/_records.pxd (checked against it at import)
from .nat._records cimport sess_rec

cdef object rec_view_of(rec_view *v, recs)
cdef object rec_selection(idx, Py_ssize_t n, Py_ssize_t *m)


cdef inline uint32_t rec_u32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint16_t rec_u16(const unsigned char *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef class CloneTable:
    cdef en_store s         # the entries (_entries.pxd)
    cdef ce_entry *e        # s.e, typed
    cdef FlowTable ids      # (proto, R, Rp, E, Ep) -> head of a same_next chain (rule_id = index)
    cdef FlowTable eps      # (proto, E, Ep, 0, 0) -> head of the endpoint list
    cdef int32_t own_head[256]
    cdef int32_t own_count[256]
    cdef hn_heap h          # (due, index) of every clone (_heap.pxd)
    cdef public uint64_t walks   # whole-table walks (items / keys / values): tests assert 0 on the loop
    cdef uint32_t gen            # batch generation (ce_entry.mark)

    cdef int32_t find(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                      uint32_t r, uint16_t rp) noexcept
    cdef int32_t add(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                     uint32_t r, uint16_t rp) except -2
    cdef void unlink(self, int32_t x) noexcept
    cdef void _set_owner(self, int32_t x, int owner) noexcept
    cdef int32_t of_entry(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                          uint32_t r, uint16_t rp, uint8_t d) noexcept
    cdef uint32_t next_gen(self) noexcept
    cdef tuple _commit(self, int owner, const unsigned char *rb, const int64_t *todo, const double *exp,
                       Py_ssize_t t, const int8_t *got, int64_t d0, const uint8_t *dv, double margin)

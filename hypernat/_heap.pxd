# cython: language_level=3
"""A binary min-heap of (due time, entry index) in C, for the tables that keep a timer per
entry (the holder's clones, ``_clones.pyx``; the owner's leases,
``agent/_leases.pyx``): one implementation, inlined into each.  An entry's timer is
checked when it comes up (a table keeps, per entry, the time it is queued under, and
skips a heap item that no longer matches)."""

from libc.stdint cimport int32_t
from libc.stdlib cimport free, realloc


ctypedef struct hn_heap:
    double *d       # due times
    int32_t *i      # entry indexes
    int32_t n
    int32_t cap


cdef inline void heap_init(hn_heap *h) noexcept nogil:
    h.d = NULL
    h.i = NULL
    h.n = 0
    h.cap = 0


cdef inline void heap_free(hn_heap *h) noexcept nogil:
    free(h.d)
    free(h.i)
    heap_init(h)


cdef inline int heap_push(hn_heap *h, double due, int32_t x) except -1:
    cdef int32_t k, parent, ncap
    cdef double *nd
    cdef int32_t *ni
    if h.n == h.cap:
        ncap = 64 if h.cap < 32 else h.cap * 2
        nd = <double *>realloc(h.d, ncap * sizeof(double))
        if nd == NULL:
            raise MemoryError()
        h.d = nd
        ni = <int32_t *>realloc(h.i, ncap * sizeof(int32_t))
        if ni == NULL:
            raise MemoryError()
        h.i = ni
        h.cap = ncap
    k = h.n
    h.n += 1
    while k > 0:
        parent = (k - 1) >> 1
        if h.d[parent] <= due:
            break
        h.d[k] = h.d[parent]
        h.i[k] = h.i[parent]
        k = parent
    h.d[k] = due
    h.i[k] = x
    return 0


cdef inline void heap_pop(hn_heap *h) noexcept nogil:
    """Drop the top (h.d[0], h.i[0]); the caller read it."""
    cdef double d
    cdef int32_t xi, k = 0, c
    h.n -= 1
    if h.n == 0:
        return
    d = h.d[h.n]
    xi = h.i[h.n]
    while True:
        c = 2 * k + 1
        if c >= h.n:
            break
        if c + 1 < h.n and h.d[c + 1] < h.d[c]:
            c += 1
        if d <= h.d[c]:
            break
        h.d[k] = h.d[c]
        h.i[k] = h.i[c]
        k = c
    h.d[k] = d
    h.i[k] = xi

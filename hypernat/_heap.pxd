# cython: language_level=3
"""Binary min-heaps of (due time, entry index) in C, for the tables that keep a timer per
entry, one implementation each, inlined into the tables.  ``hn_heap`` (the holder's
clones, ``_clones.pyx``; the owner's leases, ``agent/_leases.pyx``): an entry's timer is
checked when it comes up (a table keeps, per entry, the time it is queued under, and
skips a heap item that no longer matches).  ``hn_iheap``, indexed (the holder's fetches
in flight, ``agent/_pending.pyx``): each entry's place in the heap is known, so a timer
is moved or removed where it sits and nothing stale is left behind."""

from libc.stdint cimport int32_t, uint32_t
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


# ------------------------------------------------------------------------------------
# An indexed heap: each entry at most once, its place in the heap known (``pos``), so that
# an entry's timer is moved or removed where it sits (O(log n)) and the heap holds no
# stale item -- for a table whose entries are mostly answered before they come due (the
# holder's fetches in flight, ``agent/_pending.pyx``).  Items order by (due, tie): among
# equal due times the lower tie first (a table passes something unique, e.g. a seq), so
# the order in which a table's timers come up is fully determined.

ctypedef struct hn_iitem:
    double d        # due time
    uint32_t t      # tie-break
    int32_t x       # entry index


ctypedef struct hn_iheap:
    hn_iitem *a     # the heap
    int32_t *pos    # per entry: its place in `a`, -1: not queued
    int32_t n
    int32_t cap
    int32_t npos    # entries `pos` has room for


cdef inline void iheap_init(hn_iheap *h) noexcept nogil:
    h.a = NULL
    h.pos = NULL
    h.n = h.cap = h.npos = 0


cdef inline void iheap_free(hn_iheap *h) noexcept nogil:
    free(h.a)
    free(h.pos)
    iheap_init(h)


cdef inline int iheap_reserve(hn_iheap *h, int32_t nentries) except -1:
    """Room for entry indexes [0, nentries) (the new ones not queued)."""
    cdef int32_t *npos
    cdef int32_t x
    if nentries <= h.npos:
        return 0
    npos = <int32_t *>realloc(h.pos, <size_t>nentries * sizeof(int32_t))
    if npos == NULL:
        raise MemoryError()
    for x in range(h.npos, nentries):
        npos[x] = -1
    h.pos = npos
    h.npos = nentries
    return 0


cdef inline bint _iless(const hn_iitem *p, const hn_iitem *q) noexcept nogil:
    return p.d < q.d or (p.d == q.d and p.t < q.t)


cdef inline void _iplace(hn_iheap *h, int32_t k, hn_iitem it) noexcept nogil:
    h.a[k] = it
    h.pos[it.x] = k


cdef inline void _isift_down(hn_iheap *h, int32_t k, hn_iitem it) noexcept nogil:
    """Put `it` at place `k` (a hole), moved down to where it belongs."""
    cdef int32_t c
    while True:
        c = 2 * k + 1
        if c >= h.n:
            break
        if c + 1 < h.n and _iless(&h.a[c + 1], &h.a[c]):
            c += 1
        if not _iless(&h.a[c], &it):
            break
        _iplace(h, k, h.a[c])
        k = c
    _iplace(h, k, it)


cdef inline void _isift(hn_iheap *h, int32_t k, hn_iitem it) noexcept nogil:
    """Put `it` at place `k` (a hole), moved up or down to where it belongs."""
    cdef int32_t parent
    while k > 0:
        parent = (k - 1) >> 1
        if not _iless(&it, &h.a[parent]):
            break
        _iplace(h, k, h.a[parent])
        k = parent
    _isift_down(h, k, it)


cdef inline int iheap_set(hn_iheap *h, int32_t x, double due, uint32_t tie) except -1:
    """Entry `x` (reserved) queued under (due, tie): added, or moved if queued."""
    cdef hn_iitem it
    cdef hn_iitem *na
    cdef int32_t k = h.pos[x], ncap
    it.d = due
    it.t = tie
    it.x = x
    if k < 0:
        if h.n == h.cap:
            ncap = 64 if h.cap < 32 else h.cap * 2
            na = <hn_iitem *>realloc(h.a, <size_t>ncap * sizeof(hn_iitem))
            if na == NULL:
                raise MemoryError()
            h.a = na
            h.cap = ncap
        k = h.n
        h.n += 1
    _isift(h, k, it)
    return 0


cdef inline void iheap_remove(hn_iheap *h, int32_t x) noexcept nogil:
    """Entry `x` out of the heap (nothing if it is not queued).  Bottom-up: the hole goes
    down to a leaf along the earlier children (one comparison a level), the last item
    fills it and goes up (a step or two, usually) -- fetches are mostly answered in the
    order they went out, i.e. removed at the top, where a plain sift-down of the last
    item would compare twice a level all the way down."""
    cdef int32_t k = h.pos[x], c
    if k < 0:
        return
    h.pos[x] = -1
    h.n -= 1
    if k == h.n:
        return
    while True:
        c = 2 * k + 1
        if c >= h.n:
            break
        if c + 1 < h.n and _iless(&h.a[c + 1], &h.a[c]):
            c += 1
        _iplace(h, k, h.a[c])
        k = c
    _isift(h, k, h.a[h.n])


cdef inline void iheap_cap(hn_iheap *h, double due) noexcept nogil:
    """Every item due at `due` at the latest (the later ones moved to `due`), the heap
    rebuilt in place (Floyd: O(n))."""
    cdef int32_t k
    for k in range(h.n):
        if h.a[k].d > due:
            h.a[k].d = due
    k = (h.n >> 1) - 1
    while k >= 0:
        _isift_down(h, k, h.a[k])
        k -= 1

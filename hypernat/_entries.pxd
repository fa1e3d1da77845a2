# cython: language_level=3
"""A session-keyed entry store in C, for the tables that keep one record per session
(or per (session, holder)): the holder's clones (``_clones.pyx``), the owner's leases
(``agent/_leases.pyx``).  One implementation, inlined into each.

Each table's entry struct starts with an ``en_head`` (the session identity and the
links); the store (``en_store``) holds the entries in one C array of ``size``-byte
records, reuses freed ones (a free list through ``same_next``) and touches the ones
above its high-water mark only when they are first used.  Two FlowTables (the flow
table's hashing and probing, ``_fastpath.pxd``) index the entries: ``ids`` keyed
(proto, R, Rp, E, Ep), its slot's rule_id the head of a chain of the entries sharing
that key (``same_next``); ``eps`` keyed (proto, E, Ep, 0, 0), the head of a doubly
linked list of the entries on that external endpoint (``ep_prev``, ``ep_next``).  A
table keeps the FlowTables and passes them in; what is its own (owners, holders,
timers) it keeps in the rest of its struct."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset

from ._fastpath cimport FlowTable


ctypedef struct en_head:        # the first member of a table's entry struct
    uint32_t iaddr
    uint32_t eaddr
    uint32_t raddr
    uint16_t iport
    uint16_t eport
    uint16_t rport
    uint8_t proto
    uint8_t used
    int32_t same_next           # entries sharing (proto, R, Rp, E, Ep); the free list
    int32_t ep_prev             # entries on (proto, E, Ep)
    int32_t ep_next


ctypedef struct en_store:
    char *e                     # cap records of `size` bytes, each starting with an en_head
    size_t size
    int32_t cap
    int32_t n                   # entries in use
    int32_t free_head
    int32_t hw                  # entries [0, hw) were ever used (those above: never touched)


cdef inline void en_init(en_store *s, size_t size) noexcept nogil:
    s.e = NULL
    s.size = size
    s.cap = s.n = s.hw = 0
    s.free_head = -1


cdef inline void en_release(en_store *s) noexcept nogil:
    free(s.e)
    s.e = NULL
    s.cap = s.n = s.hw = 0
    s.free_head = -1


cdef inline en_head *en_at(const en_store *s, int32_t x) noexcept nogil:
    return <en_head *>(s.e + <size_t>x * s.size)


cdef inline int en_realloc(en_store *s, int32_t cap) except -1:
    """Room for `cap` entries (the array grows; the entries above the high-water mark are
    never touched: a presized table costs address space, not memory).  The caller then
    gives it fresh FlowTables (``en_reindex``)."""
    cdef char *ne = <char *>realloc(s.e, <size_t>cap * s.size)
    if ne == NULL:
        raise MemoryError()
    s.e = ne
    s.cap = cap
    return 0


cdef inline void en_index(en_store *s, FlowTable ids, FlowTable eps, int32_t x) noexcept:
    """Entry x into both indexes (at the head of its chain and of its endpoint list)."""
    cdef en_head *c = en_at(s, x)
    cdef int64_t j = ids.c_find(c.proto, c.raddr, c.rport, c.eaddr, c.eport)
    if j >= 0:
        c.same_next = <int32_t>ids.c_slot(j).rule_id
        ids.c_slot(j).rule_id = x
    else:
        c.same_next = -1
        ids.c_insert(c.proto, c.raddr, c.rport, c.eaddr, c.eport, 0, 0, x, 0, 0)
    j = eps.c_find(c.proto, c.eaddr, c.eport, 0, 0)
    c.ep_prev = -1
    if j >= 0:
        c.ep_next = <int32_t>eps.c_slot(j).rule_id
        en_at(s, c.ep_next).ep_prev = x
        eps.c_slot(j).rule_id = x
    else:
        c.ep_next = -1
        eps.c_insert(c.proto, c.eaddr, c.eport, 0, 0, 0, 0, x, 0, 0)


cdef inline void en_reindex(en_store *s, FlowTable ids, FlowTable eps) noexcept:
    """Every entry in use into fresh (empty) indexes."""
    cdef int32_t x
    for x in range(s.hw):
        if en_at(s, x).used:
            en_index(s, ids, eps, x)


cdef inline bint en_full(const en_store *s) noexcept nogil:
    """No free entry: grow before ``en_add``."""
    return s.free_head < 0 and s.hw == s.cap


cdef inline int32_t en_add(en_store *s, FlowTable ids, FlowTable eps, uint8_t p, uint32_t i, uint16_t ip,
                           uint32_t e, uint16_t ep, uint32_t r, uint16_t rp) noexcept:
    """A new entry (zeroed beyond its head) with this identity, indexed: its index.  The
    store is not full (``en_full``)."""
    cdef int32_t x = s.free_head
    if x >= 0:
        s.free_head = en_at(s, x).same_next
    else:
        x = s.hw
        s.hw += 1
    cdef en_head *c = en_at(s, x)
    memset(c, 0, s.size)
    c.proto, c.iaddr, c.iport, c.eaddr, c.eport, c.raddr, c.rport = p, i, ip, e, ep, r, rp
    c.used = 1
    s.n += 1
    en_index(s, ids, eps, x)
    return x


cdef inline void en_unlink(en_store *s, FlowTable ids, FlowTable eps, int32_t x) noexcept:
    """Entry x out of both indexes and onto the free list (its fields beyond the links
    are left as they were, for the caller to read)."""
    cdef en_head *c = en_at(s, x)
    cdef int64_t j = ids.c_find(c.proto, c.raddr, c.rport, c.eaddr, c.eport)
    cdef int32_t y
    if j >= 0:
        y = <int32_t>ids.c_slot(j).rule_id
        if y == x:
            if c.same_next >= 0:
                ids.c_slot(j).rule_id = c.same_next
            else:
                ids.c_delete(c.proto, c.raddr, c.rport, c.eaddr, c.eport)
        else:
            while y >= 0 and en_at(s, y).same_next != x:
                y = en_at(s, y).same_next
            if y >= 0:
                en_at(s, y).same_next = c.same_next
    if c.ep_prev >= 0:
        en_at(s, c.ep_prev).ep_next = c.ep_next
    else:
        j = eps.c_find(c.proto, c.eaddr, c.eport, 0, 0)
        if j >= 0:
            if c.ep_next >= 0:
                eps.c_slot(j).rule_id = c.ep_next
            else:
                eps.c_delete(c.proto, c.eaddr, c.eport, 0, 0)
    if c.ep_next >= 0:
        en_at(s, c.ep_next).ep_prev = c.ep_prev
    c.used = 0
    c.same_next = s.free_head
    s.free_head = x
    s.n -= 1


cdef inline int32_t en_chain(FlowTable ids, uint8_t p, uint32_t e, uint16_t ep, uint32_t r,
                             uint16_t rp) noexcept:
    """The first entry with session key (p, R, Rp, E, Ep) (-1: none); the rest follow
    through ``same_next``."""
    cdef int64_t j = ids.c_find(p, r, rp, e, ep)
    return <int32_t>ids.c_slot(j).rule_id if j >= 0 else -1


cdef inline int32_t en_find(const en_store *s, FlowTable ids, uint8_t p, uint32_t i, uint16_t ip,
                            uint32_t e, uint16_t ep, uint32_t r, uint16_t rp) noexcept:
    """The first entry with this identity (-1: none); more may follow on its chain."""
    cdef int32_t x = en_chain(ids, p, e, ep, r, rp)
    cdef en_head *c
    while x >= 0:
        c = en_at(s, x)
        if c.iaddr == i and c.iport == ip:
            return x
        x = c.same_next
    return -1


cdef inline int32_t en_on_endpoint(FlowTable eps, uint8_t p, uint32_t e, uint16_t ep) noexcept:
    """The first entry on external endpoint (p, E, Ep) (-1: none); the rest follow
    through ``ep_next``."""
    cdef int64_t j = eps.c_find(p, e, ep, 0, 0)
    return <int32_t>eps.c_slot(j).rule_id if j >= 0 else -1

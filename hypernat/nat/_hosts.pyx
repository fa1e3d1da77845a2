# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The host table of one NIC's owner side, in C (issue 11, step 1).

One record per internal host that holds port blocks here (EIM: every host whose
mappings this NIC owns): its external address (paired pooling, RFC 4787 REQ-2: all of
a host's mappings on one address), its blocks in assignment order, the block that last
had room, and its live mappings per protocol (the port cap, limits.ports_per_host).  No
Python object per host.  Records live in an open-addressing table keyed by the internal
address (linear probing, backward-shift deletion).

``allocate`` is the host's part of a new mapping, in C: port preservation over its
blocks, else RFC 6056 choice starting at its current block (``PortBlocks.take``).
Taking a new block, the journal and the translation log stay in
``hypernat.rules.RuleBuilder``.
"""
from libc.stdint cimport int64_t, uint64_t, uint32_t, int32_t
from libc.stdlib cimport calloc, realloc, free
from libc.string cimport memmove

from ._ports cimport PortBlocks

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define hn_hosts_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
    #else
    #define hn_hosts_prefetch(p) ((void)(p))
    #endif
    """
    void hn_hosts_prefetch(const void *p) noexcept nogil


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    x *= 0x9E3779B97F4A7C15ULL
    return x ^ (x >> 29)


cdef class Hosts:
    """Hosts(): the internal hosts with blocks here (see the module docstring)."""

    def __cinit__(self):
        self.t = <Host*>calloc(64, sizeof(Host))
        if self.t == NULL:
            raise MemoryError()
        self.mask = 63
        self.count = 0

    def __dealloc__(self):
        cdef uint64_t i
        if self.t != NULL:
            for i in range(self.mask + 1):
                free(self.t[i].blocks)
            free(self.t)

    cdef Host* find(self, uint32_t iaddr) noexcept nogil:
        cdef uint64_t j = _mix(iaddr) & self.mask
        while self.t[j].used:
            if self.t[j].iaddr == iaddr:
                return &self.t[j]
            j = (j + 1) & self.mask
        return NULL

    cdef void prefetch(self, uint32_t iaddr) noexcept nogil:
        """Start loading the table line `find(iaddr)` will read first (a batch looks a
        few packets ahead)."""
        hn_hosts_prefetch(&self.t[_mix(iaddr) & self.mask])

    cdef Host* _get(self, uint32_t iaddr) except NULL:
        cdef Host* h = self.find(iaddr)
        if h == NULL:
            raise KeyError(iaddr)
        return h

    cdef _rehash(self, uint64_t size):
        cdef Host* old = self.t
        cdef uint64_t om = self.mask, i, j
        nt = <Host*>calloc(size, sizeof(Host))
        if nt == NULL:
            raise MemoryError()
        self.t, self.mask = nt, size - 1
        for i in range(om + 1):
            if old[i].used:
                j = _mix(old[i].iaddr) & self.mask
                while nt[j].used:
                    j = (j + 1) & self.mask
                nt[j] = old[i]
        free(old)

    cdef int64_t allocate_c(self, Host* h, int pi, int iport, bint preserve, PortBlocks bl, int* off) noexcept nogil:
        cdef int k, t, nb = h.nblocks
        cdef int32_t s
        cdef int o
        if preserve:
            for k in range(nb):
                s = bl.slot_of(h.blocks[k])
                if s >= 0 and bl.take_at(s, pi, iport - <int>bl.s_lo[s]):
                    off[0] = iport - <int>bl.s_lo[s]
                    return h.blocks[k]
        for t in range(nb):
            k = (h.cur + t) % nb
            s = bl.slot_of(h.blocks[k])
            if s < 0:
                continue
            o = bl.take(s, pi, iport)
            if o >= 0:
                h.cur = k
                off[0] = o
                return h.blocks[k]
        return -1

    # -- Python interface -------------------------------------------------------------
    def add(self, uint32_t iaddr, int aidx, uint32_t addr):
        """A new host on external address `addr` (pool index `aidx`), no blocks yet."""
        if self.find(iaddr) != NULL:
            raise KeyError(f"host {iaddr} exists")
        if (self.count + 1) * 2 > <Py_ssize_t>(self.mask + 1):
            self._rehash((self.mask + 1) * 2)
        cdef uint64_t j = _mix(iaddr) & self.mask
        while self.t[j].used:
            j = (j + 1) & self.mask
        cdef Host* h = &self.t[j]
        h.used, h.iaddr, h.addr, h.aidx = 1, iaddr, addr, aidx
        h.nports[0] = h.nports[1] = h.nports[2] = 0
        h.cur = h.nblocks = h.capb = 0
        h.blocks = NULL
        self.count += 1

    def remove(self, uint32_t iaddr):
        """Forget host `iaddr` (KeyError if unknown)."""
        cdef Host* h = self._get(iaddr)
        free(h.blocks)
        cdef uint64_t j = h - self.t, k, home
        self.count -= 1
        k = j
        while True:  # backward-shift deletion
            k = (k + 1) & self.mask
            if not self.t[k].used:
                break
            home = _mix(self.t[k].iaddr) & self.mask
            if (k > j and (home <= j or home > k)) or (k < j and (home <= j and home > k)):
                self.t[j] = self.t[k]
                j = k
        self.t[j].used = 0
        self.t[j].blocks = NULL

    def __contains__(self, iaddr):
        return 0 <= iaddr <= 0xFFFFFFFF and self.find(<uint32_t>iaddr) != NULL

    def __len__(self):
        return self.count

    def ids(self):
        """The hosts' internal addresses (a list, in no particular order)."""
        cdef uint64_t j
        return [self.t[j].iaddr for j in range(self.mask + 1) if self.t[j].used]

    def aidx(self, uint32_t iaddr):
        return self._get(iaddr).aidx

    def addr(self, uint32_t iaddr):
        return self._get(iaddr).addr

    def nports(self, uint32_t iaddr, int pi):
        return self._get(iaddr).nports[pi]

    def add_ports(self, uint32_t iaddr, int pi, int delta):
        """Live mappings of protocol `pi` of host `iaddr` += delta."""
        self.add_ports_c(iaddr, pi, delta)

    cdef int add_ports_c(self, uint32_t iaddr, int pi, int delta) except -1:
        """``add_ports`` at C level (the expiry's ended mappings)."""
        cdef Host* h = self._get(iaddr)
        if <int64_t>h.nports[pi] + delta < 0:
            raise ValueError(f"host {iaddr}: live mappings would go below 0")
        h.nports[pi] += delta
        return 0

    def cur(self, uint32_t iaddr):
        return self._get(iaddr).cur

    def set_cur(self, uint32_t iaddr, int cur):
        self._get(iaddr).cur = cur

    def nblocks(self, uint32_t iaddr):
        return self._get(iaddr).nblocks

    def blocks(self, uint32_t iaddr):
        """Its block ids, in assignment order."""
        cdef Host* h = self._get(iaddr)
        return [h.blocks[k] for k in range(h.nblocks)]

    def append_block(self, uint32_t iaddr, int64_t g):
        cdef Host* h = self._get(iaddr)
        cdef void* p
        if h.nblocks == h.capb:
            p = realloc(h.blocks, (h.capb * 2 + 4) * sizeof(int64_t))
            if p == NULL:
                raise MemoryError()
            h.blocks = <int64_t*>p
            h.capb = h.capb * 2 + 4
        h.blocks[h.nblocks] = g
        h.nblocks += 1

    def remove_block(self, uint32_t iaddr, int64_t g):
        """Take block `g` off the host's list (ValueError if it is not on it)."""
        cdef Host* h = self._get(iaddr)
        cdef int k
        for k in range(h.nblocks):
            if h.blocks[k] == g:
                memmove(h.blocks + k, h.blocks + k + 1, (h.nblocks - k - 1) * sizeof(int64_t))
                h.nblocks -= 1
                return
        raise ValueError(f"block {g} is not host {iaddr}'s")

    def idle(self, uint32_t iaddr):
        """No block and no live mapping: the host's record can go."""
        cdef Host* h = self._get(iaddr)
        return h.nblocks == 0 and h.nports[0] == 0 and h.nports[1] == 0 and h.nports[2] == 0

    def allocate(self, uint32_t iaddr, int pi, int iport, bint preserve, PortBlocks bl):
        """A port for a new mapping of host `iaddr` in one of its blocks, marked used:
        (block id, offset), or (-1, -1) if its blocks have none (the caller takes a new
        block).  Preservation first (the internal port itself, in any of its blocks),
        then RFC 6056 choice from its current block on."""
        cdef Host* h = self._get(iaddr)
        cdef int off = -1
        cdef int64_t g = self.allocate_c(h, pi, iport, preserve, bl, &off)
        if g < 0:
            return -1, -1
        return g, off

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Port blocks of one NIC's owner side, in C (issue 11, step 1).

A *block* is ``limits.port_block_size`` consecutive ports of one external address,
assigned to one internal host (``hypernat.rules``: who gets which block, the journal,
the translation log, reuse delay and quarantine stay there).  ``PortBlocks`` keeps, per
assigned block, one C record: its id, external address, first port, size, host (internal
address), address index and, per protocol (TCP, UDP, ICMP: index 0, 1, 2), a bitmap of
the ports that are live or waiting out their reuse delay, and their count.  No Python
object per block or per port.

Port choice (RFC 6056 "random start, next free", as the Python code did): a random
offset r in [0, size), the first free port at or after r, wrapping to the block's start;
with parity (RFC 4787 REQ-3) only ports of the internal port's parity.  Random numbers
come from splitmix64 seeded at construction (tests pass a seed; tests/nat_model.py is
the readable reference of the same choice).

Block ids are looked up through an open-addressing table (linear probing, backward-shift
deletion); records live in slots reused through a free list.  All per-port operations
are ``nogil`` cdef functions (the .pxd), so compiled callers use them per connection
without the GIL; the ``def`` methods are the Python interface RuleBuilder uses.
"""
from libc.stdint cimport int64_t, uint64_t, uint32_t, int32_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset

import numpy as np

cdef extern from *:
    """
    static inline int hn_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    static inline int hn_popcount64(unsigned long long x) { return __builtin_popcountll(x); }
    """
    int hn_ctz64(unsigned long long x) nogil
    int hn_popcount64(unsigned long long x) nogil

cdef uint64_t EVEN = 0x5555555555555555ULL  # bit k set for even k
cdef uint64_t ODD = 0xAAAAAAAAAAAAAAAAULL


cdef inline uint64_t _mix(uint64_t g) noexcept nogil:
    g ^= g >> 33
    g *= 0xff51afd7ed558ccdULL
    g ^= g >> 33
    return g


cdef class PortBlocks:
    """The blocks assigned here and their used ports (see the module docstring).

    PortBlocks(block_size, parity=False, seed=0)
    """

    def __cinit__(self, int block_size, bint parity=False, uint64_t seed=0):
        if block_size < 1 or block_size > 65536:
            raise ValueError(f"block_size {block_size} out of 1..65536")
        self.block_size = block_size
        self.parity = parity
        self.words = (block_size + 63) >> 6
        self.rng_state = seed
        self.hmask = 63
        self.hkeys = <int64_t*>malloc(64 * sizeof(int64_t))
        self.hvals = <int32_t*>malloc(64 * sizeof(int32_t))
        if self.hkeys == NULL or self.hvals == NULL:
            raise MemoryError()
        cdef int i
        for i in range(64):
            self.hkeys[i] = -1
        self.hcount = 0
        self.cap = 0
        self.top = 0
        self.n_free = 0
        self._grow(16)

    def __dealloc__(self):
        free(self.hkeys); free(self.hvals); free(self.free_slots); free(self.s_id); free(self.s_addr)
        free(self.s_lo); free(self.s_size); free(self.s_host); free(self.s_aidx); free(self.s_nused)
        free(self.s_bits)

    cdef _grow(self, Py_ssize_t cap):
        cdef Py_ssize_t old = self.cap
        cdef void* p
        p = realloc(self.free_slots, cap * sizeof(int32_t))
        if p == NULL: raise MemoryError()
        self.free_slots = <int32_t*>p
        p = realloc(self.s_id, cap * sizeof(int64_t))
        if p == NULL: raise MemoryError()
        self.s_id = <int64_t*>p
        p = realloc(self.s_addr, cap * sizeof(uint32_t))
        if p == NULL: raise MemoryError()
        self.s_addr = <uint32_t*>p
        p = realloc(self.s_lo, cap * sizeof(uint32_t))
        if p == NULL: raise MemoryError()
        self.s_lo = <uint32_t*>p
        p = realloc(self.s_size, cap * sizeof(uint32_t))
        if p == NULL: raise MemoryError()
        self.s_size = <uint32_t*>p
        p = realloc(self.s_host, cap * sizeof(uint32_t))
        if p == NULL: raise MemoryError()
        self.s_host = <uint32_t*>p
        p = realloc(self.s_aidx, cap * sizeof(int32_t))
        if p == NULL: raise MemoryError()
        self.s_aidx = <int32_t*>p
        p = realloc(self.s_nused, cap * 3 * sizeof(uint32_t))
        if p == NULL: raise MemoryError()
        self.s_nused = <uint32_t*>p
        p = realloc(self.s_bits, cap * 3 * self.words * sizeof(uint64_t))
        if p == NULL: raise MemoryError()
        self.s_bits = <uint64_t*>p
        self.cap = cap

    cdef _rehash(self, uint64_t size):
        cdef int64_t* ok = self.hkeys
        cdef int32_t* ov = self.hvals
        cdef uint64_t om = self.hmask, i, j
        nk = <int64_t*>malloc(size * sizeof(int64_t))
        nv = <int32_t*>malloc(size * sizeof(int32_t))
        if nk == NULL or nv == NULL:
            free(nk); free(nv)
            raise MemoryError()
        for i in range(size):
            nk[i] = -1
        self.hkeys, self.hvals, self.hmask = nk, nv, size - 1
        for i in range(om + 1):
            if ok[i] >= 0:
                j = _mix(<uint64_t>ok[i]) & self.hmask
                while nk[j] >= 0:
                    j = (j + 1) & self.hmask
                nk[j] = ok[i]
                nv[j] = ov[i]
        free(ok); free(ov)

    cdef int32_t slot_of(self, int64_t g) noexcept nogil:
        cdef uint64_t j = _mix(<uint64_t>g) & self.hmask
        while self.hkeys[j] >= 0:
            if self.hkeys[j] == g:
                return self.hvals[j]
            j = (j + 1) & self.hmask
        return -1

    cdef uint64_t next_random(self) noexcept nogil:
        # splitmix64 (Steele, Lea, Flood 2014)
        self.rng_state += 0x9E3779B97F4A7C15ULL
        cdef uint64_t z = self.rng_state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
        return z ^ (z >> 31)

    cdef int take(self, int32_t s, int pi, int iport) noexcept nogil:
        """Choose and mark a free port of slot `s` for protocol `pi`: its offset, -1 if none."""
        cdef uint32_t size = self.s_size[s]
        if self.s_nused[s * 3 + pi] >= size:
            return -1
        cdef uint64_t* bits = self.s_bits + (<Py_ssize_t>s * 3 + pi) * self.words
        cdef int nw = (size + 63) >> 6
        cdef uint64_t pmask = <uint64_t>0xFFFFFFFFFFFFFFFFULL
        if self.parity:
            pmask = EVEN if (self.s_lo[s] & 1) == (iport & 1) else ODD
        cdef uint32_t r = <uint32_t>((self.next_random() & 0xFFFFFFFFULL) % size)
        cdef int w = r >> 6
        cdef int k
        cdef uint64_t f
        cdef int off = -1
        # at or after r ...
        f = self._free_word(bits, w, nw, size) & pmask & ((<uint64_t>0xFFFFFFFFFFFFFFFFULL) << (r & 63))
        if f:
            off = (w << 6) + hn_ctz64(f)
        else:
            for k in range(w + 1, nw):
                f = self._free_word(bits, k, nw, size) & pmask
                if f:
                    off = (k << 6) + hn_ctz64(f)
                    break
            if off < 0:  # ... else from the block's start
                for k in range(0, w + 1):
                    f = self._free_word(bits, k, nw, size) & pmask
                    if f:
                        off = (k << 6) + hn_ctz64(f)
                        break
        if off < 0:
            return -1
        bits[off >> 6] |= (<uint64_t>1) << (off & 63)
        self.s_nused[s * 3 + pi] += 1
        self.used_total[pi] += 1
        return off

    cdef inline uint64_t _free_word(self, uint64_t* bits, int k, int nw, uint32_t size) noexcept nogil:
        cdef uint64_t f = ~bits[k]
        if k == nw - 1 and (size & 63):
            f &= ((<uint64_t>1) << (size & 63)) - 1
        return f

    cdef bint take_at(self, int32_t s, int pi, int off) noexcept nogil:
        """Mark offset `off` of slot `s` used if it lies in the block and is free."""
        if off < 0 or <uint32_t>off >= self.s_size[s]:
            return False
        cdef uint64_t* bits = self.s_bits + (<Py_ssize_t>s * 3 + pi) * self.words
        cdef uint64_t bit = (<uint64_t>1) << (off & 63)
        if bits[off >> 6] & bit:
            return False
        bits[off >> 6] |= bit
        self.s_nused[s * 3 + pi] += 1
        self.used_total[pi] += 1
        return True

    cdef int release_slot(self, int32_t s, int pi, int off) noexcept nogil:
        """Clear offset `off`: -1 if it was not set, else the ports still used (all protocols)."""
        if off < 0 or <uint32_t>off >= self.s_size[s]:
            return -1
        cdef uint64_t* bits = self.s_bits + (<Py_ssize_t>s * 3 + pi) * self.words
        cdef uint64_t bit = (<uint64_t>1) << (off & 63)
        if not bits[off >> 6] & bit:
            return -1
        bits[off >> 6] &= ~bit
        self.s_nused[s * 3 + pi] -= 1
        self.used_total[pi] -= 1
        return self.s_nused[s * 3] + self.s_nused[s * 3 + 1] + self.s_nused[s * 3 + 2]

    cdef int32_t _slot(self, int64_t g) except -2:
        cdef int32_t s = self.slot_of(g)
        if s < 0:
            raise KeyError(g)
        return s

    # -- Python interface -------------------------------------------------------------
    def add(self, int64_t g, int aidx, uint32_t addr, uint32_t lo, uint32_t size, uint32_t host, bint full=False):
        """Record block `g` (ports lo..lo+size-1 of `addr`) as assigned to `host`; every
        port free, or every port used (``full``: a recovered block's reservation)."""
        if g < 0:
            raise ValueError(f"block id {g} < 0")
        if size < 1 or size > <uint32_t>self.block_size:
            raise ValueError(f"block {g}: size {size} out of 1..{self.block_size}")
        if self.slot_of(g) >= 0:
            raise KeyError(f"block {g} is assigned already")
        cdef int32_t s
        if self.n_free:
            self.n_free -= 1
            s = self.free_slots[self.n_free]
        else:
            if self.top == self.cap:
                self._grow(self.cap * 2)
            s = <int32_t>self.top
            self.top += 1
        if (self.hcount + 1) * 2 > <Py_ssize_t>(self.hmask + 1):
            self._rehash((self.hmask + 1) * 2)
        cdef uint64_t j = _mix(<uint64_t>g) & self.hmask
        while self.hkeys[j] >= 0:
            j = (j + 1) & self.hmask
        self.hkeys[j] = g
        self.hvals[j] = s
        self.hcount += 1
        self.s_id[s], self.s_addr[s], self.s_lo[s], self.s_size[s] = g, addr, lo, size
        self.s_host[s], self.s_aidx[s] = host, aidx
        cdef uint64_t* bits = self.s_bits + <Py_ssize_t>s * 3 * self.words
        memset(bits, 0, 3 * self.words * sizeof(uint64_t))
        cdef int pi
        for pi in range(3):
            self.s_nused[s * 3 + pi] = 0
        if full:
            for pi in range(3):
                self.set_mask(g, pi, (1 << <object>size) - 1)

    def remove(self, int64_t g):
        """Forget block `g` (KeyError if it is not here)."""
        cdef uint64_t j = _mix(<uint64_t>g) & self.hmask, k, h
        while self.hkeys[j] != g:
            if self.hkeys[j] < 0:
                raise KeyError(g)
            j = (j + 1) & self.hmask
        self.free_slots[self.n_free] = self.hvals[j]
        self.n_free += 1
        cdef int pi
        for pi in range(3):  # its ports leave the totals with it
            self.used_total[pi] -= self.s_nused[self.hvals[j] * 3 + pi]
            self.s_nused[self.hvals[j] * 3 + pi] = 0
        self.hcount -= 1
        # backward-shift deletion: no tombstones
        k = j
        while True:
            k = (k + 1) & self.hmask
            if self.hkeys[k] < 0:
                break
            h = _mix(<uint64_t>self.hkeys[k]) & self.hmask
            # move k into the hole j unless its home lies cyclically in (j, k]
            if (k > j and (h <= j or h > k)) or (k < j and (h <= j and h > k)):
                self.hkeys[j] = self.hkeys[k]
                self.hvals[j] = self.hvals[k]
                j = k
        self.hkeys[j] = -1

    def __contains__(self, g):
        return self.slot_of(<int64_t>g) >= 0

    def total_used(self, int pi):
        """Ports of protocol index `pi` marked used over every block here."""
        return self.used_total[pi]

    def __len__(self):
        return self.hcount

    def ids(self):
        """The assigned block ids (a list, in no particular order)."""
        cdef uint64_t j
        return [self.hkeys[j] for j in range(self.hmask + 1) if self.hkeys[j] >= 0]

    def __iter__(self):
        return iter(self.ids())

    def host(self, int64_t g):
        return self.s_host[self._slot(g)]

    def aidx(self, int64_t g):
        return self.s_aidx[self._slot(g)]

    def span(self, int64_t g):
        """(external address, first port, size) of block `g`."""
        cdef int32_t s = self._slot(g)
        return self.s_addr[s], self.s_lo[s], self.s_size[s]

    def lo(self, int64_t g):
        return self.s_lo[self._slot(g)]

    def n_used(self, int64_t g, int pi):
        return self.s_nused[self._slot(g) * 3 + pi]

    def n_total(self, int64_t g):
        cdef int32_t s = self._slot(g)
        return self.s_nused[s * 3] + self.s_nused[s * 3 + 1] + self.s_nused[s * 3 + 2]

    def room(self, int64_t g, int pi):
        """Ports of protocol `pi` still free in block `g`."""
        cdef int32_t s = self._slot(g)
        return self.s_size[s] - self.s_nused[s * 3 + pi]

    def pick(self, int64_t g, int pi, int iport):
        """RFC 6056 choice in block `g` (parity if on), marked used: the offset, -1 if none."""
        return self.take(self._slot(g), pi, iport)

    def pick_at(self, int64_t g, int pi, int off):
        """Mark offset `off` of block `g` used if it is in the block and free (preservation)."""
        return self.take_at(self._slot(g), pi, off)

    def pick_exact(self, int64_t g, int pi, int iport):
        """Port preservation: port `iport` itself if block `g` holds it and it is free
        (marked used): its offset, else -1."""
        cdef int32_t s = self._slot(g)
        cdef int off = iport - <int>self.s_lo[s]
        return off if self.take_at(s, pi, off) else -1

    def is_used(self, int64_t g, int pi, int off):
        cdef int32_t s = self._slot(g)
        if off < 0 or <uint32_t>off >= self.s_size[s]:
            return False
        return bool(self.s_bits[(<Py_ssize_t>s * 3 + pi) * self.words + (off >> 6)] >> (off & 63) & 1)

    def release(self, int64_t g, int pi, int off):
        """Free offset `off`: -1 if block `g` is not here or the port was not used, else
        the ports the block still has in use (0: the caller frees the block)."""
        cdef int32_t s = self.slot_of(g)
        if s < 0:
            return -1
        return self.release_slot(s, pi, off)

    def release_many(self, const int64_t[:] g, const int32_t[:] pi, const int32_t[:] off):
        """``release`` of each endpoint (block `g`[k], protocol index `pi`[k], offset
        `off`[k]; the fields of an ENDPOINT_DTYPE array, ``hypernat.nat._reuse``), in
        order: the blocks left with no port in use (int64 array, in the order they
        emptied; the caller frees them).  Endpoints not in use are passed over."""
        cdef Py_ssize_t n = g.shape[0], k, q = 0
        if pi.shape[0] != n or off.shape[0] != n:
            raise ValueError(f"release_many: {n} blocks, {pi.shape[0]} protocol indexes, {off.shape[0]} offsets")
        out_a = np.empty(n, np.int64)
        cdef int64_t[::1] out = out_a
        cdef int32_t s
        with nogil:
            for k in range(n):
                if pi[k] < 0 or pi[k] > 2:
                    continue
                s = self.slot_of(g[k])
                if s >= 0 and self.release_slot(s, pi[k], off[k]) == 0:
                    out[q] = g[k]
                    q += 1
        return out_a[:q]

    def used_mask(self, int64_t g, int pi):
        """The used ports of protocol `pi` as an int (bit k: offset k) -- snapshots, tests."""
        cdef int32_t s = self._slot(g)
        cdef uint64_t* bits = self.s_bits + (<Py_ssize_t>s * 3 + pi) * self.words
        cdef int k
        v = 0
        for k in range(((self.s_size[s] + 63) >> 6) - 1, -1, -1):
            v = (v << 64) | bits[k]
        return v

    def set_mask(self, int64_t g, int pi, mask):
        """Load the used ports of protocol `pi` from an int (``used_mask``'s form)."""
        cdef int32_t s = self._slot(g)
        cdef uint32_t size = self.s_size[s]
        mask = int(mask)
        if mask < 0 or mask >> size:
            raise ValueError(f"block {g}: mask has bits beyond its {size} ports")
        cdef uint64_t* bits = self.s_bits + (<Py_ssize_t>s * 3 + pi) * self.words
        cdef int k, n = 0
        cdef uint64_t w
        for k in range((size + 63) >> 6):
            w = <uint64_t>((mask >> (64 * k)) & 0xFFFFFFFFFFFFFFFF)
            bits[k] = w
            n += hn_popcount64(w)
        self.used_total[pi] += <uint64_t>n - self.s_nused[s * 3 + pi]
        self.s_nused[s * 3 + pi] = n

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The partition's geometry and the internal prefixes in C, defined once.

``Geometry`` is ``hypernat.partition.Partition``'s arithmetic (see there for the
picture): the pool's prefixes, the port range cut in blocks, by port or by address, and
the loans (blocks lent to another NIC for spill-over) as a small sorted table, so that
"which NIC owns external endpoint (E, Ep) right now" is answered in C with the loans
applied.  The Partition owns one (``Partition.geometry``), hands its loans to it on
every ``lend`` / ``return_block`` (``set_loans``), and answers ``owner`` / ``block_of``
/ ``owners`` through it; the compiled readers (``hypernat._wire``'s validator,
``hypernat.nat._mappings.OutSetup``) cimport this module's ``.pxd``.

``Prefixes`` is "is address I internal" over the configured internal prefixes.
"""
import numpy as np

from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc, realloc

ctypedef short[::1] int16_t_view
cdef int64_t ADDR_MAX = 0xFFFFFFFF


cdef class Geometry:
    """Geometry(ranges, port_min, port_max, block_size, by_port, n_nics, blocks_per_address,
    n_addresses): `ranges` [(first address, addresses, pool index of the first)] of the
    pool's prefixes; the rest as ``Partition`` computes them."""

    def __cinit__(self):
        self.base = self.size = self.off = NULL
        self.lblk = NULL
        self.lnic = NULL

    def __init__(self, ranges, int64_t port_min, int64_t port_max, int64_t block_size, bint by_port,
                 int64_t n_nics, int64_t blocks_per_address, int64_t n_addresses):
        rs = [(int(b), int(z), int(o)) for b, z, o in ranges]
        if (not rs or block_size < 1 or n_nics < 1 or blocks_per_address < 1 or n_addresses < 1
                or not 0 <= port_min <= port_max <= 65535):
            raise ValueError("partition geometry out of range")
        self.base = <int64_t*>malloc(len(rs) * sizeof(int64_t))
        self.size = <int64_t*>malloc(len(rs) * sizeof(int64_t))
        self.off = <int64_t*>malloc(len(rs) * sizeof(int64_t))
        if self.base == NULL or self.size == NULL or self.off == NULL:
            raise MemoryError()
        for k, (b, z, o) in enumerate(rs):
            self.base[k], self.size[k], self.off[k] = b, z, o
        self.nr = len(rs)
        self.port_min, self.port_max, self.block_size, self.by_port = port_min, port_max, block_size, by_port
        self.n_nics, self.bpa, self.n_addrs = n_nics, blocks_per_address, n_addresses
        self._args = (rs, port_min, port_max, block_size, by_port, n_nics, blocks_per_address, n_addresses)

    def __dealloc__(self):
        free(self.base)
        free(self.size)
        free(self.off)
        free(self.lblk)
        free(self.lnic)

    def __reduce__(self):
        return _rebuild, (self._args, self.loans())

    # -- C ---------------------------------------------------------------------------
    cdef int64_t index_c(self, uint32_t ea) noexcept nogil:
        cdef int k
        for k in range(self.nr):
            if self.base[k] <= ea and ea - self.base[k] < self.size[k]:
                return self.off[k] + (ea - self.base[k])
        return -1

    cdef int64_t block_c(self, uint32_t ea, uint32_t ep) noexcept nogil:
        cdef int64_t a = self.index_c(ea)
        if a < 0 or ep < self.port_min or ep > self.port_max:
            return -1
        return a * self.bpa + (ep - self.port_min) // self.block_size

    cdef int native_c(self, int64_t g) noexcept nogil:
        if self.by_port:
            return <int>((((g % self.bpa) + 1) * self.n_nics - 1) // self.bpa)
        return <int>((((g // self.bpa) + 1) * self.n_nics - 1) // self.n_addrs)

    cdef int holder_c(self, int64_t g) noexcept nogil:
        cdef Py_ssize_t lo = 0, hi = self.nloans, mid
        while lo < hi:  # the loans: a binary search (a handful of blocks)
            mid = (lo + hi) >> 1
            if self.lblk[mid] < g:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.nloans and self.lblk[lo] == g:
            return self.lnic[lo]
        return self.native_c(g)

    cdef int owner_c(self, uint32_t ea, uint32_t ep) noexcept nogil:
        cdef int64_t g = self.block_c(ea, ep)
        return -1 if g < 0 else self.holder_c(g)

    cdef int native_owner_c(self, uint32_t ea, uint32_t ep) noexcept nogil:
        cdef int64_t g = self.block_c(ea, ep)
        return -1 if g < 0 else self.native_c(g)

    # -- Python ----------------------------------------------------------------------
    def set_loans(self, loans):
        """The blocks lent now: {block id: NIC holding it} (replaces the previous table)."""
        items = sorted((int(g), int(o)) for g, o in dict(loans).items())
        for g, o in items:
            if not 0 <= g < self.n_addrs * self.bpa or not 0 <= o < self.n_nics:
                raise ValueError(f"bad loan: block {g} to NIC {o}")
        cdef int64_t* b = <int64_t*>realloc(self.lblk, (len(items) + 1) * sizeof(int64_t))
        if b == NULL:
            raise MemoryError()
        self.lblk = b
        cdef int32_t* o2 = <int32_t*>realloc(self.lnic, (len(items) + 1) * sizeof(int32_t))
        if o2 == NULL:
            raise MemoryError()
        self.lnic = o2
        for k, (g, o) in enumerate(items):
            self.lblk[k], self.lnic[k] = g, o
        self.nloans = len(items)

    def loans(self) -> dict:
        return {int(self.lblk[k]): int(self.lnic[k]) for k in range(self.nloans)}

    def address_index(self, uint32_t addr):
        """Pool index of an address, -1 outside the pool."""
        return self.index_c(addr)

    def block_of(self, int64_t addr, int64_t port):
        """Global block id of (addr, port), -1 outside the pool or the port range."""
        if not 0 <= addr <= ADDR_MAX or not 0 <= port <= 65535:
            return -1
        return self.block_c(<uint32_t>addr, <uint32_t>port)

    def native_owner_of_block(self, int64_t g):
        if not 0 <= g < self.n_addrs * self.bpa:
            raise IndexError(g)
        return self.native_c(g)

    def owner_of_block(self, int64_t g):
        if not 0 <= g < self.n_addrs * self.bpa:
            raise IndexError(g)
        return self.holder_c(g)

    def owner(self, int64_t addr, int64_t port):
        """NIC owning (addr, port) now (loans applied); -1 outside the pool."""
        if not 0 <= addr <= ADDR_MAX or not 0 <= port <= 65535:
            return -1
        return self.owner_c(<uint32_t>addr, <uint32_t>port)

    def native_owner(self, int64_t addr, int64_t port):
        """NIC owning (addr, port) by the strategy (no loans); -1 outside the pool."""
        if not 0 <= addr <= ADDR_MAX or not 0 <= port <= 65535:
            return -1
        return self.native_owner_c(<uint32_t>addr, <uint32_t>port)

    def owners(self, addrs, ports):
        """Vectorised ``owner`` (integer arrays in, int16 out; -1 outside the pool)."""
        a = np.asarray(addrs, dtype=np.int64).ravel()
        p = np.asarray(ports, dtype=np.int64).ravel()
        if a.shape != p.shape:
            raise ValueError("addrs and ports differ in length")
        out = np.empty(a.shape[0], dtype=np.int16)
        cdef const int64_t[::1] av = a
        cdef const int64_t[::1] pv = p
        cdef int16_t_view ov = out
        cdef Py_ssize_t i
        cdef int64_t x, y
        with nogil:
            for i in range(av.shape[0]):
                x, y = av[i], pv[i]
                ov[i] = -1 if (x < 0 or x > ADDR_MAX or y < 0 or y > 65535) else \
                    self.owner_c(<uint32_t>x, <uint32_t>y)
        return out.reshape(np.shape(addrs))


def _rebuild(args, loans):
    g = Geometry(*args)
    g.set_loans(loans)
    return g


cdef class Prefixes:
    """Prefixes(nets): `nets` [(network, netmask)] as ints, or ipaddress networks."""

    def __cinit__(self):
        self.nets = self.masks = NULL

    def __init__(self, nets):
        pairs = []
        for n in nets:
            if hasattr(n, "network_address"):
                pairs.append((int(n.network_address), int(n.netmask)))
            else:
                pairs.append((int(n[0]), int(n[1])))
        self.nets = <uint32_t*>malloc((len(pairs) + 1) * sizeof(uint32_t))
        self.masks = <uint32_t*>malloc((len(pairs) + 1) * sizeof(uint32_t))
        if self.nets == NULL or self.masks == NULL:
            raise MemoryError()
        for k, (b, m) in enumerate(pairs):
            self.nets[k], self.masks[k] = b & m, m
        self.n = len(pairs)
        self._pairs = tuple(pairs)

    def __dealloc__(self):
        free(self.nets)
        free(self.masks)

    def __reduce__(self):
        return Prefixes, (self._pairs,)

    cdef bint has_c(self, uint32_t a) noexcept nogil:
        cdef int k
        for k in range(self.n):
            if a & self.masks[k] == self.nets[k]:
                return True
        return False

    def contains(self, int64_t addr):
        return 0 <= addr <= ADDR_MAX and self.has_c(<uint32_t>addr)

    def __call__(self, addrs):
        """Vectorised: a bool array, one per address."""
        a = np.asarray(addrs, dtype=np.int64).ravel()
        out = np.zeros(a.shape[0], dtype=np.uint8)
        cdef const int64_t[::1] av = a
        cdef unsigned char[::1] ov = out
        cdef Py_ssize_t i
        with nogil:
            for i in range(av.shape[0]):
                ov[i] = 0 <= av[i] <= ADDR_MAX and self.has_c(<uint32_t>av[i])
        return out.view(bool)

# cython: language_level=3
"""The fragment table: virtual reassembly of IPv4 fragments, compiled (one per NIC).

A NAT translates by ports, and only the first fragment of a datagram carries them.  So
the first fragment (offset 0, MF set) goes through the flow tables like any packet --
hit, miss, rule built, fetched from the owner, replayed -- and, once translated, its
translation (the new source and destination addresses) is recorded here under the
datagram's identity; the later fragments are translated with it: addresses, the IP
header checksum (RFC 1624), TTL.  Their transport checksum lives in the first fragment
and was updated there.  Nothing is reassembled (VPP's "shallow virtual reassembly")::

        key = (direction, source, destination, protocol, IP ID)  as the fragments arrive

    first fragment ──► flow table (fast path) ──► translated ──► frag_first_record
                                                                 │ records (nsa, nda, exit)
                                                                 └─► releases the held ones
    later fragment ──► frag_later ──► entry knows the translation ──► rewritten in place
                                 └──► not yet ──► held (copied into a chunk of the arena)

Held fragments are released by rewriting them in their chunk and copying them into the
translate call's output area (``hypernat/_out.pxd``, the Translator's: one area for
every frame the gateway makes), cut in fragments again if longer than their exit
link's MTU; their chunks return to the free list at once.  Everything is bounded and every refusal is a counted verdict:
``limits.fragments.entries`` datagrams at a time (drop_frag_table_full: an orphan flood
cannot grow the table), ``bytes`` of held frames in FR_CHUNK-byte chunks
(drop_frag_hold_full), and ``timeout`` clock ticks per datagram, counted from its first
fragment seen (held frames of an expired datagram: ``frag_expired_dropped``).  Because
the timeout is the same for every entry, creation order is expiry order: a doubly
linked list, oldest first, expired a bounded number per call.  Bad input (RFC 1858,
RFC 791): fragments past 65535 bytes, a TCP fragment at offset 8, data-less or ragged
fragments, overlaps and repeats (byte ranges per datagram, up to FR_RANGES disjoint
pieces) are dropped by reason.  A datagram all of whose bytes went through is freed at
once.

``hypernat.frag_py`` is the readable twin; the tests run both and compare verdicts,
frames, released frames and counters.
"""

include "_verdicts.pxi"

cimport numpy as cnp
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from ._csum cimport adjust, d16, d32
from ._out cimport hn_out, out_put

import operator

import numpy as np

from . import verdicts as _verdicts

cnp.import_array()

if N_FRAG_COUNTERS != len(_verdicts.FRAG_COUNTER_NAMES) or N_VERDICTS != _verdicts.N_VERDICTS:
    raise ImportError("hypernat._frag was built from another hypernat/verdicts.py: rebuild it (make build)")

cdef enum:
    PROTO_TCP = 6
    R_OK = 0
    R_OVERLAP = 1
    R_FULL = 2
    R_MALFORMED = 3

CHUNK = FR_CHUNK
RANGES = FR_RANGES
EXPIRE_PER_CALL = FR_EXPIRE_PER_CALL


cdef inline uint32_t be16(const uint8_t *q) noexcept nogil:
    return (<uint32_t>q[0] << 8) | q[1]


cdef inline uint32_t be32(const uint8_t *q) noexcept nogil:
    return (<uint32_t>q[0] << 24) | (<uint32_t>q[1] << 16) | (<uint32_t>q[2] << 8) | q[3]


cdef inline void put16(uint8_t *q, uint32_t v) noexcept nogil:
    q[0] = <uint8_t>(v >> 8)
    q[1] = <uint8_t>v


cdef inline void put32(uint8_t *q, uint32_t v) noexcept nogil:
    q[0] = <uint8_t>(v >> 24)
    q[1] = <uint8_t>(v >> 16)
    q[2] = <uint8_t>(v >> 8)
    q[3] = <uint8_t>v


cdef inline void ip_rewrite(uint8_t *h, uint32_t nsa, uint32_t nda) noexcept nogil:
    """A later fragment's IPv4 header: addresses, TTL - 1, header checksum (RFC 1624)."""
    cdef uint32_t ttl = h[8]
    cdef uint32_t proto = h[9]
    cdef uint64_t terms = d32(be32(h + 12), nsa) + d32(be32(h + 16), nda) \
        + d16((ttl << 8) | proto, ((ttl - 1) << 8) | proto)
    put16(h + 10, adjust(be16(h + 10), terms))
    h[8] = <uint8_t>(ttl - 1)
    put32(h + 12, nsa)
    put32(h + 16, nda)


cdef inline uint32_t key_hash(int d, uint32_t sa, uint32_t da, uint32_t proto, uint32_t ipid) noexcept nogil:
    cdef uint64_t h = ((<uint64_t>sa << 32) | da) * 0x9E3779B97F4A7C15ULL
    h ^= ((<uint64_t>ipid << 16) | (proto << 8) | <uint32_t>d) * 0xC2B2AE3D27D4EB4FULL
    h ^= h >> 29
    return <uint32_t>(h ^ (h >> 32))


cdef inline bint expired(const fr_entry *e, uint32_t now) noexcept nogil:
    return <int32_t>(now - e.expires) >= 0


cdef int32_t find(const hn_frag *f, int d, uint32_t sa, uint32_t da, uint32_t proto, uint32_t ipid) noexcept nogil:
    cdef int32_t i = f.bucket[key_hash(d, sa, da, proto, ipid) & f.bmask]
    cdef const fr_entry *e
    while i >= 0:
        e = &f.e[i]
        if e.saddr == sa and e.daddr == da and e.ipid == ipid and e.proto == proto and e.dir == d:
            return i
        i = e.next
    return -1


cdef void free_chunks(hn_frag *f, int32_t c) noexcept nogil:
    cdef int32_t nx
    while c >= 0:
        nx = f.cnext[c]
        f.cnext[c] = f.free_c
        f.free_c = c
        f.chunks_used -= 1
        c = nx


cdef void free_entry(hn_frag *f, int32_t i, bint timed_out) noexcept nogil:
    cdef fr_entry *e = &f.e[i]
    cdef int32_t *pp = &f.bucket[key_hash(e.dir, e.saddr, e.daddr, e.proto, e.ipid) & f.bmask]
    while pp[0] != i:
        pp = &f.e[pp[0]].next
    pp[0] = e.next
    if e.older >= 0:
        f.e[e.older].newer = e.newer
    else:
        f.oldest = e.newer
    if e.newer >= 0:
        f.e[e.newer].older = e.older
    else:
        f.newest = e.older
    if timed_out:
        f.cnt[FC_FRAG_EXPIRED_ENTRIES] += 1
        f.cnt[FC_FRAG_EXPIRED_DROPPED] += e.nheld
    free_chunks(f, e.held_head)
    e.held_head = e.held_tail = -1
    e.nheld = 0
    e.next = f.free_e
    f.free_e = i
    f.count -= 1


cdef int32_t new_entry(hn_frag *f, int d, uint32_t sa, uint32_t da, uint32_t proto, uint32_t ipid,
                       uint32_t now) noexcept nogil:
    """A fresh entry (the oldest, if expired, makes room when none is free), or -1."""
    if f.free_e < 0:
        if f.oldest >= 0 and expired(&f.e[f.oldest], now):
            free_entry(f, f.oldest, True)
        else:
            return -1
    cdef int32_t i = f.free_e
    cdef fr_entry *e = &f.e[i]
    f.free_e = e.next
    e.saddr = sa
    e.daddr = da
    e.proto = <uint8_t>proto
    e.ipid = <uint16_t>ipid
    e.dir = <uint8_t>d
    e.known = 0
    e.exitdir = 0
    e.nsa = e.nda = 0
    e.total = 0
    e.nranges = 0
    e.nheld = 0
    e.held_head = e.held_tail = -1
    e.expires = now + f.timeout
    cdef int32_t *bk = &f.bucket[key_hash(d, sa, da, proto, ipid) & f.bmask]
    e.next = bk[0]
    bk[0] = i
    e.older = f.newest
    e.newer = -1
    if f.newest >= 0:
        f.e[f.newest].newer = i
    else:
        f.oldest = i
    f.newest = i
    f.count += 1
    f.cnt[FC_FRAG_DATAGRAMS] += 1
    return i


cdef int range_fit(const fr_entry *e, uint32_t s, uint32_t t, bint last) noexcept nogil:
    """Can [s, t) join the datagram's ranges?  R_OK, or why not (nothing changes)."""
    cdef int k, pos = 0
    cdef int n = e.nranges
    if last:
        if e.total and e.total != t:
            return R_MALFORMED
        if n and e.re[n - 1] > t:
            return R_MALFORMED
    elif e.total and t >= e.total:
        return R_MALFORMED
    for k in range(n):
        if s < e.re[k] and e.rs[k] < t:
            return R_OVERLAP
        if e.rs[k] < s:
            pos = k + 1
    if n == FR_RANGES and not ((pos > 0 and e.re[pos - 1] == s) or (pos < n and e.rs[pos] == t)):
        return R_FULL
    return R_OK


cdef void range_add(fr_entry *e, uint32_t s, uint32_t t, bint last) noexcept nogil:
    """Insert [s, t) (range_fit said R_OK), merging with adjacent ranges."""
    cdef int k, pos = 0
    cdef int n = e.nranges
    for k in range(n):
        if e.rs[k] < s:
            pos = k + 1
    cdef bint left = pos > 0 and e.re[pos - 1] == s
    cdef bint right = pos < n and e.rs[pos] == t
    if left and right:
        e.re[pos - 1] = e.re[pos]
        for k in range(pos, n - 1):
            e.rs[k] = e.rs[k + 1]
            e.re[k] = e.re[k + 1]
        e.nranges -= 1
    elif left:
        e.re[pos - 1] = t
    elif right:
        e.rs[pos] = s
    else:
        k = n
        while k > pos:
            e.rs[k] = e.rs[k - 1]
            e.re[k] = e.re[k - 1]
            k -= 1
        e.rs[pos] = s
        e.re[pos] = t
        e.nranges += 1
    if last:
        e.total = t


cdef inline bint complete(const fr_entry *e) noexcept nogil:
    return e.total != 0 and e.nranges == 1 and e.rs[0] == 0 and e.re[0] == e.total


cdef void frag_begin(hn_frag *f, uint32_t now) noexcept nogil:
    """Start of a translate call: at most FR_EXPIRE_PER_CALL timed-out datagrams are freed."""
    cdef uint32_t k = 0
    while f.oldest >= 0 and k < FR_EXPIRE_PER_CALL and expired(&f.e[f.oldest], now):
        free_entry(f, f.oldest, True)
        k += 1


cdef uint8_t frag_later(hn_frag *f, uint8_t *b, uint64_t fs, uint64_t fe, uint64_t l3, int direction,
                        uint32_t now) noexcept nogil:
    """A later fragment (offset > 0) of a frame the fast path validated (Ethernet, IPv4
    header and total length inside the frame, TTL > 1): translated in place (the
    verdict says where it goes), held, or dropped by reason."""
    cdef uint8_t *h = b + l3
    cdef uint32_t ihl = (h[0] & 0x0F) * 4
    cdef uint32_t plen = be16(h + 2) - ihl
    cdef uint32_t fo = be16(h + 6)
    cdef uint32_t proto = h[9]
    cdef uint32_t s = (fo & 0x1FFF) * 8
    cdef uint32_t t = s + plen
    cdef bint last = not (fo & 0x2000)
    if ihl + t > 65535:
        return V_DROP_FRAG_OFFSET
    if proto == PROTO_TCP and (fo & 0x1FFF) == 1:
        return V_DROP_FRAG_TINY
    if plen == 0 or (not last and (plen & 7)):
        return V_DROP_FRAG_MALFORMED
    cdef uint32_t sa = be32(h + 12)
    cdef uint32_t da = be32(h + 16)
    cdef uint32_t ipid = be16(h + 4)
    cdef int32_t i = find(f, direction, sa, da, proto, ipid)
    cdef fr_entry *e
    cdef int r
    if i >= 0:
        e = &f.e[i]
        r = range_fit(e, s, t, last)
        if r == R_OVERLAP:
            return V_DROP_FRAG_OVERLAP
        if r == R_MALFORMED:
            return V_DROP_FRAG_MALFORMED
        if r == R_FULL:
            return V_DROP_FRAG_HOLD_FULL
        if e.known:
            range_add(e, s, t, last)
            ip_rewrite(h, e.nsa, e.nda)
            r = e.exitdir
            if complete(e):
                f.cnt[FC_FRAG_COMPLETED] += 1
                free_entry(f, i, False)
            return V_HAIRPIN if r != direction else V_TRANSLATED
    # hold it until the first fragment is translated
    cdef uint64_t flen = fe - fs
    if flen > FR_CHUNK or f.free_c < 0:
        return V_DROP_FRAG_HOLD_FULL
    if i < 0:
        i = new_entry(f, direction, sa, da, proto, ipid, now)
        if i < 0:
            return V_DROP_FRAG_TABLE_FULL
    e = &f.e[i]
    range_add(e, s, t, last)
    cdef int32_t c = f.free_c
    f.free_c = f.cnext[c]
    f.chunks_used += 1
    memcpy(f.arena + <uint64_t>c * FR_CHUNK, b + fs, flen)
    f.clen[c] = <uint32_t>flen
    f.cl3[c] = <uint16_t>(l3 - fs)
    f.cnext[c] = -1
    if e.held_tail >= 0:
        f.cnext[e.held_tail] = c
    else:
        e.held_head = c
    e.held_tail = c
    e.nheld += 1
    f.cnt[FC_FRAG_HELD] += 1
    return V_FRAGMENT_HELD


cdef uint8_t frag_first_check(hn_frag *f, const uint8_t *b, uint64_t l3, int direction,
                              uint32_t now) noexcept nogil:
    """Before a first fragment (offset 0, MF) is looked up: 0 if it may go through,
    else its drop verdict.  Changes nothing."""
    cdef const uint8_t *h = b + l3
    cdef uint32_t plen = be16(h + 2) - (h[0] & 0x0F) * 4
    cdef int32_t i = find(f, direction, be32(h + 12), be32(h + 16), h[9], be16(h + 4))
    cdef int r
    if i < 0:
        if f.free_e < 0 and not (f.oldest >= 0 and expired(&f.e[f.oldest], now)):
            return V_DROP_FRAG_TABLE_FULL
        return 0
    if f.e[i].known:
        return V_DROP_FRAG_OVERLAP      # its first fragment went through already
    r = range_fit(&f.e[i], 0, plen, False)
    if r == R_OVERLAP:
        return V_DROP_FRAG_OVERLAP
    if r == R_MALFORMED:
        return V_DROP_FRAG_MALFORMED
    if r == R_FULL:
        return V_DROP_FRAG_HOLD_FULL
    return 0


cdef void frag_first_record(hn_frag *f, const uint8_t *b, uint64_t l3, int direction, int exitdir,
                            uint32_t osa, uint32_t oda, uint32_t now, const uint8_t *mac,
                            hn_out *out) noexcept nogil:
    """A first fragment that frag_first_check let through was translated (its header now
    holds the new addresses; osa/oda are the ones it arrived with): record the
    translation, release the held fragments into the output area ``out`` (``mac``:
    dst+src MAC for the exit side, or NULL), cut again where they no longer fit."""
    cdef const uint8_t *h = b + l3
    cdef uint32_t plen = be16(h + 2) - (h[0] & 0x0F) * 4
    cdef uint32_t proto = h[9]
    cdef uint32_t ipid = be16(h + 4)
    cdef int32_t i = find(f, direction, osa, oda, proto, ipid)
    if i < 0:
        i = new_entry(f, direction, osa, oda, proto, ipid, now)
        if i < 0:
            return      # cannot happen after frag_first_check
    cdef fr_entry *e = &f.e[i]
    e.known = 1
    e.nsa = be32(h + 12)
    e.nda = be32(h + 16)
    e.exitdir = <uint8_t>exitdir
    range_add(e, 0, plen, False)
    cdef int32_t c = e.held_head
    cdef uint8_t *fr
    cdef uint8_t *fh
    cdef uint32_t nf, ihl
    while c >= 0:
        fr = f.arena + <uint64_t>c * FR_CHUNK
        fh = fr + f.cl3[c]
        ip_rewrite(fh, e.nsa, e.nda)
        if mac != NULL:
            memcpy(fr, mac, 12)
        ihl = (fh[0] & 0x0F) * 4
        nf = out_put(out, fr, f.cl3[c], ihl, be16(fh + 2) - ihl, exitdir)
        if nf == 0:
            f.cnt[FC_FRAG_OUTPUT_FULL] += 1
        else:
            f.cnt[FC_FRAG_RELEASED] += 1
            if nf > 1:
                f.cnt[FC_FRAG_RECUT] += 1
        c = f.cnext[c]
    free_chunks(f, e.held_head)
    e.held_head = e.held_tail = -1
    e.nheld = 0
    if complete(e):
        f.cnt[FC_FRAG_COMPLETED] += 1
        free_entry(f, i, False)


# ------------------------------------------------------------------------------------
# Python edge
# ------------------------------------------------------------------------------------

cdef class FragTable:
    """Per-NIC fragment table (see the module doc); ``hypernat.frag_py.FragTable`` is
    its twin.  Give it to ``Translator(..., frag=table)``.

    entries   datagrams tracked at once (limits.fragments.entries)
    bytes     memory for held early fragments, in FR_CHUNK-byte chunks (limits.fragments.bytes)
    timeout   clock ticks a datagram's entry lives, from its first fragment seen
    """

    def __init__(self, entries=1024, bytes=1 << 20, timeout=2):
        entries, nbytes, timeout = operator.index(entries), operator.index(bytes), operator.index(timeout)
        if not 1 <= entries <= 1 << 24:
            raise ValueError(f"entries must be 1..{1 << 24}, got {entries}")
        if not FR_CHUNK <= nbytes <= 1 << 32:
            raise ValueError(f"bytes must be {FR_CHUNK}..{1 << 32}, got {nbytes}")
        if not 1 <= timeout <= 3600:
            raise ValueError(f"timeout must be 1..3600 ticks, got {timeout}")
        nchunks = nbytes // FR_CHUNK
        nb = 1
        while nb < 2 * entries:
            nb *= 2
        ent = np.zeros(entries * sizeof(fr_entry), np.uint8)
        bucket = np.full(nb, -1, np.int32)
        arena = np.zeros(nchunks * FR_CHUNK, np.uint8)
        clen = np.zeros(nchunks, np.uint32)
        cl3 = np.zeros(nchunks, np.uint16)
        cnext = np.arange(1, nchunks + 1, dtype=np.int32)
        cnext[nchunks - 1] = -1  # the free list ends (no negative index: wraparound is off here)
        self._counters = np.zeros(N_FRAG_COUNTERS, np.uint64)
        self._arrays = (ent, bucket, clen, cl3, cnext)
        self._arena = arena
        self.f.e = <fr_entry *>cnp.PyArray_DATA(ent)
        self.f.bucket = <int32_t *>cnp.PyArray_DATA(bucket)
        self.f.bmask = nb - 1
        self.f.nentries = entries
        self.f.count = 0
        cdef uint32_t k
        for k in range(entries):
            self.f.e[k].next = <int32_t>k + 1 if k + 1 < <uint32_t>entries else -1
        self.f.free_e = 0
        self.f.oldest = self.f.newest = -1
        self.f.arena = <uint8_t *>cnp.PyArray_DATA(arena)
        self.f.clen = <uint32_t *>cnp.PyArray_DATA(clen)
        self.f.cl3 = <uint16_t *>cnp.PyArray_DATA(cl3)
        self.f.cnext = <int32_t *>cnp.PyArray_DATA(cnext)
        self.f.free_c = 0
        self.f.nchunks = nchunks
        self.f.chunks_used = 0
        self.f.timeout = timeout
        self.f.cnt = <uint64_t *>cnp.PyArray_DATA(self._counters)
        self._busy = 0

    @property
    def capacity(self):
        return self.f.nentries

    @property
    def chunks(self):
        """Frames that can be held at once (bytes // CHUNK)."""
        return self.f.nchunks

    @property
    def timeout(self):
        return self.f.timeout

    def __len__(self):
        """Datagrams tracked now."""
        return self.f.count

    @property
    def held(self):
        """Frames held (chunks in use)."""
        return self.f.chunks_used

    @property
    def counters(self):
        """uint64 ``[N_FRAG_COUNTERS]`` (verdicts.FRAG_COUNTERS), live."""
        return self._counters

    def counters_dict(self):
        return {n: int(self._counters[i]) for i, n in enumerate(_verdicts.FRAG_COUNTER_NAMES)}

    def expire(self, now):
        """What a translate call does first (timers call it when no frame comes): free at
        most EXPIRE_PER_CALL timed-out datagrams."""
        cdef uint32_t t = operator.index(now) & 0xFFFFFFFF
        if self._busy:
            raise RuntimeError("FragTable changed while a translate over it runs in another thread")
        frag_begin(&self.f, t)

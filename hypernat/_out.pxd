# cython: language_level=3
"""The output area: the frames the gateway makes itself, per translate call.

One area per Translator; every frame the gateway makes -- its ICMP errors, the
fragments of a datagram too long for its exit link, the early fragments the fragment
table held and now releases -- is written into it through these functions, and the NIC
worker sends it once after each translate call (``Translator.out_*``)::

    fast path (_fastpath.pyx) ──┐ out_take: room for a frame it builds (ICMP error)
                                ├──────────────────────────────────────────────► | frame | frame | ...
    fragment table (_frag.pyx) ─┘ out_put: a copy of an IPv4 frame, cut in         offsets, lengths,
                                  fragments when longer than its exit's MTU        exit side per frame

``out_put`` is the one place a datagram is cut in fragments (RFC 791): a too-long
non-DF packet, a translated fragment that no longer fits, a released held fragment.
Emptied (on = ob_used = 0) at the start of every translate call."""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from ._csum cimport csum


ctypedef struct hn_out:
    uint8_t *ob             # bytes ...
    uint64_t ob_cap
    uint64_t ob_used
    uint32_t *oo            # ... and per frame: offset, length, exit direction
    uint32_t *ol
    uint8_t *ox
    uint32_t on
    uint32_t on_cap
    uint32_t mtu[2]         # per exit direction: the largest IPv4 datagram (0: no limit)


cdef inline uint8_t *out_take(hn_out *o, uint64_t n, int exitdir) noexcept nogil:
    """Room for one frame of n bytes leaving toward `exitdir`, or NULL."""
    if o.on >= o.on_cap or n > o.ob_cap - o.ob_used:
        return NULL
    cdef uint8_t *q = o.ob + o.ob_used
    o.oo[o.on] = <uint32_t>o.ob_used
    o.ol[o.on] = <uint32_t>n
    o.ox[o.on] = <uint8_t>exitdir
    o.on += 1
    o.ob_used += n
    return q


cdef inline void options_fragment(uint8_t *h, uint64_t ihl) noexcept nogil:
    """IPv4 options not to be copied into later fragments (copied flag clear) become
    NOPs, so every fragment's header keeps the same length (RFC 791, as Linux does)."""
    cdef uint64_t i = 20
    cdef uint32_t t, n
    while i < ihl:
        t = h[i]
        if t == 0:
            return
        if t == 1:
            i += 1
            continue
        if i + 1 >= ihl:
            return
        n = h[i + 1]
        if n < 2 or i + n > ihl:
            return
        if not (t & 0x80):
            memset(h + i, 1, n)
        i += n


cdef inline uint32_t out_put(hn_out *o, const uint8_t *f, uint64_t l2, uint64_t ihl, uint64_t data,
                             int exitdir) noexcept nogil:
    """Frame f (l2 bytes of link header, an IPv4 header of ihl bytes, data bytes after
    it; all within the caller's bounds) into the area toward `exitdir`: as it is when it
    fits that link's MTU, else cut into fragments of at most the MTU (RFC 791: data in
    multiples of 8 bytes, offsets relative to the frame's own, MF on every piece but the
    datagram's last, DF cleared).  Returns the frames written; 0: no room (none
    written)."""
    cdef uint64_t mtu = o.mtu[exitdir]
    cdef uint64_t chunk = data
    cdef uint64_t nf = 1
    if mtu != 0 and ihl + data > mtu:
        chunk = ((mtu - ihl) // 8) * 8      # mtu >= 68, ihl <= 60
        nf = (data + chunk - 1) // chunk
    if nf > o.on_cap - o.on or nf * (l2 + ihl) + data > o.ob_cap - o.ob_used:
        return 0
    cdef uint8_t *q
    if nf == 1:
        q = out_take(o, l2 + ihl + data, exitdir)
        memcpy(q, f, l2 + ihl + data)
        return 1
    cdef uint32_t fo = (<uint32_t>f[l2 + 6] << 8) | f[l2 + 7]
    cdef uint64_t k, off, ln
    cdef uint32_t x
    cdef uint8_t *h
    for k in range(nf):
        off = k * chunk
        ln = data - off if data - off < chunk else chunk
        q = out_take(o, l2 + ihl + ln, exitdir)
        memcpy(q, f, l2 + ihl)
        h = q + l2
        if k:
            options_fragment(h, ihl)
        h[2] = <uint8_t>((ihl + ln) >> 8)
        h[3] = <uint8_t>(ihl + ln)
        x = (fo & 0x8000) | (((fo & 0x1FFF) + <uint32_t>(off >> 3)) & 0x1FFF)
        if k + 1 < nf or (fo & 0x2000):
            x |= 0x2000
        h[6] = <uint8_t>(x >> 8)
        h[7] = <uint8_t>x
        h[10] = 0
        h[11] = 0
        x = csum(h, ihl)
        h[10] = <uint8_t>(x >> 8)
        h[11] = <uint8_t>x
        memcpy(h + ihl, f + l2 + ihl + off, ln)
    return <uint32_t>nf

# cython: language_level=3
"""Internet checksum arithmetic (RFC 1071 folds, RFC 1624 incremental updates), one
copy for every compiled module that rewrites headers (the fast path, the fragment
table).  Arithmetic on integers, and one sum over bytes whose bounds the caller
checked (csum)."""

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef inline uint32_t fold(uint64_t s) noexcept nogil:
    """One's-complement fold with end-around carry (RFC 1071), branch-free.  Every sum
    here is below 2**32 (at most 2**15 words of 16 bits, or a few dozen terms), and
    two folds bring any s < 2**32 to 16 bits: the first leaves at most 0x1FFFE, the
    second at most 0xFFFF."""
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return <uint32_t>s


cdef inline uint64_t d16(uint32_t old, uint32_t new) noexcept nogil:
    """RFC 1624 eqn. 3 term for one 16-bit word m -> m': ~m + m'."""
    return (~old & 0xFFFF) + (new & 0xFFFF)


cdef inline uint64_t d32(uint32_t old, uint32_t new) noexcept nogil:
    return d16(old >> 16, new >> 16) + d16(old & 0xFFFF, new & 0xFFFF)


cdef inline uint32_t adjust(uint32_t ck, uint64_t terms) noexcept nogil:
    """HC' = ~(~HC + sum of ~m + m')."""
    return ~fold((~ck & 0xFFFF) + terms) & 0xFFFF


cdef inline uint32_t csum(const uint8_t *q, uint64_t n) noexcept nogil:
    """Internet checksum (RFC 1071) of q[0:n]: for bytes the caller built or bounded
    itself (generated frames, a datagram whose length the parser checked)."""
    cdef uint64_t s = 0
    cdef uint64_t i = 0
    while i + 1 < n:
        s += (<uint32_t>q[i] << 8) | q[i + 1]
        i += 2
    if i < n:
        s += <uint32_t>q[i] << 8
    return ~fold(s) & 0xFFFF

# cython: language_level=3
"""802.1Q on the packet rings, one copy for every compiled backend (``_xsk.pyx`` and
``_ring.pyx``): the set of VLAN IDs a port
carries, and a frame's egress tag (a router's egress: the tag belongs to the port).

    egress mode 0: the frame as it is     1: untagged (its own tag taken out)
                2: tagged with the port's TCI (its own tag replaced)
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset


cdef inline void vlan_set_clear(uint8_t *bits) noexcept nogil:
    """An empty set of VLAN IDs: 512 bytes, one bit per ID."""
    memset(bits, 0, 512)


cdef inline void vlan_set_add(uint8_t *bits, uint32_t vid) noexcept nogil:
    bits[(vid & 0xFFF) >> 3] |= <uint8_t>(1 << (vid & 7))


cdef inline bint vlan_set_has(const uint8_t *bits, uint32_t vid) noexcept nogil:
    return (bits[(vid & 0xFFF) >> 3] >> (vid & 7)) & 1


cdef inline uint32_t vlan_tagged_vid(const uint8_t *f, uint32_t ln) noexcept nogil:
    """The VLAN ID of a frame carrying an 802.1Q tag in place (0x8100), or 0xFFFF: none."""
    if ln >= 18 and f[12] == 0x81 and f[13] == 0x00:
        return ((<uint32_t>f[14] & 0x0F) << 8) | f[15]
    return 0xFFFF


cdef inline uint32_t vlan_egress_skip(const uint8_t *f, uint32_t ln, int mode) noexcept nogil:
    """Bytes of the frame's own tag (802.1Q or 802.1ad) that egress `mode` takes out."""
    if mode and ln >= 18 and ((f[12] == 0x81 and f[13] == 0x00) or (f[12] == 0x88 and f[13] == 0xA8)):
        return 4
    return 0


cdef inline uint32_t vlan_egress_add(int mode) noexcept nogil:
    """Bytes of the port's tag that egress `mode` puts in."""
    return 4 if mode == 2 else 0


cdef inline void vlan_egress_copy(uint8_t *o, const uint8_t *f, uint32_t ln, uint32_t skip, uint32_t add,
                                  uint16_t tci) noexcept nogil:
    """Copy frame f[:ln] to o (ln - skip + add bytes): MACs, the port's tag if `add`,
    the rest after the frame's own tag if `skip`."""
    if skip == add:
        memcpy(o, f, ln)
    else:
        memcpy(o, f, 12)
        memcpy(o + 12 + add, f + 12 + skip, ln - 12 - skip)
    if add:
        o[12] = 0x81
        o[13] = 0x00
        o[14] = <uint8_t>(tci >> 8)
        o[15] = <uint8_t>(tci & 0xFF)

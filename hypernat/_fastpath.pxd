# cython: language_level=3
"""The flow table's C interface (``hypernat/_fastpath.pyx``): the slot record, the flow
hash and ``FlowTable``'s C-level insert / find / delete, for compiled modules that put
rows in a table (clone install, connection setup) or key a table of their own by the
same hashing, without a Python call per row.  Callers hold the GIL or otherwise ensure
that no translate over the table runs meanwhile (``FlowTable._busy``)."""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #ifndef HN_SLOT_DEFINED
    #define HN_SLOT_DEFINED
    /* layout.SLOT_DTYPE: natural alignment already leaves no padding, so the struct is
       packed without a pragma; the asserts pin every offset to the dtype. */
    typedef struct {
        uint32_t saddr;
        uint32_t daddr;
        uint16_t sport;
        uint16_t dport;
        uint8_t  proto;
        uint8_t  flags;
        uint16_t new_port;
        uint32_t new_addr;
        uint32_t rule_id;
        uint32_t last_seen;
        uint8_t  tcp_state;
        uint8_t  user;
        uint16_t lease;
    } hn_slot;
    #ifndef HN_ASSERT_OFF
    #define HN_ASSERT_OFF(T, f, o) _Static_assert(offsetof(T, f) == (o), #T "." #f " offset")
    #endif
    _Static_assert(sizeof(hn_slot) == 32, "hn_slot must be 32 bytes (layout.SLOT_DTYPE)");
    HN_ASSERT_OFF(hn_slot, daddr, 4);     HN_ASSERT_OFF(hn_slot, sport, 8);
    HN_ASSERT_OFF(hn_slot, dport, 10);    HN_ASSERT_OFF(hn_slot, proto, 12);
    HN_ASSERT_OFF(hn_slot, flags, 13);    HN_ASSERT_OFF(hn_slot, new_port, 14);
    HN_ASSERT_OFF(hn_slot, new_addr, 16); HN_ASSERT_OFF(hn_slot, rule_id, 20);
    HN_ASSERT_OFF(hn_slot, last_seen, 24); HN_ASSERT_OFF(hn_slot, tcp_state, 28);
    HN_ASSERT_OFF(hn_slot, user, 29);     HN_ASSERT_OFF(hn_slot, lease, 30);

    /* layout.flow_hash, the same 64-bit value. */
    static inline uint64_t hn_flow_hash(uint8_t proto, uint32_t saddr, uint16_t sport,
                                        uint32_t daddr, uint16_t dport) {
        uint64_t a = ((uint64_t)saddr << 32) | (uint64_t)daddr;
        uint64_t b = ((uint64_t)sport << 24) | ((uint64_t)dport << 8) | (uint64_t)proto;
        uint64_t h = a * UINT64_C(0x9E3779B97F4A7C15);
        h ^= b * UINT64_C(0xC2B2AE3D27D4EB4F);
        h ^= h >> 29;
        h *= UINT64_C(0xBF58476D1CE4E5B9);
        h ^= h >> 32;
        return h;
    }

    #endif
    """
    ctypedef struct hn_slot:
        uint32_t saddr
        uint32_t daddr
        uint16_t sport
        uint16_t dport
        uint8_t proto
        uint8_t flags
        uint16_t new_port
        uint32_t new_addr
        uint32_t rule_id
        uint32_t last_seen
        uint8_t tcp_state
        uint8_t user
        uint16_t lease

    uint64_t hn_flow_hash(uint8_t proto, uint32_t saddr, uint16_t sport,
                          uint32_t daddr, uint16_t dport) noexcept nogil

cdef extern from *:
    """
    #ifndef HN_TBL_PREFETCH_DEFINED
    #define HN_TBL_PREFETCH_DEFINED
    #if defined(__GNUC__) || defined(__clang__)
    #define hn_tbl_prefetch(p) __builtin_prefetch((const void *)(p), 1, 3)
    #else
    #define hn_tbl_prefetch(p) ((void)(p))
    #endif
    #endif
    """
    void hn_tbl_prefetch(const void *p) noexcept nogil


ctypedef struct hn_table:
    hn_slot *s
    uint64_t mask
    uint64_t nslots
    uint64_t count
    uint64_t capacity
    uint64_t full_count


cdef class FlowTable:
    cdef hn_table t
    cdef object _slots
    cdef int _busy          # > 0 while a translate over this table runs without the GIL

    cdef _mutating(self)    # raises while _busy

    # one entry, at C level (the key as the table holds it; flags get F_OCCUPIED);
    # the same semantics as insert / lookup / delete
    cdef int64_t c_find(self, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da,
                        uint16_t dp) noexcept nogil
    cdef bint c_insert(self, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da, uint16_t dp,
                       uint32_t new_addr, uint16_t new_port, uint32_t rule_id, uint32_t now,
                       uint8_t flags) noexcept nogil
    cdef bint c_delete(self, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da,
                       uint16_t dp) noexcept nogil
    cdef hn_slot *c_slot(self, int64_t i) noexcept nogil   # slot i (from c_find, >= 0)


cdef inline void ft_prefetch(FlowTable t, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da,
                             uint16_t dp) noexcept:
    """Start loading the home slot a find / insert of this key in `t` probes first (the
    slot ``c_find`` / ``c_insert`` hash to, for writing): callers issue it a few keys
    ahead of the probe, so that the cache misses of a batch overlap."""
    hn_tbl_prefetch(&t.t.s[hn_flow_hash(proto, sa, sp, da, dp) & t.t.mask])

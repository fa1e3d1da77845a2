# cython: language_level=3
"""The fast path, compiled: flow tables and batch translation in ``nogil`` C loops.

This is the only place where per-packet work happens.  It implements, byte for byte,
the contract in ``docs/fastpath.md`` (the readable twin is ``hypernat.fastpath_py``;
the tests run both and compare frames, verdicts, keys, counters and table slots).
What this file adds to that contract is *speed*: one Python call per batch, no GIL,
no allocation, and memory latency hidden by group prefetch.

Flow table
----------
One flow direction per 32-byte slot (``layout.SLOT_DTYPE``: two slots per cache line,
never straddling one; the numpy array is 64-byte aligned), open addressing with
linear probing and backward-shift delete (no tombstones), load <= 0.7.  The slots live
in a numpy array so the slow path can inspect and snapshot them; C reads them through
``hn_slot``, a struct whose layout is pinned to the dtype by static asserts.

Batch translation and group prefetch
------------------------------------
At a million flows the table is 64 MiB: nearly every lookup is a cache miss (~100 ns),
several times the cost of the parse and rewrite around it.  So the batch is worked in
groups of ``GROUP`` frames, in two passes::

    batch  | f0 f1 ... f31 | f32 ... f63 | ...              (offsets/lengths into buf)
             \\___________/
    pass 1:  parse + validate each frame, build its key, hash it,
             __builtin_prefetch(&slots[hash & mask])       -> up to 32 misses in flight
    pass 2:  probe (the home slot is now in cache), rewrite addresses and ports,
             RFC 1624 checksum updates, TTL, MACs, verdict, counter, key

Pass 1 never writes a frame and pass 2 never changes which slot holds which key, so
the result equals one-frame-at-a-time processing -- unless two frames of a batch
overlap in ``buf`` (then pass 1 of the second would read bytes pass 2 of the first
has not yet rewritten).  A batch whose frames are not laid out in increasing,
non-overlapping order is therefore processed with groups of one, which is exactly the
sequential order the reference follows.

What else was measured to matter (2-vCPU VM, 64-byte frames)
--------------------------------------------------------------
* the OUT and IN rewrites are specialised to the one endpoint they change
  (``rewrite_one``; the other endpoint's RFC 1624 terms are constants): +9%;
* a hit stores into its slot only what changes (same tick: nothing), so the slot's
  line stays clean and is never written back;
* the Python edge checks numpy arguments with numpy's C macros instead of acquiring
  four typed memoryviews: half the cost of a call (~0.3 us), i.e. +5-10% at 256 frames;
* group size 16/32/64 and an extra next-line prefetch made no difference, or cost
  (an unpredictable branch); a branch-free key compare cost 10-20%.  Rates are in
  benchmarks/bench_fastpath.py; ``objdump -d | grep prefetch`` must show 2 sites.

Safety
------
Every packet access goes through ``rd*/wr*`` below, always inside
``buf[offset:offset+length]`` (the parser proves each read in range before making it).
In a debug build (``HYPERNAT_DEBUG=1``) those accessors check the frame bounds and
abort loudly, so the hypothesis tests run under it catch any slip.  Packet fields are
read byte by byte, big-endian, in unsigned types: no alignment, endianness or
char-signedness assumptions (the same C compiles for aarch64).  The tables must not be
mutated from another thread while a translate runs: mutators raise instead.
"""

include "_verdicts.pxi"

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from ._csum cimport adjust, csum, d16, d32, fold
from ._out cimport hn_out, out_put, out_take
from ._frag cimport (FragTable, frag_begin, frag_first_check, frag_first_record, frag_later,
                     hn_frag)

import operator

import numpy as np

from . import layout as _layout
from . import verdicts as _verdicts
from .io import base as _iobase

cnp.import_array()

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <stdio.h>
    #include <stdlib.h>

    /* Slot and key records are little-endian by definition (layout.py); C reads them
       natively, so refuse to build where that would be wrong. */
    #if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && \
        __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "hypernat._fastpath: layout.SLOT_DTYPE is little-endian; this target is not"
    #endif

    /* hn_slot (layout.SLOT_DTYPE) and hn_flow_hash: in _fastpath.pxd */
    #define HN_ASSERT_OFF(T, f, o) _Static_assert(offsetof(T, f) == (o), #T "." #f " offset")

    /* layout.KEY_DTYPE */
    typedef struct {
        uint32_t saddr;
        uint32_t daddr;
        uint16_t sport;
        uint16_t dport;
        uint8_t  proto;
        uint8_t  kind;
        uint8_t  tcp_flags;
        uint8_t  icmp_type;
    } hn_key;
    _Static_assert(sizeof(hn_key) == 16, "hn_key must be 16 bytes (layout.KEY_DTYPE)");
    HN_ASSERT_OFF(hn_key, sport, 8);  HN_ASSERT_OFF(hn_key, proto, 12);
    HN_ASSERT_OFF(hn_key, kind, 13);  HN_ASSERT_OFF(hn_key, icmp_type, 15);

    /* Portable prefetch: gcc/clang lower it to PREFETCHT0 on x86-64, PRFM on aarch64.
       Written as a macro so that no helper can be dropped at -O2 (DESIGN.md). */
    #if defined(__GNUC__) || defined(__clang__)
    #define hn_prefetch(p) __builtin_prefetch((const void *)(p), 1, 3)
    #define hn_unlikely(x) __builtin_expect(!!(x), 0)
    #else
    #define hn_prefetch(p) ((void)(p))
    #define hn_unlikely(x) (x)
    #endif

    #ifdef HYPERNAT_DEBUG
    #define HN_DEBUG 1
    #else
    #define HN_DEBUG 0
    #endif
    /* Debug builds only: an access outside its frame is a bug in this file. */
    static void hn_out_of_frame(uint64_t pos, uint64_t n, uint64_t lo, uint64_t hi) {
        fprintf(stderr, "hypernat._fastpath: BUG: access [%llu, %llu) outside frame [%llu, %llu)\\n",
                (unsigned long long)pos, (unsigned long long)(pos + n),
                (unsigned long long)lo, (unsigned long long)hi);
        abort();
    }
    """
    ctypedef struct hn_key:
        uint32_t saddr
        uint32_t daddr
        uint16_t sport
        uint16_t dport
        uint8_t proto
        uint8_t kind
        uint8_t tcp_flags
        uint8_t icmp_type

    void hn_prefetch(const void *p) noexcept nogil
    bint hn_unlikely(bint x) noexcept nogil
    int HN_DEBUG
    void hn_out_of_frame(uint64_t pos, uint64_t n, uint64_t lo, uint64_t hi) noexcept nogil


# The verdict enum comes from the one declared list; a stale build must not run.
if N_VERDICTS != _verdicts.N_VERDICTS or DIR_OUT != _verdicts.OUT or DIR_IN != _verdicts.IN:
    raise ImportError("hypernat._fastpath was built from another hypernat/verdicts.py: rebuild it "
                      "(make build)")

cdef enum:
    GROUP = 32              # frames parsed and prefetched before the first probe
    V_PENDING = 255         # parsed, waiting for its lookup
    V_PENDING_FRAG = 254    # a later fragment, waiting for the fragment table
    FR_FIRST = 1            # hn_parsed.frag: offset 0, MF set
    FR_LATER = 2            # offset > 0
    V_ROUTER = 253          # parsed, waiting for its lookup and then the router's work (MSS clamp, fragments)
    SPLIT_FRAGMENT = 1      # hn_parsed.split: cut in fragments once translated
    SPLIT_GSO = 2           # a TCP super-frame: its gso_size lowered once translated
    META_LEN = 10           # bytes of a virtio_net_hdr record (io.base.META_DTYPE; checked below)
    # layout constants (checked against layout.py at import, below)
    F_OCCUPIED = 0x01
    F_ACTIVE = 0x04
    TCP_STATE_MASK = 0x07
    KIND_PLAIN = 0
    KIND_ICMP_ERROR = 1
    PROTO_ICMP = 1
    PROTO_TCP = 6
    PROTO_UDP = 17
    # what a parsed frame is
    K_TCP = 0
    K_UDP = 1
    K_ECHO = 2
    K_ERROR = 3

if (F_OCCUPIED, F_ACTIVE, TCP_STATE_MASK, KIND_PLAIN, KIND_ICMP_ERROR) != (
        _layout.F_OCCUPIED, _layout.F_ACTIVE, _layout.TCP_STATE_MASK,
        _layout.KIND_PLAIN, _layout.KIND_ICMP_ERROR):
    raise ImportError("hypernat._fastpath disagrees with hypernat/layout.py: rebuild it")

SLOT_DTYPE = _layout.SLOT_DTYPE
_META_DTYPE = _iobase.META_DTYPE
if (_META_DTYPE.itemsize, _META_DTYPE.fields["gso_type"][1], _META_DTYPE.fields["gso_size"][1],
        _META_DTYPE.fields["gso_size"][0].str) != (META_LEN, 1, 4, "<u2"):
    raise ImportError("hypernat._fastpath disagrees with hypernat/io/base.py's META_DTYPE: rebuild it")
KEY_DTYPE = _layout.KEY_DTYPE
_U32 = 0xFFFFFFFF
# The output area's default size: room for a batch of 256 full-size frames cut in
# fragments, or 256 ICMP errors quoting 548 bytes each, several times over.
OUTPUT_BYTES = 1 << 20
OUTPUT_FRAMES = 4096
# The router settings and the output area are checked once, by the twin's plain-Python
# functions (arguments of a call per setting, not per packet)
from .fastpath_py import ROUTER_KEYS, _check_output_area, _check_router  # noqa: E402


# ------------------------------------------------------------------------------------
# The table, in C
# ------------------------------------------------------------------------------------

# hn_table: in _fastpath.pxd

cdef inline bint key_eq(const hn_slot *s, uint8_t proto, uint32_t sa, uint16_t sp,
                        uint32_t da, uint16_t dp) noexcept nogil:
    return s.saddr == sa and s.daddr == da and s.sport == sp and s.dport == dp and s.proto == proto


cdef inline int64_t tbl_find(const hn_table *t, uint8_t proto, uint32_t sa, uint16_t sp,
                             uint32_t da, uint16_t dp, uint64_t h) noexcept nogil:
    """Slot index of the key or -1.  Bounded by nslots probes, so a table the slow path
    corrupted through ``.slots`` (every slot occupied) cannot hang the loop."""
    cdef uint64_t i = h & t.mask
    cdef uint64_t left = t.nslots
    cdef const hn_slot *s
    while left:
        s = &t.s[i]
        if not (s.flags & F_OCCUPIED):
            return -1
        if key_eq(s, proto, sa, sp, da, dp):
            return <int64_t>i
        i = (i + 1) & t.mask
        left -= 1
    return -1


cdef inline bint tbl_insert(hn_table *t, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da,
                            uint16_t dp, uint32_t new_addr, uint16_t new_port, uint32_t rule_id,
                            uint32_t now, uint8_t flags, uint64_t h) noexcept nogil:
    cdef uint64_t i = h & t.mask
    cdef uint64_t left = t.nslots
    cdef hn_slot *s = NULL
    cdef bint found = False
    while left:
        s = &t.s[i]
        if not (s.flags & F_OCCUPIED):
            break
        if key_eq(s, proto, sa, sp, da, dp):
            found = True
            break
        i = (i + 1) & t.mask
        left -= 1
    if not found:
        if t.count >= t.capacity or left == 0:
            t.full_count += 1
            return False
        s.saddr = sa
        s.daddr = da
        s.sport = sp
        s.dport = dp
        s.proto = proto
        t.count += 1
    s.new_addr = new_addr
    s.new_port = new_port
    s.rule_id = rule_id
    s.last_seen = now
    s.flags = F_OCCUPIED | flags
    s.tcp_state = 0
    s.user = 0
    s.lease = 0
    return True


cdef bint tbl_delete(hn_table *t, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da,
                     uint16_t dp) noexcept nogil:
    """Backward-shift deletion (Knuth 6.4, Algorithm R): empty the slot, then pull back
    every later entry of the cluster that the hole would otherwise cut off from its
    home.  Entries end in the same slots as in the reference."""
    cdef int64_t found = tbl_find(t, proto, sa, sp, da, dp, hn_flow_hash(proto, sa, sp, da, dp))
    if found < 0:
        return False
    cdef uint64_t mask = t.mask
    cdef uint64_t i = <uint64_t>found
    cdef uint64_t j = i
    cdef uint64_t home
    cdef hn_slot *s
    memset(&t.s[i], 0, sizeof(hn_slot))
    while True:
        j = (j + 1) & mask
        s = &t.s[j]
        if not (s.flags & F_OCCUPIED):
            break          # terminates: slot i is empty
        home = hn_flow_hash(s.proto, s.saddr, s.sport, s.daddr, s.dport) & mask
        # stays if home lies cyclically in (i, j]
        if 0 < ((home - i) & mask) <= ((j - i) & mask):
            continue
        memcpy(&t.s[i], s, sizeof(hn_slot))
        memset(s, 0, sizeof(hn_slot))
        i = j
    t.count -= 1
    return True


# ------------------------------------------------------------------------------------
# Frames: accessors, checksums
# ------------------------------------------------------------------------------------

ctypedef struct hn_parsed:
    uint8_t *b          # buffer base
    uint64_t fs, fe     # this frame: buf[fs:fe]
    uint64_t l3, l4, end   # IPv4 header, L4 header, end of the IP datagram
    uint64_t e3, e4     # ICMP errors: embedded IPv4 and L4 headers
    uint64_t hash
    uint32_t saddr, daddr
    uint16_t sport, dport
    uint8_t proto, kind, ekind, tcp_flags, icmp_type
    uint8_t verdict, haskey, hairpin, frag
    uint8_t partial     # the L4 checksum field holds the pseudo-header sum (checksum offload)
    uint8_t split       # longer than its exit link's MTU: SPLIT_FRAGMENT / SPLIT_GSO once translated
    uint16_t gso        # a super-frame's segment size (virtio_net_hdr gso_size; 0: not one)
    uint8_t *meta       # a super-frame's virtio_net_hdr record (META_DTYPE); set only with gso


ctypedef struct hn_ctx:
    hn_table *out
    hn_table *inn
    uint64_t *cnt
    const uint32_t *pool    # pairs (network, mask)
    int npool
    int l2set[2]
    uint8_t l2[2][12]       # per exit direction: dst MAC then src MAC, as written
    hn_frag *frag           # the fragment table, or NULL (fragments: V_FRAGMENT)


cdef inline void chk(const hn_parsed *p, uint64_t pos, uint64_t n) noexcept nogil:
    if HN_DEBUG:
        if pos < p.fs or pos + n > p.fe:
            hn_out_of_frame(pos, n, p.fs, p.fe)


cdef inline uint32_t rd8(const hn_parsed *p, const uint8_t *b, uint64_t pos) noexcept nogil:
    chk(p, pos, 1)
    return b[pos]


cdef inline uint32_t rd16(const hn_parsed *p, const uint8_t *b, uint64_t pos) noexcept nogil:
    chk(p, pos, 2)
    # bytes of one pointer: gcc/clang merge them into a load + byte swap (rev on ARM)
    cdef const uint8_t *q = b + pos
    return (<uint32_t>q[0] << 8) | q[1]


cdef inline uint32_t rd32(const hn_parsed *p, const uint8_t *b, uint64_t pos) noexcept nogil:
    chk(p, pos, 4)
    cdef const uint8_t *q = b + pos
    return (<uint32_t>q[0] << 24) | (<uint32_t>q[1] << 16) | (<uint32_t>q[2] << 8) | q[3]


cdef inline void wr8(const hn_parsed *p, uint8_t *b, uint64_t pos, uint32_t v) noexcept nogil:
    chk(p, pos, 1)
    b[pos] = <uint8_t>v


cdef inline void wr16(const hn_parsed *p, uint8_t *b, uint64_t pos, uint32_t v) noexcept nogil:
    chk(p, pos, 2)
    b[pos] = <uint8_t>(v >> 8)
    b[pos + 1] = <uint8_t>v


cdef inline void wr32(const hn_parsed *p, uint8_t *b, uint64_t pos, uint32_t v) noexcept nogil:
    chk(p, pos, 4)
    b[pos] = <uint8_t>(v >> 24)
    b[pos + 1] = <uint8_t>(v >> 16)
    b[pos + 2] = <uint8_t>(v >> 8)
    b[pos + 3] = <uint8_t>v


cdef inline uint32_t adjust_udp(uint32_t ck, uint64_t terms) noexcept nogil:
    """UDP: zero means 'no checksum' and stays; a computed zero is sent as 0xFFFF."""
    if ck == 0:
        return 0
    ck = adjust(ck, terms)
    return ck if ck else 0xFFFF


cdef inline uint32_t adjust_l4(bint partial, bint udp, uint32_t ck, uint64_t aterms, uint64_t pterms) noexcept nogil:
    """The TCP/UDP checksum field after the addresses (aterms) and ports (pterms)
    changed.  A partial frame's field holds the pseudo-header sum, which the device
    completes over the L4 header and payload: only the addresses are in it, and it is
    a sum, not its complement (RFC 1624 applied to ~field; no UDP zero rule)."""
    if partial:
        return ~adjust(~ck & 0xFFFF, aterms) & 0xFFFF
    if udp:
        return adjust_udp(ck, aterms + pterms)
    return adjust(ck, aterms + pterms)


cdef inline uint32_t sum16(const hn_parsed *p, uint64_t start, uint64_t end) noexcept nogil:
    """Folded one's-complement sum of buf[start:end]; an odd last byte is zero-padded."""
    cdef const uint8_t *b = p.b
    cdef uint64_t s = 0
    cdef uint64_t i = start
    if end > start:
        chk(p, start, end - start)
    while i + 1 < end:
        s += (<uint32_t>b[i] << 8) | b[i + 1]
        i += 2
    if i < end:
        s += <uint32_t>b[i] << 8
    return fold(s)


# ------------------------------------------------------------------------------------
# Pass 1: parse (docs/fastpath.md steps 1-10 up to the lookup); never writes the frame
# ------------------------------------------------------------------------------------

cdef inline void parse_icmp_error(hn_parsed *p, uint32_t icmp_type) noexcept nogil:
    cdef const uint8_t *b = p.b
    # REQ-3: the checksum over the whole ICMP message must hold.
    if sum16(p, p.l4, p.end) != 0xFFFF:
        p.verdict = V_DROP_BAD_ICMP_CHECKSUM
        return
    cdef uint64_t e3 = p.l4 + 8
    if p.end - e3 < 20:
        p.verdict = V_DROP_ICMP_ERROR_MALFORMED
        return
    cdef uint32_t vihl = rd8(p, b, e3)
    cdef uint64_t eihl = (vihl & 0x0F) * 4
    if (vihl >> 4) != 4 or eihl < 20 or e3 + eihl + 8 > p.end:
        p.verdict = V_DROP_ICMP_ERROR_MALFORMED
        return
    if rd16(p, b, e3 + 6) & 0x1FFF:
        # about a later fragment: no ports to translate by (and RFC 1122 3.2.2 forbids it)
        p.verdict = V_DROP_ICMP_ERROR_FRAGMENT
        return
    cdef uint64_t e4 = e3 + eihl
    cdef uint32_t eproto = rd8(p, b, e3 + 9)
    cdef uint32_t esa = rd32(p, b, e3 + 12)
    cdef uint32_t eda = rd32(p, b, e3 + 16)
    cdef uint32_t esp, edp, et
    if eproto == PROTO_TCP or eproto == PROTO_UDP:
        esp = rd16(p, b, e4)
        edp = rd16(p, b, e4 + 2)
        p.ekind = K_TCP if eproto == PROTO_TCP else K_UDP
    elif eproto == PROTO_ICMP:
        et = rd8(p, b, e4)
        if et != 0 and et != 8:
            p.verdict = V_DROP_ICMP_ERROR_ABOUT_ERROR   # never an error about an error (RFC 1122)
            return
        esp = edp = rd16(p, b, e4 + 4)
        p.ekind = K_ECHO
    else:
        p.verdict = V_DROP_ICMP_ERROR_MALFORMED
        return
    # The embedded packet went the other way through us: its flow reversed is the key.
    p.e3 = e3
    p.e4 = e4
    p.kind = K_ERROR
    p.proto = <uint8_t>eproto
    p.saddr = eda
    p.sport = <uint16_t>edp
    p.daddr = esa
    p.dport = <uint16_t>esp
    p.tcp_flags = 0
    p.icmp_type = <uint8_t>icmp_type
    p.haskey = 1


cdef inline void parse(hn_parsed *p, uint8_t *b, uint64_t blen, uint32_t off, uint32_t ln,
                       int direction, const hn_ctx *c) noexcept nogil:
    p.b = b
    p.verdict = V_PENDING
    p.haskey = 0
    p.hairpin = 0
    p.frag = 0
    p.fs = off
    p.fe = <uint64_t>off + ln
    # 1. inside the buffer
    if p.fe > blen:
        p.fe = p.fs
        p.verdict = V_DROP_TRUNCATED
        return
    # 2. Ethernet, at most one 802.1Q tag
    if ln < 14:
        p.verdict = V_DROP_TRUNCATED
        return
    cdef uint32_t ethertype = rd16(p, b, p.fs + 12)
    cdef uint64_t l3 = p.fs + 14
    if ethertype == 0x8100:
        if ln < 18:
            p.verdict = V_DROP_TRUNCATED
            return
        ethertype = rd16(p, b, p.fs + 16)
        l3 = p.fs + 18
    if ethertype != 0x0800:
        p.verdict = V_NOT_NAT
        return
    # 3. IPv4
    cdef uint64_t avail = p.fe - l3
    if avail < 20:
        p.verdict = V_DROP_TRUNCATED
        return
    cdef uint32_t vihl = rd8(p, b, l3)
    if (vihl >> 4) != 4:
        p.verdict = V_DROP_BAD_VERSION
        return
    cdef uint64_t ihl = (vihl & 0x0F) * 4
    if ihl < 20 or ihl > avail:
        p.verdict = V_DROP_BAD_IHL
        return
    cdef uint64_t total = rd16(p, b, l3 + 2)
    if total < ihl or total > avail:
        p.verdict = V_DROP_BAD_TOTAL_LENGTH
        return
    # 4. fragments (docs/fastpath.md "Fragments"): a later one (offset > 0) carries no
    # transport header: the fragment table translates it in pass 2.  A first one (offset
    # 0, MF) is parsed on like any packet, but must hold its whole transport header.
    cdef uint32_t fo = rd16(p, b, l3 + 6) & 0x3FFF
    cdef uint32_t x4
    if fo:
        if c.frag == NULL:
            p.verdict = V_FRAGMENT
            return
        if fo & 0x1FFF:
            x4 = rd8(p, b, l3 + 9)
            if x4 != PROTO_TCP and x4 != PROTO_UDP and x4 != PROTO_ICMP:
                p.verdict = V_NOT_NAT       # as its first fragment: no table entry to wait for
                return
            if rd8(p, b, l3 + 8) <= 1:
                p.verdict = V_TTL_EXCEEDED
                return
            p.l3 = l3
            p.frag = FR_LATER
            p.verdict = V_PENDING_FRAG
            return
        p.frag = FR_FIRST
    # 5. protocol; 6. L4 header within total_length
    cdef uint32_t proto = rd8(p, b, l3 + 9)
    cdef uint64_t l4 = l3 + ihl
    cdef uint64_t l4len = total - ihl
    cdef uint64_t x
    if proto == PROTO_TCP:
        if l4len < 20:
            p.verdict = V_DROP_FRAG_TINY if p.frag else V_DROP_BAD_L4_HEADER
            return
        x = (rd8(p, b, l4 + 12) >> 4) * 4
        if x < 20:
            p.verdict = V_DROP_BAD_L4_HEADER
            return
        if x > l4len:
            p.verdict = V_DROP_FRAG_TINY if p.frag else V_DROP_BAD_L4_HEADER
            return
        p.kind = K_TCP
    elif proto == PROTO_UDP:
        if l4len < 8:
            p.verdict = V_DROP_FRAG_TINY if p.frag else V_DROP_BAD_L4_HEADER
            return
        x = rd16(p, b, l4 + 4)
        if x < 8 or (x > l4len and not p.frag):   # a first fragment's UDP length covers the datagram
            p.verdict = V_DROP_BAD_L4_HEADER
            return
        p.kind = K_UDP
    elif proto == PROTO_ICMP:
        if l4len < 8:
            p.verdict = V_DROP_FRAG_TINY if p.frag else V_DROP_BAD_L4_HEADER
            return
        p.kind = K_ECHO
    else:
        p.verdict = V_NOT_NAT
        return
    p.l3 = l3
    p.l4 = l4
    p.end = l3 + total
    # 7. TTL (pass 2 answers it: the headers above are what the ICMP error quotes)
    if rd8(p, b, l3 + 8) <= 1:
        p.verdict = V_TTL_EXCEEDED
        return
    # 8. ICMP: echo is a query, 3/11/12 are errors, the rest unsupported
    cdef uint32_t t
    if proto == PROTO_ICMP:
        t = rd8(p, b, l4)
        if t == 3 or t == 11 or t == 12:
            if p.frag:      # its checksum covers bytes we do not have
                p.verdict = V_DROP_ICMP_ERROR_FRAGMENT
                return
            parse_icmp_error(p, t)
            return
        if t != 0 and t != 8:
            p.verdict = V_DROP_ICMP_UNSUPPORTED
            return
        p.sport = p.dport = <uint16_t>rd16(p, b, l4 + 4)
        p.tcp_flags = 0
        p.icmp_type = <uint8_t>t
    else:
        p.sport = <uint16_t>rd16(p, b, l4)
        p.dport = <uint16_t>rd16(p, b, l4 + 2)
        p.tcp_flags = <uint8_t>rd8(p, b, l4 + 13) if proto == PROTO_TCP else 0
        p.icmp_type = 0
    # 9. the key, as read from the frame
    p.proto = <uint8_t>proto
    p.saddr = rd32(p, b, l3 + 12)
    p.daddr = rd32(p, b, l3 + 16)
    p.haskey = 1
    cdef int k
    if direction == DIR_OUT:
        for k in range(c.npool):
            if (p.daddr & c.pool[2 * k + 1]) == c.pool[2 * k]:
                p.hairpin = 1
                break


# ------------------------------------------------------------------------------------
# Pass 2: rewrite (step 11) and ICMP errors (step 10)
# ------------------------------------------------------------------------------------

cdef inline void touch(hn_slot *s, uint32_t now, const hn_parsed *p) noexcept nogil:
    # Store only what changes: most hits fall in the same clock tick as the flow's last
    # one, and a line that stays clean is never written back to memory.
    if s.last_seen != now:
        s.last_seen = now
    if not (s.flags & F_ACTIVE):
        s.flags |= F_ACTIVE
    cdef uint8_t st
    if p.proto == PROTO_TCP:
        st = s.tcp_state | (p.tcp_flags & TCP_STATE_MASK)
        if st != s.tcp_state:
            s.tcp_state = st


cdef bint icmp_all_zero(const hn_parsed *p) noexcept nogil:
    """Every byte of the ICMP message except its checksum field is zero."""
    cdef const uint8_t *b = p.b
    cdef uint64_t i
    chk(p, p.l4, p.end - p.l4)
    for i in range(p.l4, p.end):
        if b[i] and i != p.l4 + 2 and i != p.l4 + 3:
            return False
    return True


cdef inline void rewrite(const hn_parsed *p, uint32_t nsa, uint32_t nsp, uint32_t nda,
                         uint32_t ndp, uint32_t nid) noexcept nogil:
    """New source (nsa:nsp) and destination (nda:ndp); unchanged ones are passed as they
    are (their checksum terms cancel).  ICMP echo has one identifier for both "ports":
    it becomes ``nid`` (a hairpin's destination wins, like the reference)."""
    # Everything from *p into locals first: stores through b may alias *p.
    cdef uint8_t *b = p.b
    cdef uint64_t l3 = p.l3
    cdef uint64_t l4 = p.l4
    cdef uint32_t kind = p.kind
    cdef uint32_t sport = p.sport
    cdef uint32_t dport = p.dport
    cdef uint32_t proto = p.proto
    cdef bint partial = p.partial
    cdef uint64_t aterms = d32(p.saddr, nsa) + d32(p.daddr, nda)
    cdef uint32_t ttl = rd8(p, b, l3 + 8)
    cdef uint32_t ck
    # IPv4: addresses and the TTL/protocol word in one update
    ck = adjust(rd16(p, b, l3 + 10), aterms + d16((ttl << 8) | proto, ((ttl - 1) << 8) | proto))
    wr8(p, b, l3 + 8, ttl - 1)
    wr16(p, b, l3 + 10, ck)
    wr32(p, b, l3 + 12, nsa)
    wr32(p, b, l3 + 16, nda)
    if kind == K_TCP:
        ck = adjust_l4(partial, False, rd16(p, b, l4 + 16), aterms, d16(sport, nsp) + d16(dport, ndp))
        wr16(p, b, l4 + 16, ck)
        wr16(p, b, l4, nsp)
        wr16(p, b, l4 + 2, ndp)
    elif kind == K_UDP:
        ck = adjust_l4(partial, True, rd16(p, b, l4 + 6), aterms, d16(sport, nsp) + d16(dport, ndp))
        wr16(p, b, l4 + 6, ck)
        wr16(p, b, l4, nsp)
        wr16(p, b, l4 + 2, ndp)
    else:
        ck = adjust(rd16(p, b, l4 + 2), d16(sport, nid))
        wr16(p, b, l4 + 4, nid)
        if ck == 0 and icmp_all_zero(p):
            # Eqn. 3 yields 0x0000 when the new message sums to +0, which only an
            # all-zero message does (echo reply, id 0, seq 0, no payload: ICMP has no
            # pseudo-header); its checksum is ~(+0) = 0xFFFF (RFC 1624 sec. 3).
            ck = 0xFFFF
        wr16(p, b, l4 + 2, ck)


cdef inline void rewrite_one(const hn_parsed *p, bint dst, uint32_t na, uint32_t np_) noexcept nogil:
    """``rewrite`` specialised to one endpoint: the source (OUT) or the destination
    (IN).  The other endpoint's RFC 1624 terms (~m + m with m unchanged) are the
    constants 0x1FFFE per address and 0xFFFF per port: added as such, the checksums
    come out bit for bit as from the general form (and the reference)."""
    cdef uint8_t *b = p.b
    cdef uint64_t l3 = p.l3
    cdef uint64_t l4 = p.l4
    cdef uint32_t kind = p.kind
    cdef uint32_t proto = p.proto
    cdef uint32_t oa = p.daddr if dst else p.saddr
    cdef uint32_t op = p.dport if dst else p.sport
    cdef uint64_t aoff = 16 if dst else 12
    cdef uint64_t poff = 2 if dst else 0
    cdef uint64_t aterms = d32(oa, na) + 0x1FFFE
    cdef bint partial = p.partial
    cdef uint32_t ttl = rd8(p, b, l3 + 8)
    cdef uint32_t ck
    ck = adjust(rd16(p, b, l3 + 10), aterms + d16((ttl << 8) | proto, ((ttl - 1) << 8) | proto))
    wr8(p, b, l3 + 8, ttl - 1)
    wr16(p, b, l3 + 10, ck)
    wr32(p, b, l3 + aoff, na)
    if kind == K_TCP:
        wr16(p, b, l4 + 16, adjust_l4(partial, False, rd16(p, b, l4 + 16), aterms, d16(op, np_) + 0xFFFF))
        wr16(p, b, l4 + poff, np_)
    elif kind == K_UDP:
        wr16(p, b, l4 + 6, adjust_l4(partial, True, rd16(p, b, l4 + 6), aterms, d16(op, np_) + 0xFFFF))
        wr16(p, b, l4 + poff, np_)
    else:
        ck = adjust(rd16(p, b, l4 + 2), d16(p.sport, np_))
        wr16(p, b, l4 + 4, np_)
        if ck == 0 and icmp_all_zero(p):
            ck = 0xFFFF                 # see rewrite()
        wr16(p, b, l4 + 2, ck)


cdef inline void rewrite_icmp_error(const hn_parsed *p, int direction, uint32_t na,
                                    uint32_t np_) noexcept nogil:
    """RFC 5508: translate the embedded packet the other way round, the outer header
    like any frame, and recompute the outer ICMP checksum."""
    cdef uint8_t *b = p.b
    cdef uint64_t e3 = p.e3
    cdef uint64_t e4 = p.e4
    cdef uint64_t a_off, p_off
    cdef uint32_t old_addr, old_port, ck, ttl, o_old
    if direction == DIR_OUT:
        # embedded destination (the inside endpoint) becomes E; key saddr/sport = emb dst
        a_off = 16
        p_off = 2
        old_addr = p.saddr
        old_port = p.sport
    else:
        a_off = 12
        p_off = 0
        old_addr = p.daddr
        old_port = p.dport
    cdef uint64_t aterm = d32(old_addr, na)
    # embedded IPv4 header
    wr16(p, b, e3 + 10, adjust(rd16(p, b, e3 + 10), aterm))
    wr32(p, b, e3 + a_off, na)
    # embedded L4: port (or echo identifier) and its checksum where present
    if p.ekind == K_TCP:
        if e4 + 18 <= p.end:
            wr16(p, b, e4 + 16, adjust(rd16(p, b, e4 + 16), aterm + d16(old_port, np_)))
        wr16(p, b, e4 + p_off, np_)
    elif p.ekind == K_UDP:
        wr16(p, b, e4 + 6, adjust_udp(rd16(p, b, e4 + 6), aterm + d16(old_port, np_)))
        wr16(p, b, e4 + p_off, np_)
    else:
        wr16(p, b, e4 + 2, adjust(rd16(p, b, e4 + 2), d16(old_port, np_)))
        wr16(p, b, e4 + 4, np_)
    # outer IPv4: address and TTL
    cdef uint64_t o_off = 12 if direction == DIR_OUT else 16
    o_old = rd32(p, b, p.l3 + o_off)
    ttl = rd8(p, b, p.l3 + 8)
    ck = adjust(rd16(p, b, p.l3 + 10),
                d32(o_old, na) + d16((ttl << 8) | PROTO_ICMP, ((ttl - 1) << 8) | PROTO_ICMP))
    wr8(p, b, p.l3 + 8, ttl - 1)
    wr16(p, b, p.l3 + 10, ck)
    wr32(p, b, p.l3 + o_off, na)
    # outer ICMP checksum from scratch
    wr16(p, b, p.l4 + 2, 0)
    wr16(p, b, p.l4 + 2, ~sum16(p, p.l4, p.end) & 0xFFFF)


cdef inline uint8_t resolve(const hn_ctx *c, hn_parsed *p, const hn_table *t, int direction,
                            uint32_t now) noexcept nogil:
    """Lookup and rewrite of one parsed frame; returns its verdict."""
    cdef int64_t i, j
    cdef hn_slot *e1
    cdef hn_slot *e2
    if p.kind == K_ERROR:
        i = tbl_find(t, p.proto, p.saddr, p.sport, p.daddr, p.dport, p.hash)
        if i < 0:
            return V_MISS_ICMP_ERROR
        e1 = &t.s[i]
        rewrite_icmp_error(p, direction, e1.new_addr, e1.new_port)
        return V_TRANSLATED
    i = tbl_find(t, p.proto, p.saddr, p.sport, p.daddr, p.dport, p.hash)
    if p.hairpin:
        if i < 0:
            return V_MISS_HAIRPIN
        e1 = &t.s[i]
        j = tbl_find(c.inn, p.proto, e1.new_addr, e1.new_port, p.daddr, p.dport,
                     hn_flow_hash(p.proto, e1.new_addr, e1.new_port, p.daddr, p.dport))
        if j < 0:
            return V_MISS_HAIRPIN
        e2 = &c.inn.s[j]
        touch(e1, now, p)
        touch(e2, now, p)
        rewrite(p, e1.new_addr, e1.new_port, e2.new_addr, e2.new_port, e2.new_port)
        return V_HAIRPIN
    if i < 0:
        return V_MISS_OUT if direction == DIR_OUT else V_MISS_IN
    e1 = &t.s[i]
    touch(e1, now, p)
    rewrite_one(p, direction != DIR_OUT, e1.new_addr, e1.new_port)
    return V_TRANSLATED


# ------------------------------------------------------------------------------------
# The gateway as a router: ICMP errors it sends itself, fragmentation, MSS clamping
# (docs/fastpath.md, "Generated frames"; issue 13 items 2 and 4)
# ------------------------------------------------------------------------------------
#
#   pass 2, per frame:  TTL <= 1 ──────────────────► ICMP time exceeded ─┐
#                       size > MTU of its exit, DF ─► ICMP frag needed ───┤
#                       size > MTU, no DF ─► resolve ─► fragments ────────┤
#                                                                         ▼
#   output area  | frame | frame | ... |   (bytes, offsets, lengths, exit direction),
#                emptied at the start of every translate(); the worker sends it per batch
#
# Every generated frame is built here, in C, from the frame that caused it; Python
# only hands the area to the ports.

ctypedef struct hn_router:
    hn_out o                # the output area (hypernat/_out.pxd), with the MTU of each exit link
    uint32_t src[2]         # ICMP source address per exit direction; 0: send none that way
    uint32_t mss_clamp      # 0: off
    uint32_t rate           # ICMP errors per clock tick: the bucket's size and its refill per tick
    uint32_t tokens
    uint32_t last           # tick of the last refill
    uint32_t primed         # 0 until the first ICMP error (then `last` is meaningful)
    uint32_t ip_id          # IPv4 identification of the next generated ICMP error
    uint64_t *ev            # router events [2, N_ROUTER_EVENTS]


cdef inline uint64_t seg_headers(const hn_parsed *p) noexcept nogil:
    """IPv4 + TCP / UDP header bytes of each segment of a super-frame."""
    if p.kind == K_TCP:
        return (p.l4 - p.l3) + (rd8(p, p.b, p.l4 + 12) >> 4) * 4
    return (p.l4 - p.l3) + 8


cdef inline uint64_t egress_len(const hn_parsed *p) noexcept nogil:
    """The one size compared with an egress MTU: the IPv4 datagram's length, or for a
    super-frame the length of each segment it becomes (headers + gso_size: Linux's
    skb_gso_validate_network_len), if shorter."""
    cdef uint64_t n = p.end - p.l3
    cdef uint64_t seg
    if p.gso:
        seg = seg_headers(p) + p.gso
        if seg < n:
            return seg
    return n


cdef inline bint too_big(const hn_router *r, const hn_parsed *p, int direction) noexcept nogil:
    """Longer than the MTU of the link it leaves by (hairpins go back inside)?"""
    cdef uint32_t mtu = r.o.mtu[DIR_IN if p.hairpin else direction]
    return mtu != 0 and egress_len(p) > mtu


cdef inline void put16(uint8_t *q, uint32_t v) noexcept nogil:
    q[0] = <uint8_t>(v >> 8)
    q[1] = <uint8_t>v


cdef inline void put32(uint8_t *q, uint32_t v) noexcept nogil:
    q[0] = <uint8_t>(v >> 24)
    q[1] = <uint8_t>(v >> 16)
    q[2] = <uint8_t>(v >> 8)
    q[3] = <uint8_t>v


cdef void icmp_answer(hn_router *r, const hn_parsed *p, int direction, uint32_t now, uint32_t itype,
                      uint32_t code, uint32_t mtu) noexcept nogil:
    """An ICMP error about the frame as it was received (never rewritten), from the
    gateway's address on the side it came from, back to its source (RFC 792, 1812):
    IP header + as much of the datagram as fits in 576 bytes (and in the MTU of the
    link it leaves by); MACs swapped."""
    cdef uint64_t *ev = r.ev + direction * N_ROUTER_EVENTS
    cdef const uint8_t *b = p.b
    cdef uint64_t l3 = p.l3
    cdef int back = DIR_IN if direction == DIR_OUT else DIR_OUT
    cdef uint32_t src = r.src[back]
    cdef uint32_t sa = rd32(p, b, l3 + 12)
    cdef uint32_t da = rd32(p, b, l3 + 16)
    cdef uint32_t t
    # RFC 1812 4.3.2.7: never about an ICMP error, a non-first fragment, a link-layer or
    # IP broadcast / multicast, or a source that is not one host
    cdef bint quiet = (src == 0 or (rd8(p, b, p.fs) & 1) or (da >> 24) >= 224 or (sa >> 24) >= 224
                       or (sa >> 24) == 0 or (sa >> 24) == 127 or (rd16(p, b, l3 + 6) & 0x1FFF) != 0)
    if not quiet and rd8(p, b, l3 + 9) == PROTO_ICMP:
        t = rd8(p, b, p.l4)
        quiet = t == 3 or t == 4 or t == 5 or t == 11 or t == 12
    if quiet:
        ev[EV_ICMP_SUPPRESSED] += 1
        return
    # RFC 1812 4.3.2.8: a token bucket per NIC, refilled per clock tick
    if not r.primed:
        r.primed = 1
        r.last = now
    elif now != r.last:
        if <uint64_t>(now - r.last) * r.rate + r.tokens >= r.rate:
            r.tokens = r.rate
        else:
            r.tokens += (now - r.last) * r.rate
        r.last = now
    if r.tokens == 0:
        ev[EV_ICMP_RATE_LIMITED] += 1
        return
    cdef uint64_t l2 = l3 - p.fs
    cdef uint64_t q = p.end - l3
    if q > 576 - 28:
        q = 576 - 28
    if r.o.mtu[back] and q > r.o.mtu[back] - 28:     # and it fits the link it leaves by
        q = r.o.mtu[back] - 28
    cdef uint8_t *o = out_take(&r.o, l2 + 28 + q, back)
    if o == NULL:
        ev[EV_OUTPUT_FULL] += 1
        return
    r.tokens -= 1
    chk(p, p.fs, l2)
    memcpy(o, b + p.fs + 6, 6)              # to the sender's MAC, from ours
    memcpy(o + 6, b + p.fs, 6)
    memcpy(o + 12, b + p.fs + 12, l2 - 12)  # VLAN tag and ethertype as received
    cdef uint8_t *h = o + l2
    h[0] = 0x45
    h[1] = 0xC0                             # precedence: internetwork control
    put16(h + 2, <uint32_t>(28 + q))
    put16(h + 4, r.ip_id & 0xFFFF)
    r.ip_id += 1
    h[6] = 0
    h[7] = 0
    h[8] = 64
    h[9] = PROTO_ICMP
    h[10] = 0
    h[11] = 0
    put32(h + 12, src)
    put32(h + 16, sa)
    put16(h + 10, csum(h, 20))
    cdef uint8_t *m = h + 20
    m[0] = <uint8_t>itype
    m[1] = <uint8_t>code
    put32(m + 2, 0)
    put16(m + 6, mtu)                       # RFC 1191: the next-hop MTU (0 for type 11)
    chk(p, l3, q)
    memcpy(m + 8, b + l3, q)
    put16(m + 2, csum(m, 8 + q))
    ev[EV_ICMP_FRAG_NEEDED if itype == 3 else EV_ICMP_TIME_EXCEEDED] += 1


cdef void finish_partial(hn_parsed *p) noexcept nogil:
    """What checksum offload would do, for a partial frame about to be cut in fragments
    (their copies leave without its metadata): the TCP / UDP checksum over the segment,
    whose field holds the pseudo-header sum already."""
    cdef uint64_t at = p.l4 + (16 if p.kind == K_TCP else 6)
    chk(p, p.l4, p.end - p.l4)
    cdef uint32_t ck = csum(p.b + p.l4, p.end - p.l4)
    if ck == 0 and p.kind == K_UDP:
        ck = 0xFFFF
    wr16(p, p.b, at, ck)


cdef uint8_t fragment(hn_router *r, hn_parsed *p, int direction, int exitdir) noexcept nogil:
    """The translated frame (any datagram, or a fragment of one) as IPv4 fragments of at
    most the MTU of its exit link, into the output area (``out_put``): V_FRAGMENTED, or
    V_OUTPUT_FULL if they do not all fit."""
    cdef uint64_t *ev = r.ev + direction * N_ROUTER_EVENTS
    cdef const uint8_t *b = p.b
    cdef uint64_t ihl = (rd8(p, b, p.l3) & 0x0F) * 4
    cdef uint64_t end = p.l3 + rd16(p, b, p.l3 + 2)
    if p.partial and p.frag == 0 and (p.kind == K_TCP or p.kind == K_UDP):
        finish_partial(p)
    chk(p, p.fs, end - p.fs)
    cdef uint32_t nf = out_put(&r.o, b + p.fs, p.l3 - p.fs, ihl, end - p.l3 - ihl, exitdir)
    if nf == 0:
        ev[EV_OUTPUT_FULL] += 1
        return V_OUTPUT_FULL
    ev[EV_FRAGMENTS] += nf
    return V_FRAGMENTED


cdef void resegment(hn_router *r, hn_parsed *p, int direction, int exitdir) noexcept nogil:
    """A TCP super-frame with DF clear whose segments do not fit its exit link: its
    gso_size lowered so that they do (the byte stream is the same, cut smaller)."""
    cdef uint64_t g = r.o.mtu[exitdir] - seg_headers(p)
    p.meta[4] = <uint8_t>g              # META_DTYPE gso_size: little-endian u16 at 4
    p.meta[5] = <uint8_t>(g >> 8)
    p.gso = <uint16_t>g
    r.ev[direction * N_ROUTER_EVENTS + EV_GSO_RESEGMENTED] += 1


cdef void clamp_mss(hn_router *r, const hn_parsed *p, int direction) noexcept nogil:
    """SYN / SYN-ACK: an MSS option above the clamp is lowered to it, the TCP checksum
    updated (RFC 1624).  Options are walked inside the TCP header only; a malformed
    list leaves the frame as it was (counted)."""
    cdef uint8_t *b = p.b
    cdef uint64_t l4 = p.l4
    cdef uint64_t end = l4 + (rd8(p, b, l4 + 12) >> 4) * 4     # within the frame (parse)
    cdef uint64_t i = l4 + 20
    cdef uint32_t kind, n, old, new
    cdef uint64_t terms
    while i < end:
        kind = rd8(p, b, i)
        if kind == 0:
            return
        if kind == 1:
            i += 1
            continue
        if i + 2 > end:
            break
        n = rd8(p, b, i + 1)
        if n < 2 or i + n > end:
            break
        if kind == 2:
            if n != 4:
                break
            old = rd16(p, b, i + 2)
            new = r.mss_clamp
            if old > new and p.partial:
                # the field holds the pseudo-header sum, which covers no option
                wr16(p, b, i + 2, new)
                r.ev[direction * N_ROUTER_EVENTS + EV_MSS_CLAMPED] += 1
            elif old > new:
                if (i + 2 - l4) & 1:   # the value straddles two checksum words: byte-swapped terms
                    terms = d16(((old & 0xFF) << 8) | (old >> 8), ((new & 0xFF) << 8) | (new >> 8))
                else:
                    terms = d16(old, new)
                wr16(p, b, l4 + 16, adjust(rd16(p, b, l4 + 16), terms))
                wr16(p, b, i + 2, new)
                r.ev[direction * N_ROUTER_EVENTS + EV_MSS_CLAMPED] += 1
            return
        i += n
    if i < end:
        r.ev[direction * N_ROUTER_EVENTS + EV_MSS_BAD_OPTIONS] += 1


# The router's work is rare and bulky: called through pointers set at import, so the C
# compiler cannot inline it into the batch loop below (code size and register pressure
# in the hot loop: measured at 3-8% of the established-flow rate).
ctypedef void (*icmp_answer_fn)(hn_router *, const hn_parsed *, int, uint32_t, uint32_t, uint32_t,
                                uint32_t) noexcept nogil
cdef icmp_answer_fn cold_icmp_answer = icmp_answer


cdef inline void write_l2(const hn_ctx *c, const hn_parsed *p, int exitdir) noexcept nogil:
    """Step 11's MACs for a frame that leaves toward `exitdir` (if set_l2 gave them)."""
    if c.l2set[exitdir]:
        chk(p, p.fs, 12)
        memcpy(p.b + p.fs, c.l2[exitdir], 12)


cdef uint8_t resolve_routed(const hn_ctx *c, hn_router *r, hn_parsed *p, const hn_table *t,
                            int direction, uint32_t now) noexcept nogil:
    """A V_ROUTER frame: lookup and rewrite as any, then MSS clamping (a SYN while
    clamping), MACs, and fragments (longer than its exit link's MTU, DF clear)."""
    cdef uint8_t v = resolve(c, p, t, direction, now)
    cdef int exitdir
    if v == V_TRANSLATED or v == V_HAIRPIN:
        if p.kind == K_TCP and (p.tcp_flags & 0x02) and r.mss_clamp:
            clamp_mss(r, p, direction)
        exitdir = DIR_IN if v == V_HAIRPIN else direction
        write_l2(c, p, exitdir)
        if p.split == SPLIT_FRAGMENT:
            v = fragment(r, p, direction, exitdir)
        elif p.split == SPLIT_GSO:
            resegment(r, p, direction, exitdir)
    return v


cdef uint8_t (*cold_routed)(const hn_ctx *, hn_router *, hn_parsed *, const hn_table *, int,
                            uint32_t) noexcept nogil
cold_routed = resolve_routed


cdef uint8_t first_fragment_check(const hn_ctx *c, hn_parsed *p, int direction, uint32_t now) noexcept nogil:
    """A first fragment is decided by the flow tables like any packet (hit, or a miss for
    the slow path) unless the fragment table refuses it first: its verdict, V_PENDING
    to go on.  A later fragment (V_PENDING_FRAG) and a frame parse dropped pass as
    they are."""
    if p.verdict != V_PENDING or p.frag != FR_FIRST:
        return p.verdict
    chk(p, p.l3, 20)
    cdef uint8_t v = frag_first_check(c.frag, p.b, p.l3, direction, now)
    return v if v else V_PENDING


cdef void first_fragment_record(const hn_ctx *c, hn_router *r, const hn_parsed *p, int direction,
                                int exitdir, uint32_t now) noexcept nogil:
    """A first fragment was translated: the fragment table records its translation and
    releases the datagram's held fragments (toward `exitdir`, with its MACs)."""
    cdef const uint8_t *mac = NULL
    if c.l2set[exitdir]:
        mac = &c.l2[exitdir][0]
    frag_first_record(c.frag, p.b, p.l3, direction, exitdir, p.saddr, p.daddr, now, mac, &r.o)


cdef void translate_batch(const hn_ctx *c, hn_router *r, uint8_t *b, uint64_t blen,
                          const uint32_t *off, const uint32_t *ln, size_t n, int direction,
                          uint32_t now, uint8_t *verdicts, hn_key *keys,
                          const uint8_t *partial, uint8_t *meta) noexcept nogil:
    cdef hn_parsed ps[GROUP]
    cdef hn_parsed *p
    cdef const hn_table *t = c.out if direction == DIR_OUT else c.inn
    cdef uint64_t *cnt = c.cnt + direction * N_VERDICTS
    cdef size_t g = GROUP
    cdef size_t i, k, m
    cdef size_t base = 0
    cdef uint8_t v
    cdef int exitdir
    cdef hn_key *kp
    cdef uint8_t *mp
    if c.frag != NULL:
        frag_begin(c.frag, now)
    # The router's check costs one test per frame in pass 1: a frame no longer than the
    # smallest MTU fits any link, and a SYN matters only while clamping (its flag lifted
    # to bit 20, above any IPv4 length, so that one compare sees both); a frame it flags
    # (V_ROUTER) takes the cold path in pass 2, so the hot one is unchanged.
    cdef uint64_t fits = 0xFFFFF
    if r.o.mtu[DIR_OUT]:
        fits = r.o.mtu[DIR_OUT]
    if r.o.mtu[DIR_IN] and r.o.mtu[DIR_IN] < fits:
        fits = r.o.mtu[DIR_IN]
    cdef uint8_t synmask = 0x02 if r.mss_clamp else 0
    # Overlapping (or out-of-order) frames: strictly one after another.
    for i in range(1, n):
        if <uint64_t>off[i] < <uint64_t>off[i - 1] + ln[i - 1]:
            g = 1
            break
    while base < n:
        m = n - base
        if m > g:
            m = g
        # pass 1: parse, size (docs/fastpath.md step 8a), hash, prefetch the home slot
        for k in range(m):
            p = &ps[k]
            parse(p, b, blen, off[base + k], ln[base + k], direction, c)
            p.partial = partial[base + k] != 0 if partial != NULL else 0
            p.gso = 0
            if p.partial and meta != NULL:      # a super-frame is partial (the ring drops any other)
                mp = meta + (base + k) * META_LEN
                if mp[1] != 0:                                  # gso_type
                    p.gso = <uint16_t>(mp[4] | (<uint32_t>mp[5] << 8))
                    p.meta = mp
            if p.verdict == V_PENDING:
                p.hash = hn_flow_hash(p.proto, p.saddr, p.sport, p.daddr, p.dport)
                hn_prefetch(&t.s[p.hash & t.mask])
                # (after the prefetch: its miss is what the group waits for.  A first
                # fragment goes the fragment table's way, as it came, and is sized after.)
                if (hn_unlikely((egress_len(p) | (<uint64_t>(p.tcp_flags & synmask) << 19)) > fits)
                        and not p.frag):
                    p.split = 0
                    p.verdict = V_ROUTER
                    if too_big(r, p, direction):
                        if rd16(p, b, p.l3 + 6) & 0x4000:      # DF: answered in pass 2
                            p.verdict = V_FRAG_NEEDED
                        elif p.gso == 0:
                            p.split = SPLIT_FRAGMENT
                        elif p.kind == K_TCP and seg_headers(p) + 8 <= r.o.mtu[DIR_IN if p.hairpin else direction]:
                            p.split = SPLIT_GSO
                        else:       # UDP segments are datagrams: not ours to re-cut (nor
                                    # TCP whose headers leave no 8 bytes of data per segment)
                            p.verdict = V_DROP_GSO_TOO_BIG
        # pass 2: probe, rewrite, account
        for k in range(m):
            p = &ps[k]
            v = p.verdict
            if p.frag:
                v = first_fragment_check(c, p, direction, now)
            if v == V_PENDING:
                v = resolve(c, p, t, direction, now)
                if v == V_TRANSLATED or v == V_HAIRPIN:
                    exitdir = DIR_IN if v == V_HAIRPIN else direction
                    if p.frag:
                        first_fragment_record(c, r, p, direction, exitdir, now)
                    if c.l2set[exitdir]:
                        chk(p, p.fs, 12)
                        memcpy(b + p.fs, c.l2[exitdir], 12)
                    if p.frag and r.o.mtu[exitdir] and p.end - p.l3 > r.o.mtu[exitdir]:
                        v = fragment(r, p, direction, exitdir)      # cut again (never DF)
            elif v == V_PENDING_FRAG:
                chk(p, p.fs, p.fe - p.fs)
                v = frag_later(c.frag, b, p.fs, p.fe, p.l3, direction, now)
                if v == V_TRANSLATED or v == V_HAIRPIN:
                    exitdir = DIR_IN if v == V_HAIRPIN else direction
                    if c.l2set[exitdir]:
                        memcpy(b + p.fs, c.l2[exitdir], 12)
                    if r.o.mtu[exitdir] and rd16(p, b, p.l3 + 2) > r.o.mtu[exitdir]:
                        v = fragment(r, p, direction, exitdir)      # cut again (never DF)
            elif hn_unlikely(v == V_ROUTER):
                v = cold_routed(c, r, p, t, direction, now)
            elif hn_unlikely(v == V_TTL_EXCEEDED):
                cold_icmp_answer(r, p, direction, now, 11, 0, 0)
            elif hn_unlikely(v == V_FRAG_NEEDED):
                cold_icmp_answer(r, p, direction, now, 3, 4, r.o.mtu[DIR_IN if p.hairpin else direction])
            verdicts[base + k] = v
            cnt[v] += 1
            if keys != NULL:
                kp = &keys[base + k]
                if p.haskey:
                    kp.saddr = p.saddr
                    kp.daddr = p.daddr
                    kp.sport = p.sport
                    kp.dport = p.dport
                    kp.proto = p.proto
                    kp.kind = KIND_ICMP_ERROR if p.kind == K_ERROR else KIND_PLAIN
                    kp.tcp_flags = p.tcp_flags
                    kp.icmp_type = p.icmp_type
                else:
                    memset(kp, 0, sizeof(hn_key))
        base += m


# ------------------------------------------------------------------------------------
# Python edge: argument checking, then one nogil call
# ------------------------------------------------------------------------------------

def flow_hash(proto, saddr, sport, daddr, dport):
    """``layout.flow_hash`` computed by the C code the tables use."""
    _check_key(proto, saddr, sport, daddr, dport)
    return hn_flow_hash(proto, saddr, sport, daddr, dport)


cdef _check_key(proto, saddr, sport, daddr, dport):
    if not (0 <= proto <= 0xFF):
        raise ValueError(f"proto {proto} out of range 0..255")
    if not (0 <= saddr <= _U32 and 0 <= daddr <= _U32):
        raise ValueError(f"address out of range 0..2**32-1: {saddr}, {daddr}")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError(f"port out of range 0..65535: {sport}, {dport}")


cdef _as_records(a, dtypes, what):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy array of {' or '.join(str(d) for d in dtypes)}")
    if a.dtype not in dtypes:
        raise TypeError(f"{what} has dtype {a.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if a.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional")
    return np.ascontiguousarray(a)


cdef _check_direction(direction):
    if isinstance(direction, bool) or direction not in (DIR_OUT, DIR_IN):
        raise ValueError(f"direction must be verdicts.OUT ({DIR_OUT}) or verdicts.IN ({DIR_IN}), "
                         f"got {direction!r}")


cdef class FlowTable:
    """Open-addressing flow table over ``layout.SLOT_DTYPE`` slots; see the module
    docstring of ``hypernat.fastpath`` for the API and ``docs/fastpath.md`` for the
    exact semantics (shared with ``hypernat.fastpath_py.FlowTable``)."""

    # fields and the C-level interface: _fastpath.pxd

    cdef int64_t c_find(self, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da,
                        uint16_t dp) noexcept nogil:
        return tbl_find(&self.t, proto, sa, sp, da, dp, hn_flow_hash(proto, sa, sp, da, dp))

    cdef bint c_insert(self, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da, uint16_t dp,
                       uint32_t new_addr, uint16_t new_port, uint32_t rule_id, uint32_t now,
                       uint8_t flags) noexcept nogil:
        return tbl_insert(&self.t, proto, sa, sp, da, dp, new_addr, new_port, rule_id, now, flags,
                          hn_flow_hash(proto, sa, sp, da, dp))

    cdef bint c_delete(self, uint8_t proto, uint32_t sa, uint16_t sp, uint32_t da,
                       uint16_t dp) noexcept nogil:
        return tbl_delete(&self.t, proto, sa, sp, da, dp)

    cdef hn_slot *c_slot(self, int64_t i) noexcept nogil:
        return &self.t.s[i]

    def __cinit__(self):
        self.t.s = NULL
        self.t.mask = 0
        self.t.nslots = 0
        self.t.count = 0
        self.t.capacity = 0
        self.t.full_count = 0
        self._busy = 0

    def __init__(self, capacity, hugepages=True):
        self._mutating()
        capacity = operator.index(capacity)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if capacity > 1 << 31:
            raise ValueError(f"capacity {capacity} too large")
        nslots = _layout.slots_for(capacity)
        slots = _layout.alloc_slots(nslots, hugepages=bool(hugepages))
        if slots.ctypes.data % 64 or slots.dtype != SLOT_DTYPE or slots.shape != (nslots,) or not slots.flags.c_contiguous \
                or not slots.flags.writeable:
            raise RuntimeError("layout.alloc_slots returned an unusable (or not 64-byte aligned) array")
        self._slots = slots
        self.t.s = <hn_slot *>cnp.PyArray_DATA(slots)
        self.t.nslots = nslots
        self.t.mask = nslots - 1
        self.t.capacity = capacity
        self.t.count = 0

    cdef _mutating(self):
        if self._busy:
            raise RuntimeError("FlowTable changed while a translate over it runs in another thread")

    @property
    def slots(self):
        """The slot array: the table's real memory (inspect, snapshot)."""
        return self._slots

    @property
    def capacity(self):
        return self.t.capacity

    @property
    def nslots(self):
        return self.t.nslots

    @property
    def full_count(self):
        """Inserts refused because the table was full (kept across clear())."""
        return self.t.full_count

    def __len__(self):
        return self.t.count

    def __repr__(self):
        return f"<FlowTable cython {self.t.count}/{self.t.capacity} entries, {self.t.nslots} slots>"

    def insert(self, proto, saddr, sport, daddr, dport, new_addr, new_port, rule_id=0, now=0,
               flags=0):
        """Insert or update one entry; False (and ``full_count`` += 1) if the table is full."""
        proto, saddr, sport, daddr, dport = int(proto), int(saddr), int(sport), int(daddr), int(dport)
        new_addr, new_port, rule_id, now, flags = (int(new_addr), int(new_port), int(rule_id),
                                                   int(now), int(flags))
        _check_key(proto, saddr, sport, daddr, dport)
        if not (0 <= new_addr <= _U32 and 0 <= new_port <= 0xFFFF):
            raise ValueError(f"translated endpoint out of range: {new_addr}:{new_port}")
        if not (0 <= rule_id <= _U32 and 0 <= now <= _U32 and 0 <= flags <= 0xFF):
            raise ValueError(f"rule_id/now/flags out of range: {rule_id}, {now}, {flags}")
        self._mutating()
        return tbl_insert(&self.t, proto, saddr, sport, daddr, dport, new_addr, new_port, rule_id,
                          now, flags, hn_flow_hash(proto, saddr, sport, daddr, dport))

    def lookup(self, proto, saddr, sport, daddr, dport):
        """Slot index of the key, or -1."""
        proto, saddr, sport, daddr, dport = int(proto), int(saddr), int(sport), int(daddr), int(dport)
        _check_key(proto, saddr, sport, daddr, dport)
        return tbl_find(&self.t, proto, saddr, sport, daddr, dport,
                        hn_flow_hash(proto, saddr, sport, daddr, dport))

    def get(self, proto, saddr, sport, daddr, dport):
        """A copy of the key's slot record, or None."""
        i = self.lookup(proto, saddr, sport, daddr, dport)
        return None if i < 0 else self._slots[i].copy()

    def delete(self, proto, saddr, sport, daddr, dport):
        """Remove the key; False if absent.  Backward-shift deletion (Knuth 6.4 R)."""
        proto, saddr, sport, daddr, dport = int(proto), int(saddr), int(sport), int(daddr), int(dport)
        _check_key(proto, saddr, sport, daddr, dport)
        self._mutating()
        return tbl_delete(&self.t, proto, saddr, sport, daddr, dport)

    def insert_batch(self, entries):
        """``insert`` for each SLOT_DTYPE record in order (``now`` = its last_seen; flags
        get F_OCCUPIED); the number inserted or updated.  Home slots are prefetched a
        group ahead, as in translate."""
        cdef cnp.ndarray a = _as_records(entries, (SLOT_DTYPE,), "entries")
        self._mutating()
        cdef const hn_slot *r = <const hn_slot *>cnp.PyArray_DATA(a)
        cdef size_t n = a.shape[0]
        cdef size_t base = 0, k, m, done = 0
        cdef uint64_t h[GROUP]
        cdef const hn_slot *e
        with nogil:
            while base < n:
                m = n - base
                if m > GROUP:
                    m = GROUP
                for k in range(m):
                    e = &r[base + k]
                    h[k] = hn_flow_hash(e.proto, e.saddr, e.sport, e.daddr, e.dport)
                    hn_prefetch(&self.t.s[h[k] & self.t.mask])
                for k in range(m):
                    e = &r[base + k]
                    done += tbl_insert(&self.t, e.proto, e.saddr, e.sport, e.daddr, e.dport,
                                       e.new_addr, e.new_port, e.rule_id, e.last_seen, e.flags, h[k])
                base += m
        return done

    def delete_batch(self, keys):
        """``delete`` for each SLOT_DTYPE or KEY_DTYPE record in order; the number deleted
        (both dtypes hold the key fields at the same offsets)."""
        cdef cnp.ndarray a = _as_records(keys, (SLOT_DTYPE, KEY_DTYPE), "keys")
        self._mutating()
        cdef const uint8_t *r = <const uint8_t *>cnp.PyArray_DATA(a)
        cdef size_t stride = a.dtype.itemsize
        cdef size_t n = a.shape[0]
        cdef size_t i, done = 0
        cdef const hn_key *e
        with nogil:
            for i in range(n):
                e = <const hn_key *>(r + i * stride)
                done += tbl_delete(&self.t, e.proto, e.saddr, e.sport, e.daddr, e.dport)
        return done

    def occupied(self):
        """Indices of the slots in use, ascending."""
        return np.flatnonzero(self._slots["flags"] & F_OCCUPIED)

    def clear(self):
        """Empty the table (full_count is kept: it counts refusals over the lifetime)."""
        self._mutating()
        memset(self.t.s, 0, self.t.nslots * sizeof(hn_slot))
        self.t.count = 0

    def load_slots(self, array):
        """Replace the contents with a snapshot taken from a table of the same nslots."""
        array = _as_records(array, (SLOT_DTYPE,), "array")
        if array.shape != (self.t.nslots,):
            raise ValueError(f"snapshot has {array.shape[0]} slots, this table has {self.t.nslots}")
        n = int(np.count_nonzero(array["flags"] & F_OCCUPIED))
        if n > self.t.capacity:
            raise ValueError(f"snapshot holds {n} entries, capacity is {self.t.capacity}")
        self._mutating()
        self._slots[:] = array
        self.t.count = n


cdef class Translator:
    """Batch translation over an out table and an in table (``hypernat.fastpath``
    documents the API, ``docs/fastpath.md`` the semantics).

    ``pool``: the external pool as ``(network, prefix_len)`` pairs; an OUT frame to an
    address in the pool is a hairpin (translated twice, sent back inside).
    """

    cdef FlowTable _out
    cdef FlowTable _in
    cdef FragTable _frag
    cdef object _counters
    cdef object _pool_arr
    cdef tuple _pool
    cdef hn_ctx c
    cdef hn_router r
    cdef object _events
    cdef object _ob
    cdef object _oo
    cdef object _ol
    cdef object _ox
    cdef dict _router

    def __init__(self, FlowTable out_table not None, FlowTable in_table not None, pool=(),
                 FragTable frag=None, output_bytes=OUTPUT_BYTES, output_frames=OUTPUT_FRAMES):
        self._out = out_table
        self._in = in_table
        self._frag = frag
        entries = []
        for entry in pool:
            net, plen = int(entry[0]), int(entry[1])
            if not (0 <= plen <= 32) or not (0 <= net <= _U32):
                raise ValueError(f"bad pool prefix {entry!r}")
            mask = (_U32 << (32 - plen)) & _U32
            entries.append((net & mask, mask))
        self._pool = tuple(entries)
        self._pool_arr = np.array([x for e in entries for x in e] or [0], dtype=np.uint32)
        self._counters = np.zeros((2, N_VERDICTS), dtype=np.uint64)
        memset(&self.c, 0, sizeof(hn_ctx))
        self.c.out = &out_table.t
        self.c.inn = &in_table.t
        self.c.cnt = <uint64_t *>cnp.PyArray_DATA(self._counters)
        self.c.pool = <const uint32_t *>cnp.PyArray_DATA(self._pool_arr)
        self.c.npool = len(entries)
        self.c.frag = &frag.f if frag is not None else NULL
        # the router part (set_router) and the output area of generated frames
        output_bytes, output_frames = _check_output_area(output_bytes, output_frames)
        self._events = np.zeros((2, N_ROUTER_EVENTS), dtype=np.uint64)
        self._ob = np.zeros(output_bytes, dtype=np.uint8)
        self._oo = np.zeros(output_frames, dtype=np.uint32)
        self._ol = np.zeros(output_frames, dtype=np.uint32)
        self._ox = np.zeros(output_frames, dtype=np.uint8)
        memset(&self.r, 0, sizeof(hn_router))
        self.r.o.ob = <uint8_t *>cnp.PyArray_DATA(self._ob)
        self.r.o.ob_cap = output_bytes
        self.r.o.oo = <uint32_t *>cnp.PyArray_DATA(self._oo)
        self.r.o.ol = <uint32_t *>cnp.PyArray_DATA(self._ol)
        self.r.o.ox = <uint8_t *>cnp.PyArray_DATA(self._ox)
        self.r.o.on_cap = output_frames
        self.r.ev = <uint64_t *>cnp.PyArray_DATA(self._events)
        self.set_router()

    def set_router(self, **settings):
        """The gateway as a router (docs/fastpath.md, "Generated frames"): keyword
        arguments ``outside_mtu``, ``inside_mtu`` (largest IPv4 datagram per egress link;
        0: no limit, else 68..65535), ``outside_address``, ``inside_address`` (source of
        the ICMP errors sent out of that side; 0: none sent), ``icmp_rate`` (ICMP errors
        per clock tick, the token bucket's size; 0: none) and ``mss_clamp`` (0: off).
        Omitted ones are 0.  The bucket starts full, and keeps its tokens when called
        again with the same ``icmp_rate`` (a live reload must not refill it)."""
        v = _check_router(settings)
        self.r.o.mtu[DIR_OUT] = v["outside_mtu"]
        self.r.o.mtu[DIR_IN] = v["inside_mtu"]
        self.r.src[DIR_OUT] = v["outside_address"]
        self.r.src[DIR_IN] = v["inside_address"]
        if self._router is None or v["icmp_rate"] != self.r.rate:
            self.r.rate = v["icmp_rate"]
            self.r.tokens = v["icmp_rate"]
            self.r.primed = 0
        self.r.mss_clamp = v["mss_clamp"]
        self._router = v

    @property
    def router(self):
        """The settings of set_router, as a dict."""
        return dict(self._router)

    @property
    def router_events(self):
        """uint64 ``[2, N_ROUTER_EVENTS]``: router events per (direction, event); live."""
        return self._events

    def router_events_dict(self):
        e = self._events
        return {
            _verdicts.DIRECTION_NAMES[d]: {_verdicts.ROUTER_EVENT_NAMES[k]: int(e[d, k])
                                           for k in range(N_ROUTER_EVENTS)}
            for d in (DIR_OUT, DIR_IN)
        }

    @property
    def out_count(self):
        """Frames the last translate() generated (in the output area)."""
        return self.r.o.on

    @property
    def out_buf(self):
        """The output area's bytes: generated frame i is
        ``out_buf[out_offsets[i]:out_offsets[i] + out_lengths[i]]``, i < out_count."""
        return self._ob

    @property
    def out_offsets(self):
        return self._oo

    @property
    def out_lengths(self):
        return self._ol

    @property
    def out_exits(self):
        """Per generated frame: the direction whose far side it goes to (verdicts.OUT:
        out of the outside port; verdicts.IN: out of the inside port)."""
        return self._ox

    def generated(self):
        """Copies of the last translate()'s generated frames: [(exit direction, bytes)]."""
        return [(int(self._ox[i]), self._ob[self._oo[i]:self._oo[i] + self._ol[i]].tobytes())
                for i in range(self.r.o.on)]

    @property
    def out_table(self):
        return self._out

    @property
    def in_table(self):
        return self._in

    @property
    def frag(self):
        """The fragment table (None: every fragment is a counted ``fragment`` drop)."""
        return self._frag

    @property
    def pool(self):
        """The pool as ``(network, mask)`` pairs."""
        return self._pool

    @property
    def counters(self):
        """uint64 ``[2, N_VERDICTS]``: frames per (direction, verdict); live."""
        return self._counters

    def counters_dict(self):
        c = self._counters
        return {
            _verdicts.DIRECTION_NAMES[d]: {_verdicts.VERDICT_NAMES[v]: int(c[d, v])
                                           for v in range(N_VERDICTS)}
            for d in (DIR_OUT, DIR_IN)
        }

    def reset_counters(self):
        self._counters[:] = 0
        self._events[:] = 0

    def set_l2(self, direction, src_mac, dst_mac):
        """MACs written into frames leaving toward `direction`'s far side (None: leave)."""
        _check_direction(direction)
        cdef int d = direction
        if src_mac is None and dst_mac is None:
            self.c.l2set[d] = 0
            return
        src, dst = bytes(src_mac), bytes(dst_mac)
        if len(src) != 6 or len(dst) != 6:
            raise ValueError("MAC addresses must be 6 bytes")
        cdef bytes both = dst + src
        memcpy(self.c.l2[d], <const char *>both, 12)
        self.c.l2set[d] = 1

    def translate(self, buf, offsets, lengths, direction, now, verdicts, keys=None, partial=None, meta=None):
        """Translate frames ``buf[offsets[i]:offsets[i]+lengths[i]]`` in place; write
        ``verdicts[i]`` (and ``keys[i]``) for each; count them.  One call, no GIL.
        ``partial``: uint8 per frame, non-zero where the TCP/UDP checksum field holds
        the pseudo-header sum (checksum offload, docs/fastpath.md).  ``meta``: the
        frames' virtio_net_hdr records (``io.base.META_DTYPE``, as writable uint8, 10
        bytes a frame, or a META_DTYPE array): a super-frame (gso_type set) is sized
        by its segments, and a TCP one may leave with a smaller gso_size written there."""
        cdef uint8_t[::1] b
        cdef const uint32_t[::1] o
        cdef const uint32_t[::1] l
        cdef uint8_t[::1] v
        cdef cnp.ndarray ka
        cdef hn_key *kp = NULL
        cdef const uint8_t *pp = NULL
        cdef uint8_t *mp = NULL
        cdef int d
        cdef uint32_t t
        cdef uint8_t *bp = NULL
        cdef const uint32_t *op = NULL
        cdef const uint32_t *lp = NULL
        cdef uint8_t *vp = NULL
        cdef uint64_t blen
        cdef Py_ssize_t n, nl, nv
        if (_plain(buf, cnp.NPY_UINT8, True) and _plain(offsets, cnp.NPY_UINT32, False)
                and _plain(lengths, cnp.NPY_UINT32, False) and _plain(verdicts, cnp.NPY_UINT8, True)):
            # The usual call: numpy arrays, checked with numpy's macros (acquiring four
            # typed memoryviews costs more than a tenth of a 256-frame batch).
            bp = <uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>buf)
            blen = <uint64_t>cnp.PyArray_DIM(<cnp.ndarray>buf, 0)
            op = <const uint32_t *>cnp.PyArray_DATA(<cnp.ndarray>offsets)
            n = cnp.PyArray_DIM(<cnp.ndarray>offsets, 0)
            lp = <const uint32_t *>cnp.PyArray_DATA(<cnp.ndarray>lengths)
            nl = cnp.PyArray_DIM(<cnp.ndarray>lengths, 0)
            vp = <uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>verdicts)
            nv = cnp.PyArray_DIM(<cnp.ndarray>verdicts, 0)
        else:
            # Any other buffer (bytearray, mmap, memoryview, ...), or a clear error.
            try:
                b = buf
            except (TypeError, ValueError, BufferError):
                b = _coerce_buf(buf)     # signed-char buffers are fine; anything else: an error
            try:
                o = offsets
                l = lengths
                v = verdicts
            except (TypeError, ValueError, BufferError):
                _explain_arrays(offsets, lengths, verdicts)
                raise
            blen = <uint64_t>b.shape[0]
            n, nl, nv = o.shape[0], l.shape[0], v.shape[0]
            if blen:
                bp = &b[0]
            if n:
                op = &o[0]
            if nl:
                lp = &l[0]
            if nv:
                vp = &v[0]
        if nl != n:
            raise ValueError(f"offsets has {n} entries, lengths {nl}")
        if nv < n:
            raise ValueError(f"verdicts has room for {nv} frames, batch has {n}")
        if keys is not None:
            if type(keys) is not np.ndarray or (<cnp.ndarray>keys).descr != KEY_DTYPE \
                    or (<cnp.ndarray>keys).ndim != 1:
                raise TypeError("keys must be a one-dimensional numpy array of layout.KEY_DTYPE")
            ka = <cnp.ndarray>keys
            if ka.shape[0] < n:
                raise ValueError(f"keys has room for {ka.shape[0]} frames, batch has {n}")
            if not cnp.PyArray_IS_C_CONTIGUOUS(ka) or not cnp.PyArray_ISWRITEABLE(ka):
                raise ValueError("keys must be contiguous and writable")
            kp = <hn_key *>cnp.PyArray_DATA(ka)
        if partial is not None:
            if not _plain(partial, cnp.NPY_UINT8, False) or cnp.PyArray_DIM(<cnp.ndarray>partial, 0) < n:
                raise ValueError("partial must be a contiguous uint8 array with an entry per frame")
            pp = <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>partial)
        if meta is not None:
            mp = _meta_pointer(meta, n)
        if type(direction) is int and (direction == DIR_OUT or direction == DIR_IN):
            d = direction
        else:
            _check_direction(direction)
            d = direction
        try:
            t = now
        except (OverflowError, TypeError):
            raise ValueError(f"now {now!r} must be an integer in uint32 range") from None
        self.r.o.on = 0
        self.r.o.ob_used = 0
        if n == 0:
            return None
        self._out._busy += 1
        self._in._busy += 1
        if self._frag is not None:
            self._frag._busy += 1
        try:
            with nogil:
                translate_batch(&self.c, &self.r, bp, blen, op, lp, <size_t>n, d, t, vp, kp, pp, mp)
        finally:
            self._out._busy -= 1
            self._in._busy -= 1
            if self._frag is not None:
                self._frag._busy -= 1
        return None




cdef uint8_t *_meta_pointer(object meta, Py_ssize_t n) except? NULL:
    """The per-frame virtio_net_hdr records as bytes (checked), for translate.  (The
    ring's bytes, the usual call, are checked with numpy's macros alone.)"""
    if not _plain(meta, cnp.NPY_UINT8, True) and type(meta) is np.ndarray \
            and (<cnp.ndarray>meta).dtype == _META_DTYPE:
        meta = (<cnp.ndarray>meta).view(np.uint8)
    if not _plain(meta, cnp.NPY_UINT8, True) or cnp.PyArray_DIM(<cnp.ndarray>meta, 0) < n * META_LEN:
        raise ValueError(f"meta must be a contiguous writable uint8 array of {META_LEN} bytes per frame "
                         "(io.base.META_DTYPE records), or such records")
    return <uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>meta)


cdef inline bint _plain(object a, int typenum, bint writable):
    """A one-dimensional, contiguous, native-order numpy array of that type."""
    if type(a) is not np.ndarray:
        return False
    cdef cnp.ndarray x = <cnp.ndarray>a
    return (cnp.PyArray_TYPE(x) == typenum and cnp.PyArray_NDIM(x) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(x) and cnp.PyArray_ISNOTSWAPPED(x)
            and (not writable or cnp.PyArray_ISWRITEABLE(x)))


def _coerce_buf(buf):
    """Called after ``buf`` was refused as uint8_t[::1]: accept a writable contiguous
    buffer of bytes in another format ('b', 'c'), else raise a precise error."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"buf must be a writable uint8 buffer, got {type(buf).__name__}") from None
    if mv.readonly:
        raise ValueError("buf is read-only: translate rewrites frames in place")
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format not in ("B", "b", "c"):
        raise ValueError(f"buf must be a one-dimensional uint8 buffer (format {mv.format!r}, ndim {mv.ndim})")
    if not mv.c_contiguous:
        raise ValueError("buf must be contiguous")
    return mv.cast("B")


def _explain_arrays(offsets, lengths, verdicts):
    """Called after an array argument was refused: raise a precise error if we can."""
    for a, dt, what in ((offsets, np.uint32, "offsets"), (lengths, np.uint32, "lengths"),
                        (verdicts, np.uint8, "verdicts")):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{what} must be a numpy {np.dtype(dt)} array, got {type(a).__name__}")
        if a.dtype != dt:
            raise ValueError(f"{what} has dtype {a.dtype}, expected {np.dtype(dt)}")
        if a.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional")
        if not a.flags.c_contiguous:
            raise ValueError(f"{what} must be contiguous")
        if what == "verdicts" and not a.flags.writeable:
            raise ValueError("verdicts must be writable")

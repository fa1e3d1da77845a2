"""Memory layouts shared by the fast path, its pure-Python twin and everything that
inspects or snapshots a flow table.  Both implementations use exactly these bytes, so
a table written by one is read by the other.

A flow table holds one *flow direction* per slot:

    out table  key (proto, I addr, I port, R addr, R port) -> (E addr, E port)
    in table   key (proto, R addr, R port, E addr, E port) -> (I addr, I port)

For ICMP query messages (echo) the identifier stands in for both ports:
key (1, src, id, dst, id).

One slot is 32 bytes (two per 64-byte cache line, never straddling one), hot fields
first: the key is compared on every probe, the value is read on a hit.

    off  size  field
     0    4    saddr       host byte order
     4    4    daddr
     8    2    sport
    10    2    dport
    12    1    proto       6 TCP, 17 UDP, 1 ICMP (0 in an empty slot)
    13    1    flags       OCCUPIED | CLONE | ACTIVE | ...
    14    2    new_port
    16    4    new_addr
    20    4    rule_id     the slow path's handle for the rule / session
    24    4    last_seen   caller's clock ticks (seconds), written on every hit
    28    1    tcp_state   OR of the TCP flags FIN|SYN|RST seen on this direction
    29    1    user        free for the slow path (clone generation, ...)
    30    2    lease       free for the slow path (lease expiry, coarse ticks)

All multi-byte fields are little-endian (x86-64 and aarch64 are both little-endian;
the dtype says so explicitly so a snapshot means the same everywhere).
"""

import numpy as np

SLOT_DTYPE = np.dtype(
    [
        ("saddr", "<u4"),
        ("daddr", "<u4"),
        ("sport", "<u2"),
        ("dport", "<u2"),
        ("proto", "u1"),
        ("flags", "u1"),
        ("new_port", "<u2"),
        ("new_addr", "<u4"),
        ("rule_id", "<u4"),
        ("last_seen", "<u4"),
        ("tcp_state", "u1"),
        ("user", "u1"),
        ("lease", "<u2"),
    ]
)
assert SLOT_DTYPE.itemsize == 32

# Slot flags.
F_OCCUPIED = 0x01
F_CLONE = 0x02  # installed from another NIC's rule, lives under a lease
F_ACTIVE = 0x04  # set by the fast path on every hit; the slow path clears it when reporting

# TCP flag bits recorded in tcp_state (they are the TCP header's own bits).
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10
TCP_STATE_MASK = TCP_FIN | TCP_SYN | TCP_RST

# Per-frame key written by translate() when a keys array is given: the lookup key
# the frame produced (for an ICMP error, the session key rebuilt from its embedded
# packet, oriented like the table it is looked up in).  16 bytes.
KEY_DTYPE = np.dtype(
    [
        ("saddr", "<u4"),
        ("daddr", "<u4"),
        ("sport", "<u2"),
        ("dport", "<u2"),
        ("proto", "u1"),
        ("kind", "u1"),  # KIND_PLAIN or KIND_ICMP_ERROR
        ("tcp_flags", "u1"),  # the frame's TCP flags byte (0 for UDP / ICMP)
        ("icmp_type", "u1"),  # the frame's ICMP type (0 otherwise)
    ]
)
assert KEY_DTYPE.itemsize == 16
KIND_PLAIN = 0
KIND_ICMP_ERROR = 1

# One fetch a batch's misses start (``RuleBuilder.decide_misses`` writes them, the
# holder's ``PendingTable.fetch_rows`` reads them): the key to ask for, oriented like
# `fetch_dir`'s table (KEY_DTYPE's first 15 bytes, field for field), the frame's index
# in its batch and the NIC that owns the key.  24 bytes; its C struct is ``fetch_row``
# (hypernat/_keys.pxd), checked against this dtype where it is compiled.
FETCH_ROW_DTYPE = np.dtype(
    [
        ("saddr", "<u4"),
        ("daddr", "<u4"),
        ("sport", "<u2"),
        ("dport", "<u2"),
        ("proto", "u1"),
        ("kind", "u1"),  # KIND_PLAIN or KIND_ICMP_ERROR (an ICMP error's lookup: fetched with FETCH_F_ICMP_ERROR)
        ("tcp_flags", "u1"),
        ("fetch_dir", "u1"),  # verdicts.OUT / IN: the table the key is oriented for
        ("frame", "<i4"),  # the frame's index in its batch
        ("owner", "<i4"),  # the NIC asked
    ]
)
assert FETCH_ROW_DTYPE.itemsize == 24

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

MAX_LOAD = 0.7  # slots = next power of two >= capacity / MAX_LOAD
MIN_SLOTS = 16

_M64 = 0xFFFFFFFFFFFFFFFF


def flow_hash(proto: int, saddr: int, sport: int, daddr: int, dport: int) -> int:
    """The table's hash, defined here once; the Cython fast path computes the same
    64-bit value (tests check both against this function)."""
    a = ((saddr << 32) | daddr) & _M64
    b = (sport << 24) | (dport << 8) | proto
    h = (a * 0x9E3779B97F4A7C15) & _M64
    h ^= (b * 0xC2B2AE3D27D4EB4F) & _M64
    h ^= h >> 29
    h = (h * 0xBF58476D1CE4E5B9) & _M64
    h ^= h >> 32
    return h


def slots_for(capacity: int) -> int:
    """Number of slots (a power of two) for a table that holds `capacity` entries."""
    need = max(MIN_SLOTS, int(-(-capacity // MAX_LOAD)) + 1)
    n = MIN_SLOTS
    while n < need:
        n <<= 1
    return n


def alloc_slots(nslots: int, hugepages: bool = True) -> np.ndarray:
    """Zeroed slot array, 64-byte aligned.  Tables of 2 MiB and more get their own
    anonymous mapping (page-aligned), advised to use transparent huge pages where the
    kernel offers them: the table is the fast path's working set."""
    import mmap

    size = nslots * SLOT_DTYPE.itemsize
    if size < (2 << 20):
        # On a 64-byte boundary, so no slot straddles a cache line (malloc'd numpy
        # memory is often only 16-byte aligned).
        raw = np.zeros(size + 64, dtype=np.uint8)
        start = (-raw.ctypes.data) % 64
        return raw[start : start + size].view(SLOT_DTYPE)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # hugepages=False (tables presized far beyond what they hold, as the per-connection
    # indexes): small pages, even where numpy or THP "always" would give huge ones.  A
    # huge page is zeroed (and, with THP defrag "madvise", compacted for) on its first
    # touch: random inserts into a presized 10^6-entry index touched ~230 huge pages in
    # the first 200 connections, a 0.4 s stall of the loop and the whole table resident.
    advice = "MADV_HUGEPAGE" if hugepages else "MADV_NOHUGEPAGE"
    if hasattr(mmap, advice):
        try:
            m.madvise(getattr(mmap, advice))
        except OSError:
            pass
    return np.frombuffer(m, dtype=SLOT_DTYPE)

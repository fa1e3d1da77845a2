"""The fast path in plain Python: the readable reference of ``hypernat._fastpath``.

This module is the *specification you can run*.  It follows ``docs/fastpath.md`` step
by step, with the same names, so that a reader can hold the document in one hand and
this file in the other.  The Cython module must agree with it byte for byte (frames,
verdicts, keys, counters and table slots); the tests run both and compare.  It is also
the baseline the benchmarks divide by, so it is written plainly but never slowed on
purpose (no per-byte copies, no needless objects in the per-frame path).

Two parts
---------
**FlowTable** -- one flow direction per slot, open addressing in one preallocated
numpy block of ``layout.SLOT_DTYPE`` records (32 bytes each)::

    home = flow_hash(key) & (nslots - 1)

      slot:  0     1     2     3     4     5     6     7   ...
           [   ] [ A ] [ B ] [ C ] [   ] [ D ] [   ] [   ]
                   ^home(A)=1, home(B)=1, home(C)=2       linear probing: i, i+1, ...
                                                          an empty slot ends a search

    delete(A): empty slot 1, then walk right until an empty slot; every entry whose
    home is not cyclically in (hole, its slot] moves back into the hole (Knuth 6.4,
    Algorithm R, "backward-shift"): B moves to 1, then C to 2.  No tombstones, so a
    lookup never walks further than the cluster it is in, and both implementations
    leave every entry in exactly the same slot.

**Translator** -- batch translation of frames stored back to back in one buffer::

    buf:  | frame 0 | frame 1 |  ...  | frame n-1 |
            ^offsets[0], lengths[0]

    per frame:  Ethernet (+ one 802.1Q tag) -> IPv4 -> TCP | UDP | ICMP
                -> key -> lookup (out table for OUT, in table for IN)
                -> rewrite in place + incremental checksums -> verdict

    OUT (inside -> Internet):  source      I:i  becomes E:e   (out table: I,i,R,r -> E,e)
    IN  (Internet -> pool):    destination E:e  becomes I:i   (in table:  R,r,E,e -> I,i)
    hairpin (OUT to a pool address E2:e2): both at once, then back inside
                               I:i -> E2:e2  becomes  E:e -> I2:i2

Every frame gets exactly one verdict (``hypernat.verdicts``) and is counted under
``counters[direction, verdict]``.  A frame that is not sent is left untouched.

Checksums
---------
Only the 16-bit words that change are folded into the checksum (RFC 1624, eqn. 3:
``HC' = ~(~HC + ~m + m')``) -- that keeps the cost independent of the payload and
gives the same result as a full recomputation, with one exception: data that sum to
+0 (all zeros) have checksum 0xFFFF, where eqn. 3 yields 0x0000.  Only an ICMP echo
(no pseudo-header) can be all zeros; that one case is checked.  The TCP and UDP checksums cover the
pseudo-header (RFC 793, RFC 768), so an address change touches them too.  A UDP
checksum of zero means "no checksum" and stays zero; a computed zero is sent as
0xFFFF (RFC 768).  ICMP errors (RFC 5508) are verified over the whole message first
(REQ-3), their embedded packet is translated the other way round, and the outer ICMP
checksum is recomputed from scratch (the embedded bytes changed).

Where docs/fastpath.md leaves a choice, this reference (and the tests) take:

* an emptied slot is zeroed whole (layout: "proto 0 in an empty slot"), and a moved
  entry is copied whole, so snapshots of both twins are byte-identical;
* ``insert_batch`` uses each record's ``last_seen`` as ``now`` (user, lease and
  tcp_state are reset as by ``insert``);
* ``miss_hairpin`` refreshes nothing, even when the out half hit (nothing was sent);
* a hairpin ICMP echo gets the identifier of the in entry (source rewritten first,
  then destination);
* an ICMP error's key has ``tcp_flags`` 0 (the frame is ICMP) and ``icmp_type`` the
  outer type;
* an ICMP error is valid when its one's-complement sum, checksum included, is -0
  (RFC 1071), so a stored 0xFFFF for a computed 0x0000 passes;
* an embedded UDP checksum that computes to 0x0000 is written 0xFFFF, as outside.
"""

from __future__ import annotations

import operator

import numpy as np

from . import layout
from .layout import (
    F_ACTIVE,
    F_OCCUPIED,
    KEY_DTYPE,
    KIND_ICMP_ERROR,
    KIND_PLAIN,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    SLOT_DTYPE,
    TCP_STATE_MASK,
    flow_hash,
)
from .verdicts import (
    DIRECTION_NAMES,
    IN,
    N_ROUTER_EVENTS,
    N_VERDICTS,
    OUT,
    ROUTER_EVENT,
    ROUTER_EVENT_NAMES,
    VERDICT,
    VERDICT_NAMES,
)

__all__ = ["FlowTable", "Translator", "flow_hash"]

# Verdict numbers, named once for the per-frame code below.
V_TRANSLATED = VERDICT["translated"]
V_HAIRPIN = VERDICT["hairpin"]
V_MISS_OUT = VERDICT["miss_out"]
V_MISS_IN = VERDICT["miss_in"]
V_MISS_ICMP_ERROR = VERDICT["miss_icmp_error"]
V_MISS_HAIRPIN = VERDICT["miss_hairpin"]
V_NOT_NAT = VERDICT["not_nat"]
V_TTL_EXCEEDED = VERDICT["ttl_exceeded"]
V_FRAGMENT = VERDICT["fragment"]
V_DROP_TRUNCATED = VERDICT["drop_truncated"]
V_DROP_BAD_VERSION = VERDICT["drop_bad_version"]
V_DROP_BAD_IHL = VERDICT["drop_bad_ihl"]
V_DROP_BAD_TOTAL_LENGTH = VERDICT["drop_bad_total_length"]
V_DROP_BAD_L4_HEADER = VERDICT["drop_bad_l4_header"]
V_DROP_BAD_ICMP_CHECKSUM = VERDICT["drop_bad_icmp_checksum"]
V_DROP_ICMP_ERROR_MALFORMED = VERDICT["drop_icmp_error_malformed"]
V_DROP_ICMP_UNSUPPORTED = VERDICT["drop_icmp_unsupported"]
V_DROP_FRAG_TINY = VERDICT["drop_frag_tiny"]
V_DROP_ICMP_ERROR_FRAGMENT = VERDICT["drop_icmp_error_fragment"]
V_DROP_ICMP_ERROR_ABOUT_ERROR = VERDICT["drop_icmp_error_about_error"]
V_FRAG_NEEDED = VERDICT["frag_needed"]
V_FRAGMENTED = VERDICT["fragmented"]
V_OUTPUT_FULL = VERDICT["output_full"]
V_DROP_GSO_TOO_BIG = VERDICT["drop_gso_too_big"]
EV_ICMP_TIME_EXCEEDED = ROUTER_EVENT["icmp_time_exceeded"]
EV_ICMP_FRAG_NEEDED = ROUTER_EVENT["icmp_frag_needed"]
EV_ICMP_RATE_LIMITED = ROUTER_EVENT["icmp_rate_limited"]
EV_ICMP_SUPPRESSED = ROUTER_EVENT["icmp_suppressed"]
EV_OUTPUT_FULL = ROUTER_EVENT["output_full"]
EV_FRAGMENTS = ROUTER_EVENT["fragments"]
EV_MSS_CLAMPED = ROUTER_EVENT["mss_clamped"]
EV_MSS_BAD_OPTIONS = ROUTER_EVENT["mss_bad_options"]
EV_GSO_RESEGMENTED = ROUTER_EVENT["gso_resegmented"]
# _size_check's answers (a frame's fate against the MTU of its exit link)
FITS, SPLIT_FRAGMENT, SPLIT_GSO, TOO_BIG_DF, TOO_BIG_GSO = 0, 1, 2, -1, -2
META_LEN = 10  # bytes of a virtio_net_hdr record (io.base.META_DTYPE): gso_type at 1, gso_size (LE) at 4

# The output area's default size and the settings of Translator.set_router.
OUTPUT_BYTES = 1 << 20
OUTPUT_FRAMES = 4096
ROUTER_KEYS = ("outside_mtu", "inside_mtu", "outside_address", "inside_address", "icmp_rate", "mss_clamp")
ICMP_QUOTE_MAX = 576 - 28  # RFC 1812 4.3.2.3: the error as a whole within 576 bytes

ETH_HLEN = 14
VLAN_HLEN = 4
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = 0x8100

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAM_PROBLEM = 12
ICMP_QUERY_TYPES = (ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST)
ICMP_ERROR_TYPES = (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAM_PROBLEM)

# Byte offsets inside the headers.
IP_TOTLEN, IP_FRAG, IP_TTL, IP_PROTO, IP_CSUM, IP_SRC, IP_DST = 2, 6, 8, 9, 10, 12, 16
TCP_CSUM, TCP_FLAGS, TCP_DOFF = 16, 13, 12
UDP_LEN, UDP_CSUM = 4, 6
ICMP_CSUM, ICMP_ID = 2, 4

_U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Byte and checksum helpers (big-endian 16-bit words, read byte by byte)
# --------------------------------------------------------------------------------------


def _be16(b, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


def _be32(b, i: int) -> int:
    return (b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]


def _put16(b, i: int, v: int) -> None:
    b[i] = v >> 8
    b[i + 1] = v & 0xFF


def _put32(b, i: int, v: int) -> None:
    b[i] = v >> 24
    b[i + 1] = (v >> 16) & 0xFF
    b[i + 2] = (v >> 8) & 0xFF
    b[i + 3] = v & 0xFF


def _fold(s: int) -> int:
    """One's-complement fold of a wide sum into 16 bits (end-around carry, RFC 1071)."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum_adjust(cksum: int, old_words, new_words) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for every changed 16-bit word m -> m'.

    Equivalent to recomputing the checksum over the changed data (0x0000 included;
    only UDP maps a zero result to 0xFFFF, see _udp_csum_adjust)."""
    s = ~cksum & 0xFFFF
    for m in old_words:
        s += ~m & 0xFFFF
    for m in new_words:
        s += m
    return ~_fold(s) & 0xFFFF


def _udp_csum_adjust(cksum: int, old_words, new_words) -> int:
    """RFC 768: a zero UDP checksum means "none" and stays zero; a computed zero is
    transmitted as all ones."""
    if cksum == 0:
        return 0
    c = _csum_adjust(cksum, old_words, new_words)
    return c if c else 0xFFFF


def _sum16(b, start: int, end: int) -> int:
    """One's-complement sum (folded) of b[start:end]; an odd last byte is padded with
    a zero byte (RFC 1071)."""
    s = 0
    i = start
    last = end - 1
    while i < last:
        s += (b[i] << 8) | b[i + 1]
        i += 2
    if i == last:
        s += b[i] << 8
    return _fold(s)


def _icmp_all_zero(b, start: int, end: int) -> bool:
    """Every byte of the ICMP message b[start:end] except its checksum field is zero."""
    for i in range(start, end):
        if b[i] and i != start + ICMP_CSUM and i != start + ICMP_CSUM + 1:
            return False
    return True


def _addr_words(a: int):
    return (a >> 16, a & 0xFFFF)


# --------------------------------------------------------------------------------------
# Flow table
# --------------------------------------------------------------------------------------


def _check_key(proto, saddr, sport, daddr, dport):
    if not (0 <= proto <= 0xFF):
        raise ValueError(f"proto {proto} out of range 0..255")
    if not (0 <= saddr <= _U32 and 0 <= daddr <= _U32):
        raise ValueError(f"address out of range 0..2**32-1: {saddr}, {daddr}")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError(f"port out of range 0..65535: {sport}, {dport}")


class FlowTable:
    """Open-addressing flow table over ``layout.SLOT_DTYPE`` slots (see the module doc).

    ``slots`` is the real memory; ``capacity`` entries at most (``nslots`` slots, load
    ≤ ``layout.MAX_LOAD``).  An insert into a full table is refused and counted in
    ``full_count``; it never overwrites another entry.
    """

    def __init__(self, capacity: int, hugepages: bool = True):
        capacity = int(capacity)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if capacity > 1 << 31:
            raise ValueError(f"capacity {capacity} too large")
        self.capacity = capacity
        self.nslots = layout.slots_for(capacity)
        self._mask = self.nslots - 1
        self.slots = layout.alloc_slots(self.nslots, hugepages=hugepages)
        self.full_count = 0
        self._len = 0
        self._bind_fields()

    def _bind_fields(self):
        # Views of one field across all slots: element access is what the per-frame
        # code does, and a view per field spares building a record each time.
        s = self.slots
        self._saddr = s["saddr"]
        self._daddr = s["daddr"]
        self._sport = s["sport"]
        self._dport = s["dport"]
        self._proto = s["proto"]
        self._flags = s["flags"]
        self._new_addr = s["new_addr"]
        self._new_port = s["new_port"]
        self._rule_id = s["rule_id"]
        self._last_seen = s["last_seen"]
        self._tcp_state = s["tcp_state"]
        self._user = s["user"]
        self._lease = s["lease"]

    # -- size ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"<FlowTable python {self._len}/{self.capacity} entries, {self.nslots} slots>"

    # -- probing ------------------------------------------------------------------------

    def _home(self, proto, saddr, sport, daddr, dport) -> int:
        return flow_hash(proto, saddr, sport, daddr, dport) & self._mask

    def _find(self, proto, saddr, sport, daddr, dport):
        """(found, index): the key's slot, or the first empty slot of its probe sequence.

        The table always has an empty slot (capacity < nslots), so this ends."""
        i = self._home(proto, saddr, sport, daddr, dport)
        flags, sa, da, sp, dp, pr = (
            self._flags, self._saddr, self._daddr, self._sport, self._dport, self._proto,
        )
        mask = self._mask
        while True:
            if not flags[i] & F_OCCUPIED:
                return False, i
            if sa[i] == saddr and da[i] == daddr and sp[i] == sport and dp[i] == dport and pr[i] == proto:
                return True, i
            i = (i + 1) & mask

    def _write_value(self, i, new_addr, new_port, rule_id, now, flags):
        self._new_addr[i] = new_addr
        self._new_port[i] = new_port
        self._rule_id[i] = rule_id
        self._last_seen[i] = now
        self._flags[i] = F_OCCUPIED | flags
        self._tcp_state[i] = 0
        self._user[i] = 0
        self._lease[i] = 0

    # -- API ----------------------------------------------------------------------------

    def insert(self, proto, saddr, sport, daddr, dport, new_addr, new_port, rule_id=0, now=0, flags=0) -> bool:
        """Insert or update one entry; False (and ``full_count`` += 1) if the table is full."""
        proto, saddr, sport, daddr, dport = map(int, (proto, saddr, sport, daddr, dport))
        new_addr, new_port, rule_id, now, flags = map(int, (new_addr, new_port, rule_id, now, flags))
        _check_key(proto, saddr, sport, daddr, dport)
        if not (0 <= new_addr <= _U32 and 0 <= new_port <= 0xFFFF):
            raise ValueError(f"translated endpoint out of range: {new_addr}:{new_port}")
        if not (0 <= rule_id <= _U32 and 0 <= now <= _U32 and 0 <= flags <= 0xFF):
            raise ValueError(f"rule_id/now/flags out of range: {rule_id}, {now}, {flags}")
        found, i = self._find(proto, saddr, sport, daddr, dport)
        if not found:
            if self._len >= self.capacity:
                self.full_count += 1
                return False
            self._saddr[i] = saddr
            self._daddr[i] = daddr
            self._sport[i] = sport
            self._dport[i] = dport
            self._proto[i] = proto
            self._len += 1
        self._write_value(i, new_addr, new_port, rule_id, now, flags)
        return True

    def lookup(self, proto, saddr, sport, daddr, dport) -> int:
        """Slot index of the key, or -1."""
        key = (int(proto), int(saddr), int(sport), int(daddr), int(dport))
        _check_key(*key)
        found, i = self._find(*key)
        return i if found else -1

    def get(self, proto, saddr, sport, daddr, dport):
        """A copy of the key's slot record, or None."""
        i = self.lookup(proto, saddr, sport, daddr, dport)
        return None if i < 0 else self.slots[i].copy()

    def delete(self, proto, saddr, sport, daddr, dport) -> bool:
        """Remove the key; False if absent.  Backward-shift deletion (Knuth 6.4 R)."""
        key = (int(proto), int(saddr), int(sport), int(daddr), int(dport))
        _check_key(*key)
        found, i = self._find(*key)
        if not found:
            return False
        self._delete_at(i)
        return True

    def _delete_at(self, i: int) -> None:
        slots, flags, mask = self.slots, self._flags, self._mask
        slots[i] = 0
        j = i
        while True:
            j = (j + 1) & mask
            if not flags[j] & F_OCCUPIED:
                break
            h = self._home(int(self._proto[j]), int(self._saddr[j]), int(self._sport[j]),
                           int(self._daddr[j]), int(self._dport[j]))
            # Stays if its home h lies cyclically in (i, j]: it is still reachable.
            if 0 < ((h - i) & mask) <= ((j - i) & mask):
                continue
            slots[i] = slots[j]
            slots[j] = 0
            i = j
        self._len -= 1

    def insert_batch(self, entries) -> int:
        """``insert`` for each SLOT_DTYPE record in order (now = its last_seen); the
        number inserted or updated."""
        entries = _as_records(entries, (SLOT_DTYPE,), "entries")
        n = 0
        for r in entries.tolist():
            # tolist() of a SLOT_DTYPE record: field order of layout.SLOT_DTYPE.
            saddr, daddr, sport, dport, proto, flags, new_port, new_addr, rule_id, last_seen = r[:10]
            n += self.insert(proto, saddr, sport, daddr, dport, new_addr, new_port, rule_id, last_seen, flags)
        return n

    def delete_batch(self, keys) -> int:
        """``delete`` for each SLOT_DTYPE or KEY_DTYPE record in order; the number deleted."""
        keys = _as_records(keys, (SLOT_DTYPE, KEY_DTYPE), "keys")
        n = 0
        for saddr, daddr, sport, dport, proto in zip(
            keys["saddr"].tolist(), keys["daddr"].tolist(), keys["sport"].tolist(),
            keys["dport"].tolist(), keys["proto"].tolist(),
        ):
            n += self.delete(proto, saddr, sport, daddr, dport)
        return n

    def occupied(self) -> np.ndarray:
        """Indices of the slots in use, ascending."""
        return np.flatnonzero(self._flags & F_OCCUPIED)

    def clear(self) -> None:
        """Empty the table (full_count is kept: it counts refusals over the lifetime)."""
        self.slots[:] = np.zeros(1, dtype=SLOT_DTYPE)
        self._len = 0

    def load_slots(self, array) -> None:
        """Replace the contents with a snapshot taken from a table of the same nslots."""
        array = _as_records(array, (SLOT_DTYPE,), "array")
        if array.shape != (self.nslots,):
            raise ValueError(f"snapshot has {array.shape[0]} slots, this table has {self.nslots}")
        n = int(np.count_nonzero(array["flags"] & F_OCCUPIED))
        if n > self.capacity:
            raise ValueError(f"snapshot holds {n} entries, capacity is {self.capacity}")
        self.slots[:] = array
        self._len = n


def _as_records(a, dtypes, what):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy array of {' or '.join(str(d) for d in dtypes)}")
    if a.dtype not in dtypes:
        raise TypeError(f"{what} has dtype {a.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if a.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional")
    return a


# --------------------------------------------------------------------------------------
# Translator
# --------------------------------------------------------------------------------------


def _as_u8_buffer(buf):
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
    return mv.cast("B") if mv.format != "B" else mv


def _as_array(a, dtype, what):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy {np.dtype(dtype)} array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{what} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be contiguous")
    return a


class OutputArea:
    """The frames the gateway makes itself, per translate call: the twin of
    ``hypernat/_out.pxd`` (one area per Translator; the fragment table releases into it
    too).  ``put`` is the one place a datagram is cut in fragments."""

    def __init__(self, output_bytes: int, output_frames: int):
        self.buf = np.zeros(output_bytes, dtype=np.uint8)
        self.offsets = np.zeros(output_frames, dtype=np.uint32)
        self.lengths = np.zeros(output_frames, dtype=np.uint32)
        self.exits = np.zeros(output_frames, dtype=np.uint8)
        self.count = 0
        self.used = 0
        self.mtu = [0, 0]  # per exit direction: the largest IPv4 datagram (0: no limit)

    def reset(self) -> None:
        self.count = self.used = 0

    def take(self, frame: bytes, exitdir: int) -> bool:
        """Append one frame toward `exitdir`; False if it has no room."""
        n = len(frame)
        if self.count >= len(self.offsets) or n > len(self.buf) - self.used:
            return False
        i, pos = self.count, self.used
        self.buf[pos : pos + n] = np.frombuffer(frame, dtype=np.uint8)
        self.offsets[i], self.lengths[i], self.exits[i] = pos, n, exitdir
        self.count += 1
        self.used += n
        return True

    def put(self, frame: bytes, l2: int, ihl: int, data: int, exitdir: int) -> int:
        """``frame`` (link header, IPv4 header, data) toward `exitdir`: as it is when it fits
        that link's MTU, else as fragments of at most the MTU (RFC 791; DF cleared, MF on
        all but the datagram's last).  Returns the frames written; 0: no room (none)."""
        mtu = self.mtu[exitdir]
        chunk, nf = data, 1
        if mtu and ihl + data > mtu:
            chunk = (mtu - ihl) // 8 * 8  # mtu >= 68, ihl <= 60
            nf = -(-data // chunk)
        if nf > len(self.offsets) - self.count or nf * (l2 + ihl) + data > len(self.buf) - self.used:
            return 0
        if nf == 1:
            self.take(bytes(frame[: l2 + ihl + data]), exitdir)
            return 1
        fo = _be16(frame, l2 + IP_FRAG)
        head = bytes(frame[: l2 + ihl])
        later = bytearray(head)
        _options_fragment(later, l2, ihl)
        for k in range(nf):
            pos = k * chunk
            piece = bytes(frame[l2 + ihl + pos : l2 + ihl + min(data, pos + chunk)])
            f = bytearray(head if k == 0 else later)
            _put16(f, l2 + IP_TOTLEN, ihl + len(piece))
            flags = (fo & 0x8000) | (((fo & 0x1FFF) + (pos >> 3)) & 0x1FFF)
            if k + 1 < nf or fo & 0x2000:
                flags |= 0x2000
            _put16(f, l2 + IP_FRAG, flags)
            _put16(f, l2 + IP_CSUM, 0)
            _put16(f, l2 + IP_CSUM, ~_sum16(f, l2, l2 + ihl) & 0xFFFF)
            self.take(bytes(f) + piece, exitdir)
        return nf


class Translator:
    """Batch translation over an out table and an in table (see the module doc).

    ``pool``: the external pool as ``(network, prefix_len)`` pairs; an OUT frame to an
    address in the pool is a hairpin (translated twice, sent back inside).
    """

    def __init__(self, out_table: FlowTable, in_table: FlowTable, pool=(), frag=None, output_bytes=OUTPUT_BYTES,
                 output_frames=OUTPUT_FRAMES):
        if not isinstance(out_table, FlowTable) or not isinstance(in_table, FlowTable):
            raise TypeError("out_table and in_table must be hypernat.fastpath_py.FlowTable")
        from .frag_py import FragTable  # (frag_py imports this module's helpers)

        if frag is not None and not isinstance(frag, FragTable):
            raise TypeError("frag must be a hypernat.frag_py.FragTable (or None)")
        self.out_table = out_table
        self.in_table = in_table
        self.frag = frag  # None: every fragment is a counted V_FRAGMENT drop
        self.pool = []
        for entry in pool:
            net, plen = int(entry[0]), int(entry[1])
            if not (0 <= plen <= 32) or not (0 <= net <= _U32):
                raise ValueError(f"bad pool prefix {entry!r}")
            mask = (_U32 << (32 - plen)) & _U32
            self.pool.append((net & mask, mask))
        self.pool = tuple(self.pool)
        self.counters = np.zeros((2, N_VERDICTS), dtype=np.uint64)
        self._l2 = [None, None]  # per exit direction: (src_mac, dst_mac) or None
        self._partial = False  # the frame being translated has a partial checksum (translate sets it)
        # The router part (set_router) and the output area of generated frames.
        output_bytes, output_frames = _check_output_area(output_bytes, output_frames)
        self.router_events = np.zeros((2, N_ROUTER_EVENTS), dtype=np.uint64)
        self.output = OutputArea(output_bytes, output_frames)
        self.out_buf, self.out_offsets = self.output.buf, self.output.offsets
        self.out_lengths, self.out_exits = self.output.lengths, self.output.exits
        self._gso = 0  # the frame being translated: its gso_size if a super-frame (translate sets it)
        self._meta = None  # the batch's virtio_net_hdr records as bytes, and the frame's one
        self._meta_at = 0
        self._ip_id = 0
        self.set_router()

    def set_router(self, **settings) -> None:
        """The gateway as a router (docs/fastpath.md, "Generated frames"): keyword
        arguments ``outside_mtu``, ``inside_mtu`` (largest IPv4 datagram per egress link;
        0: no limit, else 68..65535), ``outside_address``, ``inside_address`` (source of
        the ICMP errors sent out of that side; 0: none sent), ``icmp_rate`` (ICMP errors
        per clock tick, the token bucket's size; 0: none) and ``mss_clamp`` (0: off).
        Omitted ones are 0.  The bucket starts full, and keeps its tokens when called
        again with the same ``icmp_rate`` (a live reload must not refill it)."""
        v = _check_router(settings)
        fresh = getattr(self, "_router", None) is None or v["icmp_rate"] != self._rate
        self._router = v
        self._mtu = self.output.mtu
        self._mtu[OUT], self._mtu[IN] = v["outside_mtu"], v["inside_mtu"]
        self._src = [0, 0]
        self._src[OUT], self._src[IN] = v["outside_address"], v["inside_address"]
        if fresh:
            self._rate = self._tokens = v["icmp_rate"]
            self._primed = False
            self._last = 0
        self._mss_clamp = v["mss_clamp"]

    @property
    def router(self) -> dict:
        """The settings of set_router, as a dict."""
        return dict(self._router)

    def router_events_dict(self) -> dict:
        e = self.router_events
        return {DIRECTION_NAMES[d]: {ROUTER_EVENT_NAMES[k]: int(e[d, k]) for k in range(N_ROUTER_EVENTS)}
                for d in (OUT, IN)}

    @property
    def out_count(self) -> int:
        """Frames the last translate() generated (in the output area)."""
        return self.output.count

    def generated(self) -> list:
        """Copies of the last translate()'s generated frames: [(exit direction, bytes)]."""
        return [(int(self.out_exits[i]), self.out_buf[self.out_offsets[i]:self.out_offsets[i] + self.out_lengths[i]].tobytes())
                for i in range(self.out_count)]

    # -- configuration and counters ------------------------------------------------------

    def set_l2(self, direction: int, src_mac, dst_mac) -> None:
        """MACs written into frames leaving toward `direction`'s far side (None: leave)."""
        _check_direction(direction)
        if src_mac is None and dst_mac is None:
            self._l2[direction] = None
            return
        src, dst = bytes(src_mac), bytes(dst_mac)
        if len(src) != 6 or len(dst) != 6:
            raise ValueError("MAC addresses must be 6 bytes")
        self._l2[direction] = (src, dst)

    def counters_dict(self) -> dict:
        return {
            DIRECTION_NAMES[d]: {VERDICT_NAMES[v]: int(self.counters[d, v]) for v in range(N_VERDICTS)}
            for d in (OUT, IN)
        }

    def reset_counters(self) -> None:
        self.counters[:] = 0
        self.router_events[:] = 0

    def _in_pool(self, addr: int) -> bool:
        for net, mask in self.pool:
            if addr & mask == net:
                return True
        return False

    # -- the batch -----------------------------------------------------------------------

    def translate(self, buf, offsets, lengths, direction, now, verdicts, keys=None, partial=None, meta=None) -> None:
        """Translate frames ``buf[offsets[i]:offsets[i]+lengths[i]]`` in place; write
        ``verdicts[i]`` (and ``keys[i]``) for each; count them.  ``partial``: non-zero
        where the TCP/UDP checksum field holds the pseudo-header sum (offload).
        ``meta``: the frames' virtio_net_hdr records (io.base.META_DTYPE, or its bytes):
        a super-frame is sized by its segments; a TCP one may get a smaller gso_size."""
        b = _as_u8_buffer(buf)
        offsets = _as_array(offsets, np.uint32, "offsets")
        lengths = _as_array(lengths, np.uint32, "lengths")
        verdicts = _as_array(verdicts, np.uint8, "verdicts")
        n = offsets.shape[0]
        if lengths.shape[0] != n:
            raise ValueError(f"offsets has {n} entries, lengths {lengths.shape[0]}")
        if verdicts.shape[0] < n:
            raise ValueError(f"verdicts has room for {verdicts.shape[0]} frames, batch has {n}")
        if keys is not None:
            if not isinstance(keys, np.ndarray) or keys.dtype != KEY_DTYPE or keys.ndim != 1:
                raise TypeError("keys must be a one-dimensional numpy array of layout.KEY_DTYPE")
            if keys.shape[0] < n:
                raise ValueError(f"keys has room for {keys.shape[0]} frames, batch has {n}")
        if partial is not None:
            partial = _as_array(partial, np.uint8, "partial")
            if partial.shape[0] < n:
                raise ValueError("partial must be a contiguous uint8 array with an entry per frame")
        if meta is not None:
            if isinstance(meta, np.ndarray) and meta.dtype.names is not None:
                meta = meta.view(np.uint8)
            if (not isinstance(meta, np.ndarray) or meta.dtype != np.uint8 or meta.ndim != 1
                    or not meta.flags.c_contiguous or not meta.flags.writeable or meta.shape[0] < n * META_LEN):
                raise ValueError(f"meta must be a contiguous writable uint8 array of {META_LEN} bytes per frame "
                                 "(io.base.META_DTYPE records), or such records")
        _check_direction(direction)
        now = int(now)
        if not (0 <= now <= _U32):
            raise ValueError(f"now {now} out of uint32 range")

        self.output.reset()
        self._meta = meta
        buflen = len(b)
        counts = [0] * N_VERDICTS
        if self.frag is not None and n:
            self.frag.begin(now)
        for i, (off, length) in enumerate(zip(offsets.tolist(), lengths.tolist())):
            self._partial = partial is not None and partial[i] != 0
            self._gso, self._meta_at = 0, i * META_LEN
            if meta is not None and self._partial and meta[i * META_LEN + 1]:  # gso_type: a super-frame (partial)
                self._gso = int(meta[i * META_LEN + 4]) | int(meta[i * META_LEN + 5]) << 8
            v, key = self._frame(b, buflen, off, length, direction, now)
            verdicts[i] = v
            counts[v] += 1
            if keys is not None:
                keys[i] = key if key is not None else (0, 0, 0, 0, 0, 0, 0, 0)
        row = self.counters[direction]
        for v, c in enumerate(counts):
            if c:
                row[v] += c

    # -- one frame ----------------------------------------------------------------------

    def _frame(self, b, buflen, off, length, direction, now):
        """Steps 1-11 of docs/fastpath.md for one frame: (verdict, key tuple or None).

        The key tuple is in KEY_DTYPE field order:
        (saddr, daddr, sport, dport, proto, kind, tcp_flags, icmp_type)."""
        # 1. The frame must lie inside the buffer.
        if off + length > buflen:
            return V_DROP_TRUNCATED, None
        # 2. Ethernet, at most one 802.1Q tag.
        if length < ETH_HLEN:
            return V_DROP_TRUNCATED, None
        ethertype = _be16(b, off + 12)
        l3 = ETH_HLEN
        if ethertype == ETHERTYPE_VLAN:
            if length < ETH_HLEN + VLAN_HLEN:
                return V_DROP_TRUNCATED, None
            ethertype = _be16(b, off + 16)
            l3 = ETH_HLEN + VLAN_HLEN
        if ethertype != ETHERTYPE_IPV4:
            return V_NOT_NAT, None
        # 3. IPv4 header (RFC 791).
        avail = length - l3
        if avail < 20:
            return V_DROP_TRUNCATED, None
        ip = off + l3
        if b[ip] >> 4 != 4:
            return V_DROP_BAD_VERSION, None
        ihl = (b[ip] & 0x0F) * 4
        if ihl < 20 or ihl > avail:
            return V_DROP_BAD_IHL, None
        total = _be16(b, ip + IP_TOTLEN)
        if total < ihl or total > avail:
            return V_DROP_BAD_TOTAL_LENGTH, None
        # 4. Fragments (docs/fastpath.md "Fragments").  A later one (offset > 0) has no
        # transport header: the fragment table translates it by its first fragment's
        # translation, or holds it.  A first one (offset 0, MF) goes on like any packet
        # but must hold its whole transport header (RFC 1858).
        fo = _be16(b, ip + IP_FRAG) & 0x3FFF
        first = False
        if fo:
            if self.frag is None:
                return V_FRAGMENT, None
            if fo & 0x1FFF:
                if b[ip + IP_PROTO] not in (PROTO_TCP, PROTO_UDP, PROTO_ICMP):
                    return V_NOT_NAT, None  # as its first fragment: no table entry to wait for
                if b[ip + IP_TTL] <= 1:
                    return V_TTL_EXCEEDED, None
                v = self.frag.later(b, off, off + length, ip, direction, now)
                if v == V_TRANSLATED or v == V_HAIRPIN:
                    exitdir = IN if v == V_HAIRPIN else direction
                    self._set_macs(b, off, exitdir)
                    end = ip + _be16(b, ip + IP_TOTLEN)
                    if self._mtu[exitdir] and end - ip > self._mtu[exitdir]:  # cut again (never DF)
                        v = self._fragment(b, off, ip, ip + ihl, end, direction, exitdir)
                return v, None
            first = True
        # 5. Protocol.
        proto = b[ip + IP_PROTO]
        if proto != PROTO_TCP and proto != PROTO_UDP and proto != PROTO_ICMP:
            return V_NOT_NAT, None
        # 6. The L4 header lies within total_length.
        l4 = ip + ihl
        l4len = total - ihl
        short = V_DROP_FRAG_TINY if first else V_DROP_BAD_L4_HEADER
        if proto == PROTO_TCP:
            if l4len < 20:
                return short, None
            doff = (b[l4 + TCP_DOFF] >> 4) * 4
            if doff < 20:
                return V_DROP_BAD_L4_HEADER, None
            if doff > l4len:
                return short, None
        elif proto == PROTO_UDP:
            if l4len < 8:
                return short, None
            ulen = _be16(b, l4 + UDP_LEN)
            # a first fragment's UDP length covers the whole datagram
            if ulen < 8 or (ulen > l4len and not first):
                return V_DROP_BAD_L4_HEADER, None
        elif l4len < 8:
            return short, None
        # 7. TTL: a router does not forward a packet whose TTL would reach 0.
        if b[ip + IP_TTL] <= 1:
            self._icmp_answer(b, off, ip, l4, ip + total, direction, now, ICMP_TIME_EXCEEDED, 0, 0)
            return V_TTL_EXCEEDED, None
        # 8. ICMP: echo is a query (the identifier is the "port"), 3/11/12 are errors.
        if proto == PROTO_ICMP:
            icmp_type = b[l4]
            if icmp_type in ICMP_ERROR_TYPES:
                if first:  # its checksum covers bytes we do not have
                    return V_DROP_ICMP_ERROR_FRAGMENT, None
                return self._icmp_error(b, off, ip, l4, ip + total, icmp_type, direction, now)
            if icmp_type not in ICMP_QUERY_TYPES:
                return V_DROP_ICMP_UNSUPPORTED, None
            sport = dport = _be16(b, l4 + ICMP_ID)
            tcp_flags = 0
        else:
            icmp_type = 0
            sport = _be16(b, l4)
            dport = _be16(b, l4 + 2)
            tcp_flags = b[l4 + TCP_FLAGS] if proto == PROTO_TCP else 0
        # 9. Query / TCP / UDP.
        saddr = _be32(b, ip + IP_SRC)
        daddr = _be32(b, ip + IP_DST)
        key = (saddr, daddr, sport, dport, proto, KIND_PLAIN, tcp_flags, icmp_type)
        if not first:
            return self._resolve(b, off, ip, l4, total, proto, saddr, sport, daddr, dport, tcp_flags, key,
                                 direction, now)
        # A first fragment: checked by the fragment table, decided by the flow tables like
        # any packet; once translated, its translation is recorded there and the held
        # fragments of its datagram are released.
        v = self.frag.first_check(b, ip, direction, now)
        if v:
            return v, key
        v, key = self._resolve(b, off, ip, l4, total, proto, saddr, sport, daddr, dport, tcp_flags, key,
                               direction, now, router=False)
        if v == V_TRANSLATED or v == V_HAIRPIN:
            exitdir = IN if v == V_HAIRPIN else direction
            macs = self._l2[exitdir]
            self.frag.first_record(b, ip, direction, exitdir, saddr, daddr, now,
                                   None if macs is None else macs[1] + macs[0], self.output)
            if self._mtu[exitdir] and total > self._mtu[exitdir]:  # cut again (never DF)
                v = self._fragment(b, off, ip, l4, ip + total, direction, exitdir)
        return v, key

    def _resolve(self, b, off, ip, l4, total, proto, saddr, sport, daddr, dport, tcp_flags, key, direction, now,
                 router=True):
        """Step 11: look up and rewrite one parsed TCP / UDP / echo frame (`router`:
        with the size check and MSS clamping; a first fragment goes as it came)."""
        old = (saddr, sport, daddr, dport)
        end = ip + total
        hairpin = direction == OUT and self.pool and self._in_pool(daddr)
        # The size against the MTU of the link it leaves by (hairpins go back inside).
        exitdir = IN if hairpin else direction
        split = self._size_check(b, off, ip, l4, end, direction, exitdir, now) if router else FITS
        if split < 0:
            return (V_FRAG_NEEDED if split == TOO_BIG_DF else V_DROP_GSO_TOO_BIG), key
        tcp_flags_router = tcp_flags if router else 0  # no clamping either

        if direction == OUT:
            t = self.out_table
            found, i = t._find(proto, saddr, sport, daddr, dport)
            if hairpin:
                # Hairpin: inside to one of our own external endpoints.  Translate as
                # if the frame went out (source I -> E) and came back in (dest E' -> I').
                if not found:
                    return V_MISS_HAIRPIN, key
                src_addr, src_port = int(t._new_addr[i]), int(t._new_port[i])
                u = self.in_table
                found2, j = u._find(proto, src_addr, src_port, daddr, dport)
                if not found2:
                    return V_MISS_HAIRPIN, key
                dst_addr, dst_port = int(u._new_addr[j]), int(u._new_port[j])
                _touch(t, i, now, proto, tcp_flags)
                _touch(u, j, now, proto, tcp_flags)
                new = (src_addr, src_port, dst_addr, dst_port)
                self._rewrite(b, ip, l4, ip + total, proto, old, new, new_id=dst_port)
                self._set_macs(b, off, IN)
                return self._sent(b, off, ip, l4, end, direction, exitdir, split, tcp_flags_router, V_HAIRPIN), key
            if not found:
                return V_MISS_OUT, key
            new_addr, new_port = int(t._new_addr[i]), int(t._new_port[i])
            _touch(t, i, now, proto, tcp_flags)
            new = (new_addr, new_port, daddr, dport)
            self._rewrite(b, ip, l4, ip + total, proto, old, new, new_id=new_port)
            self._set_macs(b, off, OUT)
            return self._sent(b, off, ip, l4, end, direction, exitdir, split, tcp_flags_router, V_TRANSLATED), key

        t = self.in_table
        found, i = t._find(proto, saddr, sport, daddr, dport)
        if not found:
            return V_MISS_IN, key
        new_addr, new_port = int(t._new_addr[i]), int(t._new_port[i])
        _touch(t, i, now, proto, tcp_flags)
        new = (saddr, sport, new_addr, new_port)
        self._rewrite(b, ip, l4, ip + total, proto, old, new, new_id=new_port)
        self._set_macs(b, off, IN)
        return self._sent(b, off, ip, l4, end, direction, exitdir, split, tcp_flags_router, V_TRANSLATED), key

    def _rewrite(self, b, ip, l4, end, proto, old, new, new_id):
        """Step 11: write the new endpoints, decrement TTL, update the checksums.

        ``old`` = (saddr, sport, daddr, dport) as in the frame, ``new`` the values to
        write; ``end`` is the end of the IP datagram.  ICMP echo has one identifier
        for both "ports": ``new_id`` is its new value (a hairpin rewrites source then
        destination, so the destination's wins).
        """
        saddr, sport, daddr, dport = old
        nsaddr, nsport, ndaddr, ndport = new
        old_addr_words = _addr_words(saddr) + _addr_words(daddr)
        new_addr_words = _addr_words(nsaddr) + _addr_words(ndaddr)

        # IPv4 header: addresses and the TTL/protocol word, in one RFC 1624 update.
        ttl = b[ip + IP_TTL]
        ip_csum = _be16(b, ip + IP_CSUM)
        ip_csum = _csum_adjust(
            ip_csum,
            old_addr_words + (ttl << 8 | proto,),
            new_addr_words + ((ttl - 1) << 8 | proto,),
        )
        b[ip + IP_TTL] = ttl - 1
        _put16(b, ip + IP_CSUM, ip_csum)
        _put32(b, ip + IP_SRC, nsaddr)
        _put32(b, ip + IP_DST, ndaddr)

        if proto == PROTO_ICMP:
            # ICMP echo: no pseudo-header; only the identifier changes (RFC 5508 sec. 3).
            c = _csum_adjust(_be16(b, l4 + ICMP_CSUM), (sport,), (new_id,))
            _put16(b, l4 + ICMP_ID, new_id)
            if c == 0 and _icmp_all_zero(b, l4, end):
                # Eqn. 3 yields 0x0000 when the new message sums to +0, which only an
                # all-zero message does; its checksum is ~(+0) = 0xFFFF (RFC 1624 sec. 3:
                # -0 only for all-zero data).  No pseudo-header makes ICMP the one place
                # this can happen (an echo reply, code 0, id 0, seq 0, zero payload).
                c = 0xFFFF
            _put16(b, l4 + ICMP_CSUM, c)
            return
        old_words = old_addr_words + (sport, dport)
        new_words = new_addr_words + (nsport, ndport)
        if self._partial:
            # Checksum offload: the field holds the pseudo-header sum (not complemented),
            # which covers the addresses and not the ports (RFC 1624 on its complement).
            o = l4 + (TCP_CSUM if proto == PROTO_TCP else UDP_CSUM)
            _put16(b, o, ~_csum_adjust(~_be16(b, o) & 0xFFFF, old_addr_words, new_addr_words) & 0xFFFF)
        elif proto == PROTO_TCP:
            c = _be16(b, l4 + TCP_CSUM)
            _put16(b, l4 + TCP_CSUM, _csum_adjust(c, old_words, new_words))
        else:
            c = _be16(b, l4 + UDP_CSUM)
            _put16(b, l4 + UDP_CSUM, _udp_csum_adjust(c, old_words, new_words))
        _put16(b, l4, nsport)
        _put16(b, l4 + 2, ndport)

    def _set_macs(self, b, off, exit_direction):
        macs = self._l2[exit_direction]
        if macs is not None:
            src, dst = macs
            b[off : off + 6] = dst
            b[off + 6 : off + 12] = src

    # -- the gateway as a router: ICMP errors, fragments, MSS clamping (issue 13) --------
    #
    # What a router does besides forwarding (RFC 1812), done to the frame that causes
    # it; frames it makes go to the output area (out_buf / out_offsets / out_lengths /
    # out_exits, out_count of them), emptied at the start of every translate().

    def _seg_headers(self, b, ip, l4):
        """IPv4 + TCP / UDP header bytes of each segment of a super-frame."""
        if b[ip + IP_PROTO] == PROTO_TCP:
            return l4 - ip + (b[l4 + TCP_DOFF] >> 4) * 4
        return l4 - ip + 8

    def _size_check(self, b, off, ip, l4, end, direction, exitdir, now):
        """Step 9a: the datagram against the MTU of the link it leaves by: FITS,
        SPLIT_FRAGMENT (cut in fragments once translated), SPLIT_GSO (a TCP super-frame:
        its gso_size lowered once translated), TOO_BIG_DF (ICMP fragmentation needed
        answered; verdict frag_needed) or TOO_BIG_GSO (a UDP super-frame: verdict
        drop_gso_too_big).  The size compared is the IPv4 datagram's length or, for a
        super-frame, its segments' (headers + gso_size, as Linux forwards), if shorter."""
        mtu = self._mtu[exitdir]
        size = end - ip
        if self._gso:
            size = min(size, self._seg_headers(b, ip, l4) + self._gso)
        if not mtu or size <= mtu:
            return FITS
        if _be16(b, ip + IP_FRAG) & 0x4000:
            self._icmp_answer(b, off, ip, l4, end, direction, now, ICMP_DEST_UNREACH, 4, mtu)
            return TOO_BIG_DF
        if not self._gso:
            return SPLIT_FRAGMENT
        if b[ip + IP_PROTO] == PROTO_TCP and self._seg_headers(b, ip, l4) + 8 <= mtu:
            return SPLIT_GSO
        return TOO_BIG_GSO  # UDP segments are datagrams: not ours to re-cut (nor TCP headers alone)

    def _sent(self, b, off, ip, l4, end, direction, exitdir, split, tcp_flags, verdict):
        """After the rewrite of a frame to send: MSS clamping, then fragments."""
        if self._mss_clamp and b[ip + IP_PROTO] == PROTO_TCP and tcp_flags & 0x02:
            self._clamp_mss(b, l4, direction)
        if split == SPLIT_FRAGMENT:
            return self._fragment(b, off, ip, l4, end, direction, exitdir)
        if split == SPLIT_GSO:
            self._resegment(b, ip, l4, direction, exitdir)
        return verdict

    def _resegment(self, b, ip, l4, direction, exitdir):
        """A TCP super-frame with DF clear whose segments do not fit its exit link: its
        gso_size lowered so that they do (the byte stream is the same, cut smaller)."""
        g = self._mtu[exitdir] - self._seg_headers(b, ip, l4)
        self._meta[self._meta_at + 4], self._meta[self._meta_at + 5] = g & 0xFF, g >> 8
        self._gso = g
        self.router_events[direction][EV_GSO_RESEGMENTED] += 1

    def _icmp_answer(self, b, off, ip, l4, end, direction, now, itype, code, mtu):
        """An ICMP error about the frame as received, from the gateway's address on the
        side it came from, back to its source: IP header + as much of the datagram as
        fits in 576 bytes (RFC 792, RFC 1812 4.3.2.3) and in the MTU of the link it
        leaves by; MAC addresses swapped."""
        ev = self.router_events[direction]
        back = IN if direction == OUT else OUT
        src = self._src[back]
        sa, da = _be32(b, ip + IP_SRC), _be32(b, ip + IP_DST)
        # RFC 1812 4.3.2.7: never about an ICMP error, a non-first fragment, a
        # link-layer or IP broadcast / multicast, or a source that is not one host.
        quiet = (not src or b[off] & 1 or da >> 24 >= 224 or sa >> 24 >= 224 or sa >> 24 in (0, 127)
                 or _be16(b, ip + IP_FRAG) & 0x1FFF)
        if not quiet and b[ip + IP_PROTO] == PROTO_ICMP:
            quiet = b[l4] in (3, 4, 5, 11, 12)
        if quiet:
            ev[EV_ICMP_SUPPRESSED] += 1
            return
        # RFC 1812 4.3.2.8: a token bucket per NIC, `icmp_rate` tokens, refilled per tick.
        if not self._primed:
            self._primed, self._last = True, now
        elif now != self._last:
            self._tokens = min(self._rate, self._tokens + ((now - self._last) & _U32) * self._rate)
            self._last = now
        if self._tokens == 0:
            ev[EV_ICMP_RATE_LIMITED] += 1
            return
        room = ICMP_QUOTE_MAX if not self._mtu[back] else min(ICMP_QUOTE_MAX, self._mtu[back] - 28)
        quote = bytes(b[ip : ip + min(end - ip, room)])
        l2 = bytes(b[off:ip])
        hdr = bytearray(20)
        hdr[0], hdr[1] = 0x45, 0xC0  # precedence: internetwork control
        _put16(hdr, 2, 28 + len(quote))
        _put16(hdr, 4, self._ip_id & 0xFFFF)
        hdr[8], hdr[9] = 64, PROTO_ICMP
        _put32(hdr, 12, src)
        _put32(hdr, 16, sa)
        _put16(hdr, IP_CSUM, ~_sum16(hdr, 0, 20) & 0xFFFF)
        msg = bytearray(8) + quote
        msg[0], msg[1] = itype, code
        _put16(msg, 6, mtu)  # RFC 1191: the next-hop MTU (0 for time exceeded)
        _put16(msg, ICMP_CSUM, ~_sum16(msg, 0, len(msg)) & 0xFFFF)
        if not self.output.take(l2[6:12] + l2[0:6] + l2[12:] + hdr + msg, back):
            ev[EV_OUTPUT_FULL] += 1
            return
        self._tokens -= 1
        self._ip_id += 1
        ev[EV_ICMP_FRAG_NEEDED if itype == ICMP_DEST_UNREACH else EV_ICMP_TIME_EXCEEDED] += 1

    def _fragment(self, b, off, ip, l4, end, direction, exitdir):
        """The translated frame (a datagram, or a fragment of one) as IPv4 fragments of
        at most the exit link's MTU, into the output area (OutputArea.put): V_FRAGMENTED,
        or V_OUTPUT_FULL if not all fit.  A partial checksum is finished first (the
        pieces leave without the frame's metadata)."""
        proto = b[ip + IP_PROTO]
        if self._partial and not _be16(b, ip + IP_FRAG) & 0x3FFF and proto in (PROTO_TCP, PROTO_UDP):
            at = l4 + (TCP_CSUM if proto == PROTO_TCP else UDP_CSUM)
            c = ~_sum16(b, l4, end) & 0xFFFF  # the field holds the pseudo-header sum
            _put16(b, at, 0xFFFF if c == 0 and proto == PROTO_UDP else c)
        ihl = (b[ip] & 0x0F) * 4
        nf = self.output.put(b[off:end], ip - off, ihl, end - ip - ihl, exitdir)
        if not nf:
            self.router_events[direction][EV_OUTPUT_FULL] += 1
            return V_OUTPUT_FULL
        self.router_events[direction][EV_FRAGMENTS] += nf
        return V_FRAGMENTED

    def _clamp_mss(self, b, l4, direction):
        """SYN / SYN-ACK: an MSS option above the clamp is lowered to it and the TCP
        checksum updated (RFC 1624).  Options are walked inside the TCP header only; a
        malformed list leaves the frame as it was (counted)."""
        end = l4 + (b[l4 + TCP_DOFF] >> 4) * 4
        i = l4 + 20
        while i < end:
            kind = b[i]
            if kind == 0:
                return
            if kind == 1:
                i += 1
                continue
            if i + 2 > end:
                break
            n = b[i + 1]
            if n < 2 or i + n > end:
                break
            if kind == 2:
                if n != 4:
                    break
                old, new = _be16(b, i + 2), self._mss_clamp
                if old > new:
                    if (i + 2 - l4) & 1:  # the value straddles two checksum words
                        old, new = _swap16(old), _swap16(new)
                    if not self._partial:  # a partial field holds the pseudo-header sum: no option in it
                        _put16(b, l4 + TCP_CSUM, _csum_adjust(_be16(b, l4 + TCP_CSUM), (old,), (new,)))
                    _put16(b, i + 2, self._mss_clamp)
                    self.router_events[direction][EV_MSS_CLAMPED] += 1
                return
            i += n
        if i < end:
            self.router_events[direction][EV_MSS_BAD_OPTIONS] += 1

    # -- ICMP errors (RFC 5508) ----------------------------------------------------------

    def _icmp_error(self, b, off, ip, l4, end, icmp_type, direction, now):
        """Step 10: an ICMP error is translated through the session of the packet it
        carries.  ``end`` is the end of the IP datagram (ip + total_length)."""
        # REQ-3: the checksum over the whole ICMP message must hold.
        if _sum16(b, l4, end) != 0xFFFF:
            return V_DROP_BAD_ICMP_CHECKSUM, None
        # The embedded packet: an IPv4 header and at least 8 bytes of its L4 header.
        e = l4 + 8
        if end - e < 20:
            return V_DROP_ICMP_ERROR_MALFORMED, None
        if b[e] >> 4 != 4:
            return V_DROP_ICMP_ERROR_MALFORMED, None
        eihl = (b[e] & 0x0F) * 4
        if eihl < 20 or e + eihl + 8 > end:
            return V_DROP_ICMP_ERROR_MALFORMED, None
        if _be16(b, e + IP_FRAG) & 0x1FFF:
            # about a later fragment: no ports to translate by (RFC 1122 3.2.2 forbids it)
            return V_DROP_ICMP_ERROR_FRAGMENT, None
        eproto = b[e + IP_PROTO]
        el4 = e + eihl
        esrc = _be32(b, e + IP_SRC)
        edst = _be32(b, e + IP_DST)
        if eproto == PROTO_TCP or eproto == PROTO_UDP:
            esport = _be16(b, el4)
            edport = _be16(b, el4 + 2)
        elif eproto == PROTO_ICMP:
            if b[el4] not in ICMP_QUERY_TYPES:  # never an error about an error (RFC 1122)
                return V_DROP_ICMP_ERROR_ABOUT_ERROR, None
            esport = edport = _be16(b, el4 + ICMP_ID)
        else:
            return V_DROP_ICMP_ERROR_MALFORMED, None

        # The embedded packet went the other way through us: its flow reversed is the
        # session key in the table of this direction.
        key = (edst, esrc, edport, esport, eproto, KIND_ICMP_ERROR, 0, icmp_type)
        split = self._size_check(b, off, ip, l4, end, direction, direction, now)
        if split < 0:
            return (V_FRAG_NEEDED if split == TOO_BIG_DF else V_DROP_GSO_TOO_BIG), key
        t = self.out_table if direction == OUT else self.in_table
        found, i = t._find(eproto, edst, edport, esrc, esport)
        if not found:
            return V_MISS_ICMP_ERROR, key
        new_addr, new_port = int(t._new_addr[i]), int(t._new_port[i])
        # No refresh: an error says nothing about the session being alive.

        if direction == OUT:
            # Outer source and embedded destination are the inside endpoint: make them E.
            a_off, p_off, old_addr, old_port = IP_DST, 2, edst, edport
        else:
            # Outer destination and embedded source are our E: make them the inside one.
            a_off, p_off, old_addr, old_port = IP_SRC, 0, esrc, esport

        # Embedded IPv4 header: the address and its header checksum.
        ec = _be16(b, e + IP_CSUM)
        _put16(b, e + IP_CSUM, _csum_adjust(ec, _addr_words(old_addr), _addr_words(new_addr)))
        _put32(b, e + a_off, new_addr)

        # Embedded L4: the port (or echo identifier) and its checksum when present.
        old_w = _addr_words(old_addr) + (old_port,)
        new_w = _addr_words(new_addr) + (new_port,)
        if eproto == PROTO_TCP:
            if el4 + TCP_CSUM + 2 <= end:
                c = _be16(b, el4 + TCP_CSUM)
                _put16(b, el4 + TCP_CSUM, _csum_adjust(c, old_w, new_w))
            _put16(b, el4 + p_off, new_port)
        elif eproto == PROTO_UDP:
            c = _be16(b, el4 + UDP_CSUM)
            _put16(b, el4 + UDP_CSUM, _udp_csum_adjust(c, old_w, new_w))
            _put16(b, el4 + p_off, new_port)
        else:
            c = _be16(b, el4 + ICMP_CSUM)
            _put16(b, el4 + ICMP_CSUM, _csum_adjust(c, (old_port,), (new_port,)))
            _put16(b, el4 + ICMP_ID, new_port)

        # Outer IPv4: the address and the TTL (step 11).
        osaddr = _be32(b, ip + IP_SRC)
        odaddr = _be32(b, ip + IP_DST)
        o_addr_off = IP_SRC if direction == OUT else IP_DST
        o_old = osaddr if direction == OUT else odaddr
        ttl = b[ip + IP_TTL]
        c = _be16(b, ip + IP_CSUM)
        c = _csum_adjust(
            c,
            _addr_words(o_old) + (ttl << 8 | PROTO_ICMP,),
            _addr_words(new_addr) + ((ttl - 1) << 8 | PROTO_ICMP,),
        )
        b[ip + IP_TTL] = ttl - 1
        _put16(b, ip + IP_CSUM, c)
        _put32(b, ip + o_addr_off, new_addr)

        # Outer ICMP checksum: recomputed over the whole message (the payload changed).
        _put16(b, l4 + ICMP_CSUM, 0)
        _put16(b, l4 + ICMP_CSUM, ~_sum16(b, l4, end) & 0xFFFF)

        self._set_macs(b, off, OUT if direction == OUT else IN)
        if split == SPLIT_FRAGMENT:
            return self._fragment(b, off, ip, l4, end, direction, direction), key
        return V_TRANSLATED, key


def _swap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def _options_fragment(h: bytearray, start: int, ihl: int) -> None:
    """IPv4 options not to be copied into later fragments (copied flag clear) become
    NOPs, so every fragment's header keeps the same length (RFC 791, as Linux does).
    ``h[start:start+ihl]`` is the header."""
    i = 20
    while i < ihl:
        t = h[start + i]
        if t == 0:
            return
        if t == 1:
            i += 1
            continue
        if i + 1 >= ihl:
            return
        n = h[start + i + 1]
        if n < 2 or i + n > ihl:
            return
        if not t & 0x80:
            h[start + i : start + i + n] = b"\x01" * n
        i += n


def _check_output_area(output_bytes, output_frames):
    output_bytes, output_frames = operator.index(output_bytes), operator.index(output_frames)
    if not (4096 <= output_bytes <= 1 << 31) or not (64 <= output_frames <= 1 << 24):
        raise ValueError(f"output area of {output_bytes} bytes / {output_frames} frames: "
                         "need 4096..2**31 bytes and 64..2**24 frames")
    return output_bytes, output_frames


def _check_router(settings) -> dict:
    unknown = set(settings) - set(ROUTER_KEYS)
    if unknown:
        raise TypeError(f"set_router: unknown setting(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(ROUTER_KEYS)})")
    v = {k: operator.index(settings.get(k, 0)) for k in ROUTER_KEYS}
    for k in ("outside_mtu", "inside_mtu"):
        if v[k] and not 68 <= v[k] <= 65535:
            raise ValueError(f"{k} {v[k]}: 0 (no limit) or 68..65535 (RFC 791's minimum is 68)")
    for k in ("outside_address", "inside_address"):
        if not 0 <= v[k] <= _U32:
            raise ValueError(f"{k} {v[k]} is not an IPv4 address (0..2**32-1)")
    if not 0 <= v["icmp_rate"] <= 1 << 24:
        raise ValueError(f"icmp_rate {v['icmp_rate']}: 0..{1 << 24} per tick")
    if not 0 <= v["mss_clamp"] <= 0xFFFF:
        raise ValueError(f"mss_clamp {v['mss_clamp']}: 0 (off) or 1..65535")
    return v


def _touch(table: FlowTable, i: int, now: int, proto: int, tcp_flags: int) -> None:
    """A hit: refresh last_seen, mark active, remember TCP SYN/FIN/RST."""
    table._last_seen[i] = now
    table._flags[i] |= F_ACTIVE
    if proto == PROTO_TCP:
        table._tcp_state[i] |= tcp_flags & TCP_STATE_MASK


def _check_direction(direction):
    if direction not in (OUT, IN) or isinstance(direction, bool):
        raise ValueError(f"direction must be verdicts.OUT ({OUT}) or verdicts.IN ({IN}), got {direction!r}")

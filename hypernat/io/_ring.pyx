# cython: language_level=3
"""Walking PACKET_MMAP rings without the GIL: receive (TPACKET_V3 blocks, or TPACKET_V2
slots) and transmit (TPACKET_V2).

A TPACKET_V2 ring is an array of fixed-size frames shared with the kernel.  Each
frame starts with a ``struct tpacket2_hdr`` whose ``tp_status`` word is the
hand-over flag: whoever owns the frame flips it, and the other side only reads the
frame after it sees the flip (acquire/release ordering on that one word)::

   receive ring (kernel fills, we read)          transmit ring (we fill, kernel sends)

   head ─► [USER ][USER ][KERN ][KERN ]...        [AVAIL][SENDING][SEND ][SEND ][AVAIL]...
            │  walk(): offsets/lengths of                ▲ tail   ▲ sent     ▲ head
            │  frames whose status has USER         fill(): copy frame, tp_len, status =
            ▼  set; no copy — the Batch views       SEND_REQUEST at head; flush(): kick =
         release(): status = KERNEL, in place       send(fd, NULL, 0, DONTWAIT) while any
                                                    frame is still SEND_REQUEST

TPACKET_V2 hands every frame over the moment it is written, so the first packet of a
connection waits for nothing; but every slot must hold the largest frame (a 64 KB
super-frame).  A TPACKET_V3 receive ring (``RxRingV3``) is an array of blocks; the
kernel packs frames into the active block back to back and hands the whole block over
(its ``block_status``) when it is full or its retire timer fires, so a 64-byte frame
costs ~160 bytes of ring, not a 68 KB slot::

   block:  [tpacket_block_desc: status, num_pkts, offset_to_first_pkt]
           [tpacket3_hdr | sockaddr_ll | virtio_net_hdr | frame ] ─tp_next_offset─►
           [tpacket3_hdr | ... ] ... (num_pkts entries, 8-byte aligned)

Both receive rings read a frame the same way (``_RxBase._frame``).  Frames handed out
in a batch stay ours until ``release``: the walker never passes them (``outstanding``
bounds the V2 walk, per-block references the V3 walk) and the kernel never overwrites
them.

The transmit ring keeps two positions behind ``head``: ``sent``, the next frame the
kernel has not taken yet (it takes them in ring order, as ours), and ``tail``, the
oldest frame not yet given back (AVAILABLE).  A kick is owed as long as ``unsent`` (head
- sent) is not zero, whether or not this call queued anything: when the device refuses a
frame (ENOBUFS: the receiving CPU's backlog over ``netdev_max_backlog``, a stopped
queue, the carrier off) ``tpacket_snd`` puts it back to SEND_REQUEST and stops there,
and only another kick sends it and everything behind it.  Kicking only after queueing
something stalls for good once every frame is SEND_REQUEST (nothing can be queued, so
nothing is ever kicked again).  Both positions move in ``reap``, by reading status
words (no scan of the ring); the kernel changes them only inside our own kick, or from
SENDING to AVAILABLE when a frame in flight is freed, so the counts are exact.

Frames the walker refuses, counted and released at once: truncated by the ring
(``tp_snaplen < tp_len``: longer than a V2 slot or a V3 block), frames whose checksum
the kernel left unfinished without a virtio_net_hdr to say where it starts
(``TP_STATUS_CSUMNOTREADY`` on a ring without ``vnet``), inconsistent virtio_net_hdrs
and VLAN tags the port does not carry.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memmove, memset
from libc.errno cimport errno

from ._vlan cimport (vlan_egress_add, vlan_egress_copy, vlan_egress_skip, vlan_set_add, vlan_set_clear,
                     vlan_set_has)

import numpy as np

cdef extern from *:
    """
    #include <linux/if_packet.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <errno.h>
    static inline unsigned int hn_status_load(void *p) {
        return __atomic_load_n((unsigned int *)p, __ATOMIC_ACQUIRE);
    }
    static inline void hn_status_store(void *p, unsigned int v) {
        __atomic_store_n((unsigned int *)p, v, __ATOMIC_RELEASE);
    }
    #define HN_TPACKET2_DATA_OFF (TPACKET_ALIGN(sizeof(struct tpacket2_hdr)))
    #include <stddef.h>
    #define HN_BLOCK_STATUS_OFF (offsetof(struct tpacket_block_desc, hdr.bh1.block_status))
    """
    struct tpacket2_hdr:
        uint32_t tp_status
        uint32_t tp_len
        uint32_t tp_snaplen
        uint16_t tp_mac
        uint16_t tp_net
        uint16_t tp_vlan_tci
        uint16_t tp_vlan_tpid
    struct tpacket_hdr_variant1:
        uint32_t tp_rxhash
        uint32_t tp_vlan_tci
        uint16_t tp_vlan_tpid
    struct tpacket3_hdr:
        uint32_t tp_next_offset
        uint32_t tp_sec
        uint32_t tp_nsec
        uint32_t tp_snaplen
        uint32_t tp_len
        uint32_t tp_status
        uint16_t tp_mac
        uint16_t tp_net
        tpacket_hdr_variant1 hv1
    struct tpacket_hdr_v1:
        uint32_t block_status
        uint32_t num_pkts
        uint32_t offset_to_first_pkt
        uint32_t blk_len
    union tpacket_bd_header_u:
        tpacket_hdr_v1 bh1
    struct tpacket_block_desc:
        uint32_t version
        uint32_t offset_to_priv
        tpacket_bd_header_u hdr
    int HN_BLOCK_STATUS_OFF
    int TPACKET_V3, TPACKET3_HDRLEN, TP_STATUS_BLK_TMO
    unsigned int hn_status_load(void *p) nogil
    void hn_status_store(void *p, unsigned int v) nogil
    int HN_TPACKET2_DATA_OFF
    int TP_STATUS_KERNEL, TP_STATUS_USER, TP_STATUS_COPY, TP_STATUS_LOSING, TP_STATUS_CSUMNOTREADY
    int TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID
    int PACKET_VNET_HDR
    int TP_STATUS_AVAILABLE, TP_STATUS_SEND_REQUEST, TP_STATUS_SENDING, TP_STATUS_WRONG_FORMAT
    int SOL_PACKET, TPACKET_V2, TPACKET2_HDRLEN
    int PACKET_RX_RING, PACKET_TX_RING, PACKET_VERSION, PACKET_QDISC_BYPASS, PACKET_IGNORE_OUTGOING
    int PACKET_LOSS, PACKET_STATISTICS
    int MSG_DONTWAIT
    int EAGAIN, ENOBUFS, EINTR, EBUSY, ENETDOWN
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags) nogil

# Constants for the Python side, read from the kernel's own header.
CONST = dict(
    SOL_PACKET=SOL_PACKET, TPACKET_V2=TPACKET_V2, TPACKET2_HDRLEN=TPACKET2_HDRLEN,
    PACKET_RX_RING=PACKET_RX_RING, PACKET_TX_RING=PACKET_TX_RING, PACKET_VERSION=PACKET_VERSION,
    PACKET_QDISC_BYPASS=PACKET_QDISC_BYPASS, PACKET_IGNORE_OUTGOING=PACKET_IGNORE_OUTGOING,
    PACKET_LOSS=PACKET_LOSS, PACKET_STATISTICS=PACKET_STATISTICS, PACKET_VNET_HDR=PACKET_VNET_HDR,
    TP_STATUS_KERNEL=TP_STATUS_KERNEL, TP_STATUS_USER=TP_STATUS_USER, TP_STATUS_AVAILABLE=TP_STATUS_AVAILABLE,
    TP_STATUS_SEND_REQUEST=TP_STATUS_SEND_REQUEST, TP_STATUS_WRONG_FORMAT=TP_STATUS_WRONG_FORMAT,
    DATA_OFF=HN_TPACKET2_DATA_OFF, TPACKET_V3=TPACKET_V3, TPACKET3_HDRLEN=TPACKET3_HDRLEN,
    BLOCK_DESC_LEN=sizeof(tpacket_block_desc),
)


# virtio_net_hdr (include/uapi/linux/virtio_net.h): the kernel's word on a frame's
# checksum and segmentation, 10 bytes just before the frame with PACKET_VNET_HDR.
cdef enum:
    VNET_LEN = 10
    VNET_F_NEEDS_CSUM = 1
    VNET_F_DATA_VALID = 2
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_UDP = 3
    GSO_TCPV6 = 4
    GSO_UDP_L4 = 5
    GSO_ECN = 0x80
VNET_HDR_LEN = VNET_LEN



cdef inline uint32_t ld16le(const uint8_t *q) noexcept nogil:
    return q[0] | (<uint32_t>q[1] << 8)


cdef inline void st16le(uint8_t *q, uint32_t v) noexcept nogil:
    q[0] = v & 0xFF
    q[1] = (v >> 8) & 0xFF


cdef inline uint32_t ld16be(const uint8_t *q) noexcept nogil:
    return (<uint32_t>q[0] << 8) | q[1]


cdef int check_vnet(uint8_t *f, uint32_t ln, uint8_t *m) noexcept nogil:
    """Is the virtio_net_hdr `m` consistent with frame `f` (`ln` bytes)?  0 if so, 1 for a
    bad GSO request, 2 for a bad checksum request.  For IPv4 the partial checksum must
    be the TCP or UDP checksum of the frame's own L4 header; other frames (IPv6, ARP)
    only need their offsets inside the frame: the fast path does not translate them."""
    cdef uint32_t flags = m[0], gso = m[1] & ~GSO_ECN
    cdef uint32_t start = ld16le(m + 6), off = ld16le(m + 8)
    cdef uint32_t et, l3 = 14, ihl, proto = 0, l4 = 0
    if ln < 14:
        return 1 if gso != GSO_NONE else (2 if flags & VNET_F_NEEDS_CSUM else 0)
    et = ld16be(f + 12)
    if et == 0x8100 and ln >= 18:
        et = ld16be(f + 16)
        l3 = 18
    if et == 0x0800:
        if ln < l3 + 20:
            return 2
        ihl = (f[l3] & 0x0F) * 4
        proto = f[l3 + 9]
        l4 = l3 + ihl
        if ihl < 20 or l4 + 8 > ln:
            return 2
    if gso != GSO_NONE:
        if ld16le(m + 4) == 0 or not (flags & VNET_F_NEEDS_CSUM):
            return 1
        if et == 0x0800:
            if not ((gso == GSO_TCPV4 and proto == 6) or ((gso == GSO_UDP or gso == GSO_UDP_L4) and proto == 17)):
                return 1
        elif et == 0x86DD:
            if gso != GSO_TCPV6 and gso != GSO_UDP_L4 and gso != GSO_UDP:
                return 1
        else:
            return 1
    if flags & VNET_F_NEEDS_CSUM:
        if <uint64_t>start + off + 2 > ln:
            return 2
        if et == 0x0800 and not (start == l4 and ((proto == 6 and off == 16) or (proto == 17 and off == 6))):
            return 2
    return 0


cdef void complete_csum(uint8_t *f, uint32_t ln, const uint8_t *m) noexcept nogil:
    """Finish a partial checksum as the device would: the one's-complement sum from
    csum_start to the end of the IPv4 datagram (the field holds the pseudo-header sum),
    complemented, into csum_start + csum_offset.  Checked by ``check_vnet`` first."""
    cdef uint32_t start = ld16le(m + 6), off = ld16le(m + 8)
    cdef uint32_t l3 = 18 if ld16be(f + 12) == 0x8100 else 14
    cdef uint32_t end = l3 + ld16be(f + l3 + 2)
    cdef uint64_t s = 0
    cdef uint32_t i
    if end > ln or end < start:
        end = ln
    i = start
    while i + 1 < end:
        s += (<uint32_t>f[i] << 8) | f[i + 1]
        i += 2
    if i < end:
        s += <uint32_t>f[i] << 8
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    if s == 0 and f[l3 + 9] == 17:
        s = 0xFFFF                      # UDP: a computed zero is sent as all ones
    f[start + off] = <uint8_t>(s >> 8)
    f[start + off + 1] = <uint8_t>(s & 0xFF)


cdef class _RxBase:
    """What both receive rings share: the reading of one frame the kernel handed over
    (``_frame``) and its counters.  ``vnet``: the socket has PACKET_VNET_HDR (each frame
    comes with its virtio_net_hdr: super-frames and partial checksums).  ``vlans``: the
    VLAN IDs this port serves; a frame whose tag the kernel took off gets it back in
    place (the ring has headroom before the Ethernet header), a tag not served is a
    drop."""

    cdef uint8_t *base
    cdef object mem  # keeps the mapping alive while we point into it
    cdef readonly bint vnet
    cdef uint8_t vlan_ok[512]
    cdef readonly uint64_t frames, bytes, truncated, csum_partial, vlan_unconfigured, vlan_restored, losing_seen
    cdef readonly uint64_t vnet_bad_gso, vnet_bad_csum, csum_completed, super_frames, vlan_missing
    cdef bint vlan_port
    cdef uint32_t hdrlen  # the kernel's frame header + sockaddr_ll: a restored tag may not reach into it

    cdef _setup(self, uint8_t[::1] mem, bint vnet, vlans, uint32_t hdrlen):
        self.mem = mem
        self.base = &mem[0]
        self.vnet = vnet
        self.hdrlen = hdrlen
        vlan_set_clear(self.vlan_ok)
        for v in vlans:
            self.vlan_port = True
            if not 1 <= v <= 4094:
                raise ValueError(f"VLAN ID {v!r} is outside 1-4094")
            vlan_set_add(self.vlan_ok, v)

    cdef uint32_t _limit(self, uint32_t max_frames, uint32_t[::1] offsets, uint32_t[::1] lengths,
                         uint8_t[::1] meta, uint8_t[::1] partial) except? 0:
        if max_frames > <uint32_t>offsets.shape[0]:
            max_frames = <uint32_t>offsets.shape[0]
        if max_frames > <uint32_t>lengths.shape[0]:
            max_frames = <uint32_t>lengths.shape[0]
        if self.vnet:
            if meta is None or partial is None:
                raise ValueError("a vnet ring needs meta and partial arrays")
            if max_frames > <uint32_t>(meta.shape[0] // VNET_LEN):
                max_frames = <uint32_t>(meta.shape[0] // VNET_LEN)
            if max_frames > <uint32_t>partial.shape[0]:
                max_frames = <uint32_t>partial.shape[0]
        return max_frames

    cdef bint _frame(self, uint8_t *frame, uint32_t room, uint32_t status, uint32_t mac, uint32_t snap,
                     uint32_t wire_len, uint32_t tci, uint32_t tpid, uint32_t n, uint32_t *offsets,
                     uint32_t *lengths, uint8_t *m, uint8_t *pp) noexcept nogil:
        """One frame the kernel handed over: `frame` is its ring header, `room` the bytes
        from there the frame may use (its slot, or the rest of its block), `mac` / `snap`
        / `wire_len` / `status` / `tci` / `tpid` the header's fields.  Fills entry `n`
        (offset into the mapping, length, virtio_net_hdr, partial flag) and returns 1, or
        counts why it is refused and returns 0."""
        cdef uint32_t vid, bad, x
        cdef uint8_t *f
        cdef uint8_t scratch[VNET_LEN]
        if status & TP_STATUS_LOSING:
            self.losing_seen += 1
        if snap < wire_len or <uint64_t>mac + snap > room or snap < 14:
            self.truncated += 1         # longer than a ring frame (or a runt)
            return 0
        if self.vnet:
            if mac < VNET_LEN:
                self.truncated += 1
                return 0
            memcpy(scratch, frame + mac - VNET_LEN, VNET_LEN)   # before a tag may cover it
        elif status & TP_STATUS_CSUMNOTREADY:
            self.csum_partial += 1      # no virtio_net_hdr: where the checksum starts is unknown
            return 0
        if status & TP_STATUS_VLAN_VALID:
            vid = tci & 0x0FFF
            if not vlan_set_has(self.vlan_ok, vid) or mac < self.hdrlen + 4:
                self.vlan_unconfigured += 1     # never forwarded untagged
                return 0
            # The kernel took the tag off (keeping it in tp_vlan_tci): put it back,
            # the MAC addresses moved 4 bytes into the headroom.
            if not (status & TP_STATUS_VLAN_TPID_VALID) or tpid == 0:
                tpid = 0x8100
            f = frame + mac - 4
            memmove(f, f + 4, 12)
            f[12] = <uint8_t>(tpid >> 8)
            f[13] = <uint8_t>(tpid & 0xFF)
            f[14] = <uint8_t>((tci >> 8) & 0xFF)
            f[15] = <uint8_t>(tci & 0xFF)
            mac -= 4
            snap += 4
            self.vlan_restored += 1
            if self.vnet and scratch[0] & VNET_F_NEEDS_CSUM:
                st16le(scratch + 6, ld16le(scratch + 6) + 4)
                x = ld16le(scratch + 2)
                if x:
                    st16le(scratch + 2, x + 4)
        elif self.vlan_port:
            self.vlan_missing += 1      # untagged on a VLAN port: not this segment's
            return 0
        f = frame + mac
        if self.vnet:
            pp[n] = 0
            if scratch[0] & VNET_F_NEEDS_CSUM or scratch[1] != GSO_NONE:
                bad = check_vnet(f, snap, scratch)
                if bad == 1:
                    self.vnet_bad_gso += 1
                    return 0
                if bad == 2:
                    self.vnet_bad_csum += 1
                    return 0
                if scratch[1] != GSO_NONE:
                    pp[n] = 1
                    self.super_frames += 1
                elif scratch[0] & VNET_F_NEEDS_CSUM:
                    complete_csum(f, snap, scratch)
                    scratch[0] = (scratch[0] & ~VNET_F_NEEDS_CSUM) | VNET_F_DATA_VALID
                    self.csum_completed += 1
            memcpy(m + <uint64_t>n * VNET_LEN, scratch, VNET_LEN)
        offsets[n] = <uint32_t>((<uint64_t>(frame - self.base)) + mac)
        lengths[n] = snap
        self.bytes += snap
        return 1

    def _counters(self):
        return {"rx_frames": self.frames, "rx_bytes": self.bytes, "rx_truncated": self.truncated,
                "rx_csum_partial": self.csum_partial, "rx_vlan_unconfigured": self.vlan_unconfigured,
                "rx_vlan_restored": self.vlan_restored, "rx_vlan_missing": self.vlan_missing,
                "rx_vnet_bad_gso": self.vnet_bad_gso,
                "rx_vnet_bad_csum": self.vnet_bad_csum, "rx_csum_completed": self.csum_completed,
                "rx_super_frames": self.super_frames, "rx_losing_seen": self.losing_seen}

    def release_mem(self):
        self.base = NULL
        self.mem = None


cdef class RxRing(_RxBase):
    """The TPACKET_V2 receive ring of one socket: hands out runs of frames, takes them
    back (``vnet`` / ``vlans``: see ``_RxBase``)."""

    cdef readonly uint32_t frame_size, frame_nr, head, outstanding

    def __cinit__(self, uint8_t[::1] mem not None, uint32_t frame_size, uint32_t frame_nr, bint vnet=False,
                  vlans=()):
        if frame_size < 64 or frame_size % 16 or <uint64_t>frame_size * frame_nr > <uint64_t>mem.shape[0]:
            raise ValueError(f"ring of {frame_nr} x {frame_size} does not fit a mapping of {mem.shape[0]} bytes")
        self._setup(mem, vnet, vlans, TPACKET2_HDRLEN)
        self.frame_size = frame_size
        self.frame_nr = frame_nr

    def walk(self, uint32_t[::1] offsets not None, uint32_t[::1] lengths not None, uint32_t max_frames,
             uint8_t[::1] meta=None, uint8_t[::1] partial=None):
        """Collect up to `max_frames` ready frames: fills offsets/lengths (offset into
        the mapping of each frame's Ethernet header) and returns ``(start, taken, n)``:
        `taken` ring frames from index `start` are now ours (give them back with
        ``release(start, taken)``), `n` of them are in offsets/lengths.

        On a ``vnet`` ring, `meta` (10 bytes a frame, META_DTYPE) gets each frame's
        virtio_net_hdr and `partial` a 1 where the frame is left with a partial
        checksum (a super-frame: its L4 checksum field holds the pseudo-header sum).
        A partial frame that is not a super-frame has its checksum completed here."""
        cdef uint32_t n = 0, taken = 0, start = self.head, limit
        cdef uint32_t status
        cdef tpacket2_hdr *h
        cdef uint8_t *frame
        cdef uint8_t *m = NULL
        cdef uint8_t *pp = NULL
        max_frames = self._limit(max_frames, offsets, lengths, meta, partial)
        if max_frames == 0:
            return start, 0, 0
        if self.vnet:
            m = &meta[0]
            pp = &partial[0]
        limit = self.frame_nr - self.outstanding
        with nogil:
            while n < max_frames and taken < limit:
                frame = self.base + <uint64_t>self.head * self.frame_size
                status = hn_status_load(frame)
                if not (status & TP_STATUS_USER):
                    break
                h = <tpacket2_hdr *>frame
                taken += 1
                self.head += 1
                if self.head == self.frame_nr:
                    self.head = 0
                n += self._frame(frame, self.frame_size, status, h.tp_mac, h.tp_snaplen, h.tp_len,
                                 h.tp_vlan_tci, h.tp_vlan_tpid, n, &offsets[0], &lengths[0], m, pp)
            self.frames += n
            self.outstanding += taken
        return start, taken, n

    def release(self, uint32_t start, uint32_t taken):
        """Give `taken` frames from ring index `start` back to the kernel."""
        cdef uint32_t i, idx = start
        if taken > self.outstanding or start >= self.frame_nr:
            raise ValueError(f"release({start}, {taken}) of a ring with {self.outstanding} frames out")
        with nogil:
            for i in range(taken):
                hn_status_store(self.base + <uint64_t>idx * self.frame_size, TP_STATUS_KERNEL)
                idx += 1
                if idx == self.frame_nr:
                    idx = 0
            self.outstanding -= taken

    def ready(self):
        """True if the frame at the head is ours to read (a poll without a syscall)."""
        return bool(hn_status_load(self.base + <uint64_t>self.head * self.frame_size) & TP_STATUS_USER)

    def counters(self):
        c = self._counters()
        c["rx_outstanding"] = self.outstanding
        return c


cdef class RxRingV3(_RxBase):
    """The TPACKET_V3 receive ring of one socket: blocks of variable-size frames.

    The kernel packs frames into the active block back to back (each a
    ``tpacket3_hdr``, ``tp_next_offset`` to the next) and hands the block over whole
    (``block_status`` USER) when it is full or its retire timer fires; a block is given
    back whole.  The walk goes block by block, frame by frame, and may stop inside a
    block (``max_frames``): the next walk resumes there.  Every batch holds a reference
    on each block it took frames from (the batch views them: the fast path rewrites
    them in place, the transmit ring copies them out), so a block goes back to the
    kernel once the walk has passed its last frame and every batch that took frames
    from it is released, in whatever order.  A block that is passed but still held is
    never entered again: the walk stops there (the kernel stops before it as well and
    counts its drops)::

        [blk 0: passed, held by batch 7][blk 1: walk at frame 12 of 40][blk 2: USER][blk 3: KERNEL]...
    """

    cdef readonly uint32_t block_size, block_nr, cur, outstanding
    cdef uint32_t left, pos  # frames of block `cur` not yet walked, the offset of the next one
    cdef bint inside  # the walk is inside block `cur` (its header read)
    cdef object _refs, _passed
    cdef uint32_t *refs
    cdef uint8_t *passed
    cdef readonly uint64_t blocks, bad_blocks

    def __cinit__(self, uint8_t[::1] mem not None, uint32_t block_size, uint32_t block_nr, bint vnet=False,
                  vlans=()):
        if block_size < 4096 or block_size % 16 or block_nr == 0 or \
                <uint64_t>block_size * block_nr > <uint64_t>mem.shape[0]:
            raise ValueError(f"ring of {block_nr} blocks of {block_size} does not fit a mapping of "
                             f"{mem.shape[0]} bytes")
        self._setup(mem, vnet, vlans, TPACKET3_HDRLEN)
        self.block_size = block_size
        self.block_nr = block_nr
        self._refs = np.zeros(block_nr, np.uint32)
        self._passed = np.zeros(block_nr, np.uint8)
        cdef uint32_t[::1] r = self._refs
        cdef uint8_t[::1] p = self._passed
        self.refs = &r[0]
        self.passed = &p[0]

    cdef void _pass_block(self) noexcept nogil:
        """The walk is past block `cur`'s last frame: hand it back now if no batch holds
        it, else when the last one is released."""
        self.inside = False
        if self.refs[self.cur] == 0:
            hn_status_store(self.base + <uint64_t>self.cur * self.block_size + HN_BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
        else:
            self.passed[self.cur] = 1
        self.cur += 1
        if self.cur == self.block_nr:
            self.cur = 0

    def walk(self, uint32_t[::1] offsets not None, uint32_t[::1] lengths not None, uint32_t max_frames,
             uint8_t[::1] meta=None, uint8_t[::1] partial=None):
        """As ``RxRing.walk``, but ``(start, taken, n)`` names blocks: the batch holds
        `taken` blocks from block `start` (``release(start, taken)``)."""
        cdef uint32_t n = 0, taken = 0, start = self.cur, status, nxt
        cdef uint8_t *blk
        cdef tpacket_block_desc *bd
        cdef tpacket3_hdr *h
        cdef uint8_t *m = NULL
        cdef uint8_t *pp = NULL
        cdef bint held_here = False  # this walk took a reference on block `cur`
        max_frames = self._limit(max_frames, offsets, lengths, meta, partial)
        if max_frames == 0:
            return start, 0, 0
        if self.vnet:
            m = &meta[0]
            pp = &partial[0]
        with nogil:
            while n < max_frames:
                blk = self.base + <uint64_t>self.cur * self.block_size
                if not self.inside:
                    if self.passed[self.cur] or taken == self.block_nr:
                        break               # still held by a batch: the ring is full of ours
                    status = hn_status_load(blk + HN_BLOCK_STATUS_OFF)
                    if not (status & TP_STATUS_USER):
                        break
                    bd = <tpacket_block_desc *>blk
                    self.left = bd.hdr.bh1.num_pkts
                    self.pos = bd.hdr.bh1.offset_to_first_pkt
                    self.inside = True
                    self.blocks += 1
                if not held_here:
                    self.refs[self.cur] += 1
                    taken += 1
                    held_here = True
                if self.left and (self.pos < sizeof(tpacket_block_desc) or
                                  <uint64_t>self.pos + sizeof(tpacket3_hdr) > self.block_size):
                    self.bad_blocks += 1    # a frame header outside its block: the rest is unreadable
                    self.left = 0
                if self.left:
                    h = <tpacket3_hdr *>(blk + self.pos)
                    n += self._frame(<uint8_t *>h, self.block_size - self.pos, h.tp_status, h.tp_mac,
                                     h.tp_snaplen, h.tp_len, h.hv1.tp_vlan_tci, h.hv1.tp_vlan_tpid, n,
                                     &offsets[0], &lengths[0], m, pp)
                    nxt = h.tp_next_offset
                    self.left -= 1
                    if self.left and (nxt == 0 or nxt % 8):  # V3_ALIGNMENT
                        self.bad_blocks += 1
                        self.left = 0
                    self.pos += nxt
                if self.left == 0:
                    self._pass_block()
                    held_here = False
            self.frames += n
            self.outstanding += taken
        return start, taken, n

    def release(self, uint32_t start, uint32_t taken):
        """Drop a batch's reference on `taken` blocks from block `start`; a block passed
        and no longer held goes back to the kernel."""
        cdef uint32_t i, b = start
        if taken > self.outstanding or start >= self.block_nr:
            raise ValueError(f"release({start}, {taken}) of a ring with {self.outstanding} blocks out")
        for i in range(taken):
            if self.refs[b] == 0:
                raise ValueError(f"release({start}, {taken}): block {b} is not held")
            b += 1
            if b == self.block_nr:
                b = 0
        b = start
        with nogil:
            for i in range(taken):
                self.refs[b] -= 1
                if self.refs[b] == 0 and self.passed[b]:
                    self.passed[b] = 0
                    hn_status_store(self.base + <uint64_t>b * self.block_size + HN_BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
                b += 1
                if b == self.block_nr:
                    b = 0
            self.outstanding -= taken

    def ready(self):
        """True if a frame is ours to read (a poll without a syscall)."""
        if self.inside:
            return True
        return not self.passed[self.cur] and bool(
            hn_status_load(self.base + <uint64_t>self.cur * self.block_size + HN_BLOCK_STATUS_OFF) & TP_STATUS_USER)

    def counters(self):
        c = self._counters()
        c["rx_outstanding"] = self.outstanding
        c["rx_blocks"] = self.blocks
        c["rx_bad_blocks"] = self.bad_blocks
        return c


cdef class TxRing:
    """The transmit ring of one socket: copies frames in, asks the kernel to send them.

    ``vnet``: the socket has PACKET_VNET_HDR: each frame goes out behind a
    virtio_net_hdr (from the batch's ``meta``, zero where it has none), so a
    super-frame is segmented by the kernel (or the NIC) and a partial checksum is
    finished there."""

    cdef uint8_t *base
    cdef object mem
    cdef readonly uint32_t frame_size, frame_nr, head, max_len
    cdef readonly bint vnet
    cdef readonly uint32_t tail, sent, queued, unsent  # see the module's docstring
    cdef readonly uint64_t frames, bytes, ring_full, too_big, out_of_buffer, kick_errors, kicks, refused
    cdef readonly uint64_t super_frames
    cdef uint8_t macs[12]
    cdef bint rewrite_macs
    cdef readonly int vlan_mode      # 0: frames leave as they are; 1: untagged; 2: tagged tx_tci
    cdef readonly uint32_t max_plain  # longest frame sent without GSO (0: max_len); longer: too_big
    cdef readonly uint16_t tx_tci

    def __cinit__(self, uint8_t[::1] mem not None, uint32_t frame_size, uint32_t frame_nr, bint vnet=False):
        if frame_size < 128 or frame_size % 16 or <uint64_t>frame_size * frame_nr > <uint64_t>mem.shape[0]:
            raise ValueError(f"ring of {frame_nr} x {frame_size} does not fit a mapping of {mem.shape[0]} bytes")
        self.mem = mem
        self.base = &mem[0]
        self.frame_size = frame_size
        self.frame_nr = frame_nr
        self.vnet = vnet
        self.max_len = frame_size - HN_TPACKET2_DATA_OFF - (VNET_LEN if vnet else 0)

    def set_macs(self, src=None, dst=None):
        """Rewrite source and destination MAC of every frame sent (None: leave them)."""
        if src is None or dst is None:
            self.rewrite_macs = False
            return
        src, dst = bytes(src), bytes(dst)
        if len(src) != 6 or len(dst) != 6:
            raise ValueError("MAC addresses are 6 bytes")
        cdef bytes both = dst + src  # Ethernet order: destination first
        memcpy(self.macs, <const char *>both, 12)
        self.rewrite_macs = True

    def set_max_plain(self, uint32_t n):
        """The longest frame the link takes without segmentation (MTU + Ethernet + a tag):
        a longer one without a GSO request (a super-frame copied out of its batch, say)
        is counted as too big here instead of vanishing in the kernel (0: no limit)."""
        self.max_plain = n

    def set_vlan(self, tci):
        """The 802.1Q tag of the link this ring sends on, written into every frame sent
        (a router's egress: the tag belongs to the port, not to the frame): ``None``
        leaves frames as they are, ``0`` sends them untagged (a tag is taken out), a
        TCI (VLAN ID in the low 12 bits, priority above) sends them with that tag."""
        if tci is None:
            self.vlan_mode = 0
            return
        if not 0 <= tci <= 0xFFFF:
            raise ValueError(f"802.1Q TCI {tci!r} out of range")
        self.vlan_mode = 2 if tci else 1
        self.tx_tci = tci

    def fill(self, const uint8_t[::1] buf not None, const uint32_t[::1] offsets not None,
             const uint32_t[::1] lengths not None, const int64_t[::1] idx not None,
             const uint8_t[::1] meta=None):
        """Copy frames `idx` of a batch into the ring; returns how many were queued.
        A frame that does not fit a ring frame, lies outside `buf`, or finds the ring
        full is not sent and is counted.  `meta`: the batch's virtio_net_hdr records
        (META_DTYPE viewed as bytes), used on a ``vnet`` ring."""
        cdef Py_ssize_t k, n = idx.shape[0], nframes = offsets.shape[0]
        cdef uint64_t buflen = buf.shape[0]
        cdef int64_t i
        cdef uint32_t off, ln, queued = 0, data = HN_TPACKET2_DATA_OFF, vlen = 0
        cdef uint8_t *frame
        cdef const uint8_t *src = &buf[0] if buflen else NULL
        cdef const uint8_t *m = NULL
        cdef Py_ssize_t nmeta = 0
        cdef uint32_t skip, add, out_len
        cdef uint8_t *vh
        if lengths.shape[0] < nframes:
            nframes = lengths.shape[0]
        if self.vnet:
            vlen = VNET_LEN
            data += VNET_LEN
            if meta is not None and meta.shape[0] >= VNET_LEN:
                m = &meta[0]
                nmeta = meta.shape[0] // VNET_LEN
        with nogil:
            for k in range(n):
                i = idx[k]
                if i < 0 or i >= nframes:
                    self.out_of_buffer += 1
                    continue
                off = offsets[i]
                ln = lengths[i]
                if ln < 14 or <uint64_t>off + ln > buflen:
                    self.out_of_buffer += 1
                    continue
                # 802.1Q on egress: `skip` bytes of the frame's own tag out, `add` of ours in.
                skip = vlan_egress_skip(src + off, ln, self.vlan_mode)
                add = vlan_egress_add(self.vlan_mode)
                out_len = ln - skip + add
                if out_len > self.max_len or (self.max_plain and out_len > self.max_plain and (
                        i >= nmeta or m[i * VNET_LEN + 1] == GSO_NONE)):
                    self.too_big += 1
                    continue
                if self.queued == self.frame_nr:
                    self._reap()
                    if self.queued == self.frame_nr:
                        self.ring_full += n - k
                        break
                frame = self.base + <uint64_t>self.head * self.frame_size
                if vlen:
                    if i < nmeta:
                        memcpy(frame + HN_TPACKET2_DATA_OFF, m + i * VNET_LEN, VNET_LEN)
                        if m[i * VNET_LEN + 1] != GSO_NONE:
                            self.super_frames += 1
                    else:
                        memset(frame + HN_TPACKET2_DATA_OFF, 0, VNET_LEN)
                vlan_egress_copy(frame + data, src + off, ln, skip, add, self.tx_tci)
                if skip != add:
                    if vlen and i < nmeta:      # offsets into the frame moved with the tag
                        vh = frame + HN_TPACKET2_DATA_OFF
                        if vh[0] & VNET_F_NEEDS_CSUM:
                            st16le(vh + 6, ld16le(vh + 6) + add - skip)
                        if ld16le(vh + 2):
                            st16le(vh + 2, ld16le(vh + 2) + add - skip)
                if self.rewrite_macs:
                    memcpy(frame + data, self.macs, 12)
                ln = out_len
                (<tpacket2_hdr *>frame).tp_len = ln + vlen
                hn_status_store(frame, TP_STATUS_SEND_REQUEST)
                self.queued += 1
                self.unsent += 1
                self.head += 1
                if self.head == self.frame_nr:
                    self.head = 0
                self.bytes += ln
                queued += 1
            self.frames += queued
        return queued

    cdef void _reap(self) noexcept nogil:
        """Move `sent` past the frames the kernel took (no longer SEND_REQUEST) and
        `tail` past the frames it gave back (AVAILABLE), in ring order."""
        cdef unsigned int st
        while self.unsent:
            if hn_status_load(self.base + <uint64_t>self.sent * self.frame_size) & TP_STATUS_SEND_REQUEST:
                break
            self.unsent -= 1
            self.sent += 1
            if self.sent == self.frame_nr:
                self.sent = 0
        while self.queued > self.unsent:
            st = hn_status_load(self.base + <uint64_t>self.tail * self.frame_size)
            if st & (TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING):
                break
            self.queued -= 1
            self.tail += 1
            if self.tail == self.frame_nr:
                self.tail = 0

    def flush(self, int fd):
        """Kick the kernel if any queued frame is still waiting to be taken (a frame
        the device refused is one: it stays SEND_REQUEST until the next kick).  Returns
        ``(unsent, err)``: frames still waiting after the kick, and the kick's errno
        (0: none).  ENOBUFS / EAGAIN / EBUSY / ENETDOWN count as ``refused`` (the device,
        its link or the socket's send budget said not now; the frames wait for the
        next flush),
        anything else as ``kick_errors``."""
        cdef ssize_t r = 0
        cdef int err = 0
        with nogil:
            self._reap()
            if self.unsent:
                r = c_send(fd, NULL, 0, MSG_DONTWAIT)
                if r < 0:
                    err = errno
                self.kicks += 1
                self._reap()
        if err == EINTR:
            err = 0
        elif err in (ENOBUFS, EAGAIN, EBUSY, ENETDOWN):
            self.refused += 1
        elif err:
            self.kick_errors += 1
        return self.unsent, err

    def pending(self):
        """Frames queued and not yet given back (waiting or in flight)."""
        with nogil:
            self._reap()
        return self.queued

    def counters(self):
        return {"tx_frames": self.frames, "tx_bytes": self.bytes, "tx_ring_full": self.ring_full,
                "tx_too_big": self.too_big, "tx_bad_frame": self.out_of_buffer, "tx_kicks": self.kicks,
                "tx_refused": self.refused, "tx_kick_errors": self.kick_errors, "tx_super_frames": self.super_frames}

    def release_mem(self):
        self.base = NULL
        self.mem = None


def select_ipv4_to(const uint8_t[::1] buf not None, const uint32_t[::1] offsets not None,
                   const uint32_t[::1] lengths not None, uint32_t n, mac, int64_t[::1] out not None):
    """Indices of the first `n` frames that are IPv4 (ethertype 0x0800) and addressed to
    `mac` (6 bytes), written to `out`; returns how many.  The forwarding decision of a
    router's layer 2, without the GIL: everything else (ARP, broadcast, IPv6, frames for
    another host) is left to the kernel, which sees every frame as well."""
    cdef bytes m = bytes(mac)
    if len(m) != 6:
        raise ValueError("MAC addresses are 6 bytes")
    cdef const uint8_t *want = <const uint8_t *>(<const char *>m)
    cdef uint64_t buflen = buf.shape[0]
    cdef uint32_t i, k = 0, off, ln
    cdef const uint8_t *f
    if n > <uint32_t>offsets.shape[0]:
        n = <uint32_t>offsets.shape[0]
    if n > <uint32_t>lengths.shape[0]:
        n = <uint32_t>lengths.shape[0]
    if n > <uint32_t>out.shape[0]:
        n = <uint32_t>out.shape[0]
    if buflen == 0:
        return 0
    with nogil:
        for i in range(n):
            off = offsets[i]
            ln = lengths[i]
            if ln < 34 or <uint64_t>off + ln > buflen:
                continue
            f = &buf[0] + off
            if f[12] != 0x08 or f[13] != 0x00:
                continue
            if (f[0] != want[0] or f[1] != want[1] or f[2] != want[2] or f[3] != want[3]
                    or f[4] != want[4] or f[5] != want[5]):
                continue
            out[k] = i
            k += 1
    return k

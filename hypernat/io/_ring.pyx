# cython: language_level=3
"""Walking PACKET_MMAP rings without the GIL (TPACKET_V2, receive and transmit).

A PACKET_MMAP ring is an array of fixed-size frames shared with the kernel.  Each
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

TPACKET_V2 hands every frame over the moment it is written (V3 hands over whole
blocks, on a millisecond timer), so the first packet of a connection waits for
nothing.  Frames handed out in a batch stay ours until ``release``: the walker never
passes them (``outstanding`` bounds the walk) and the kernel never overwrites them.

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
(``tp_snaplen < tp_len``, an MTU above the frame size) and frames whose checksum the
kernel left unfinished (``TP_STATUS_CSUMNOTREADY``: checksum offload on a link we
serve; the lab turns offloads off).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy
from libc.errno cimport errno

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
    """
    struct tpacket2_hdr:
        uint32_t tp_status
        uint32_t tp_len
        uint32_t tp_snaplen
        uint16_t tp_mac
        uint16_t tp_net
    unsigned int hn_status_load(void *p) nogil
    void hn_status_store(void *p, unsigned int v) nogil
    int HN_TPACKET2_DATA_OFF
    int TP_STATUS_KERNEL, TP_STATUS_USER, TP_STATUS_COPY, TP_STATUS_LOSING, TP_STATUS_CSUMNOTREADY
    int TP_STATUS_VLAN_VALID
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
    PACKET_LOSS=PACKET_LOSS, PACKET_STATISTICS=PACKET_STATISTICS,
    TP_STATUS_KERNEL=TP_STATUS_KERNEL, TP_STATUS_USER=TP_STATUS_USER, TP_STATUS_AVAILABLE=TP_STATUS_AVAILABLE,
    TP_STATUS_SEND_REQUEST=TP_STATUS_SEND_REQUEST, TP_STATUS_WRONG_FORMAT=TP_STATUS_WRONG_FORMAT,
    DATA_OFF=HN_TPACKET2_DATA_OFF,
)


cdef class RxRing:
    """The receive ring of one socket: hands out runs of frames, takes them back."""

    cdef uint8_t *base
    cdef object mem  # keeps the mapping alive while we point into it
    cdef readonly uint32_t frame_size, frame_nr, head, outstanding
    cdef readonly uint64_t frames, bytes, truncated, csum_partial, vlan_seen, losing_seen

    def __cinit__(self, uint8_t[::1] mem not None, uint32_t frame_size, uint32_t frame_nr):
        if frame_size < 64 or frame_size % 16 or <uint64_t>frame_size * frame_nr > <uint64_t>mem.shape[0]:
            raise ValueError(f"ring of {frame_nr} x {frame_size} does not fit a mapping of {mem.shape[0]} bytes")
        self.mem = mem
        self.base = &mem[0]
        self.frame_size = frame_size
        self.frame_nr = frame_nr

    def walk(self, uint32_t[::1] offsets not None, uint32_t[::1] lengths not None, uint32_t max_frames):
        """Collect up to `max_frames` ready frames: fills offsets/lengths (offset into
        the mapping of each frame's Ethernet header) and returns ``(start, taken, n)``:
        `taken` ring frames from index `start` are now ours (give them back with
        ``release(start, taken)``), `n` of them are in offsets/lengths."""
        cdef uint32_t n = 0, taken = 0, start = self.head, limit
        cdef uint32_t status
        cdef tpacket2_hdr *h
        cdef uint8_t *frame
        if max_frames > <uint32_t>offsets.shape[0]:
            max_frames = <uint32_t>offsets.shape[0]
        if max_frames > <uint32_t>lengths.shape[0]:
            max_frames = <uint32_t>lengths.shape[0]
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
                if status & TP_STATUS_LOSING:
                    self.losing_seen += 1
                if status & TP_STATUS_VLAN_VALID:
                    self.vlan_seen += 1
                if h.tp_snaplen < h.tp_len or <uint32_t>h.tp_mac + h.tp_snaplen > self.frame_size:
                    self.truncated += 1
                    continue
                if status & TP_STATUS_CSUMNOTREADY:
                    self.csum_partial += 1
                    continue
                offsets[n] = <uint32_t>((<uint64_t>(frame - self.base)) + h.tp_mac)
                lengths[n] = h.tp_snaplen
                self.bytes += h.tp_snaplen
                n += 1
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
        return {"rx_frames": self.frames, "rx_bytes": self.bytes, "rx_truncated": self.truncated,
                "rx_csum_partial": self.csum_partial, "rx_vlan_stripped": self.vlan_seen,
                "rx_losing_seen": self.losing_seen, "rx_outstanding": self.outstanding}

    def release_mem(self):
        self.base = NULL
        self.mem = None


cdef class TxRing:
    """The transmit ring of one socket: copies frames in, asks the kernel to send them."""

    cdef uint8_t *base
    cdef object mem
    cdef readonly uint32_t frame_size, frame_nr, head, max_len
    cdef readonly uint32_t tail, sent, queued, unsent  # see the module's docstring
    cdef readonly uint64_t frames, bytes, ring_full, too_big, out_of_buffer, kick_errors, kicks, refused
    cdef uint8_t macs[12]
    cdef bint rewrite_macs

    def __cinit__(self, uint8_t[::1] mem not None, uint32_t frame_size, uint32_t frame_nr):
        if frame_size < 128 or frame_size % 16 or <uint64_t>frame_size * frame_nr > <uint64_t>mem.shape[0]:
            raise ValueError(f"ring of {frame_nr} x {frame_size} does not fit a mapping of {mem.shape[0]} bytes")
        self.mem = mem
        self.base = &mem[0]
        self.frame_size = frame_size
        self.frame_nr = frame_nr
        self.max_len = frame_size - HN_TPACKET2_DATA_OFF

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

    def fill(self, const uint8_t[::1] buf not None, const uint32_t[::1] offsets not None,
             const uint32_t[::1] lengths not None, const int64_t[::1] idx not None):
        """Copy frames `idx` of a batch into the ring; returns how many were queued.
        A frame that does not fit a ring frame, lies outside `buf`, or finds the ring
        full is not sent and is counted."""
        cdef Py_ssize_t k, n = idx.shape[0], nframes = offsets.shape[0]
        cdef uint64_t buflen = buf.shape[0]
        cdef int64_t i
        cdef uint32_t off, ln, queued = 0
        cdef uint8_t *frame
        cdef const uint8_t *src = &buf[0] if buflen else NULL
        if lengths.shape[0] < nframes:
            nframes = lengths.shape[0]
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
                if ln > self.max_len:
                    self.too_big += 1
                    continue
                if self.queued == self.frame_nr:
                    self._reap()
                    if self.queued == self.frame_nr:
                        self.ring_full += n - k
                        break
                frame = self.base + <uint64_t>self.head * self.frame_size
                memcpy(frame + HN_TPACKET2_DATA_OFF, src + off, ln)
                if self.rewrite_macs:
                    memcpy(frame + HN_TPACKET2_DATA_OFF, self.macs, 12)
                (<tpacket2_hdr *>frame).tp_len = ln
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
                "tx_refused": self.refused, "tx_kick_errors": self.kick_errors}

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

"""PACKET_MMAP ports: one Linux interface, a TPACKET_V3 (or V2) receive ring and a
TPACKET_V2 transmit ring, frames rewritten where the kernel put them and copied once on send.

::

      kernel (veth / NIC driver)                       hypernat-nic
   ──► rx socket ─► RX ring (mmap) ──── recv() ─► Batch views the ring ─► fast path
        ETH_P_ALL,   status USER                       (frames rewritten in place)
        IGNORE_OUTGOING                                         │ send(batch, idx)
                                                                ▼
   ◄── tx socket ◄─ TX ring (mmap) ◄── one memcpy per frame ◄───┘  release(batch):
        QDISC_BYPASS  status SEND_REQUEST, kick = send(NULL, 0)      rx frames back

Why these choices:

* **TPACKET_V2 on receive by default, TPACKET_V3 selectable** (``rx_ring="v3"``, the
  config's ``nics[].rx_ring``): the default keeps a lone frame's hand-over at ~10 µs,
  V3 trades ~1 ms of it for about a third of the memory (below).  A TPACKET_V2 slot must hold a whole super-frame
  (~68 KB), so a ring deep enough for 64-byte traffic costs hundreds of MB per port
  (``RX_RING_BYTES``: 256 MB, ~3850 slots).  V3 packs frames back to back into blocks
  (a 64-byte frame takes ~160 bytes of a block, a super-frame what it needs): 32 MB
  (``RX_V3_BYTES``) hold ~200k small frames.  Measured (same runs): 64-byte UDP through
  the no-op forwarder and HyperNAT and bulk TCP with offloads on, V3 at least as fast
  as V2.  The price is latency when traffic is light: the kernel hands a block over
  when it is full or when its retire timer fires (``rx_block_ms``, default
  ``RX_BLOCK_MS`` = 1 ms, the smallest the kernel takes), so a lone frame waits for the
  timer: measured p50 ~1 ms, p99 ~6 ms (V2: ~10 µs).  Where that matters more than
  memory, keep V2 (the default).  The receive walk is in Cython without the GIL (``_ring.pyx``:
  ``RxRingV3`` and ``RxRing``, one per-frame reading shared by both), one call per
  batch; a V3 block goes back to the kernel once every batch that took frames from it
  is released.
* **Two sockets.**  The receive socket is bound with ``ETH_P_ALL`` (the daemon also
  wants ARP) and sets ``PACKET_IGNORE_OUTGOING`` so our own transmissions are not
  read back; the transmit socket is bound with protocol 0 so it receives nothing and
  costs the kernel no per-packet clone.
* **Qdisc bypass** on transmit (``PACKET_QDISC_BYPASS``) without ``vnet``: frames go
  straight to the driver; a full driver queue is a counted drop, as on a NIC.  With
  ``vnet`` the frames take the qdisc path: only there does the kernel segment a
  super-frame in software for a link without TSO (the bypass drops it, ENOBUFS).
* **A send buffer the size of the ring**: a frame sent is an skb charged to the
  socket until it is freed, possibly far downstream; the default budget would let only
  a few hundred frames be in flight.
* **PACKET_LOSS** on transmit: a malformed frame the kernel rejects is skipped
  instead of stalling the ring.
* **A kick whenever a frame waits**, not only when this call queued one: a frame the
  device refuses (ENOBUFS: backlog full, queue stopped, carrier off) stays in the ring
  as SEND_REQUEST and the kernel stops there until the next kick.  ``send`` kicks while
  any frame waits, and ``flush`` (the loop's every turn) does the same when nothing new
  arrives, so a direction recovers from back-pressure by itself; refusals are counted
  (``tx_refused``), and frames that find the ring full are dropped and counted
  (``tx_ring_full``).
* **PACKET_VNET_HDR** on both rings (``vnet``, the default): every frame comes with
  the kernel's ``virtio_net_hdr``, so offloads stay on.  A GRO-merged or TSO-built
  super-frame (up to 64 KB) is translated once and sent back with its GSO type and
  size (the kernel or the NIC segments it); its partial checksum stays partial (the
  fast path updates the pseudo-header sum: docs/fastpath.md, "Partial checksums and
  super-frames").  A partial frame that is not a super-frame has its checksum
  finished on receive.  A ring frame must hold a whole super-frame: the frame size
  follows the link's ``gso_max_size`` / ``gro_max_size`` (at most 64 KB), and the
  ring's frame count a memory budget (``RX_RING_BYTES``, ``TX_RING_BYTES``).  A header inconsistent with
  its frame is a counted drop (``rx_vnet_bad_gso``, ``rx_vnet_bad_csum``).
* **VLANs**: the kernel takes the 802.1Q tag off every frame it receives (keeping it
  in ``tp_vlan_tci``).  On a port configured for that VLAN (``vlans``, one per port)
  the tag is put back in place; any other tagged frame is dropped and counted
  (``rx_vlan_unconfigured``), never forwarded untagged.  On transmit the tag is the
  port's, as on a router's egress: every frame sent on a VLAN port carries its tag,
  every frame sent on a port without one leaves untagged.

The kernel still delivers every frame to its own stack as well: the gateway's
namespace must not forward them (ip_forward off; the lab does that).  Without
``vnet``, frames with an unfinished checksum are counted as ``rx_csum_partial`` and
not forwarded; frames longer than a ring frame are counted as ``rx_truncated``.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import socket
import struct

import numpy as np

from .base import Batch, Port

try:
    from ._ring import CONST, VNET_HDR_LEN, RxRing, RxRingV3, TxRing
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        f"hypernat.io._ring is not built ({exc}): `make build` or "
        "`HYPERNAT_BUILD_ONLY=hypernat.io._ring python setup.py build_ext --inplace`"
    ) from exc

ETH_P_ALL = 0x0003
SO_SNDBUFFORCE = 32
SIOCGIFHWADDR = 0x8927
PAGE = mmap.PAGESIZE
# Memory for one ring of super-frame slots (rx_frames / tx_frames = None).  A TPACKET_V2
# slot must hold a whole super-frame (~68 KB), so a ring of 64-byte frames is as deep as
# its budget allows: measured (64-byte UDP, no-op forwarder, same run) 0.05 Mpps with a
# 64 MB receive ring (~960 slots, the kernel drops what finds it full), 0.087-0.089 with
# 256 MB (~3850), 0.07-0.096 with classic 2 KB slots.  Transmit rings drain at once.
RX_RING_BYTES = 256 << 20
TX_RING_BYTES = 64 << 20
# The TPACKET_V3 receive ring: RX_V3_BYTES in blocks of at least RX_BLOCK_BYTES (a power
# of two: the kernel allocates each block as 2^order pages), each holding at least one
# whole super-frame; RX_BLOCK_MS the retire timer of a partly filled block.
RX_RINGS = ("v2", "v3")
RX_V3_BYTES = 32 << 20
RX_BLOCK_BYTES = 256 << 10
RX_BLOCK_MS = 1
V3_FRAME_SIZE = 2048  # tp_frame_size: V3 uses it only to count frames; frames are packed
SLOT_OVERHEAD = 128  # tpacket2_hdr + sockaddr_ll + virtio_net_hdr + a restored 802.1Q tag, aligned
MAX_SUPER_FRAME = 65536  # a larger gso/gro_max_size (BIG TCP) has no IPv4 total length to carry it


def link_limits(ifname: str) -> dict:
    """What the kernel may hand this interface's socket at once: its MTU and its
    ``gso_max_size`` / ``gro_max_size`` (asked in the current namespace)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links(ifname=ifname)
        if not links:
            raise PacketMmapError(19, f"no interface {ifname!r} in this namespace")
        ln = links[0]
        return {"mtu": ln.get_attr("IFLA_MTU") or 1500, "gso_max_size": ln.get_attr("IFLA_GSO_MAX_SIZE") or 0,
                "gro_max_size": ln.get_attr("IFLA_GRO_MAX_SIZE") or 0}


SO_ATTACH_FILTER = 26
SKF_AD_QUEUE = -0x1000 + 24  # classic BPF ancillary load: skb->queue_mapping


def queue_filter(ifname: str, queue: int) -> bytes:
    """A classic BPF program (``struct sock_fprog`` payload) that keeps the frames of
    receive queue `queue` only: one worker per queue of a multi-queue port, the NIC's
    RSS (or the sending veth's queue choice) being the switch.  A NIC driver records
    queue q as ``queue_mapping`` q + 1 (``skb_record_rx_queue``); veth, which has no
    bus device, hands the sender's queue over as it is."""
    import os

    recorded = 1 if os.path.exists(f"/sys/class/net/{ifname}/device") else 0
    return b"".join(struct.pack("HBBI", *i) for i in (
        (0x20, 0, 0, SKF_AD_QUEUE & 0xFFFFFFFF),  # A = queue_mapping
        (0x15, 0, 1, queue + recorded),           # A == q ? accept : drop
        (0x06, 0, 0, 0xFFFFFFFF),
        (0x06, 0, 0, 0)))


def link_problem(ifname: str, limits: dict, vnet: bool) -> str | None:
    """What this port needs from its link and does not get, in words (None: nothing).
    Super-frames above 64 KB (BIG TCP's ``gso_max_size`` / ``gro_max_size``) carry no
    IPv4 total length: neither a ring slot nor the fast path can take them."""
    if not vnet:
        return None
    big = {k: limits[k] for k in ("gso_max_size", "gro_max_size") if limits.get(k, 0) > MAX_SUPER_FRAME}
    if big:
        have = ", ".join(f"{k} {v}" for k, v in big.items())
        return (f"{ifname}: {have} above {MAX_SUPER_FRAME} (BIG TCP): IPv4 super-frames that large have no "
                f"total length; `ip link set dev {ifname} gso_max_size {MAX_SUPER_FRAME} "
                f"gro_max_size {MAX_SUPER_FRAME}`")
    return None


def slot_size(limits: dict, vnet: bool) -> int:
    """The ring frame size for a link: a whole super-frame with vnet, an MTU frame
    (at least the classic 2048 bytes) without."""
    frame = limits["mtu"] + 14 + 4
    if vnet:
        frame = max(frame, min(MAX_SUPER_FRAME, max(limits["gso_max_size"], limits["gro_max_size"])) + 14 + 4)
    size = max(2048, frame + SLOT_OVERHEAD)
    if size <= 2048:
        return 2048
    return -(-size // PAGE) * PAGE  # whole pages: a block then holds whole frames


class PacketMmapError(OSError):
    pass


def v3_request(frame_size: int, ring_bytes: int, block_ms: int, block_bytes: int = RX_BLOCK_BYTES) -> tuple:
    """A ``struct tpacket_req3`` for a receive ring of about `ring_bytes` in blocks of a
    power-of-two size, at least `block_bytes`, each holding a frame of `frame_size`
    behind the block's header: (request, bytes, block_size, block_nr)."""
    if not 1 <= block_ms <= 1000:
        raise ValueError(f"rx_block_ms {block_ms!r} is outside 1-1000")
    block = PAGE
    while block < max(block_bytes, frame_size + CONST["BLOCK_DESC_LEN"] + SLOT_OVERHEAD):
        block <<= 1
    if block > (1 << 26):
        raise ValueError(f"no block size for frames of {frame_size} bytes")
    nr = max(2, -(-ring_bytes // block))
    req = struct.pack("7I", block, nr, V3_FRAME_SIZE, block // V3_FRAME_SIZE * nr, block_ms, 0, 0)
    return req, block * nr, block, nr


def _ring_request(frame_size: int, frame_nr: int) -> tuple:
    """A ``struct tpacket_req`` whose blocks hold whole frames: (bytes, block_size, block_nr)."""
    if frame_size % 16 or frame_size < 128:
        raise ValueError("frame_size must be a multiple of 16, at least 128")
    block_size = PAGE
    while block_size < frame_size or block_size % frame_size:
        block_size += PAGE
        if block_size > (1 << 22):
            raise ValueError(f"no block size for frames of {frame_size} bytes")
    per_block = block_size // frame_size
    block_nr = max(1, -(-frame_nr // per_block))
    frame_nr = block_nr * per_block
    return struct.pack("IIII", block_size, block_nr, frame_size, frame_nr), block_size * block_nr, frame_nr


def interface_mac(sock: socket.socket, ifname: str) -> bytes:
    """The interface's MAC, asked of the kernel through `sock` (so in its namespace)."""
    res = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
    return res[18:24]


class PacketMmapPort(Port):
    """One interface over PACKET_MMAP rings.  Create it inside the interface's network
    namespace (the sockets stay there).

    ``rx_frames`` / ``tx_frames``: ring sizes in frames (rounded up to whole blocks;
    None: as many as ``RX_RING_BYTES`` / ``TX_RING_BYTES`` hold, at most 4096); ``frame_size``: bytes per
    ring frame (None: from the link, ``slot_size``; 2048 holds a 1500-byte MTU frame).
    ``vnet``: PACKET_VNET_HDR on both rings (super-frames, partial checksums);
    ``vlans``: the 802.1Q VLAN IDs this port carries; ``queue``: receive only what the
    link puts on that receive queue (one worker per queue).  ``rx_ring``: ``"v3"``
    (blocks: ``RX_V3_BYTES``, or ``rx_frames`` x ``frame_size`` when given; a partly filled
    block is handed over after ``rx_block_ms``; blocks of ``rx_block_bytes``, more where a
    frame of ``frame_size`` needs it) or ``"v2"`` (a slot per frame)."""

    def __init__(self, ifname: str, rx_frames: int | None = None, tx_frames: int | None = None,
                 frame_size: int | None = None, rx: bool = True, tx: bool = True, qdisc_bypass: bool | None = None,
                 vnet: bool = True, vlans=(), queue: int | None = None, rx_ring: str = "v2",
                 rx_block_ms: int = RX_BLOCK_MS, rx_block_bytes: int = RX_BLOCK_BYTES):
        if rx_ring not in RX_RINGS:
            raise ValueError(f"{ifname}: rx_ring {rx_ring!r} is not one of {', '.join(RX_RINGS)}")
        self.name = ifname
        self.rx_version = rx_ring
        self.rx_block_ms = rx_block_ms
        self.rx_block_bytes = rx_block_bytes
        self.rx_ring_bytes = self.tx_ring_bytes = 0  # the rings' mappings (kernel memory, in our RSS)
        self.queue = queue
        self.vnet = bool(vnet)
        self.vlans = tuple(int(v) for v in vlans)
        if len(self.vlans) > 1:
            raise ValueError(f"{ifname}: one VLAN per port (frames sent there carry its tag), got {self.vlans}")
        self.rx_sock = self.tx_sock = None
        self._rx_map = self._tx_map = None
        self.rx_ring = self.tx_ring = None
        self._rx_mem = self._tx_mem = None
        self._kernel = {"kernel_rx_packets": 0, "kernel_rx_drops": 0}
        self._mac = None
        self.tx_kick_errno = 0
        try:
            if frame_size is None or self.vnet:
                self.limits = link_limits(ifname)
                problem = link_problem(ifname, self.limits, self.vnet)
                if problem:
                    raise PacketMmapError(22, problem)
            if frame_size is None:
                frame_size = slot_size(self.limits, self.vnet)
            rx_bytes = rx_frames * frame_size if rx_frames else RX_V3_BYTES
            rx_frames = rx_frames or max(64, min(4096, RX_RING_BYTES // frame_size))
            tx_frames = tx_frames or max(64, min(4096, TX_RING_BYTES // frame_size))
            self.frame_size = frame_size
            if qdisc_bypass is None:
                # A super-frame the link cannot segment itself is cut by the kernel's
                # software GSO, which the bypass path (packet_direct_xmit) does not
                # reach: the frame is dropped with ENOBUFS.  Measured on 6.18.
                qdisc_bypass = not self.vnet
            if rx:
                self._open_rx(ifname, rx_frames, frame_size, rx_bytes)
            if tx:
                self._open_tx(ifname, tx_frames, frame_size, qdisc_bypass)
        except OSError as exc:
            self.close()
            raise PacketMmapError(exc.errno, f"PACKET_MMAP on {ifname!r}: {exc.strerror or exc}") from exc

    # setup ----------------------------------------------------------------
    def _open_rx(self, ifname, frames, frame_size, ring_bytes):
        c = CONST
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.rx_sock = s
        v3 = self.rx_version == "v3"
        s.setsockopt(c["SOL_PACKET"], c["PACKET_VERSION"], c["TPACKET_V3" if v3 else "TPACKET_V2"])
        if self.vnet:
            s.setsockopt(c["SOL_PACKET"], c["PACKET_VNET_HDR"], 1)
        try:
            s.setsockopt(c["SOL_PACKET"], c["PACKET_IGNORE_OUTGOING"], 1)
        except OSError:  # kernels before 4.20: we then see our own frames; count, not fatal
            self.ignore_outgoing = False
        else:
            self.ignore_outgoing = True
        if v3:
            req, size, block, nr = v3_request(frame_size, ring_bytes, self.rx_block_ms, self.rx_block_bytes)
        else:
            req, size, nr = _ring_request(frame_size, frames)
        s.setsockopt(c["SOL_PACKET"], c["PACKET_RX_RING"], req)
        self.rx_ring_bytes = size
        self._rx_map = mmap.mmap(s.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._rx_mem = np.frombuffer(self._rx_map, dtype=np.uint8)
        if v3:
            self.rx_ring = RxRingV3(self._rx_mem, block, nr, self.vnet, self.vlans)
        else:
            self.rx_ring = RxRing(self._rx_mem, frame_size, nr, self.vnet, self.vlans)
        if self.queue is not None:
            prog = queue_filter(ifname, self.queue)
            self._filter = ctypes.create_string_buffer(prog, len(prog))
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                         struct.pack("HL", len(prog) // 8, ctypes.addressof(self._filter)))
        # Bind last: frames start arriving only once the ring exists.
        s.bind((ifname, ETH_P_ALL))
        s.setblocking(False)

    def _open_tx(self, ifname, frames, frame_size, qdisc_bypass):
        c = CONST
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.tx_sock = s
        s.setsockopt(c["SOL_PACKET"], c["PACKET_VERSION"], c["TPACKET_V2"])
        if self.vnet:
            s.setsockopt(c["SOL_PACKET"], c["PACKET_VNET_HDR"], 1)
        if qdisc_bypass:
            s.setsockopt(c["SOL_PACKET"], c["PACKET_QDISC_BYPASS"], 1)
        s.setsockopt(c["SOL_PACKET"], c["PACKET_LOSS"], 1)
        req, size, nr = _ring_request(frame_size, frames)
        # Every frame in flight is an skb charged to this socket until it is freed
        # (downstream, maybe in another namespace): with the default sndbuf (~200 kB)
        # only a few hundred frames could be in flight and the ring would stall.
        want = 2 * size
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
        except OSError:  # not CAP_NET_ADMIN: what wmem_max allows
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        s.setsockopt(c["SOL_PACKET"], c["PACKET_TX_RING"], req)
        self.tx_ring_bytes = size
        self._tx_map = mmap.mmap(s.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._tx_mem = np.frombuffer(self._tx_map, dtype=np.uint8)
        self.tx_ring = TxRing(self._tx_mem, frame_size, nr, self.vnet)
        # A router's egress: frames leave with this link's tag (its one VLAN), or none.
        self.tx_ring.set_vlan(self.vlans[0] if self.vlans else 0)
        if self.vnet and getattr(self, "limits", None):
            self.tx_ring.set_max_plain(self.limits["mtu"] + 14 + 4)
        s.bind((ifname, 0))

    # Port -----------------------------------------------------------------
    def fileno(self) -> int:
        return self.rx_sock.fileno()

    def recv(self, max_frames: int = 256) -> Batch | None:
        """Frames waiting in the receive ring, as a Batch viewing the ring (no copy).
        Release it (``release``) once sent or copied, or the ring fills up."""
        if self.rx_ring is None:
            return None
        # Each batch owns its offsets/lengths: a batch may still be in use when the
        # next one is taken (the NIC loop holds misses until the slow path copied them).
        offsets = np.empty(max_frames, dtype=np.uint32)
        lengths = np.empty(max_frames, dtype=np.uint32)
        if self.vnet:
            meta = np.empty(max_frames * VNET_HDR_LEN, dtype=np.uint8)
            partial = np.empty(max_frames, dtype=np.uint8)
            start, taken, n = self.rx_ring.walk(offsets, lengths, max_frames, meta, partial)
        else:
            meta = partial = None
            start, taken, n = self.rx_ring.walk(offsets, lengths, max_frames)
        if taken == 0:
            return None
        return Batch(self._rx_mem, offsets, lengths, n, token=(start, taken), meta=meta, partial=partial)

    def release(self, batch: Batch) -> None:
        tok = batch.token
        if tok is None or self.rx_ring is None:
            return
        batch.token = None  # a second release is a no-op, never a double free
        self.rx_ring.release(*tok)

    def send(self, batch: Batch, idx) -> int:
        if self.tx_ring is None:
            raise PacketMmapError(0, f"{self.name}: opened without a transmit ring")
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if idx.size == 0:
            return 0
        buf = batch.buf if batch.buf.flags.c_contiguous else np.ascontiguousarray(batch.buf)
        if self.tx_ring.unsent:  # refused earlier: their turn first, and room for these
            self.flush()
        q = self.tx_ring.fill(buf, np.ascontiguousarray(batch.offsets, dtype=np.uint32),
                              np.ascontiguousarray(batch.lengths, dtype=np.uint32), idx, batch.meta)
        self.flush()
        return q

    def flush(self) -> int:
        ring = self.tx_ring
        if ring is None or not ring.unsent:  # nothing waits (the loop's every turn: one test)
            return 0
        unsent, err = ring.flush(self.tx_sock.fileno())
        if err:
            self.tx_kick_errno = err
        return unsent

    def set_macs(self, src: bytes | None, dst: bytes | None) -> None:
        """Rewrite the MACs of every frame this port sends (the no-op forwarder's L2)."""
        self.tx_ring.set_macs(src, dst)

    def mac(self) -> bytes:
        if self._mac is None:
            self._mac = interface_mac(self.rx_sock or self.tx_sock, self.name)
        return self._mac

    def kernel_stats(self) -> dict:
        """The kernel's own rx counters (``PACKET_STATISTICS``; reading resets them, so
        they are accumulated here).  ``kernel_rx_drops`` = ring full."""
        if self.rx_sock is not None:
            raw = self.rx_sock.getsockopt(CONST["SOL_PACKET"], CONST["PACKET_STATISTICS"], 8)
            packets, drops = struct.unpack("II", raw)
            self._kernel["kernel_rx_packets"] += packets
            self._kernel["kernel_rx_drops"] += drops
        return dict(self._kernel)

    def stats(self) -> dict:
        out = {}
        if self.rx_ring is not None:
            out.update(self.rx_ring.counters())
            out.update(self.kernel_stats())
        if self.tx_ring is not None:
            out.update(self.tx_ring.counters())
        return out

    def tx_pending(self) -> int:
        return self.tx_ring.pending() if self.tx_ring is not None else 0

    def close(self) -> None:
        for ring in (self.rx_ring, self.tx_ring):
            if ring is not None:
                ring.release_mem()
        self.rx_ring = self.tx_ring = None
        self._rx_mem = self._tx_mem = None
        for m in (self._rx_map, self._tx_map):
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a Batch still views the ring: the GC unmaps it later
                    pass
        self._rx_map = self._tx_map = None
        for s in (self.rx_sock, self.tx_sock):
            if s is not None:
                s.close()
        self.rx_sock = self.tx_sock = None

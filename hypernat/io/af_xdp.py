"""AF_XDP ports (optional): libxdp's xsk API, copy mode, one socket per queue of an
interface, one XDP program per interface shared by its sockets.

::

     NIC/veth ─► XDP program (_xsk.pyx): IPv4 / 802.1Q IPv4 ─► XSKMAP[rx queue] ─► RX ring ─► recv()
                                         other ─► kernel (ARP answered there, neighbours learned)
     send(batch, idx): one memcpy into a free UMEM frame (the port's VLAN tag set) ─► TX ring ─► kick

Compared with PACKET_MMAP the kernel's stack never touches the IPv4 frames (no skb on
the receive side in native mode), which is where AF_XDP's extra speed comes from.  ARP
and every non-IPv4 frame still reach the kernel because our XDP program passes them:
the daemon needs no ARP code of its own on this backend either (``hypernat.l2`` stays
available for addresses the kernel does not own).

**Queues** (one worker per queue): a port names its ``queue``; the first socket of an
interface attaches the program, the next ones (other queues, other processes) join it
through its BPF link, so it stays attached until the last socket closes.  The program
redirects each frame to the socket of the queue it arrived on.  On veth the receive
queue is the sender's transmit queue (its flow hash, XPS off); native XDP needs at
least as many receive queues as the peer has transmit queues (``lab up --queues N``
gives both ends N); generic XDP on veth sees every frame on queue 0, so several queues
need native mode.

**VLANs** (``vlans``, one per port, as on PACKET_MMAP): a tag the driver took off (veth:
always, whatever ``rx-vlan-offload`` says, when the sender's VLAN device or tc left it
as metadata) is not in the frame XDP sees.  Natively the program is device-bound and
asks the driver for it (``bpf_xdp_metadata_rx_vlan_tag``, Linux 6.8+: veth, ice,
...) and puts it back in front; a tag it cannot put back (no headroom) drops the frame,
counted ``rx_vlan_lost``.  ``recv`` then drops and counts a frame of another VLAN
(``rx_vlan_unconfigured``) or an untagged one on a VLAN port (``rx_vlan_missing``):
never forwarded untagged.  On transmit every frame carries the port's tag (or none).
Generic XDP has no driver metadata: a VLAN port refuses it.  A NIC driver without the
metadata op answers EOPNOTSUPP: the tag is then seen only with VLAN stripping off,
which the port asks for (``rxvlan_off`` in its stats).

Built only where pkg-config finds libxdp and libbpf (``_xsk.pyx`` says so on its first
line); ``import hypernat.io.af_xdp`` raises ImportError elsewhere.  Needs CAP_NET_ADMIN
and CAP_BPF (root).  Zero-copy is not used: veth has none (EOPNOTSUPP).
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import socket
import struct
import time

import numpy as np

from .base import Batch, Port

try:
    from ._xsk import XskError, XskSocket
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(f"hypernat.io._xsk is not built ({exc}): install libxdp-dev and libbpf-dev, `make build`") from exc

SIOCGIFHWADDR = 0x8927


# The kernel frees a closed AF_XDP socket asynchronously: for a moment after a close
# (a daemon restarted at once, a test reopening a port) the queue is still bound and
# xsk_socket__create fails with EBUSY.  Asked again, within this bound.
BUSY_RETRY_S = 2.0


def _rxvlan_off(ifname: str) -> bool:
    """Turn the link's VLAN stripping off (``ethtool -K IF rxvlan off``); True if it is
    off now (or the link has none to turn off)."""
    import subprocess

    try:
        subprocess.run(["ethtool", "-K", ifname, "rxvlan", "off"], capture_output=True, timeout=5)
        p = subprocess.run(["ethtool", "-k", ifname], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    for ln in p.stdout.splitlines():
        if ln.strip().startswith("rx-vlan-offload:"):
            return "off" in ln.split(":", 1)[1]
    return p.returncode == 0


def _queues(ifname: str) -> int | None:
    """How many queue pairs the link has now (``ethtool -l``: the lesser of its current
    receive and transmit channels, combined ones counted in both; None: unknown).
    Asked in the current namespace."""
    import subprocess

    try:
        p = subprocess.run(["ethtool", "-l", ifname], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0 or "Current hardware settings:" not in p.stdout:
        return None
    cur = {}
    for ln in p.stdout.split("Current hardware settings:", 1)[1].splitlines():
        k, _, v = ln.partition(":")
        cur[k.strip()] = int(v) if v.strip().isdigit() else 0
    both = cur.get("Combined", 0)
    n = min(both + cur.get("RX", 0), both + cur.get("TX", 0))
    return n or None


class AfXdpPort(Port):
    """One receive/transmit queue of an interface over an AF_XDP socket.  Create it
    inside the interface's network namespace.  ``mode``: "auto" (native where the
    driver has XDP, else generic), "native" or "skb".  ``queue``: the queue pair this
    socket serves (one worker per queue: every socket of the port shares one XDP
    program, which redirects each frame to the socket of the queue it arrived on).
    ``vlans``: the 802.1Q VLAN IDs this port carries (one; frames sent carry its tag)."""

    def __init__(self, ifname: str, frames: int = 8192, frame_size: int = 2048, ring_size: int = 2048,
                 mode: str = "auto", queue: int = 0, vlans=()):
        self.name = ifname
        self.queue = queue
        self.vlans = tuple(int(v) for v in vlans)
        if len(self.vlans) > 1:
            raise ValueError(f"{ifname}: one VLAN per port (frames sent there carry its tag), got {self.vlans}")
        # VLANs (module docstring): stripping off where the driver honours it.
        self.rxvlan_off = _rxvlan_off(ifname)
        queues = _queues(ifname)
        if queues is not None and queue >= queues:
            raise XskError(errno.EINVAL, f"AF_XDP on {ifname!r}: queue {queue}, but the link has {queues} queue "
                                         f"pair(s) (`ethtool -L {ifname} combined N`, or `rx N tx N` on veth)")
        self._map = mmap.mmap(-1, frames * frame_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._mem = np.frombuffer(self._map, dtype=np.uint8)
        deadline = time.monotonic() + BUSY_RETRY_S
        try:
            while True:  # (inline: a helper's frame in the traceback would pin the buffer)
                try:
                    self.xsk = XskSocket(ifname, self._mem, frame_size, queue, ring_size, mode)
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise
                time.sleep(0.02)
        except BaseException:
            self._mem = None
            self._map.close()
            raise
        self.mode = self.xsk.mode
        if self.vlans and not self.xsk.vlan_kfunc:
            self.close()
            raise XskError(errno.EOPNOTSUPP, f"AF_XDP on {ifname!r}: VLAN {self.vlans[0]} needs native XDP with "
                                             "the driver's VLAN metadata (bpf_xdp_metadata_rx_vlan_tag; here: "
                                             f"{self.mode} mode without it): a tag the driver strips would be "
                                             "lost; use packet_mmap")
        # A router's egress: frames leave with this link's tag (its one VLAN), or none.
        self.xsk.set_vlans(self.vlans, self.vlans[0] if self.vlans else 0)
        # Asked now, while we are in the interface's namespace (the port may be used
        # from another thread or namespace later).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
        self._mac = res[18:24]
        self._frame_size = frame_size

    def fileno(self) -> int:
        return self.xsk.fileno()

    def recv(self, max_frames: int = 256) -> Batch | None:
        offsets = np.empty(max_frames, dtype=np.uint32)
        lengths = np.empty(max_frames, dtype=np.uint32)
        addrs = np.empty(max_frames, dtype=np.uint64)
        n = self.xsk.recv(offsets, lengths, addrs, max_frames)
        if n == 0:
            return None
        return Batch(self._mem, offsets, lengths, n, token=addrs[:n])

    def release(self, batch: Batch) -> None:
        tok = batch.token
        if tok is None:
            return
        batch.token = None
        self.xsk.release(tok, len(tok))

    def send(self, batch: Batch, idx) -> int:
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if idx.size == 0:
            return 0
        return self.xsk.send(np.ascontiguousarray(batch.buf), np.ascontiguousarray(batch.offsets, dtype=np.uint32),
                             np.ascontiguousarray(batch.lengths, dtype=np.uint32), idx)

    def flush(self) -> int:
        return self.xsk.flush() if self.xsk is not None else 0

    def set_macs(self, src: bytes | None, dst: bytes | None) -> None:
        self.xsk.set_macs(src, dst)

    def mac(self) -> bytes:
        return self._mac

    def stats(self) -> dict:
        """Numeric counters only (metrics take them as they are); the XDP mode is
        ``.mode``."""
        if self.xsk is None:
            return {}
        return dict(self.xsk.counters(), **self.xsk.kernel_counters(), xdp_native=int(self.mode == "native"),
                    rxvlan_off=int(self.rxvlan_off), xdp_vlan_metadata=int(self.xsk.vlan_kfunc))

    def close(self) -> None:
        if self.xsk is not None:
            self.xsk.close()
            self.xsk = None
        self._mem = None
        try:
            self._map.close()
        except BufferError:  # a Batch still views UMEM: unmapped when it goes
            pass


__all__ = ["AfXdpPort", "XskError"]

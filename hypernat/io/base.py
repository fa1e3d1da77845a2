"""The packet-I/O interface the NIC worker loop runs over.

A *port* is one interface of one NIC (inside or outside).  The loop asks a port for a
batch of received frames, runs the fast path over the batch in place, and hands the
frames to send to the *other* port:

    inside.recv() ──► Batch ──► Translator.translate(OUT) ──► outside.send(batch, idx)
                                                    misses ──► slow path (copies them)
    inside.release(batch)   # rx frames go back to the ring only after send/copy

A Batch may view a kernel ring directly (PACKET_MMAP, AF_XDP UMEM): frames are
rewritten where they lie and copied once, into the transmit ring.  A backend that
reads the kernel's per-frame metadata (PACKET_MMAP with PACKET_VNET_HDR) hands it
over with the batch: ``meta`` (one ``virtio_net_hdr`` record per frame, META_DTYPE,
as raw bytes) and ``partial`` (1 where the frame's L4 checksum field holds only the
pseudo-header sum: a super-frame, finished by whoever segments it).  The fast path
takes ``partial``; the transmit side writes ``meta`` back.  Backends:
memory (tests, emulated deployment), packet_mmap (always), af_xdp (where libxdp is),
pcap (offline).
"""
from __future__ import annotations

from itertools import accumulate

import numpy as np

# One virtio_net_hdr (include/uapi/linux/virtio_net.h), little-endian as the kernel
# writes it for PACKET_VNET_HDR: the per-frame metadata of a Batch.
META_DTYPE = np.dtype([("flags", np.uint8), ("gso_type", np.uint8), ("hdr_len", "<u2"),
                       ("gso_size", "<u2"), ("csum_start", "<u2"), ("csum_offset", "<u2")])
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80


def finish_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """Do what checksum offload would: sum the frame from ``csum_start`` (the field at
    ``csum_start + csum_offset`` holds the pseudo-header sum) and store the
    complement there.  For frames leaving a batch as copies (the slow path)."""
    end = len(frame)
    if frame[12:14] == b"\x81\x00":
        l3 = 18
    else:
        l3 = 14
    if end >= l3 + 4 and frame[l3] >> 4 == 4:
        end = min(end, l3 + int.from_bytes(frame[l3 + 2:l3 + 4], "big"))
    if csum_start + csum_offset + 2 > end:
        return
    data = bytes(frame[csum_start:end]) + b"\0" * ((end - csum_start) & 1)
    s = int(np.frombuffer(data, dtype=">u2").sum(dtype=np.uint64))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    if s == 0 and frame[l3 + 9] == 17:
        s = 0xFFFF
    frame[csum_start + csum_offset:csum_start + csum_offset + 2] = s.to_bytes(2, "big")


class Batch:
    """Frames stored in one uint8 buffer, frame i at buf[offsets[i]:offsets[i]+lengths[i]].

    Only the first `n` entries of offsets/lengths are valid.  `buf` is writable.
    ``meta`` / ``partial``: the per-frame metadata (module docstring), or None.
    """

    __slots__ = ("buf", "offsets", "lengths", "n", "token", "meta", "partial")

    def __init__(self, buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, n: int, token=None,
                 meta=None, partial=None):
        self.buf = buf
        self.offsets = offsets
        self.lengths = lengths
        self.n = n
        self.token = token  # backend's handle for release()
        self.meta = meta  # uint8, META_DTYPE.itemsize bytes a frame
        self.partial = partial  # uint8, one a frame

    def meta_records(self) -> np.ndarray | None:
        """``meta`` as META_DTYPE records (a view), or None."""
        return None if self.meta is None else self.meta[: self.n * META_DTYPE.itemsize].view(META_DTYPE)

    @classmethod
    def from_frames(cls, frames, capacity: int | None = None) -> "Batch":
        """A batch holding copies of `frames` (bytes-like), back to back: one join, and
        the lengths and offsets in one or two numpy calls (no Python step per frame)."""
        if not isinstance(frames, (list, tuple)):
            frames = list(frames)
        n = len(frames)
        cap = max(n, capacity or 0)
        if cap == 1:  # one frame (a replayed first packet): the least numpy possible
            f = frames[0] if n else b""
            lengths = np.zeros(1, dtype=np.uint32)
            lengths[0] = len(f)
            buf = np.frombuffer(bytearray(f) if len(f) else bytearray(1), dtype=np.uint8)
            return cls(buf, np.zeros(1, dtype=np.uint32), lengths, n)
        if n <= 16:  # a few frames: offsets added up in Python
            lens = list(map(len, frames))
            if cap == n and n:
                lengths = np.array(lens, dtype=np.uint32)
                offsets = np.array([0, *accumulate(lens[:-1])], dtype=np.uint32)
            else:
                lengths = np.zeros(cap, dtype=np.uint32)
                offsets = np.zeros(cap, dtype=np.uint32)
                if n:
                    lengths[:n] = lens
                    offsets[1:n] = list(accumulate(lens[:-1]))
        else:
            lengths = np.zeros(cap, dtype=np.uint32)
            lengths[:n] = np.fromiter(map(len, frames), np.uint32, n)
            offsets = np.zeros(cap, dtype=np.uint32)
            np.cumsum(lengths[: n - 1], dtype=np.uint32, out=offsets[1:n])
        buf = np.frombuffer(bytearray().join(frames) or bytearray(1), dtype=np.uint8)
        return cls(buf, offsets, lengths, n)

    def select(self, idx) -> "Batch":
        """Frames `idx` of this batch (in that order) as a batch of their own over the
        same buffer: no frame is copied, and what the fast path rewrites in the
        selection is rewritten in this batch's buffer.  Offsets, lengths and the
        per-frame metadata are gathered (one numpy call each); a translation that
        lowers a super-frame's gso_size writes it in the selection's ``meta``, which is
        what a send of the selection hands to the ring.  Valid while this batch is (a
        ring's batch: until it is released); of this batch's class (a kind of batch
        says what may happen to its buffer: the selection shares it)."""
        ia = np.asarray(idx, dtype=np.intp)
        meta = partial = None
        if self.partial is not None:
            partial = self.partial[ia]
        if self.meta is not None:
            meta = self.meta[: self.n * META_DTYPE.itemsize].reshape(-1, META_DTYPE.itemsize)[ia].reshape(-1)
        return type(self)(self.buf, self.offsets[ia], self.lengths[ia], len(ia), meta=meta, partial=partial)

    def frames_of(self, idx, tags=None) -> "Frames":
        """Frames `idx` (an integer index array) for whoever copies them out of the batch at
        once (the fetch tables' arena): a view (offsets and lengths gathered, no frame
        copied); `tags` one each (uint8) or None.  A partial checksum among them is finished the way
        ``frames`` does it, in copies of those frames."""
        n = len(idx)
        if self.partial is not None and n and self.partial[idx].any():
            return Frames.of(self.frames(idx), tags)
        if n == 1:  # one frame (a new connection's first packet): views, not gathers
            i = int(idx[0])
            return Frames(self.buf, self.offsets[i:i + 1], self.lengths[i:i + 1], tags, 1)
        return Frames(self.buf, self.offsets[idx], self.lengths[idx], tags, n)

    def frame(self, i: int) -> bytes:
        o = int(self.offsets[i])
        return self.buf[o : o + int(self.lengths[i])].tobytes()

    def frames(self, idx=None) -> list[bytes]:
        """Copies of frames `idx` (all n when None), in that order.  A copy leaves its
        metadata behind: a partial checksum is finished in it (``finish_checksum``)."""
        if idx is not None and not hasattr(idx, "__len__"):
            idx = list(idx)
        out = self._copies(idx)
        if self.partial is not None and self.partial[: self.n].any():
            ids = range(self.n) if idx is None else [int(i) for i in idx]
            rec = self.meta_records()
            for j, i in enumerate(ids):
                if self.partial[i]:
                    f = bytearray(out[j])
                    finish_checksum(f, int(rec["csum_start"][i]), int(rec["csum_offset"][i]))
                    out[j] = bytes(f)
        return out

    def _copies(self, idx) -> list[bytes]:
        if idx is None:
            idx = range(self.n)
        elif not hasattr(idx, "__len__"):
            idx = list(idx)
        if len(idx) == 1:
            i = int(idx[0])
            o = self.offsets.item(i)
            return [self.buf[o : o + self.lengths.item(i)].tobytes()]
        if len(idx) <= 16:  # a few: item() per index beats a gather
            oi, li = self.offsets.item, self.lengths.item
            pos = [(oi(int(i)), li(int(i))) for i in idx]
        else:
            ia = np.asarray(idx, dtype=np.intp)
            pos = zip(self.offsets[ia].tolist(), self.lengths[ia].tolist())
        try:
            mv = memoryview(self.buf)
        except (TypeError, ValueError):  # a buffer without the buffer protocol: numpy slices
            b = self.buf
            return [b[o : o + ln].tobytes() for o, ln in pos]
        return [mv[o : o + ln].tobytes() for o, ln in pos]


NO_FRAME = 0xFFFFFFFF  # a Frames offset: no frame for this row


class Frames:
    """Frames back to back in one uint8 buffer, each with a tag byte: frame i at
    buf[offsets[i]:offsets[i]+lengths[i]], tag tags[i] (tags None: all 0).  What the
    fetch tables take (a view of a batch's frames, ``Batch.frames_of``: frame i the frame
    of fetch row i; offsets[i] == NO_FRAME: the row has none) and what they hand back
    (the frames of the answered fetches, copies out of their arena: the ``replay``
    callback's argument, ``batch()`` its frames as a Batch, no Python object per frame).
    The tag of a hairpinned frame is its hairpin decisions so far (0: not hairpinned).
    Iterating yields each frame as bytes (introspection, tests)."""

    __slots__ = ("buf", "offsets", "lengths", "tags", "n")
    __hash__ = None

    def __init__(self, buf, offsets, lengths, tags=None, n=None):
        self.buf = buf
        self.offsets = offsets
        self.lengths = lengths
        self.tags = tags
        self.n = len(offsets) if n is None else n

    @classmethod
    def of(cls, frames, tags=None) -> "Frames":
        """Frames (bytes-like, or None: no frame) copied back to back; `tags` one each or
        None (a ``RuleAgent.fetch`` of one frame, tests, the pure-Python table)."""
        if isinstance(frames, Frames):
            return frames
        frames = list(frames)
        n = len(frames)
        lengths = np.fromiter((0 if f is None else len(f) for f in frames), np.uint32, n)
        offsets = np.zeros(n, np.uint32)
        if n > 1:
            np.cumsum(lengths[:-1], dtype=np.uint32, out=offsets[1:])
        if any(f is None for f in frames):
            offsets[[j for j, f in enumerate(frames) if f is None]] = NO_FRAME
        buf = np.frombuffer(bytearray().join(f for f in frames if f is not None) or bytearray(1), np.uint8)
        if tags is not None:
            tags = np.asarray(tags, np.uint8).reshape(-1)
            if len(tags) != n:
                raise ValueError(f"{len(tags)} tags for {n} frames")
            if not tags.any():
                tags = None
        return cls(buf, offsets, lengths, tags, n)

    def __len__(self):
        return self.n

    def __bool__(self):
        return self.n > 0

    def frame(self, i: int):
        o = int(self.offsets[i])
        return None if o == NO_FRAME else bytes(self.buf[o:o + int(self.lengths[i])])

    def __iter__(self):
        return iter(self.tolist())

    def tolist(self) -> list:
        """Each frame as bytes (None: none)."""
        b = self.buf
        return [None if o == NO_FRAME else b[o:o + ln].tobytes()
                for o, ln in zip(self.offsets[:self.n].tolist(), self.lengths[:self.n].tolist())]

    def tag_list(self) -> list:
        return [0] * self.n if self.tags is None else self.tags[:self.n].tolist()

    def __eq__(self, other):
        if isinstance(other, Frames):
            return self.tolist() == other.tolist() and self.tag_list() == other.tag_list()
        if isinstance(other, list):
            return self.tolist() == other
        return NotImplemented

    def __repr__(self):
        return f"Frames({self.tolist()!r}, tags={self.tag_list()!r})"

    def select(self, idx) -> "Frames":
        """Frames `idx` (an index array), over the same buffer."""
        idx = np.asarray(idx, np.intp)
        return Frames(self.buf, self.offsets[idx], self.lengths[idx], None if self.tags is None else self.tags[idx],
                      len(idx))

    def batch(self) -> "Batch":
        """The frames as a Batch over the same buffer (no copy)."""
        return Batch(self.buf, self.offsets, self.lengths, self.n)


# The transmit counters every ring backend reports in ``stats()`` (declared here once;
# tests/test_io_tx_backpressure.py holds each backend to it).
TX_COUNTERS = {
    "tx_frames": "frames queued for transmission",
    "tx_bytes": "bytes queued for transmission",
    "tx_ring_full": "frames dropped: the transmit ring held no free frame",
    "tx_too_big": "frames dropped: longer than a ring frame",
    "tx_bad_frame": "frames dropped: index or extent outside the batch",
    "tx_kicks": "times the kernel was asked to send what waits in the ring",
    "tx_refused": "kicks the kernel answered 'not now' (ENOBUFS/EAGAIN/EBUSY/ENETDOWN: device backlog "
                  "full, queue stopped, link down, send budget spent); the frames wait for the next kick",
    "tx_kick_errors": "kicks that failed for another reason (errno in tx_kick_errno where kept)",
}


class Port:
    """One interface of one NIC.  Non-blocking; `fileno()` is pollable (zmq.Poller)."""

    name: str = "?"

    def fileno(self) -> int:
        raise NotImplementedError

    def recv(self, max_frames: int = 256) -> Batch | None:
        """Frames waiting now (at most max_frames), or None.  Never blocks."""
        raise NotImplementedError

    def send(self, batch: Batch, idx: np.ndarray) -> int:
        """Queue batch frames `idx` for transmission; returns how many were queued
        (the rest are counted as tx drops by the backend).  Never blocks."""
        raise NotImplementedError

    def send_frames(self, frames) -> int:
        """Send frames built by the slow path (bytes-like)."""
        b = Batch.from_frames(frames)
        return self.send(b, np.arange(b.n))

    def flush(self) -> int:
        """Ask the kernel again to send frames queued earlier that it has not taken yet
        (a device that refused a frame — backlog full, queue stopped — leaves it, and
        everything behind it, waiting for the next request).  Never blocks.  Returns how
        many still wait: while that is not zero, call again on the loop's next turn,
        soon; ``send`` flushes too."""
        return 0

    def release(self, batch: Batch) -> None:
        """Give the batch's receive buffers back (after send copied what it needed)."""

    def mac(self) -> bytes:
        """The interface's MAC address (6 bytes)."""
        raise NotImplementedError

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""The packet-I/O interface the NIC worker loop runs over.

A *port* is one interface of one NIC (inside or outside).  The loop asks a port for a
batch of received frames, runs the fast path over the batch in place, and hands the
frames to send to the *other* port:

    inside.recv() ──► Batch ──► Translator.translate(OUT) ──► outside.send(batch, idx)
                                                    misses ──► slow path (copies them)
    inside.release(batch)   # rx frames go back to the ring only after send/copy

A Batch may view a kernel ring directly (PACKET_MMAP, AF_XDP UMEM): frames are
rewritten where they lie and copied once, into the transmit ring.  Backends:
memory (tests, emulated deployment), packet_mmap (always), af_xdp (where libxdp is),
pcap (offline).
"""
from __future__ import annotations

import numpy as np


class Batch:
    """Frames stored in one uint8 buffer, frame i at buf[offsets[i]:offsets[i]+lengths[i]].

    Only the first `n` entries of offsets/lengths are valid.  `buf` is writable.
    """

    __slots__ = ("buf", "offsets", "lengths", "n", "token")

    def __init__(self, buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, n: int, token=None):
        self.buf = buf
        self.offsets = offsets
        self.lengths = lengths
        self.n = n
        self.token = token  # backend's handle for release()

    @classmethod
    def from_frames(cls, frames, capacity: int | None = None) -> "Batch":
        """A batch holding copies of `frames` (bytes-like), back to back."""
        frames = [bytes(f) for f in frames]
        cap = max(len(frames), capacity or 0)
        lengths = np.zeros(cap, dtype=np.uint32)
        offsets = np.zeros(cap, dtype=np.uint32)
        pos = 0
        for i, f in enumerate(frames):
            offsets[i] = pos
            lengths[i] = len(f)
            pos += len(f)
        buf = np.frombuffer(bytearray(b"".join(frames) or b"\0"), dtype=np.uint8)
        return cls(buf, offsets, lengths, len(frames))

    def frame(self, i: int) -> bytes:
        o = int(self.offsets[i])
        return self.buf[o : o + int(self.lengths[i])].tobytes()

    def frames(self, idx=None) -> list[bytes]:
        idx = range(self.n) if idx is None else idx
        return [self.frame(int(i)) for i in idx]


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

"""Memory backends of the packet-I/O interface: tests, the emulated deployment, benchmarks.

Three ports, all behind ``hypernat.io.base.Port`` so the NIC worker loop cannot tell
them from a real interface:

* ``MemoryPort`` — in one process: a bounded deque of frames per direction.  Tests
  ``inject()`` frames and ``take_tx()`` what the worker sent; two ports can be wired
  back to back with ``connect()``.
* ``ShmPort`` over two ``ShmRing`` — between processes: single-producer /
  single-consumer rings in ``multiprocessing.shared_memory``, one fixed-size slot per
  frame.  ``recv()`` hands out a zero-copy view of the ring (offsets computed with
  numpy, no per-frame Python work), ``release()`` gives the slots back.
* ``TracePort`` / ``SinkPort`` — benchmarks: a pre-built trace replayed batch after
  batch (one memcpy refreshes the pristine frames) and a sink that only counts, so a
  measurement sees the worker loop and the fast path, not the emulation.

Every port exposes a pollable ``fileno()`` (an eventfd that is readable while frames
are waiting), so ``zmq.Poller`` waits on packets and on the coordinator's socket at
once, without a timeout on the hot side:

      producer                     shared memory                       consumer
   ┌──────────┐  push()   ┌──────────────────────────────┐  recv()  ┌──────────┐
   │ switch / │ ───────►  │ head │ tail │ slot0 … slotN-1 │ ───────► │ NIC      │
   │ worker   │           └──────────────────────────────┘ release()│ worker   │
   └──────────┘ ── eventfd_write ──────────────────────────► poll ── └──────────┘

The ring never blocks: a full ring refuses frames and counts them as drops.
"""
from __future__ import annotations

import collections
import os
from multiprocessing import shared_memory

import numpy as np

from .base import Batch, Port

_HDR = 128  # head at byte 0, tail at byte 64: separate cache lines
DEFAULT_SLOT = 2048  # one Ethernet frame up to 1514 bytes (plus a VLAN tag)


class Notifier:
    """An eventfd: readable while the producer says there is work.  Inherited by
    forked children, so one end may live in another process."""

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def signal(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except (BlockingIOError, OSError):  # counter saturated or closed: a wakeup is pending anyway
            pass

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


def _default_mac(name: str) -> bytes:
    """A stable locally administered MAC derived from the port name."""
    import hashlib

    return b"\x02" + hashlib.sha1(name.encode()).digest()[:5]


class MemoryPort(Port):
    """In-process port: a bounded queue of received frames and a list of sent ones."""

    def __init__(self, name: str = "mem", capacity: int = 65536, mac: bytes | None = None):
        self.name = name
        self.capacity = capacity
        self._rx: collections.deque = collections.deque()
        self._tx: collections.deque = collections.deque()
        self._peer: MemoryPort | None = None
        self._note = Notifier()
        self._mac = mac or _default_mac(name)
        self.counters = {"rx_packets": 0, "tx_packets": 0, "rx_drops": 0}

    # -- test side ------------------------------------------------------------------
    def inject(self, frames) -> int:
        """Queue frames as if received on the wire; returns how many fitted."""
        n = 0
        for f in frames:
            if len(self._rx) >= self.capacity:
                self.counters["rx_drops"] += 1
                continue
            self._rx.append(bytes(f))
            n += 1
        if n:
            self._note.signal()
        return n

    def take_tx(self) -> list[bytes]:
        """Everything sent since the last call (when not connected to a peer)."""
        out = list(self._tx)
        self._tx.clear()
        return out

    def connect(self, peer: "MemoryPort") -> None:
        """Frames sent on this port are received by `peer` (one way)."""
        self._peer = peer

    def pending(self) -> int:
        return len(self._rx)

    # -- Port -----------------------------------------------------------------------
    def fileno(self) -> int:
        return self._note.fd

    def recv(self, max_frames: int = 256) -> Batch | None:
        self._note.clear()  # clear first: a frame injected after this re-signals
        if not self._rx:
            return None
        k = min(max_frames, len(self._rx))
        frames = [self._rx.popleft() for _ in range(k)]
        if self._rx:
            self._note.signal()
        self.counters["rx_packets"] += k
        return Batch.from_frames(frames)

    def send(self, batch: Batch, idx: np.ndarray) -> int:
        frames = batch.frames(idx)
        self.counters["tx_packets"] += len(frames)
        if self._peer is not None:
            return self._peer.inject(frames)
        self._tx.extend(frames)
        return len(frames)

    def mac(self) -> bytes:
        return self._mac

    def stats(self) -> dict:
        return dict(self.counters, rx_queued=len(self._rx))

    def close(self) -> None:
        self._note.close()


class ShmRing:
    """A single-producer single-consumer ring of fixed-size frame slots in shared memory.

    Layout: ``[head u64 | pad | tail u64 | pad][data nslots*slot_size][lengths u32*nslots]``.
    The producer owns ``tail``, the consumer owns ``head``; ``tail - head`` frames are
    waiting.  Create it in the parent, fork, and use one end in each process.
    """

    def __init__(self, nslots: int = 4096, slot_size: int = DEFAULT_SLOT, name: str | None = None):
        if nslots & (nslots - 1):
            raise ValueError("nslots must be a power of two")
        self.nslots = nslots
        self.slot_size = slot_size
        size = _HDR + nslots * slot_size + 4 * nslots
        self._shm = shared_memory.SharedMemory(create=True, size=size, name=name)
        self._owner_pid = os.getpid()
        buf = self._shm.buf
        self._head = np.ndarray((1,), dtype=np.uint64, buffer=buf, offset=0)
        self._tail = np.ndarray((1,), dtype=np.uint64, buffer=buf, offset=64)
        self.data = np.ndarray((nslots * slot_size,), dtype=np.uint8, buffer=buf, offset=_HDR)
        self.data2d = self.data.reshape(nslots, slot_size)
        self.lens = np.ndarray((nslots,), dtype=np.uint32, buffer=buf, offset=_HDR + nslots * slot_size)
        self._data_mv = memoryview(self.data)  # the frame slots as bytes (slice assignment copies)
        self._head[0] = 0
        self._tail[0] = 0
        self.note = Notifier()
        self.drops = 0  # frames refused because the ring was full or a frame too long

    def __len__(self) -> int:
        return int(self._tail[0] - self._head[0])

    def free(self) -> int:
        return self.nslots - len(self)

    # -- producer ---------------------------------------------------------------------
    # Frames are copied with memoryview slices (one C-level copy each, no numpy indexing
    # per frame: that cost ~1 us a frame, more than the fast path spends on it).
    def push_frames(self, frames) -> int:
        tail = int(self._tail[0])
        room = self.nslots - (tail - int(self._head[0]))
        mask, size = self.nslots - 1, self.slot_size
        data, lens = self._data_mv, self.lens
        n = 0
        for f in frames:
            ln = len(f)
            if n >= room or ln > size:
                self.drops += 1
                continue
            s = (tail + n) & mask
            o = s * size
            data[o : o + ln] = f if f.__class__ is bytes else bytes(f)
            lens[s] = ln
            n += 1
        if n:
            self._tail[0] = tail + n  # publish after the data (x86/aarch64 stores of numpy: see note)
            self.note.signal()
        return n

    def push_batch(self, batch: Batch, idx) -> int:
        tail = int(self._tail[0])
        room = self.nslots - (tail - int(self._head[0]))
        mask, size = self.nslots - 1, self.slot_size
        ia = np.asarray(idx, dtype=np.intp).reshape(-1)
        offs = batch.offsets[ia].tolist()
        lns = batch.lengths[ia].tolist()
        try:
            src = memoryview(batch.buf).cast("B") if batch.buf.ndim == 1 else None
        except (TypeError, ValueError):
            src = None
        data, lens = self._data_mv, self.lens
        n = 0
        slots, put = [], []
        for o, ln in zip(offs, lns):
            if n >= room or ln > size:
                self.drops += 1
                continue
            s = (tail + n) & mask
            d = s * size
            if src is not None:
                data[d : d + ln] = src[o : o + ln]
            else:
                self.data[d : d + ln] = batch.buf[o : o + ln]
            slots.append(s)
            put.append(ln)
            n += 1
        if n:
            lens[slots] = put
            self._tail[0] = tail + n
            self.note.signal()
        return n

    # -- consumer ---------------------------------------------------------------------
    def peek(self, max_frames: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Offsets and lengths of up to max_frames waiting frames (zero copy)."""
        head = int(self._head[0])
        n = min(max_frames, int(self._tail[0]) - head)
        if n <= 0:
            return None, None, 0
        slots = (head + np.arange(n, dtype=np.uint64)) & np.uint64(self.nslots - 1)
        offsets = (slots * np.uint64(self.slot_size)).astype(np.uint32)
        lengths = self.lens[slots.astype(np.intp)].copy()
        return offsets, lengths, n

    def consume(self, n: int) -> None:
        self._head[0] = int(self._head[0]) + n

    def pop_frames(self, max_frames: int = 1 << 30) -> list[bytes]:
        """Copy out and release waiting frames (the emulation's side)."""
        self.note.clear()
        offsets, lengths, n = self.peek(max_frames)
        out = []
        if n:
            mv = self._data_mv
            out = [mv[o : o + ln].tobytes() for o, ln in zip(offsets.tolist(), lengths.tolist())]
            self.consume(n)
        if len(self):
            self.note.signal()
        return out

    def close(self, unlink: bool | None = None) -> None:
        """Detach; the creating process also unlinks the segment."""
        self._head = self._tail = self.data = self.data2d = self.lens = None
        mv, self._data_mv = getattr(self, "_data_mv", None), None
        if mv is not None:
            mv.release()
        try:
            self._shm.close()
        except (BufferError, OSError):
            pass
        if unlink or (unlink is None and os.getpid() == self._owner_pid):
            try:
                self._shm.unlink()
            except (FileNotFoundError, OSError):
                pass


class ShmPort(Port):
    """A port over two rings: frames arrive on `rx`, are sent into `tx`.

    recv() returns a view of the rx ring (frames are rewritten in place there);
    release() hands the slots back to the producer.
    """

    def __init__(self, name: str, rx: ShmRing, tx: ShmRing, mac: bytes | None = None):
        self.name = name
        self.rx = rx
        self.tx = tx
        self._mac = mac or _default_mac(name)
        self.counters = {"rx_packets": 0, "tx_packets": 0, "tx_drops": 0}
        self._outstanding = 0

    def fileno(self) -> int:
        return self.rx.note.fd

    def recv(self, max_frames: int = 256) -> Batch | None:
        if self._outstanding:
            raise RuntimeError(f"{self.name}: recv() before release() of the previous batch")
        self.rx.note.clear()
        offsets, lengths, n = self.rx.peek(max_frames)
        if n == 0:
            return None
        if len(self.rx) > n:
            self.rx.note.signal()  # more waiting: stay readable
        self._outstanding = n
        self.counters["rx_packets"] += n
        return Batch(self.rx.data, offsets, lengths, n, token=n)

    def release(self, batch: Batch) -> None:
        if batch is not None and batch.token and self._outstanding:
            self.rx.consume(batch.token)
            self._outstanding = 0
            if len(self.rx):
                self.rx.note.signal()

    def send(self, batch: Batch, idx) -> int:
        n = self.tx.push_batch(batch, idx)
        self.counters["tx_packets"] += n
        self.counters["tx_drops"] += len(idx) - n
        return n

    def send_frames(self, frames) -> int:
        frames = list(frames)
        n = self.tx.push_frames(frames)
        self.counters["tx_packets"] += n
        self.counters["tx_drops"] += len(frames) - n
        return n

    def mac(self) -> bytes:
        return self._mac

    def stats(self) -> dict:
        return dict(self.counters, rx_queued=len(self.rx))


class TracePort(Port):
    """Replays a pre-built trace forever (benchmarks): each recv() restores the next
    batch's pristine bytes with one memcpy and hands it out."""

    def __init__(self, frames, batch_size: int = 256, name: str = "trace", rounds: int | None = None):
        self.name = name
        frames = list(frames)
        if not frames:
            raise ValueError("empty trace")
        self._batches = []
        for i in range(0, len(frames), batch_size):
            b = Batch.from_frames(frames[i : i + batch_size])
            self._batches.append((b, b.buf.copy()))
        self._i = 0
        self._left = None if rounds is None else rounds * len(self._batches)
        self._note = Notifier()
        self._note.signal()  # always readable
        self.counters = {"rx_packets": 0}

    def fileno(self) -> int:
        return self._note.fd

    def recv(self, max_frames: int = 256) -> Batch | None:
        if self._left is not None:
            if self._left <= 0:
                self._note.clear()
                return None
            self._left -= 1
        b, pristine = self._batches[self._i]
        self._i = (self._i + 1) % len(self._batches)
        np.copyto(b.buf, pristine)
        self.counters["rx_packets"] += b.n
        return b

    def send(self, batch: Batch, idx) -> int:
        return len(idx)

    def mac(self) -> bytes:
        return _default_mac(self.name)

    def stats(self) -> dict:
        return dict(self.counters)

    def close(self) -> None:
        self._note.close()


class SinkPort(Port):
    """Counts what is sent to it; never receives."""

    def __init__(self, name: str = "sink"):
        self.name = name
        self._note = Notifier()
        self.counters = {"tx_packets": 0}

    def fileno(self) -> int:
        return self._note.fd

    def recv(self, max_frames: int = 256) -> Batch | None:
        return None

    def send(self, batch: Batch, idx) -> int:
        self.counters["tx_packets"] += len(idx)
        return len(idx)

    def send_frames(self, frames) -> int:
        n = len(list(frames))
        self.counters["tx_packets"] += n
        return n

    def mac(self) -> bytes:
        return _default_mac(self.name)

    def stats(self) -> dict:
        return dict(self.counters)

    def close(self) -> None:
        self._note.close()

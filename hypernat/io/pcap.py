"""pcap files: an offline packet source and sink, and ``run_pcap`` — the gateway's
translation of a capture, frame by frame, for debugging and golden tests.

::

   IN.pcap ──read──► classify by address ──► batches of consecutive frames of one
   (or pcapng)        src ∈ internal → OUT    direction ──► Translator.translate(dir)
                      dst ∈ pool     → IN                    │ misses ─► RuleBuilder
                      else: counted                          │ (replayed once)
                                                             ▼
   OUT.pcap ◄──write, in input order, with the input timestamps── frames to send

``run_pcap`` returns (and ``hypernat-nic --pcap-in/--pcap-out`` prints) a summary of
counters: frames read and written, classification, the fast path's verdicts per
direction, what the slow path decided.  One NIC sees the whole capture; a miss whose
owner is another NIC cannot be fetched offline and is counted as ``fetch_offline``.

Formats: classic pcap (micro- and nanosecond, either byte order) read and written
(written as microsecond, little-endian, LINKTYPE_ETHERNET); pcapng read (Section
Header, Interface Description, Enhanced and Simple Packet Blocks; Ethernet interfaces
only).  A truncated or corrupt file ends the read with ``PcapError`` naming the offset.
"""
from __future__ import annotations

import collections
import os
import struct

import numpy as np

from .base import Batch, Port

LINKTYPE_ETHERNET = 1
_MAGIC_US = 0xA1B2C3D4
_MAGIC_NS = 0xA1B23C4D
_PCAPNG_SHB = 0x0A0D0D0A
_BOM = 0x1A2B3C4D


class PcapError(ValueError):
    pass


def read_frames(path: str):
    """Yield ``(timestamp_seconds: float, frame: bytes)`` from a pcap or pcapng file."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise PcapError(f"{path}: empty or truncated header")
        f.seek(0)
        if struct.unpack("<I", head)[0] == _PCAPNG_SHB:
            yield from _read_pcapng(f, path)
        else:
            yield from _read_pcap(f, path)


def _read_pcap(f, path):
    hdr = f.read(24)
    if len(hdr) < 24:
        raise PcapError(f"{path}: truncated pcap header")
    for endian in ("<", ">"):
        magic = struct.unpack(endian + "I", hdr[:4])[0]
        if magic in (_MAGIC_US, _MAGIC_NS):
            break
    else:
        raise PcapError(f"{path}: not a pcap file (magic {hdr[:4].hex()})")
    scale = 1e-6 if magic == _MAGIC_US else 1e-9
    _, _, _, _, _, linktype = struct.unpack(endian + "HHiIII", hdr[4:])
    if linktype & 0xFFFF != LINKTYPE_ETHERNET:
        raise PcapError(f"{path}: link type {linktype} is not Ethernet")
    rec = struct.Struct(endian + "IIII")
    while True:
        pos = f.tell()
        h = f.read(16)
        if not h:
            return
        if len(h) < 16:
            raise PcapError(f"{path}: truncated record header at offset {pos}")
        sec, frac, incl, _orig = rec.unpack(h)
        if incl > 262144:
            raise PcapError(f"{path}: record of {incl} bytes at offset {pos}")
        data = f.read(incl)
        if len(data) < incl:
            raise PcapError(f"{path}: truncated record at offset {pos}")
        yield sec + frac * scale, data


def _read_pcapng(f, path):
    endian = "<"
    if_tsres = []  # per interface: seconds per tick
    while True:
        pos = f.tell()
        h = f.read(8)
        if not h:
            return
        if len(h) < 8:
            raise PcapError(f"{path}: truncated block header at offset {pos}")
        btype = struct.unpack("<I", h[:4])[0]
        if btype == _PCAPNG_SHB:
            bom = f.read(4)
            endian = "<" if struct.unpack("<I", bom)[0] == _BOM else ">"
            if struct.unpack(endian + "I", bom)[0] != _BOM:
                raise PcapError(f"{path}: bad byte-order magic at offset {pos}")
            blen = struct.unpack(endian + "I", h[4:])[0]
            body = bom + f.read(blen - 12)
            if_tsres = []
        else:
            btype, blen = struct.unpack(endian + "II", h)
            body = f.read(blen - 8)
        if blen < 12 or blen % 4 or len(body) != blen - 8:
            raise PcapError(f"{path}: bad block length {blen} at offset {pos}")
        body = body[:-4]  # the trailing copy of the length
        if btype == 1:  # Interface Description
            linktype = struct.unpack(endian + "H", body[:2])[0]
            res = 1e-6
            opts = body[8:]
            while len(opts) >= 4:
                code, olen = struct.unpack(endian + "HH", opts[:4])
                if code == 0:
                    break
                if code == 9 and olen >= 1:  # if_tsresol
                    v = opts[4]
                    res = 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
                opts = opts[4 + ((olen + 3) & ~3):]
            if_tsres.append((linktype, res))
        elif btype == 6:  # Enhanced Packet
            ifid, hi, lo, cap, _orig = struct.unpack(endian + "IIIII", body[:20])
            if ifid >= len(if_tsres):
                raise PcapError(f"{path}: packet for undeclared interface {ifid} at offset {pos}")
            linktype, res = if_tsres[ifid]
            if linktype != LINKTYPE_ETHERNET:
                continue
            yield ((hi << 32) | lo) * res, body[20:20 + cap]
        elif btype == 3:  # Simple Packet
            if if_tsres and if_tsres[0][0] == LINKTYPE_ETHERNET:
                orig = struct.unpack(endian + "I", body[:4])[0]
                yield 0.0, body[4:4 + orig]


class PcapWriter:
    """Classic pcap, microsecond timestamps, Ethernet."""

    def __init__(self, path: str, snaplen: int = 65535):
        self.f = open(path, "wb")
        self.f.write(struct.pack("<IHHiIII", _MAGIC_US, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        self.count = 0

    def write(self, frame, ts: float = 0.0) -> None:
        sec = int(ts)
        usec = int(round((ts - sec) * 1e6))
        if usec >= 1000000:
            sec, usec = sec + 1, usec - 1000000
        self.f.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
        self.f.write(frame)
        self.count += 1

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PcapPort(Port):
    """A Port over files: ``recv`` replays `path_in`, ``send`` appends to `path_out`
    (or to ``.sent`` in memory).  ``fileno`` is an eventfd readable while input remains."""

    def __init__(self, path_in: str | None = None, path_out: str | None = None, mac: bytes = b"\0" * 6):
        self.name = path_in or path_out or "pcap"
        self._it = iter(read_frames(path_in)) if path_in else iter(())
        self._writer = PcapWriter(path_out) if path_out else None
        self.sent = [] if path_out is None else None
        self._mac = mac
        self._efd = os.eventfd(1 if path_in else 0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done = path_in is None
        self.counters = collections.Counter()
        self.last_ts = 0.0

    def fileno(self) -> int:
        return self._efd

    def recv(self, max_frames: int = 256):
        if self._done:
            return None
        frames = []
        for ts, fr in self._it:
            frames.append(fr)
            self.last_ts = ts
            if len(frames) >= max_frames:
                break
        else:
            self._done = True
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
        if not frames:
            return None
        self.counters["rx_frames"] += len(frames)
        return Batch.from_frames(frames)

    def send(self, batch, idx) -> int:
        n = 0
        for i in np.asarray(idx):
            fr = batch.frame(int(i))
            if self._writer is not None:
                self._writer.write(fr, self.last_ts)
            else:
                self.sent.append(fr)
            n += 1
        self.counters["tx_frames"] += n
        return n

    def mac(self) -> bytes:
        return self._mac

    def stats(self) -> dict:
        return dict(self.counters)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1


# ---------------------------------------------------------------------------------------
# Offline translation of a capture


def _classify(frames, cfg) -> np.ndarray:
    """Direction of every frame: 0 OUT, 1 IN, 2 neither / not IPv4 (per connection-free
    address test; vectorised over the capture)."""
    n = len(frames)
    out = np.full(n, 2, dtype=np.uint8)
    src = np.zeros(n, dtype=np.uint32)
    dst = np.zeros(n, dtype=np.uint32)
    ip = np.zeros(n, dtype=bool)
    for i, f in enumerate(frames):  # header fields only; the fast path does the parsing
        if len(f) >= 34 and f[12:14] == b"\x08\x00":
            ip[i] = True
            src[i] = int.from_bytes(f[26:30], "big")
            dst[i] = int.from_bytes(f[30:34], "big")
    internal = np.zeros(n, dtype=bool)
    for net in cfg.internal:
        internal |= (src & np.uint32(int(net.netmask))) == np.uint32(int(net.network_address))
    pool = np.zeros(n, dtype=bool)
    for net in cfg.pool:
        pool |= (dst & np.uint32(int(net.netmask))) == np.uint32(int(net.network_address))
    out[ip & internal] = 0
    out[ip & ~internal & pool] = 1
    return out


def run_pcap(config, nic_id: int, pcap_in: str, pcap_out: str, *, prefill=None, use_rules: bool = True,
             batch: int = 256) -> dict:
    """Translate `pcap_in` as NIC `nic_id` of `config` would; write what it would send
    to `pcap_out` in input order; return the counters.

    ``prefill(out_table, in_table)``: fill the flow tables before the run (golden tests
    without the slow path).  ``use_rules``: let ``hypernat.rules.RuleBuilder`` decide
    misses (when it is available in this build)."""
    from .. import config as cfgmod
    from .. import verdicts as V
    from ..fastpath import IMPL, FlowTable, FragTable, Translator
    from ..layout import KEY_DTYPE

    cfg = cfgmod.load(config) if isinstance(config, (str, os.PathLike)) else config
    if not 0 <= nic_id < cfg.n_nics:
        raise ValueError(f"NIC {nic_id} is not in the config (0..{cfg.n_nics - 1})")
    cap = min(cfg.limits.flow_table_capacity, 1 << 20)
    out_t, in_t = FlowTable(cap, hugepages=False), FlowTable(cap, hugepages=False)
    if prefill is not None:
        prefill(out_t, in_t)
    fl = cfg.limits.fragments
    ft = FragTable(fl.entries, fl.bytes, fl.timeout)
    tr = Translator(out_t, in_t, cfg.pool_ranges, frag=ft)
    released = []  # early fragments a translate call released, sent right after it (as the NIC does)

    def take_released():  # the translator's one output area (hypernat/_out.pxd)
        if tr.out_count:
            released.extend(g for _, g in tr.generated())
    builder, rules_status = None, "disabled"
    if use_rules:
        try:
            from ..rules import ACT_DROP, ACT_FETCH, ACT_REPLAY, RuleBuilder

            builder = RuleBuilder(cfg, nic_id, out_t, in_t, rng=np.random.default_rng(0))
            rules_status = "RuleBuilder"
        except (ImportError, NotImplementedError) as exc:
            rules_status = f"unavailable ({type(exc).__name__}): misses counted, not decided"

    records = list(read_frames(pcap_in))
    frames = [f for _, f in records]
    dirs = _classify(frames, cfg)
    summary = collections.Counter()
    summary["frames_in"] = len(frames)
    summary["unclassified"] = int((dirs == 2).sum())
    summary["outgoing"] = int((dirs == 0).sum())
    summary["incoming"] = int((dirs == 1).sum())
    slow = collections.Counter()

    with PcapWriter(pcap_out) as w:
        i = 0
        while i < len(frames):
            d = dirs[i]
            j = i + 1
            while j < len(frames) and dirs[j] == d and j - i < batch:
                j += 1
            if d == 2:
                i = j
                continue
            b = Batch.from_frames(frames[i:j])
            verd = np.zeros(b.n, dtype=np.uint8)
            keys = np.zeros(b.n, dtype=KEY_DTYPE)
            now = int(records[i][0])
            tr.translate(b.buf, b.offsets, b.lengths, int(d), now, verd, keys)
            take_released()
            miss = np.isin(verd, list(V.MISS_VERDICTS))
            if miss.any():
                if builder is None:
                    slow["undecided_miss"] += int(miss.sum())
                else:
                    dec = builder.handle_misses(int(d), verd, keys, now)
                    for k in np.nonzero(miss)[0]:
                        act = int(dec.action[k])
                        if act == ACT_REPLAY:
                            rv = np.zeros(1, dtype=np.uint8)
                            tr.translate(b.buf, b.offsets[k:k + 1], b.lengths[k:k + 1], int(d), now, rv)
                            take_released()
                            verd[k] = rv[0]
                            slow["replayed"] += 1
                        elif act == ACT_FETCH:
                            slow["fetch_offline"] += 1
                        elif act == ACT_DROP:
                            slow[f"drop_{V.SLOW_PATH_REASON_NAMES[int(dec.reason[k])]}"] += 1
            for k in range(b.n):
                if int(verd[k]) in V.SEND_VERDICTS:
                    w.write(b.frame(k), records[i + k][0])
            for f in released:
                w.write(f, records[j - 1][0])
            released.clear()
            i = j
        summary["frames_out"] = w.count
    return {
        "nic": nic_id,
        "fastpath": IMPL,
        "slow_path": rules_status,
        **dict(summary),
        "verdicts": {d: {k: v for k, v in c.items() if v} for d, c in tr.counters_dict().items()},
        "fragments": {k: v for k, v in ft.counters_dict().items() if v},
        "slow": dict(slow),
        **({"rules": builder.counters_dict()} if builder is not None else {}),
    }

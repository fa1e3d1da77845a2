"""A 64-byte UDP frame generator for the testbed: every frame its own 5-tuple, sent from
a TPACKET_V2 transmit ring in ``vpc`` as fast as the ring takes them (or paced), and a
counter that drops them in ``inet`` (``benchmarks/bench_cps.py``)::

    vpc: PACKET_MMAP TX ring on nic0 ──► gateway ──► inet: nftables netdev ingress on nic0,
         frames built once with numpy,                     "translated" (source in the pool)
         sent chunk by chunk                               and "other" counters, both drop

Flow f (0 <= f < n) comes from host ``f % hosts`` (internal base + 256 + host) and source
port ``1024 + (host * per_host + f // hosts) % 64000``: the hosts take turns (no host
opens its connections in one burst), and nearby hosts use disjoint port ranges (a NAT
that preserves ports rarely has to search).  Destination: one server and port, so every
flow needs a mapping of its own (the costly case of a NAT: endpoint-independent
mappings are not shared between flows here).  UDP checksum 0 (none, RFC 768).
"""
from __future__ import annotations

import ipaddress
import json
import time

import numpy as np

from . import netns
from .deadline import Deadline

FRAME = 60  # bytes; 64 on the wire with the FCS
CHUNK = 256  # frames per send() call
STALL_S = 5.0  # the transmit ring took no frame this long: the run fails
COUNTER_TABLE = "hn_udpgen"


def flow_endpoints(n: int, hosts: int, internal: str) -> tuple:
    """(source address as uint32, source port) of flows 0..n-1 (module docstring)."""
    f = np.arange(n, dtype=np.int64)
    per_host = -(-n // hosts)
    if per_host > 64000:
        raise ValueError(f"{n} flows over {hosts} hosts: {per_host} ports a host, at most 64000")
    base = int(ipaddress.ip_network(internal).network_address) + 256
    if hosts > ipaddress.ip_network(internal).num_addresses - 512:
        raise ValueError(f"{hosts} hosts do not fit in {internal}")
    h = f % hosts
    return (base + h).astype(np.uint32), (1024 + (h * per_host + f // hosts) % 64000).astype(np.uint16)


def build_frames(src: np.ndarray, sport: np.ndarray, dst_ip: str, dport, src_mac: bytes,
                 dst_mac: bytes) -> np.ndarray:
    """One 60-byte Ethernet/IPv4/UDP frame per (src, sport), as an (n, 60) uint8 array,
    IPv4 header checksums computed; ``dport``: one port, or one per frame.  (UDP
    checksum 0: none, RFC 768; NATs update it only when present.)"""
    n = len(src)
    fr = np.zeros((n, FRAME), dtype=np.uint8)
    fr[:, 0:6] = np.frombuffer(dst_mac, np.uint8)
    fr[:, 6:12] = np.frombuffer(src_mac, np.uint8)
    fr[:, 12:14] = (0x08, 0x00)
    ip = fr[:, 14:34]
    ip[:, 0] = 0x45
    ip[:, 2:4] = (0, 46)  # total length: 20 + 8 + 18 bytes of payload
    ip[:, 8] = 64
    ip[:, 9] = 17
    ip[:, 12:16] = src.astype(">u4").view(np.uint8).reshape(-1, 4)
    ip[:, 16:20] = np.frombuffer(ipaddress.IPv4Address(dst_ip).packed, np.uint8)
    words = ip.reshape(n, 10, 2).astype(np.uint32)
    s = (words[:, :, 0] << 8 | words[:, :, 1]).sum(axis=1)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    ck = (~s) & 0xFFFF
    ip[:, 10] = ck >> 8
    ip[:, 11] = ck & 0xFF
    udp = fr[:, 34:42]
    udp[:, 0:2] = sport.astype(">u2").view(np.uint8).reshape(-1, 2)
    udp[:, 2:4] = np.broadcast_to(np.asarray(dport, np.uint32), (n,)).astype(">u2").view(np.uint8).reshape(-1, 2)
    udp[:, 4:6] = (0, 26)
    return fr


class Generator:
    """`frames` on a transmit ring of `ifname` in namespace `ns`; `send_all()` sends each
    once.  Close it (or use it as a context manager)."""

    def __init__(self, ns: str, ifname: str, tx_frames: int = 8192):
        from ..io.packet_mmap import PacketMmapPort

        with netns.entered(ns):
            self.port = PacketMmapPort(ifname, rx=False, tx_frames=tx_frames, vnet=False, frame_size=2048)
        self.batch = None
        self.chunks = []

    def mac(self) -> bytes:
        return self.port.mac()

    def load(self, frames: np.ndarray) -> None:
        """Send these frames from now on (the array itself, not a copy: ``mark`` on it
        changes what is sent)."""
        from ..io.base import Batch

        n = len(frames)
        self.batch = Batch(frames.reshape(-1), np.arange(n, dtype=np.uint32) * FRAME,
                           np.full(n, FRAME, dtype=np.uint32), n)
        self.chunks = [np.arange(s, min(s + CHUNK, n), dtype=np.int64) for s in range(0, n, CHUNK)]

    def send_all(self, rate: float = 0.0) -> dict:
        """Every loaded frame once, in order, as fast as the ring takes them (`rate` > 0:
        at most that many frames per second).  Returns {"sent", "seconds"}; a ring that
        takes nothing for STALL_S raises."""
        sent = 0
        t0 = time.monotonic()
        for c in self.chunks:
            q = self.port.send(self.batch, c)
            if q < len(c):
                d = Deadline(STALL_S, "the generator's transmit ring to take a chunk")
                rest = c[q:]
                while len(rest):
                    d.check(self.port.stats)
                    k = self.port.send(self.batch, rest)
                    rest = rest[k:]
            sent += len(c)
            if rate:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        return {"sent": sent, "seconds": time.monotonic() - t0}

    def stats(self) -> dict:
        return self.port.stats()

    def close(self) -> None:
        self.port.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def mark(frames: np.ndarray, tag: int) -> None:
    """Write `tag` (0..MARKS-1) into every frame's first payload byte: the counter
    files each pass's frames apart, so a frame that arrives late (held in a ring, a
    backlog) is never counted in the next pass.  No NAT touches the payload, and with
    UDP checksum 0 there is no checksum to update."""
    frames[:, PAYLOAD] = tag


PAYLOAD = 42  # first payload byte: 14 Ethernet + 20 IPv4 + 8 UDP
MARKS = 8


def install_counter(ns: str, ifname: str, pool: str) -> None:
    """Count and drop every IPv4 frame arriving on `ifname` in `ns`, at the ingress hook
    (the stack there costs nothing and nothing comes back; ARP passes: the gateway must
    resolve its next hop): sources in `pool` (translated) per pass mark (``mark``), and
    others apart."""
    rules = "\n".join(f"        ip saddr {pool} @nh,{(PAYLOAD - 14) * 8},8 {m} counter drop" for m in range(MARKS))
    netns.run(ns, ["nft", "-f", "-"], input_=f"""
table netdev {COUNTER_TABLE} {{
    chain count {{
        type filter hook ingress device "{ifname}" priority -500; policy accept;
{rules}
        meta protocol ip counter drop
    }}
}}
""")


def counted(ns: str, tag: int) -> dict:
    """{"translated": frames of pass `tag`, "other": frames from outside the pool (any
    pass)} the counter of `install_counter` saw."""
    p = netns.run(ns, ["nft", "-j", "list", "table", "netdev", COUNTER_TABLE])
    got = [e["counter"]["packets"] for item in json.loads(p.stdout)["nftables"] if "rule" in item
           for e in item["rule"]["expr"] if "counter" in e]
    return {"translated": got[tag], "other": got[MARKS]}


def settle(ns: str, tag: int, before: dict, t0: float, poll: float = 0.05, quiet: float = 0.5,
           timeout: float = 10.0) -> tuple:
    """Poll the counter of pass `tag` until it has not moved for `quiet` s (at most
    `timeout` s); returns (frames counted since `before`, seconds from `t0` to the
    last poll that saw the count grow: the gateway's own time for them, the frames it
    still held in its rings when the generator stopped included)."""
    d = Deadline(timeout, "the counter in inet to settle")
    last, last_t = None, time.monotonic()
    while not d.passed:
        c = counted(ns, tag)
        now = time.monotonic()
        total = c["translated"] + c["other"]
        if total != last:
            last, last_t = total, now
        elif now - last_t >= quiet:
            break
        time.sleep(poll)
    c = counted(ns, tag)
    return {k: c[k] - before[k] for k in c}, last_t - t0

"""`hypernat trace`: synthetic data-centre traces like the paper's, and real captures.

The paper (§IV-A) replays flows sampled from a university data-centre trace (Benson,
Akella and Maltz, IMC 2010) as Traces 1–4 (10k, 50k, 100k, 200k flows).  That trace is
not public in packet form, so this module *generates* traces with the properties that
paper reports and that matter to a NAT:

    flows      heavy-tailed sizes: most flows are a handful of packets ("mice"), a few
               carry most of the bytes ("elephants") -- a lognormal body with a Pareto
               tail (alpha 1.2), capped at --max-packets;
    arrivals   heavy-tailed inter-arrival times of flows (lognormal, sigma 1.5) and of
               the packets inside a flow (lognormal around 1 ms);
    packets    bimodal sizes: pure ACK/SYN/FIN and small requests near the 64-byte
               minimum, bulk data near the 1514-byte MTU frame, a few in between;
    TCP        every TCP flow opens with SYN, ACK (the handshake as the internal side
               sends it) and closes with FIN|ACK, ACK; data packets are PSH|ACK;
    UDP        a share of flows (DNS, NTP, QUIC-like) without any of that;
    addresses  internal sources in the config's internal prefixes (popular hosts open
               more flows: Zipf), remotes outside every private and NAT pool range.

Only the *outgoing* direction (internal → remote) is generated: the paper's receiver
reflects every packet, and so do our experiments (``hypernat.eval``).

::

   per flow (numpy, vectorised)          per packet (numpy, vectorised)          file
   proto, I:Ip, R:Rp ─► size n_f ─► start_f + cumsum(gaps) ─► sort by time ─► headers ─► pcap
                                    flags (SYN, ACK, PSH|ACK, FIN|ACK, ACK)     checksums

Frames are written as a *header capture* (like the DC traces, which kept headers): each
record holds the first ``snaplen`` bytes (Ethernet, IPv4, TCP/UDP headers, zero payload)
while its original length and the IP/UDP length fields say how big the packet really
was; the checksums are those of the full packet with a zero payload, so the headers are
exactly what the wire carried.  For replay (``replay_frames``) the lengths are cut to
what is present (tcpreplay's ``--fixlen=trunc``) and the checksums recomputed, so every
frame handed to the gateway is self-consistent.

Everything is a function of the seed (numpy ``default_rng``): the same command writes the
same bytes.  200k flows (~1.7M packets) take a few seconds.

    hypernat trace gen --flows 10000 --seed 1 -o trace1.pcap [--config conf/x.yaml]
    hypernat trace info trace1.pcap          (any pcap or pcapng, e.g. your own capture)
    hypernat trace paper -d traces/          Traces 1-4 of the paper (10k..200k flows)
"""
from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

TCP, UDP = 6, 17
SYN, FIN, PSH, ACK = 0x02, 0x01, 0x08, 0x10
ETH_MIN = 60  # minimum Ethernet frame without FCS
MTU_FRAME = 1514
MAC_DST = (2, 0, 0, 0, 0, 2)  # the same as the emulated deployment's frames
MAC_SRC = (2, 0, 0, 0, 0, 1)
PAPER_TRACES = {1: 10_000, 2: 50_000, 3: 100_000, 4: 200_000}

# never used as remotes: private, shared, loopback, link-local, benchmark and documentation
# space, multicast and above (the gateway's own pool is excluded from the config too)
_RESERVED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/3")]


@dataclass
class Params:
    """The knobs of the generator (defaults: the shape described in the module doc)."""

    flows: int = 10_000
    seed: int = 1
    udp_share: float = 0.2          # share of UDP flows
    flow_rate: float = 5000.0       # mean new flows per second
    body_mu: float = 1.0            # lognormal body of data packets per flow (log-space mean)
    body_sigma: float = 1.2
    tail_share: float = 0.05        # flows drawn from the Pareto tail
    tail_alpha: float = 1.2
    tail_min: float = 20.0
    max_packets: int = 2000         # cap on data packets per flow
    gap_median: float = 1e-3        # median gap between packets of one flow, seconds
    gap_sigma: float = 1.0
    arrival_sigma: float = 1.5      # lognormal sigma of flow inter-arrivals
    small_share: float = 0.30       # data packets: small (64..128 bytes)
    large_share: float = 0.55       # data packets: near MTU (1400..1514 bytes)
    hosts: int | None = None        # internal hosts (default flows // 10, at least 16)
    remotes: int | None = None      # remote addresses (default flows // 4, at least 64)


@dataclass
class Trace:
    """A generated trace: per-flow columns (``f_*``) and per-packet columns (``p_*``,
    in time order)."""

    f_proto: np.ndarray
    f_iaddr: np.ndarray
    f_iport: np.ndarray
    f_raddr: np.ndarray
    f_rport: np.ndarray
    f_packets: np.ndarray
    p_ts: np.ndarray       # seconds from the start
    p_flow: np.ndarray     # flow index
    p_len: np.ndarray      # wire length of the frame (Ethernet, no FCS, padded to 60)
    p_iplen: np.ndarray    # IP total length (a bare SYN: 40, in a 60-byte frame)
    p_flags: np.ndarray    # TCP flags (0 for UDP)
    p_seq: np.ndarray      # packet number inside its flow

    @property
    def n_flows(self) -> int:
        return len(self.f_proto)

    @property
    def n_packets(self) -> int:
        return len(self.p_ts)


# ------------------------------------------------------------------------- generation


def _allowed(addrs: np.ndarray, excluded) -> np.ndarray:
    ok = np.ones(len(addrs), bool)
    for net in excluded:
        lo, hi = int(net.network_address), int(net.broadcast_address)
        ok &= ~((addrs >= lo) & (addrs <= hi))
    return ok


def _zipf_choice(rng, n_items: int, size: int, a: float = 1.1) -> np.ndarray:
    """Indices in [0, n_items) with Zipf-like popularity (rank^-a), shuffled ranks."""
    w = 1.0 / np.arange(1, n_items + 1) ** a
    w /= w.sum()
    perm = rng.permutation(n_items)
    return perm[rng.choice(n_items, size=size, p=w)]


def generate(params: Params, internal=("10.0.0.0/16",), exclude=()) -> Trace:
    """Generate a trace (see the module doc); `internal`: prefixes of the sources,
    `exclude`: prefixes remotes must avoid besides the reserved ones (the pool)."""
    p = params
    if p.flows <= 0:
        raise ValueError("flows must be positive")
    rng = np.random.default_rng(p.seed)
    nf = p.flows
    nets = [ipaddress.ip_network(n) if not isinstance(n, ipaddress.IPv4Network) else n for n in internal]
    excluded = _RESERVED + [ipaddress.ip_network(n) if isinstance(n, str) else n for n in exclude] + nets

    # -- flows: protocol, size ---------------------------------------------------------
    proto = np.where(rng.random(nf) < p.udp_share, UDP, TCP).astype(np.uint8)
    body = rng.lognormal(p.body_mu, p.body_sigma, nf)
    tail = p.tail_min * (1.0 + rng.pareto(p.tail_alpha, nf))
    data = np.where(rng.random(nf) < p.tail_share, tail, body)
    data = np.minimum(np.floor(data), p.max_packets).astype(np.int64)
    # TCP: SYN, ACK, data..., FIN|ACK, ACK; UDP: at least one datagram
    n_pk = np.where(proto == TCP, data + 4, np.maximum(data, 1)).astype(np.int64)

    # -- flows: endpoints -------------------------------------------------------------------
    n_hosts = p.hosts or max(16, nf // 10)
    sizes = np.array([n.num_addresses - 2 if n.prefixlen < 31 else n.num_addresses for n in nets])
    cum = np.cumsum(sizes)
    n_hosts = int(min(n_hosts, cum[-1]))
    host_slot = rng.choice(int(cum[-1]), size=n_hosts, replace=False)
    net_i = np.searchsorted(cum, host_slot, side="right")
    first = np.array([int(n.network_address) + (1 if n.prefixlen < 31 else 0) for n in nets], np.int64)
    hosts = (first[net_i] + host_slot - np.concatenate([[0], cum[:-1]])[net_i]).astype(np.uint32)
    iaddr = hosts[_zipf_choice(rng, n_hosts, nf)]

    n_rem = p.remotes or max(64, nf // 4)
    cand = rng.integers(0x01000000, 0xE0000000, size=n_rem * 2, dtype=np.int64)
    cand = cand[_allowed(cand, excluded)]
    while len(cand) < n_rem:  # pathological exclusions only
        more = rng.integers(0x01000000, 0xE0000000, size=n_rem, dtype=np.int64)
        cand = np.concatenate([cand, more[_allowed(more, excluded)]])
    remotes = cand[:n_rem].astype(np.uint32)
    raddr = remotes[_zipf_choice(rng, n_rem, nf)]
    tcp_ports = np.array([443, 80, 8080, 22, 3306, 6379, 9092], np.uint16)
    tcp_w = np.array([0.5, 0.2, 0.08, 0.05, 0.07, 0.05, 0.05])
    udp_ports = np.array([53, 123, 443, 5353, 4789], np.uint16)
    udp_w = np.array([0.55, 0.1, 0.25, 0.05, 0.05])
    rport = np.where(proto == TCP, rng.choice(tcp_ports, nf, p=tcp_w), rng.choice(udp_ports, nf, p=udp_w))
    iport = rng.integers(1024, 65536, nf).astype(np.uint16)
    # the 5-tuples must be distinct: redraw the source port of any repeat
    for _ in range(20):
        key = (proto.astype(np.uint64) << 56) ^ (iaddr.astype(np.uint64) << 24) ^ (iport.astype(np.uint64) << 8) \
            ^ (raddr.astype(np.uint64) * np.uint64(0x9E3779B1)) ^ rport.astype(np.uint64)
        _, first_i = np.unique(key, return_index=True)
        dup = np.ones(nf, bool)
        dup[first_i] = False
        if not dup.any():
            break
        iport[dup] = rng.integers(1024, 65536, int(dup.sum())).astype(np.uint16)

    # -- packets: times, flags, sizes -------------------------------------------------------
    gaps_f = rng.lognormal(0.0, p.arrival_sigma, nf)
    start = np.cumsum(gaps_f / gaps_f.mean() / p.flow_rate)
    start -= start[0]
    total = int(n_pk.sum())
    p_flow = np.repeat(np.arange(nf, dtype=np.int64), n_pk)
    offs = np.concatenate([[0], np.cumsum(n_pk)[:-1]])
    p_seq = np.arange(total, dtype=np.int64) - np.repeat(offs, n_pk)
    gaps = rng.lognormal(np.log(p.gap_median), p.gap_sigma, total)
    gaps[offs] = 0.0
    csum = np.cumsum(gaps)
    p_ts = start[p_flow] + csum - np.repeat(csum[offs], n_pk)

    is_tcp = proto[p_flow] == TCP
    last = p_seq == (n_pk[p_flow] - 1)
    flags = np.zeros(total, np.uint8)
    flags[is_tcp] = PSH | ACK
    flags[is_tcp & (p_seq == 0)] = SYN
    flags[is_tcp & (p_seq == 1)] = ACK
    flags[is_tcp & (p_seq == n_pk[p_flow] - 2)] = FIN | ACK
    flags[is_tcp & last] = ACK

    u = rng.random(total)
    small = rng.integers(64, 129, total)
    large = rng.integers(1400, MTU_FRAME + 1, total)
    mid = rng.integers(129, 1400, total)
    size = np.where(u < p.small_share, small, np.where(u < p.small_share + p.large_share, large, mid))
    hdr = np.where(is_tcp, 54, 42)
    control = is_tcp & (flags != (PSH | ACK))
    size = np.where(control, hdr, np.maximum(size, hdr + 1))
    iplen = (size - 14).astype(np.int32)
    size = np.maximum(size, ETH_MIN).astype(np.int32)  # Ethernet pads short frames

    order = np.argsort(p_ts, kind="stable")
    return Trace(proto, iaddr, iport, raddr.astype(np.uint32), rport.astype(np.uint16), n_pk,
                 p_ts[order], p_flow[order], size[order], iplen[order], flags[order], p_seq[order])


# ----------------------------------------------------------------------------- frames


def _put(a: np.ndarray, col: int, v: np.ndarray, nbytes: int) -> None:
    v = v.astype(np.uint64)
    for i in range(nbytes):
        a[:, col + i] = (v >> np.uint64(8 * (nbytes - 1 - i))) & np.uint64(0xFF)


def _fold(s: np.ndarray) -> np.ndarray:
    for _ in range(3):
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum16(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    w = a[:, lo:hi].astype(np.uint64)
    return (w[:, 0::2] << np.uint64(8) | w[:, 1::2]).sum(axis=1)


def headers(trace: Trace, snaplen: int = 96, fixlen: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The frames of `trace` as a (packets, width) byte array and the captured length of
    each (``min(wire length, snaplen)``).  ``fixlen`` False: lengths and checksums of
    the full packet (a header capture); True: of the captured bytes (replayable)."""
    if snaplen < 54:
        raise ValueError("snaplen must hold Ethernet + IPv4 + TCP headers (54 bytes)")
    n = trace.n_packets
    f = trace.p_flow
    proto = trace.f_proto[f]
    is_tcp = proto == TCP
    wire = trace.p_len.astype(np.int64)
    incl = np.minimum(wire, snaplen)
    iplen = trace.p_iplen.astype(np.int64)
    length = 14 + (np.minimum(iplen, incl - 14) if fixlen else iplen)  # Ethernet + IP total length
    width = int(incl.max()) if n else 54
    a = np.zeros((n, max(width, 54)), np.uint8)
    a[:, 0:6] = MAC_DST
    a[:, 6:12] = MAC_SRC
    a[:, 12:14] = (0x08, 0x00)
    a[:, 14] = 0x45
    _put(a, 16, length - 14, 2)
    _put(a, 18, trace.p_seq & 0xFFFF, 2)  # IP id: the packet's number in its flow
    a[:, 20] = 0x40  # DF
    a[:, 22] = 64
    a[:, 23] = proto
    src, dst = trace.f_iaddr[f], trace.f_raddr[f]
    _put(a, 26, src, 4)
    _put(a, 30, dst, 4)
    ipc = (~_fold(_sum16(a, 14, 34)).astype(np.uint64)) & np.uint64(0xFFFF)
    _put(a, 24, ipc, 2)
    _put(a, 34, trace.f_iport[f], 2)
    _put(a, 36, trace.f_rport[f], 2)
    l4len = length - 34
    # TCP: seq = 1000 + packet number (an ACK number of 1 after the SYN), offset 5, window
    tcp = np.flatnonzero(is_tcp)
    if len(tcp):
        t = a[tcp]
        _put(t, 38, 1000 + trace.p_seq[tcp], 4)
        _put(t, 42, np.where(trace.p_seq[tcp] == 0, 0, 1), 4)
        t[:, 46] = 5 << 4
        t[:, 47] = trace.p_flags[tcp]
        _put(t, 48, np.full(len(tcp), 65535), 2)
        a[tcp] = t
    udp = np.flatnonzero(~is_tcp)
    if len(udp):
        t = a[udp]
        _put(t, 38, l4len[udp], 2)
        a[udp] = t
    pseudo = (src.astype(np.uint64) >> np.uint64(16)) + (src.astype(np.uint64) & np.uint64(0xFFFF)) \
        + (dst.astype(np.uint64) >> np.uint64(16)) + (dst.astype(np.uint64) & np.uint64(0xFFFF)) \
        + proto.astype(np.uint64) + l4len.astype(np.uint64)
    s = pseudo + np.where(is_tcp, _sum16(a, 34, 54), _sum16(a, 34, 42))  # payload is zero
    c = (~_fold(s).astype(np.uint64)) & np.uint64(0xFFFF)
    c = np.where(~is_tcp & (c == 0), np.uint64(0xFFFF), c)
    ci = np.where(is_tcp, 50, 40)
    for off in (40, 50):
        m = ci == off
        a[m, off] = (c[m] >> np.uint64(8)).astype(np.uint8)
        a[m, off + 1] = (c[m] & np.uint64(0xFF)).astype(np.uint8)
    return a, incl


def replay_frames(trace: Trace, snaplen: int = 64) -> list[bytes]:
    """Self-consistent frames of at most `snaplen` bytes, in trace order (for replay)."""
    a, incl = headers(trace, snaplen, fixlen=True)
    return [a[i, : incl[i]].tobytes() for i in range(len(incl))]


def write_pcap(trace: Trace, path: str, snaplen: int = 96) -> int:
    """Write `trace` as a classic pcap header capture; returns bytes written."""
    from .io.pcap import PcapWriter

    a, incl = headers(trace, snaplen, fixlen=False)
    n, w = a.shape
    rec = np.zeros((n, 16 + w), np.uint8)
    ts = trace.p_ts
    sec = np.floor(ts).astype(np.uint64)
    usec = np.minimum(np.round((ts - sec) * 1e6), 999_999).astype(np.uint64)
    hdr = np.stack([sec, usec, incl.astype(np.uint64), trace.p_len.astype(np.uint64)], axis=1).astype("<u4")
    rec[:, :16] = hdr.view(np.uint8).reshape(n, 16)
    rec[:, 16:] = a
    keep = np.arange(16 + w)[None, :] < (16 + incl)[:, None]
    body = rec[keep]
    with PcapWriter(path, snaplen=snaplen) as pw:
        pw.f.write(body.tobytes())
        pw.count = n
    return 24 + len(body)


# ---------------------------------------------------------------------- reading / info


def read_flows(path: str):
    """Parse any pcap/pcapng (``hypernat.io.pcap.read_frames``): per packet the
    timestamp, 5-tuple, IP length and TCP flags; non-IPv4 frames are counted."""
    import struct

    from .io.pcap import read_frames

    rows, other = [], collections.Counter()
    for ts, fr in read_frames(path):
        if len(fr) < 34 or fr[12:14] != b"\x08\x00":
            other["not_ipv4"] += 1
            continue
        ihl = (fr[14] & 15) * 4
        tot, = struct.unpack_from("!H", fr, 16)
        proto = fr[23]
        src, dst = struct.unpack_from("!II", fr, 26)
        sp = dp = fl = 0
        if proto in (TCP, UDP) and len(fr) >= 14 + ihl + 4:
            sp, dp = struct.unpack_from("!HH", fr, 14 + ihl)
            if proto == TCP and len(fr) >= 14 + ihl + 14:
                fl = fr[14 + ihl + 13]
        elif proto not in (TCP, UDP):
            other[f"proto_{proto}"] += 1
        rows.append((ts, proto, src, sp, dst, dp, tot + 14, fl))
    return rows, other


def info(path: str) -> dict:
    """A summary of a capture: packets, flows, protocol mix, size distributions."""
    rows, other = read_flows(path)
    if not rows:
        return {"path": path, "packets": 0, "other": dict(other)}
    a = np.array(rows, dtype=np.float64)
    ts, proto, length, fl = a[:, 0], a[:, 1].astype(int), a[:, 6], a[:, 7].astype(int)
    flows = collections.Counter()
    for r in rows:  # direction-agnostic 5-tuple
        k = (r[1],) + (min((r[2], r[3]), (r[4], r[5])) + max((r[2], r[3]), (r[4], r[5])))
        flows[k] += 1
    sizes = np.array(sorted(flows.values()))
    top = sizes[-max(1, len(sizes) // 100):]  # the largest 1 % of flows
    tcp_flows = sum(1 for k in flows if k[0] == TCP)
    q = lambda x, v: float(np.quantile(x, v))  # noqa: E731
    dur = float(ts.max() - ts.min())
    return {
        "path": path, "packets": len(rows), "flows": len(flows), "tcp_flows": tcp_flows,
        "udp_flows": sum(1 for k in flows if k[0] == UDP), "duration_s": round(dur, 3),
        "rate_pps": round(len(rows) / dur, 1) if dur > 0 else None,
        "syn": int(((fl & SYN) & ~(fl & ACK)).astype(bool).sum()), "fin": int((fl & FIN).astype(bool).sum()),
        "packet_bytes": {"mean": round(float(length.mean()), 1), "p10": q(length, 0.1), "p50": q(length, 0.5),
                         "p90": q(length, 0.9),
                         "share_le_128": round(float((length <= 128).mean()), 3),
                         "share_ge_1400": round(float((length >= 1400).mean()), 3)},
        "flow_packets": {"mean": round(float(sizes.mean()), 2), "p50": q(sizes, 0.5), "p90": q(sizes, 0.9),
                         "p99": q(sizes, 0.99), "max": int(sizes.max()),
                         "top1pct_packet_share": round(float(top.sum() / sizes.sum()), 3)},
        "proto_packets": {str(k): int(v) for k, v in collections.Counter(proto.tolist()).items()},
        "other": dict(other),
    }


def load_replay(path: str, snaplen: int = 128) -> list[bytes]:
    """Frames of a real capture made replayable: IPv4 frames whose capture is shorter
    than their IP length are cut to what is present (lengths and checksums redone, like
    tcpreplay --fixlen=trunc); other frames pass unchanged."""
    import struct

    from .io.pcap import read_frames
    from .packets import inet_checksum as csum

    out = []
    for _, fr in read_frames(path):
        fr = bytearray(fr[:snaplen])
        if len(fr) >= 34 and fr[12:14] == b"\x08\x00":
            ihl = (fr[14] & 15) * 4
            tot = struct.unpack_from("!H", fr, 16)[0]
            if tot + 14 != len(fr) and len(fr) >= 14 + ihl:
                tot = len(fr) - 14
                struct.pack_into("!HH", fr, 16, tot, struct.unpack_from("!H", fr, 18)[0])
                struct.pack_into("!H", fr, 24, 0)
                struct.pack_into("!H", fr, 24, csum(bytes(fr[14:14 + ihl])))
                proto, l4 = fr[23], 14 + ihl
                src, dst = bytes(fr[26:30]), bytes(fr[30:34])
                co = {TCP: 16, UDP: 6}.get(proto)
                if co is not None and len(fr) >= l4 + co + 2:
                    if proto == UDP:
                        struct.pack_into("!H", fr, l4 + 4, len(fr) - l4)
                    struct.pack_into("!H", fr, l4 + co, 0)
                    c = csum(src + dst + struct.pack("!BBH", 0, proto, len(fr) - l4) + bytes(fr[l4:]))
                    struct.pack_into("!H", fr, l4 + co, 0xFFFF if (proto == UDP and c == 0) else c)
        out.append(bytes(fr))
    return out


# --------------------------------------------------------------------------------- CLI


def _config_prefixes(path):
    if not path:
        return ["10.0.0.0/16"], []
    from .config import load

    cfg = load(path)
    return list(cfg.internal), list(cfg.pool)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hypernat trace", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen", help="generate a synthetic trace (pcap)")
    g.add_argument("--flows", type=int, default=10_000)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--udp-share", type=float, default=Params.udp_share)
    g.add_argument("--flow-rate", type=float, default=Params.flow_rate, help="mean new flows per second")
    g.add_argument("--max-packets", type=int, default=Params.max_packets)
    g.add_argument("--snaplen", type=int, default=96, help="bytes captured per packet (header capture)")
    g.add_argument("--config", help="take the internal prefixes and the pool (excluded) from this config")
    g.add_argument("-o", "--output", required=True)
    pp = sub.add_parser("paper", help="write the paper's Traces 1-4 (10k, 50k, 100k, 200k flows)")
    pp.add_argument("-d", "--directory", default=".")
    pp.add_argument("--seed", type=int, default=1)
    pp.add_argument("--config")
    i = sub.add_parser("info", help="summarise a pcap/pcapng capture")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "info":
            d = info(a.file)
            if a.json:
                print(json.dumps(d, indent=2))
            else:
                for k, v in d.items():
                    print(f"{k:>14}: {v}")
            return 0
        internal, pool = _config_prefixes(a.config)
        if a.cmd == "paper":
            os.makedirs(a.directory, exist_ok=True)
        jobs = ([(a.flows, a.seed, a.output)] if a.cmd == "gen" else
                [(n, a.seed + k, f"{a.directory}/trace{k}.pcap") for k, n in PAPER_TRACES.items()])
        for flows, seed, out in jobs:
            t0 = time.perf_counter()
            p = Params(flows=flows, seed=seed)
            if a.cmd == "gen":
                p.udp_share, p.flow_rate, p.max_packets = a.udp_share, a.flow_rate, a.max_packets
            tr = generate(p, internal=internal, exclude=pool)
            size = write_pcap(tr, out, snaplen=getattr(a, "snaplen", 96))
            print(f"{out}: {tr.n_flows} flows, {tr.n_packets} packets, {tr.p_ts[-1]:.2f} s of traffic, "
                  f"{size / 1e6:.1f} MB, {time.perf_counter() - t0:.2f} s")
    except (OSError, ValueError) as exc:
        print(f"hypernat trace: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

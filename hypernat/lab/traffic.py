"""Real traffic through the testbed, checked end to end.

One asyncio loop in the calling process drives every socket; the sockets themselves
are created inside ``vpc`` (clients) and ``inet`` (servers) — see netns.py — so the
kernel stacks in those namespaces do real TCP through the gateway::

    vpc: client i ──TCP──► gateway (NIC a, then NIC b back) ──► inet: echo server
         sends  [id | len | payload(id)]                           checks payload(id),
         checks the echo byte for byte                             echoes it, notes the
                                                                   peer (the translated
                                                                   endpoint)

Which NIC each direction used is seen by AF_PACKET sniffers on the far ends of the
links: in ``vpc`` a frame *leaving* on ``nic k`` took NIC k outward; in ``inet`` a
frame *leaving* on ``nic k`` toward the pool took NIC k back.  The outward frames are
keyed by the client's own endpoint, the return frames by the translated endpoint the
server saw, so the two are joined per connection without knowing how the NAT chose.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass, field

from . import netns

ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
TCP_PORT = 5001
UDP_PORT = 5002
HDR = struct.Struct("!II")  # connection id, payload length


def payload_for(conn_id: int, size: int, seed: int = 0) -> bytes:
    """The known payload of connection `conn_id`: deterministic, distinct per id."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.blake2b(struct.pack("!IIQ", seed, conn_id, block), digest_size=64).digest()
        block += 1
    return bytes(out[:size])


def size_for(conn_id: int, lo: int, hi: int, seed: int = 0) -> int:
    h = int.from_bytes(hashlib.blake2b(struct.pack("!II", seed, conn_id), digest_size=4).digest(), "big")
    return lo + h % (hi - lo + 1)


class LinkSniffer:
    """Counts frames leaving each `nic k` of one namespace, per 5-tuple end.

    `key` picks the endpoint frames are filed under: 'src' (vpc: the client) or
    'dst' (inet: the translated client)."""

    def __init__(self, ns: str, ifnames: list, key: str):
        self.key = key
        self.socks = {}
        self.counts = collections.defaultdict(collections.Counter)  # (proto, ip, port) -> {k: frames}
        self.frames = collections.Counter()
        for k, name in enumerate(ifnames):
            # Outgoing frames reach only ETH_P_ALL taps.
            s = netns.ns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((name, ETH_P_ALL))
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.socks[k] = s

    def attach(self, loop) -> None:
        for k, s in self.socks.items():
            loop.add_reader(s.fileno(), self._drain, k, s)

    DRAIN_MAX = 4096  # frames per wake-up: the loop's other readers get their turn

    def _drain(self, k, s) -> None:
        for _ in range(self.DRAIN_MAX):
            try:
                data, addr = s.recvfrom(256)
            except BlockingIOError:
                return
            if addr[2] != PACKET_OUTGOING or len(data) < 34 or data[12:14] != b"\x08\x00":
                continue
            self.frames[k] += 1
            ihl = (data[14] & 0x0F) * 4
            proto = data[23]
            if proto not in (6, 17) or len(data) < 14 + ihl + 4:
                continue
            if self.key == "src":
                ip, port = data[26:30], data[14 + ihl : 16 + ihl]
            else:
                ip, port = data[30:34], data[16 + ihl : 18 + ihl]
            self.counts[(proto, socket.inet_ntoa(ip), struct.unpack("!H", port)[0])][k] += 1

    def link_of(self, proto, ip, port):
        c = self.counts.get((proto, ip, port))
        if not c:
            return None, 0
        k, _ = c.most_common(1)[0]
        return k, len(c)

    def close(self, loop=None) -> None:
        for s in self.socks.values():
            if loop is not None:
                loop.remove_reader(s.fileno())
            s.close()


@dataclass
class ConnResult:
    conn_id: int
    client: tuple = ()
    translated: tuple = ()
    size: int = 0
    sent_ok: bool = False  # the server got the known payload intact
    echo_ok: bool = False  # the client got it back intact
    out_link: int | None = None
    in_link: int | None = None
    links_seen: int = 0  # > 2 would mean a direction changed NIC mid-connection
    error: str = ""


@dataclass
class TcpReport:
    conns: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def intact(self) -> int:
        return sum(1 for c in self.conns if c.sent_ok and c.echo_ok)

    @property
    def crossed(self) -> int:
        """Connections whose two directions used different NICs."""
        return sum(1 for c in self.conns if c.out_link is not None and c.in_link is not None and c.out_link != c.in_link)

    @property
    def located(self) -> int:
        return sum(1 for c in self.conns if c.out_link is not None and c.in_link is not None)

    def summary(self) -> dict:
        pairs = collections.Counter(f"{c.out_link}->{c.in_link}" for c in self.conns)
        return {
            "connections": len(self.conns),
            "intact": self.intact,
            "bytes_checked": sum(2 * c.size for c in self.conns if c.sent_ok and c.echo_ok),
            "located": self.located,
            "crossed_nics": self.crossed,
            "crossed_fraction": round(self.crossed / max(1, self.located), 3),
            "link_pairs_out_to_in": dict(sorted(pairs.items())),
            "errors": collections.Counter(c.error for c in self.conns if c.error),
            "seconds": round(self.seconds, 3),
        }


async def tcp_echo(topo, n_conns=200, size=(1000, 32000), seed=0, timeout=30.0, port=TCP_PORT,
                   sniff=True, server_ns=None, server_ip=None) -> TcpReport:
    """`n_conns` concurrent TCP connections vpc → inet (or `server_ns`/`server_ip`),
    each with its own payload."""
    loop = asyncio.get_running_loop()
    a = topo.addr
    server_ip = server_ip or a.server(0)
    results = {i: ConnResult(i, size=size_for(i, size[0], size[1], seed)) for i in range(n_conns)}
    sniffers = []
    if sniff:
        far = [topo.far(k) for k in range(topo.nics)]
        sniffers = [LinkSniffer(topo.vpc, far, "src"), LinkSniffer(topo.inet, far, "dst")]
        for s in sniffers:
            s.attach(loop)

    async def echo(reader, writer):
        peer = writer.get_extra_info("peername")
        cid, n = HDR.unpack(await reader.readexactly(HDR.size))
        data = await reader.readexactly(n)
        r = results.get(cid)
        if r is not None:
            r.translated = peer[:2]
            r.sent_ok = data == payload_for(cid, r.size, seed) and n == r.size
        writer.write(data)
        await writer.drain()

    async def serve(reader, writer):
        try:  # bounded: a client that stops sending does not hold its handler
            await asyncio.wait_for(echo(reader, writer), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    lsock = netns.ns_socket(server_ns or topo.inet, socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((server_ip, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    server = await asyncio.start_server(serve, sock=lsock, backlog=4096)

    async def client(r: ConnResult):
        sock = netns.ns_socket(topo.vpc, socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((a.host(r.conn_id % a.hosts), 0))
            r.client = sock.getsockname()[:2]
            await loop.sock_connect(sock, (server_ip, port))
            reader, writer = await asyncio.open_connection(sock=sock)
            data = payload_for(r.conn_id, r.size, seed)
            writer.write(HDR.pack(r.conn_id, r.size) + data)
            await writer.drain()
            echo = await reader.readexactly(r.size)
            r.echo_ok = echo == data
            writer.close()
        except (OSError, asyncio.IncompleteReadError) as exc:
            r.error = type(exc).__name__
            sock.close()

    t0 = time.monotonic()
    try:
        done, pending = await asyncio.wait([asyncio.ensure_future(client(r)) for r in results.values()],
                                           timeout=timeout)
        for t in pending:
            t.cancel()
        for r in results.values():
            if not r.echo_ok and not r.error:
                r.error = "timeout"
        await asyncio.sleep(0.05)  # the last frames reach the sniffers
    finally:
        server.close()
        for s in sniffers:
            s.close(loop)
    rep = TcpReport(list(results.values()), time.monotonic() - t0)
    if sniff:
        out_s, in_s = sniffers
        for r in rep.conns:
            if r.client:
                r.out_link, n1 = out_s.link_of(6, *r.client)
            if r.translated:
                r.in_link, n2 = in_s.link_of(6, *r.translated)
            else:
                n2 = 0
            r.links_seen = (n1 if r.client else 0) + n2
    return rep


async def udp_echo(topo, n_flows=50, size=64, seed=0, timeout=3.0, tries=3, port=UDP_PORT) -> dict:
    """UDP request/response: one socket (one flow) per request; retried on loss."""
    loop = asyncio.get_running_loop()
    a = topo.addr
    srv = netns.ns_socket(topo.inet, socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((a.server(0), port))
    srv.setblocking(False)
    seen = {}

    def on_request():
        for _ in range(4096):  # per wake-up: the flows' own readers get their turn
            try:
                data, peer = srv.recvfrom(2048)
            except BlockingIOError:
                return
            if len(data) >= 4:
                seen[struct.unpack("!I", data[:4])[0]] = peer
            srv.sendto(data, peer)

    loop.add_reader(srv.fileno(), on_request)
    ok = 0
    retried = 0

    async def flow(i):
        nonlocal ok, retried
        s = netns.ns_socket(topo.vpc, socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((a.host(i % a.hosts), 0))
        msg = struct.pack("!I", i) + payload_for(i, size - 4, seed + 1)
        try:
            for t in range(tries):
                await loop.sock_sendto(s, msg, (a.server(0), port))
                try:
                    data = await asyncio.wait_for(loop.sock_recv(s, 2048), timeout / tries)
                except asyncio.TimeoutError:
                    retried += 1
                    continue
                if data == msg:
                    ok += 1
                return
        finally:
            s.close()

    try:
        await asyncio.gather(*(flow(i) for i in range(n_flows)))
    finally:
        loop.remove_reader(srv.fileno())
        srv.close()
    return {"flows": n_flows, "answered": ok, "retries": retried,
            "translated_sources": len({p[0] for p in seen.values()})}


def _icmp_checksum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


async def ping(topo, count=5, timeout=2.0, dst=None) -> dict:
    """ICMP echo from vpc host 0 to server 0 (raw socket; no ping binary needed)."""
    loop = asyncio.get_running_loop()
    dst = dst or topo.addr.server(0)
    s = netns.ns_socket(topo.vpc, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.bind((topo.addr.host(0), 0))
    s.setblocking(False)
    ident = os.getpid() & 0xFFFF
    token = os.urandom(8)
    got = set()
    rtts = []
    sent_at = {}
    try:
        for seq in range(count):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + token
            body = body[:2] + struct.pack("!H", _icmp_checksum(body)) + body[4:]
            sent_at[seq] = time.monotonic()
            await loop.sock_sendto(s, body, (dst, 0))
            end = time.monotonic() + timeout / count
            while time.monotonic() < end and seq not in got:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(s, 2048), max(0.001, end - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                ihl = (data[0] & 0x0F) * 4
                icmp = data[ihl:]
                if len(icmp) >= 16 and icmp[0] == 0 and icmp[8:16] == token:
                    rseq = struct.unpack("!H", icmp[6:8])[0]
                    if rseq not in got and rseq in sent_at:
                        got.add(rseq)
                        rtts.append((time.monotonic() - sent_at[rseq]) * 1e3)
    finally:
        s.close()
    return {"sent": count, "received": len(got), "rtt_ms_max": round(max(rtts), 3) if rtts else None}


def run_all(topo, n_conns=200, udp_flows=50, pings=5, seed=0) -> dict:
    async def main():
        tcp = await tcp_echo(topo, n_conns=n_conns, seed=seed)
        udp = await udp_echo(topo, n_flows=udp_flows, seed=seed)
        icmp = await ping(topo, count=pings)
        return {"tcp": tcp.summary(), "udp": udp, "ping": icmp}

    return asyncio.run(main())

"""The gateway as a router on the testbed (issue 13): real clients, real kernels.

    vpc ══(1500)══ gw: 2 NICs ══(1280)══ inet (servers advertise MSS 1460 toward the pool)
                   tcp_mss_clamp: 1300

* traceroute from vpc shows the gateway's hop (its inside address, from its own ICMP
  time exceeded) and then reaches the server;
* a TCP upload completes by path-MTU discovery from the gateway's own ICMP
  fragmentation needed: the clamp (1300) still lets 1340-byte packets through toward a
  1280-byte link, so the client's first full-size segments must be answered;
* the SYN the server receives carries the clamped MSS (captured with a raw socket in
  inet, bounded in time);
* offloads are on, so the clients' TSO super-frames reach the gateway whole: no segment
  the server side receives is longer than the narrow link (read with PACKET_VNET_HDR in
  inet: a super-frame's segments are its headers + gso_size; veth itself never checks).
"""
import asyncio
import os
import re
import select
import shutil
import socket
import time

import pytest
import yaml
from scapy.all import TCP, Ether  # (here, not in _syn_mss: a first import of scapy under load outlasted its deadline)

from hypernat.lab import netns, traffic
from hypernat.lab.topology import Addressing, Topology

import labkit  # noqa: E402  (tests/labkit.py)

pytestmark = pytest.mark.netns
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "testbed.yaml")
CLAMP = 1300
NARROW = 1280


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with open(CONF) as f:
        tree = yaml.safe_load(f)
    tree["tcp_mss_clamp"] = CLAMP
    conf = str(tmp_path_factory.mktemp("router") / "gw.yaml")
    with open(conf, "w") as f:
        yaml.safe_dump(tree, f)
    # offloads on (the lab's default): the clients' TSO super-frames reach the gateway
    # whole, and their segments (gso_size), not their length, meet the narrow link
    topo = Topology(tag=f"t{os.getpid()}rt", nics=2, mode="hypernat", addr=Addressing.from_config(conf),
                    outside_mtu=NARROW)
    with labkit.gateway(topo, conf):
        yield topo


from labkit import counters, total  # noqa: E402  (shared with the other testbed tests)


def _snmp(ns, group, field):
    lines = [ln.split() for ln in netns.run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith(group + ":")]
    return int(lines[1][lines[0].index(field)])


@pytest.mark.skipif(shutil.which("traceroute") is None, reason="traceroute is not installed (tools/install-deps.sh)")
def test_traceroute_shows_the_gateway_and_reaches_the_server(gw):
    server = gw.addr.server(0)
    gw_hops = {gw.addr.link("inside", k, "gw") for k in range(gw.nics)}
    for attempt in range(3):  # a probe lost to a first-packet fetch race is retried by a new run
        p = netns.run(gw.vpc, ["traceroute", "-n", "-q", "1", "-w", "2", "-m", "4", server], check=False, timeout=40)
        hops = [ln.split() for ln in p.stdout.splitlines()[1:] if re.match(r"\s*\d+\s", ln)]
        if len(hops) >= 2 and hops[0][1] in gw_hops and hops[-1][1] == server:
            break
    assert p.returncode == 0, p.stderr
    assert hops[0][1] in gw_hops, p.stdout  # the gateway answers for itself (time exceeded)
    assert hops[-1][1] == server and len(hops) == 2, p.stdout
    c = counters(gw)
    assert total(c, "router_out_icmp_time_exceeded") >= 1, c


@pytest.mark.skipif(shutil.which("tracepath") is None, reason="tracepath is not installed (tools/install-deps.sh)")
def test_tracepath_shows_the_gateway(gw):
    server = gw.addr.server(0)
    gw_hops = {gw.addr.link("inside", k, "gw") for k in range(gw.nics)}
    p = netns.run(gw.vpc, ["tracepath", "-n", "-m", "4", server], check=False, timeout=40)
    first = [ln.split() for ln in p.stdout.splitlines() if re.match(r"\s*1:\s+\d", ln)]
    assert first and first[0][1] in gw_hops, p.stdout
    assert "reached" in p.stdout, p.stdout


def _syn_mss(raw_sock, port, deadline):
    """The MSS option of the first SYN to `port` the raw socket holds (None: none)."""
    seen = 0
    while time.monotonic() < deadline:
        r, _, _ = select.select([raw_sock], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        f = raw_sock.recv(65535)
        seen += 1
        if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:
            continue
        tcp = 14 + (f[14] & 15) * 4
        if f[tcp + 2 : tcp + 4] == port.to_bytes(2, "big") and f[tcp + 13] & 0x12 == 0x02:  # SYN, not SYN-ACK
            return dict(Ether(f)[TCP].options).get("MSS")
    raise AssertionError(f"no SYN to port {port} among {seen} frames captured")


SOL_PACKET, PACKET_VNET_HDR, SO_RCVBUFFORCE = 263, 15, 33  # linux/socket.h, if_packet.h, asm/socket.h


def _segments(sock, port):
    """(frames, the longest IPv4 segment) of the TCP frames to `port` the socket holds
    (a PACKET_VNET_HDR socket: a super-frame counts by headers + gso_size)."""
    frames = longest = 0
    while True:
        try:
            f = sock.recv(1 << 17, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return frames, longest
        gso_type, gso_size = f[1], int.from_bytes(f[4:6], "little")
        f = f[10:]
        if len(f) < 54 or f[12:14] != b"\x08\x00" or f[23] != 6:
            continue
        ihl = (f[14] & 15) * 4
        tcp = 14 + ihl
        if f[tcp + 2:tcp + 4] != port.to_bytes(2, "big"):
            continue
        total = int.from_bytes(f[16:18], "big")
        seg = min(total, ihl + (f[tcp + 12] >> 4) * 4 + gso_size) if gso_type else total
        frames += 1
        longest = max(longest, seg)


def test_pmtud_by_the_gateways_own_icmp_and_mss_clamped_at_the_server(gw):
    """Against the second server: tracepath above taught vpc the path MTU toward the
    first one already (and a SYN then carries the smaller MSS of that route)."""
    port = 5113
    server = gw.addr.server(1)
    netns.run(gw.vpc, ["ip", "route", "flush", "cache"])
    rawsock = netns.ns_socket(gw.inet, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    segsock = netns.ns_socket(gw.inet, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    segsock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    segsock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    try:
        got_before = _snmp(gw.vpc, "Icmp", "InDestUnreachs")
        rep = asyncio.run(traffic.tcp_echo(gw, n_conns=8, size=(40000, 120000), seed=13, port=port, timeout=60,
                                           sniff=False, server_ip=server))
        assert rep.intact == 8, rep.summary()
        assert _syn_mss(rawsock, port, time.monotonic() + 3) == CLAMP  # the client sent 1460
        frames, longest = _segments(segsock, port)
    finally:
        rawsock.close()
        segsock.close()
    assert frames > 0 and longest <= NARROW, (frames, longest)
    got = _snmp(gw.vpc, "Icmp", "InDestUnreachs") - got_before
    assert got > 0, "no fragmentation-needed reached the clients"
    c = counters(gw)
    assert total(c, "router_out_icmp_frag_needed") >= 1, c
    assert total(c, "rx_super_frames") > 0, c  # TSO on: super-frames did come, and were sized by segment
    assert total(c, "router_out_mss_clamped") >= 8 and total(c, "router_in_mss_clamped") >= 8, c
    # the clients learnt the gateway's MTU for the server's address
    routes = netns.run(gw.vpc, ["ip", "route", "get", server]).stdout
    assert f"mtu {NARROW}" in routes, routes

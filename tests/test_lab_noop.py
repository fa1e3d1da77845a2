"""The no-op forwarder over PACKET_MMAP on the testbed: real TCP across the gateway
with plain routing (no NAT), ip_forward off in gw — so every byte that arrives went
through our rings."""
import asyncio
import json
import os

import pytest

from hypernat.lab import netns, noop, traffic
from hypernat.lab.topology import Topology

pytestmark = pytest.mark.netns


def _backends():
    out = ["packet_mmap"]
    try:
        import hypernat.io.af_xdp  # noqa: F401

        out.append("af_xdp")
    except ImportError:
        pass
    return out


@pytest.fixture(params=_backends())
def noop_lab(request):
    topo = Topology(tag=f"t{os.getpid()}n{request.param[0]}", nics=2, mode="noop",
                    offloads=request.param != "af_xdp")  # AF_XDP is per-frame
    try:
        topo.up()
        stats = noop.start_in_lab(topo, backend=request.param)
        yield topo, stats
    finally:
        topo.down()
        for f in [topo.log_path(["x", "-m", "hypernat.lab.noop", "--inside", topo.inside(k)]) for k in range(2)]:
            if os.path.exists(f):
                os.unlink(f)
        for f in locals().get("stats", []):
            if os.path.exists(f):
                os.unlink(f)
    assert not topo.exists()


def test_tcp_udp_ping_through_the_noop_forwarder(noop_lab):
    topo, stats_files = noop_lab
    assert netns.sysctl(topo.gw, "net.ipv4.ip_forward") == "0"

    async def go():
        tcp = await traffic.tcp_echo(topo, n_conns=60, size=(500, 20000), seed=3)
        udp = await traffic.udp_echo(topo, n_flows=20)
        icmp = await traffic.ping(topo, count=3)
        return tcp, udp, icmp

    tcp, udp, icmp = asyncio.run(go())
    s = tcp.summary()
    assert s["intact"] == 60, s
    # Plain routing: the server sees the VPC hosts' own addresses.
    assert {c.translated[0] for c in tcp.conns} <= {topo.addr.host(i) for i in range(topo.addr.hosts)}
    assert {c.out_link for c in tcp.conns} == {0, 1} and {c.in_link for c in tcp.conns} == {0, 1}
    assert udp["answered"] == 20 and icmp["received"] == 3
    counters = topo.link_counters()
    topo.down()  # SIGTERM: the forwarders write their counters
    total_out = total_in = 0
    for f in stats_files:
        with open(f) as fh:
            st = json.load(fh)
        fw = st["forwarder"]
        total_out += fw["out_frames"]
        total_in += fw["in_frames"]
        assert fw["out_tx_dropped"] == 0 and fw["in_tx_dropped"] == 0
        assert st["inside"].get("rx_truncated", 0) == 0 and st["inside"].get("rx_csum_partial", 0) == 0
    # Every TCP data segment of both directions crossed our rings (at least one frame
    # per connection per direction, plus the handshakes).
    assert total_out >= 60 * 3 and total_in >= 60 * 3
    # What the forwarders transmitted is what the outside links carried out of gw.
    assert sum(counters[f"outside{k}"][1] for k in range(2)) >= total_out - 10

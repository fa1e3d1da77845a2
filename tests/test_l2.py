"""hypernat.l2 against scapy (an oracle we did not write) and, for resolution, a real
kernel in a namespace."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.l2 import ARP, Ether

from hypernat import l2

GW = bytes.fromhex("020000000001")
HOST = bytes.fromhex("020000000002")


def test_mac_helpers():
    assert l2.mac_bytes("02:00:00:00:00:01") == GW
    assert l2.mac_bytes("0200.0000.0001") == GW
    assert l2.mac_str(GW) == "02:00:00:00:00:01"
    assert l2.is_multicast(l2.BROADCAST) and l2.is_multicast(bytes.fromhex("01005e000001"))
    assert not l2.is_multicast(GW)
    for bad in ("02:00", b"12345", "zz:00:00:00:00:00"):
        with pytest.raises(ValueError):
            l2.mac_bytes(bad)


def test_request_matches_scapy():
    f = l2.arp_request(GW, "172.16.0.1", "172.16.0.2")
    p = Ether(f)
    assert len(f) == 60
    assert p.dst == "ff:ff:ff:ff:ff:ff" and p.src == "02:00:00:00:00:01"
    assert p[ARP].op == 1 and p[ARP].psrc == "172.16.0.1" and p[ARP].pdst == "172.16.0.2"
    assert p[ARP].hwsrc == "02:00:00:00:00:01"


def test_responder_answers_owned_addresses_and_learns():
    r = l2.ArpResponder(GW, owned=["172.16.0.1", "203.0.113.0/24"])
    req = bytes(Ether(src=l2.mac_str(HOST), dst="ff:ff:ff:ff:ff:ff") /
                ARP(op=1, hwsrc=l2.mac_str(HOST), psrc="172.16.0.2", pdst="203.0.113.7"))
    rep = r.handle(req)
    p = Ether(rep)
    assert p.dst == l2.mac_str(HOST) and p.src == l2.mac_str(GW)
    assert p[ARP].op == 2 and p[ARP].psrc == "203.0.113.7" and p[ARP].pdst == "172.16.0.2"
    assert p[ARP].hwsrc == l2.mac_str(GW) and p[ARP].hwdst == l2.mac_str(HOST)
    assert r.neighbours.get("172.16.0.2") == HOST
    # Not ours: learned, not answered.
    other = bytes(Ether(src="02:00:00:00:00:03", dst="ff:ff:ff:ff:ff:ff") /
                  ARP(op=1, hwsrc="02:00:00:00:00:03", psrc="172.16.0.3", pdst="172.16.0.9"))
    assert r.handle(other) is None
    assert r.counters["request_not_ours"] == 1
    assert r.neighbours.get("172.16.0.3") == bytes.fromhex("020000000003")
    # A reply is learned.
    reply = bytes(Ether(src="02:00:00:00:00:04", dst=l2.mac_str(GW)) /
                  ARP(op=2, hwsrc="02:00:00:00:00:04", psrc="172.16.0.4", pdst="172.16.0.1"))
    assert r.handle(reply) is None and r.neighbours.get("172.16.0.4")


def test_neighbours_age_out_and_refuse_multicast():
    now = [0.0]
    n = l2.Neighbours(max_age=10, clock=lambda: now[0])
    n.learn("10.0.0.1", HOST)
    n.learn("10.0.0.2", l2.BROADCAST)
    assert n.get("10.0.0.2") is None and n.counters["learn_refused_bad_mac"] == 1
    now[0] = 9
    assert n.get("10.0.0.1") == HOST
    now[0] = 11
    assert n.get("10.0.0.1") is None and n.counters["expired"] == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_never_crash(data):
    r = l2.ArpResponder(GW, owned=["0.0.0.0/0"])
    out = r.handle(data)
    assert out is None or Ether(out).haslayer(ARP)


@pytest.mark.netns
def test_resolve_asks_the_kernel():
    from pyroute2 import IPRoute
    from pyroute2 import netns as pr_netns

    from hypernat.lab import netns

    a, b = f"hn-t{os.getpid()}-l2a", f"hn-t{os.getpid()}-l2b"
    pr_netns.create(a)
    pr_netns.create(b)
    try:
        with IPRoute(netns=a) as ipr:
            ipr.link("add", ifname="x", kind="veth", peer={"ifname": "y", "net_ns_fd": b})
            i = ipr.link_lookup(ifname="x")[0]
            ipr.addr("add", index=i, address="192.0.2.1", prefixlen=24)
            ipr.link("set", index=i, state="up")
        with IPRoute(netns=b) as ipr:
            i = ipr.link_lookup(ifname="y")[0]
            ipr.addr("add", index=i, address="192.0.2.2", prefixlen=24)
            ipr.link("set", index=i, state="up")
            want = l2.mac_bytes(ipr.get_links(i)[0].get("IFLA_ADDRESS"))
        with netns.entered(a):
            n = l2.Neighbours()
            assert n.resolve("192.0.2.2", "x", timeout=3) == want
            with pytest.raises(TimeoutError):
                n.resolve("192.0.2.99", "x", timeout=0.3)
    finally:
        pr_netns.remove(a)
        pr_netns.remove(b)


@pytest.mark.netns
def test_next_hop_mac_of_the_testbed_links():
    from hypernat.lab import netns
    from hypernat.lab.topology import Topology

    topo = Topology(tag=f"t{os.getpid()}l", nics=2, mode="hypernat")
    try:
        topo.up()
        with netns.entered(topo.gw):
            for k in range(2):
                assert l2.gateway_via(topo.inside(k)) == topo.addr.link("inside", k, "far")
                assert l2.gateway_via(topo.outside(k)) == topo.addr.link("outside", k, "far")
                assert l2.next_hop_mac(topo.outside(k)) == topo.mac(topo.inet, topo.far(k))
                assert l2.next_hop_mac(topo.inside(k)) == topo.mac(topo.vpc, topo.far(k))
            with pytest.raises(ValueError, match="lo"):
                l2.gateway_via("lo")
    finally:
        topo.down()

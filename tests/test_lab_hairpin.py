"""Hairpinning on any NIC, on the testbed (RFC 4787 REQ-9): two VPC hosts talk to each
other through their external endpoints, 20 times with fresh mappings, 2 NICs, each
datagram sent once.

    A ──► server (learns E_A)      B ──► server (learns E_B)
    A ──► E_B  ══ gateway turns it around ══► B sees it from E_A
    B ──► E_A  ══ gateway turns it around ══► A sees it from E_B

A's and B's mappings are owned by different NICs (endpoint-independent mapping: the
host's NIC), and the kernel's ECMP hash puts each hairpinned datagram on either NIC, so
most of them find one half, or both, on another NIC and fetch it: the first datagram
must still arrive.  Filtering is endpoint-independent (as for coturn's RFC 5780 probe),
so no hole punching is needed."""
import ipaddress
import os
import shutil
import socket
import tempfile
import time

import pytest
import yaml

from hypernat.config import load
from hypernat.lab import cli, netns
from hypernat.lab.topology import Addressing, Topology

import labkit  # noqa: E402  (tests/labkit.py)
from hypernat.partition import Partition

pytestmark = pytest.mark.netns
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gw():
    d = tempfile.mkdtemp(prefix="hn-frag-hairpin-")
    with open(os.path.join(ROOT, "conf", "testbed.yaml")) as f:
        tree = yaml.safe_load(f)
    tree["filtering"] = "endpoint-independent"
    conf = os.path.join(d, "hairpin.yaml")
    with open(conf, "w") as f:
        yaml.safe_dump(tree, f)
    addr = Addressing.from_config(conf)
    addr.hosts = 8
    topo = Topology(tag=f"frag{os.getpid() % 100000}h", nics=2, mode="hypernat", addr=addr)
    try:
        with labkit.gateway(topo, conf):
            yield topo
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_hairpin_20_of_20_first_datagrams_on_2_nics(gw):
    part = Partition.from_config(load(gw.config))
    hosts = [gw.addr.host(i) for i in range(gw.addr.hosts)]
    owner = {h: part.eim_owner(int(ipaddress.IPv4Address(h))) for h in hosts}
    ha = next(h for h in hosts if owner[h] == 0)
    hb = next(h for h in hosts if owner[h] == 1)
    pool = ipaddress.ip_network(gw.addr.pool)
    srv = netns.ns_socket(gw.inet, socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((gw.addr.server(0), 5120))
    srv.settimeout(2.0)
    ok, failed = 0, []
    try:
        for rnd in range(20):
            a = netns.ns_socket(gw.vpc, socket.AF_INET, socket.SOCK_DGRAM)
            b = netns.ns_socket(gw.vpc, socket.AF_INET, socket.SOCK_DGRAM)
            try:
                a.bind((ha, 20000 + rnd))
                b.bind((hb, 21000 + rnd))
                for s in (a, b):
                    s.settimeout(2.0)
                a.sendto(b"a-out", (gw.addr.server(0), 5120))
                _, ea = srv.recvfrom(2048)
                b.sendto(b"b-out", (gw.addr.server(0), 5120))
                _, eb = srv.recvfrom(2048)
                assert ipaddress.ip_address(ea[0]) in pool and ipaddress.ip_address(eb[0]) in pool
                try:
                    a.sendto(b"a-to-b %d" % rnd, eb)  # once: the first datagram must arrive
                    got_b = b.recvfrom(2048)
                    b.sendto(b"b-to-a %d" % rnd, ea)
                    got_a = a.recvfrom(2048)
                except socket.timeout:
                    failed.append((rnd, "timeout"))
                    continue
                if got_b == (b"a-to-b %d" % rnd, ea) and got_a == (b"b-to-a %d" % rnd, eb):
                    ok += 1
                else:
                    failed.append((rnd, got_b, got_a))
            finally:
                a.close()
                b.close()
    finally:
        srv.close()
    time.sleep(1.3)  # the NICs send STATS every second
    c = cli.gateway_counters(gw)
    hp = {k: v for k, v in c.items() if "hairpin" in k}
    assert ok == 20, (failed, hp)
    assert c.get("fastpath_out_hairpin", 0) >= 40, hp
    # some of them found a half missing on their NIC and fetched it (the case this pins)
    assert c.get("loop_hairpin_replayed", 0) > 0 and c.get("loop_hairpin_unresolved", 0) == 0, hp

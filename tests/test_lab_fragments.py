"""Fragments through HyperNAT on the testbed: real kernels fragment, real clients check.

    vpc ══ECMP══ gw (2 hypernat-nic daemons) ══ECMP══ inet
    ping -s 4000  ───── 3 fragments out ─────►  echo ──── 3 fragments back ────►
    dig +bufsize=4096 TXT big.test ─────────►  dnsmasq: a ~3.4 kB answer in 3 fragments

Every (host, server) pair of the run: the kernels' ECMP hashes spread them over both
NICs (each NIC's fragment counters show it), and every datagram must arrive whole."""
import os
import re
import time

import pytest

from hypernat.lab import cli, netns
from hypernat.lab.topology import Addressing, Topology

import labkit  # noqa: E402  (tests/labkit.py)

pytestmark = pytest.mark.netns
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "testbed.yaml")
TXT = [f"{k:02d}" + "x" * 248 for k in range(13)]  # 13 strings of 250 bytes: a ~3.4 kB answer


@pytest.fixture(scope="module")
def gw():
    addr = Addressing.from_config(CONF)
    addr.hosts, addr.servers = 4, 4
    topo = Topology(tag=f"frag{os.getpid() % 100000}", nics=2, mode="hypernat", addr=addr)
    with labkit.gateway(topo, CONF):
        yield topo


def per_nic(topo, settle=1.3):
    time.sleep(settle)  # the NICs send STATS every second
    with cli._ctl(topo) as c:
        return (c.query("counters") or {}).get("per_nic", {})


def test_ping_4000_bytes_through_both_nics(gw):
    before = per_nic(gw, settle=0)
    lost = []
    for h in range(gw.addr.hosts):
        for s in range(gw.addr.servers):
            r = netns.run(gw.vpc, ["ping", "-n", "-q", "-s", "4000", "-c", "2", "-i", "0.2", "-W", "3",
                                   "-I", gw.addr.host(h), gw.addr.server(s)], check=False, timeout=30)
            m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
            if not m or m.group(1) != m.group(2):
                lost.append((gw.addr.host(h), gw.addr.server(s), r.stdout.strip().splitlines()[-2:]))
    assert not lost, lost
    after = per_nic(gw)
    for nic in ("nic0", "nic1"):
        done = after.get(nic, {}).get("fastpath_frag_completed", 0) - before.get(nic, {}).get("fastpath_frag_completed", 0)
        assert done > 0, (nic, after.get(nic))
    assert all(c.get("fastpath_frag_expired_dropped", 0) == 0 for c in after.values()), after


def test_dns_answer_larger_than_the_path_mtu_arrives_whole(gw):
    srv = gw.addr.server(0)
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={srv}", "--port=53", "--edns-packet-max=4096",
            "--user=root", f"--pid-file=/run/hypernat-lab/{gw.tag}-dnsmasq.pid"]
    argv += [f"--txt-record=big.test,{t}" for t in TXT]
    p = gw.start(gw.inet, argv)
    try:
        for _ in range(50):  # dnsmasq listening (bounded: 5 s)
            if netns.run(gw.inet, ["ss", "-uln", f"sport = :53"], check=False).stdout.count(srv):
                break
            time.sleep(0.1)
        for h in range(gw.addr.hosts):
            r = netns.run(gw.vpc, ["dig", "+bufsize=4096", "+notcp", "+ignore", "+time=3", "+tries=1",
                                   "-b", gw.addr.host(h), f"@{srv}", "TXT", "big.test"], check=False, timeout=30)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "status: NOERROR" in r.stdout and " tc" not in r.stdout.split("flags:")[1].split(";")[0], r.stdout
            got = sorted(re.findall(r'"(\d\dx+)"', r.stdout))
            assert got == TXT, r.stdout
            size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", r.stdout).group(1))
            assert size > 3000  # more than two 1500-byte packets: it came in fragments
    finally:
        p.terminate()
        p.wait(5)

"""The VPC router's resilient group (hypernat.fleet.resilient) on a real kernel: a
server's failure or return moves only the hosts that must move.  The kernel's own
route lookup (``ip route get ... iif``) is the oracle: it picks a bucket by the
source-address hash exactly as forwarding does.  Root and network namespaces."""
import os
import subprocess
import time
import uuid

import pytest

from hypernat.fleet.resilient import ResilientRoutes, nexthops_from_bgp

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

SERVERS = ["192.0.2.11", "192.0.2.12", "192.0.2.13"]
HOSTS = [f"10.77.{i // 250}.{1 + i % 250}" for i in range(600)]


def sh(ns, *args):
    return subprocess.run(["ip", "netns", "exec", ns, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def router():
    ns = f"hn-fleet-res-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["sysctl", "-qw", "net.ipv4.ip_forward=1"], ["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=3"],
                    ["sysctl", "-qw", "net.ipv4.fib_multipath_hash_fields=0x0001"],
                    ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"], ["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"],
                    ["ip", "link", "add", "hosts", "type", "veth", "peer", "name", "hosts-p"], ["ip", "link", "add", "srv", "type", "veth", "peer", "name", "srv-p"],
                    ["ip", "link", "set", "hosts-p", "up"], ["ip", "link", "set", "srv-p", "up"],
                    ["ip", "addr", "add", "192.0.2.1/24", "dev", "srv"], ["ip", "link", "set", "srv", "up"],
                    ["ip", "link", "set", "hosts", "up"], ["ip", "link", "set", "lo", "up"]):
            sh(ns, *cmd)
        for s in SERVERS:  # the servers' MACs as the router would have learnt them
            sh(ns, "ip", "neigh", "replace", s, "lladdr", "02:00:00:00:00:%02x" % int(s.rsplit(".", 1)[1]), "dev", "srv")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def where(ns) -> dict:
    """host -> the server its packets to the Internet go to now (the kernel's choice)."""
    cmds = "".join(f"route get 198.51.100.1 from {h} iif hosts\n" for h in HOSTS)
    p = subprocess.run(["ip", "netns", "exec", ns, "ip", "-batch", "-"], input=cmds, check=True, capture_output=True,
                       text=True, timeout=30)
    vias = [ln.split(" via ")[1].split()[0] for ln in p.stdout.splitlines() if " via " in ln]
    assert len(vias) == len(HOSTS)
    return dict(zip(HOSTS, vias))


def programmed(ns, fn):
    from hypernat.lab import netns

    with netns.entered(ns):
        return fn()


def test_failure_and_return_move_only_what_must_move(router):
    rr = ResilientRoutes(["10.77.0.0/16"], buckets=128, idle_timer=1)
    programmed(router, rr.setup)
    programmed(router, lambda: rr.apply(dict.fromkeys(SERVERS, 256)))
    before = where(router)
    assert set(before.values()) == set(SERVERS)  # all three carry hosts
    # Server 2 fails: its hosts move, and only they.
    programmed(router, lambda: rr.apply(dict.fromkeys([SERVERS[0], SERVERS[2]], 256)))
    after = where(router)
    moved = {h for h in HOSTS if after[h] != before[h]}
    assert moved == {h for h in HOSTS if before[h] == SERVERS[1]}
    assert set(after.values()) == {SERVERS[0], SERVERS[2]}
    # It returns.  No traffic flows here, so every bucket falls idle: it gets its share
    # back after idle_timer, and the only hosts that move are those that move *to* it.
    programmed(router, lambda: rr.apply(dict.fromkeys(SERVERS, 256)))
    time.sleep(1.6)  # idle_timer 1 s
    back = where(router)
    moved = {h for h in HOSTS if back[h] != after[h]}
    assert moved and all(back[h] == SERVERS[1] for h in moved)
    share = programmed(router, rr.buckets_by_member)
    assert sorted(share.values()) in ([42, 43, 43], [42, 42, 44]) or max(share.values()) - min(share.values()) <= 2


def test_draining_member_gets_no_bucket(router):
    rr = ResilientRoutes(["10.77.0.0/16"], buckets=128, idle_timer=1)
    programmed(router, rr.setup)
    programmed(router, lambda: rr.apply({SERVERS[0]: 256, SERVERS[1]: 256}))
    before = where(router)
    programmed(router, lambda: rr.apply({SERVERS[0]: 256, SERVERS[1]: 1}))  # SERVERS[1] drains
    time.sleep(1.6)  # no traffic: every bucket falls idle (idle_timer 1 s) and migrates
    after = where(router)
    assert set(after.values()) == {SERVERS[0]}
    assert all(after[h] == before[h] for h in HOSTS if before[h] == SERVERS[0])


def test_nexthops_from_bgp_reads_graceful_shutdown():
    paths = {"paths": [
        {"valid": True, "nexthops": [{"ip": "172.30.1.2", "accessible": True}]},
        {"valid": True, "community": {"string": "graceful-shutdown", "list": ["gracefulShutdown"]},
         "nexthops": [{"ip": "172.30.2.2", "accessible": True}]},
        {"valid": False, "nexthops": [{"ip": "172.30.3.2"}]},
    ]}
    assert nexthops_from_bgp(paths) == {"172.30.1.2": 256, "172.30.2.2": 1}
    assert nexthops_from_bgp({"paths": paths["paths"][1:]}) == {"172.30.2.2": 256}  # all draining: spread
    assert nexthops_from_bgp({}) == {}

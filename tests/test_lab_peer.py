"""The testbed with Linux's own NAT in gw (the peer): real TCP through a 2-NIC gateway.

These tests need nothing of HyperNAT's data plane; they pin the testbed itself:
ECMP on both sides really spreads the directions independently, the peer really
translates, and everything is removed afterwards."""
import asyncio
import os

import pytest

from hypernat.lab import netns, peer, traffic
from hypernat.lab.topology import Topology, list_runs

pytestmark = pytest.mark.netns


@pytest.fixture
def linux_lab():
    topo = Topology(tag=f"t{os.getpid()}p", nics=2, mode="linux")
    try:
        yield topo.up()
    finally:
        topo.down()
    assert not topo.exists()


def test_200_tcp_connections_through_linux_nat_over_two_nics(linux_lab):
    rep = asyncio.run(traffic.tcp_echo(linux_lab, n_conns=200, seed=7))
    s = rep.summary()
    assert s["intact"] == 200, s
    assert s["located"] == 200, s
    # Every connection was translated: the server saw the pool address, never the host.
    assert {c.translated[0] for c in rep.conns} == {linux_lab.addr.snat()}
    # No direction changed NIC in the middle of a connection.
    assert all(c.links_seen == 2 for c in rep.conns), [c for c in rep.conns if c.links_seen != 2][:3]
    # ECMP on both sides, independently: about half cross (binomial, 200 draws).
    assert 0.2 <= s["crossed_fraction"] <= 0.8, s
    # ...and each side used both NICs.
    assert {c.out_link for c in rep.conns} == {0, 1}
    assert {c.in_link for c in rep.conns} == {0, 1}
    assert peer.nat_counters(linux_lab)["snat"] >= 200


def test_steered_return_path_is_predicted_for_every_connection():
    """inet steers replies by nftables jhash; steering.predict_return_nic reproduces
    the kernel's choice for every connection (and the split stays fair)."""
    from hypernat.lab import steering

    seed = 0x5EED1234
    topo = Topology(tag=f"t{os.getpid()}s", nics=2, mode="linux", steer_seed=seed)
    try:
        topo.up()
        rep = asyncio.run(traffic.tcp_echo(topo, n_conns=200, seed=11))
        s = rep.summary()
        assert s["intact"] == 200 and s["located"] == 200, s
        predicted = [steering.predict_return_nic(topo.addr.server(0), traffic.TCP_PORT, c.translated[0],
                                                 c.translated[1], topo.nics, seed) for c in rep.conns]
        assert predicted == [c.in_link for c in rep.conns]
        assert 0.2 <= s["crossed_fraction"] <= 0.8, s
        # ...and ping (no ports: not steered) still works.
        assert asyncio.run(traffic.ping(topo, count=2))["received"] == 2
    finally:
        topo.down()


def test_nft_jhash_known_values():
    """Pinned values of Linux's jhash() (lookup3), so a refactor cannot drift silently;
    the kernel itself is the oracle in the steered test above."""
    from hypernat.lab.steering import jhash

    assert jhash(b"", 0) == 0xDEADBEEF
    # lookup3's published self-test vectors (hashlittle, which jhash is on little-endian).
    assert jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_udp_and_ping_through_linux_nat(linux_lab):
    async def go():
        return await traffic.udp_echo(linux_lab, n_flows=40), await traffic.ping(linux_lab, count=3)

    udp, icmp = asyncio.run(go())
    assert udp["answered"] == 40, udp
    assert udp["translated_sources"] == 1  # all behind the one snat address
    assert icmp["received"] == 3, icmp


def test_gateway_does_not_forward_without_nat_in_hypernat_mode():
    """In hypernat mode gw has ip_forward off: with no daemon running nothing passes.
    (The kernel must not forward what AF_PACKET hands to the NIC daemons.)"""
    topo = Topology(tag=f"t{os.getpid()}h", nics=2, mode="hypernat")
    try:
        topo.up()
        assert netns.sysctl(topo.gw, "net.ipv4.ip_forward") == "0"
        rep = asyncio.run(traffic.tcp_echo(topo, n_conns=4, size=(100, 100), timeout=1.5, sniff=False))
        assert rep.intact == 0
        assert netns.sysctl(topo.vpc, "net.ipv4.fib_multipath_hash_policy") == "1"
    finally:
        topo.down()
    assert not topo.exists()


def test_down_is_idempotent_and_cleans_after_a_failed_up(monkeypatch):
    topo = Topology(tag=f"t{os.getpid()}f", nics=1, mode="linux")

    def boom(_topo):
        raise RuntimeError("injected failure while configuring the peer")

    monkeypatch.setattr(peer, "install_linux_nat", boom)
    with pytest.raises(RuntimeError, match="injected"):
        topo.up()
    assert not topo.exists()
    assert topo.tag not in list_runs()
    topo.down()  # again: nothing to do, no error


def test_lab_cli_up_run_down(capsys):
    from hypernat.lab.cli import main

    tag = f"t{os.getpid()}c"
    try:
        assert main(["up", "--tag", tag, "--peer", "linux", "--config", "/nonexistent.yaml"]) == 0
        assert tag in list_runs()
        assert main(["run", "--tag", tag, "--conns", "20", "--udp", "5", "--pings", "2"]) == 0
        out = capsys.readouterr().out
        assert "20/20 connections intact" in out
        assert "linux-nat snat" in out
    finally:
        assert main(["down", "--tag", tag]) == 0
        assert main(["down", "--tag", tag]) == 0
    assert tag not in list_runs()

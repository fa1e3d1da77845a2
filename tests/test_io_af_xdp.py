"""AF_XDP ports on a real veth pair (copy mode; native and generic XDP).

Skipped only where the extension is not built (no libxdp/libbpf at build time: setup.py
says so); CI installs both, so there it runs."""
import os
import time

import numpy as np
import pytest
from pyroute2 import IPRoute
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from hypernat.io.base import Batch
from hypernat.l2 import mac_str
from hypernat.lab import netns
from vethkit import veth_namespace

pytestmark = pytest.mark.netns
af_xdp = pytest.importorskip("hypernat.io.af_xdp", reason="hypernat.io._xsk not built (libxdp/libbpf missing)")
from hypernat.io.packet_mmap import PacketMmapPort  # noqa: E402


ADDRS = {"a": "10.9.0.1/24", "b": "10.9.0.2/24"}


@pytest.fixture
def ns():
    with veth_namespace(f"hn-t{os.getpid()}-xdp", [("a", "b")], addresses=ADDRS, offloads=False, ipv6=False) as name:
        yield name


def open_ports(ns, mode):
    with netns.entered(ns):
        a = PacketMmapPort("a")
        try:
            b = af_xdp.AfXdpPort("b", mode=mode, frames=4096, ring_size=1024)
        except BaseException:
            a.close()
            raise
    return a, b


def udp_frames(a, b, n, start=0):
    return [bytes(Ether(src=mac_str(a.mac()), dst=mac_str(b.mac())) / IP(src="10.9.0.1", dst="198.51.100.1") /
                  UDP(sport=start + i, dport=9) / (b"p" * 18)) for i in range(n)]


def collect(port, want, timeout=3.0, only_ipv4=True):
    got = []
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        bt = port.recv()
        if bt is None:
            time.sleep(0.002)
            continue
        got += [f for f in bt.frames() if not only_ipv4 or f[12:14] == b"\x08\x00"]
        port.release(bt)
    return got


@pytest.mark.parametrize("mode", ["native", "skb"])
def test_ipv4_to_the_socket_arp_to_the_kernel(ns, mode):
    a, b = open_ports(ns, mode)
    with a, b:
        assert b.mode == mode
        sent = udp_frames(a, b, 200)
        req = bytes(Ether(src=mac_str(a.mac()), dst="ff:ff:ff:ff:ff:ff") /
                    ARP(hwsrc=mac_str(a.mac()), psrc="10.9.0.7", pdst="10.9.0.2"))  # not a local address
        assert a.send(Batch.from_frames(sent + [req]), np.arange(201)) == 201
        assert collect(b, 200) == sent
        time.sleep(0.05)
        assert b.recv() is None  # the ARP request did not come to us...
        replies = [f for f in collect(a, 1, only_ipv4=False) if Ether(f).haslayer(ARP)]
        assert replies and Ether(replies[0])[ARP].op == 2  # ...the kernel answered it
        assert Ether(replies[0])[ARP].hwsrc == mac_str(b.mac())


def test_frames_are_recycled_through_the_fill_ring(ns):
    a, b = open_ports(ns, "auto")
    with a, b:
        total = 0
        for rnd in range(6):  # 6 x 600 frames through a 1024-frame fill ring
            sent = udp_frames(a, b, 600, start=rnd * 600)
            for s in range(0, 600, 200):
                a.send(Batch.from_frames(sent[s:s + 200]), np.arange(200))
                got = collect(b, 200)
                assert got == sent[s:s + 200]
                total += len(got)
        st = b.stats()
        assert total == 3600 and st["fill_failed"] == 0
        assert st["kernel_rx_ring_full"] == 0 and st["kernel_rx_dropped"] == 0


def test_send_rewrites_macs_and_counts_refusals(ns):
    a, b = open_ports(ns, "auto")
    with a, b:
        frames = udp_frames(a, b, 5)
        b.set_macs(b.mac(), a.mac())
        big = bytes(2100)
        batch = Batch.from_frames(frames + [big, b"\x01"])
        assert b.send(batch, np.array([0, 1, 2, 3, 4, 5, 6, 99, -3])) == 5
        st = b.stats()
        assert st["tx_too_big"] == 1 and st["tx_bad_frame"] == 3
        got = collect(a, 5)
        assert len(got) == 5
        for f, orig in zip(got, frames):
            e = Ether(f)
            assert e.src == mac_str(b.mac()) and e.dst == mac_str(a.mac())
            assert f[12:] == orig[12:]


def test_close_detaches_the_program(ns):
    a, b = open_ports(ns, "skb")
    b.close()
    b.close()  # idempotent
    # Attaching again succeeds only if the first program is gone.
    with netns.entered(ns):
        b2 = af_xdp.AfXdpPort("b", mode="skb", frames=4096, ring_size=1024)
    b2.close()
    a.close()


def test_errors_are_clear(ns):
    with netns.entered(ns):
        with pytest.raises(OSError, match="no such interface"):
            af_xdp.AfXdpPort("nosuch0")
        with pytest.raises(ValueError, match="mode"):
            af_xdp.AfXdpPort("b", mode="turbo")
        with pytest.raises(OSError, match="queue 1, but the link has 1 queue"):
            af_xdp.AfXdpPort("b", queue=1)


def test_a_tag_of_another_vlan_never_handed_out(ns):
    """A frame carrying its 802.1Q tag in the frame reaches the socket (tagged IPv4)
    and is dropped there, counted: this port carries no VLAN.  Untagged frames pass."""
    from scapy.layers.l2 import Dot1Q

    a, b = open_ports(ns, "native")
    with a, b:
        assert b.stats()["rxvlan_off"] == 1
        assert "rx-vlan-offload: off" in netns.run(ns, ["ethtool", "-k", "b"]).stdout
        a.tx_ring.set_vlan(None)  # a test sender: the tag stays as built
        tagged = [bytes(Ether(src=mac_str(a.mac()), dst=mac_str(b.mac())) / Dot1Q(vlan=5) /
                        IP(src="10.9.0.1", dst="198.51.100.1") / UDP(sport=7, dport=9))]
        a.send(Batch.from_frames(tagged + udp_frames(a, b, 2)), np.arange(3))
        got = collect(b, 3, timeout=1.0, only_ipv4=False)
        assert len(got) == 2 and all(Dot1Q not in Ether(f) for f in got)
        assert b.stats()["rx_vlan_unconfigured"] == 1


@pytest.fixture
def tagging_sender(ns):
    """a's egress pushes 802.1Q tag 42 as a VLAN device would: into the skb's metadata
    (tc BPF, hypernat.lab.vlan), so the receiving veth's XDP sees the frame without it."""
    from hypernat.lab import vlan

    push = vlan.load(vlan.push_program(42))
    try:
        with IPRoute(netns=ns) as ipr:
            idx = ipr.link_lookup(ifname="a")[0]
            ipr.tc("add", "clsact", index=idx)
            ipr.tc("add-filter", "bpf", index=idx, handle=":1", fd=push, name="hn_vlan_push", parent="ffff:fff3",
                   classid=1, direct_action=True)
    finally:
        os.close(push)
    return ns


def tagged_port_pair(ns, vlans):
    with netns.entered(ns):
        a = PacketMmapPort("a", qdisc_bypass=False, vlans=(42,))  # through tc egress (no bypass)
        try:
            b = af_xdp.AfXdpPort("b", mode="native", frames=4096, ring_size=1024, vlans=vlans)
        except BaseException:
            a.close()
            raise
    a.tx_ring.set_vlan(0)  # sent untagged: the tag is pushed by a's tc egress
    return a, b


def test_a_tag_the_driver_strips_is_put_back(tagging_sender):
    """The tag arrives as the skb's metadata; the XDP program asks the driver for it
    (bpf_xdp_metadata_rx_vlan_tag) and puts it back in front: the socket gets tagged
    frames, counted.  What the port sends carries its tag."""
    from scapy.layers.l2 import Dot1Q

    a, b = tagged_port_pair(tagging_sender, (42,))
    with a, b:
        assert b.xsk.vlan_kfunc and b.mode == "native"
        sent = udp_frames(a, b, 50)
        a.send(Batch.from_frames(sent), np.arange(50))
        got = collect(b, 50, only_ipv4=False)
        assert len(got) == 50
        for f, orig in zip(got, sent):
            assert Ether(f)[Dot1Q].vlan == 42 and Ether(f)[Dot1Q].type == 0x0800
            assert f[:12] + f[16:] == orig  # the frame as sent, the tag put back in place
        st = b.stats()
        assert st["rx_vlan_restored"] == 50 and st["rx_vlan_lost"] == 0 and st["rx_vlan_missing"] == 0
        # Transmit: the port's tag, whether the frame came with one (here) or not.
        b.set_macs(b.mac(), a.mac())
        assert b.send(Batch.from_frames(got[:5] + sent[:5]), np.arange(10)) == 10
        back = [f for f in collect(a, 10, only_ipv4=False) if IP in Ether(f)]
        # (a: VLAN 42 on PACKET_MMAP, puts the tag the kernel took off back; untagged: dropped)
        assert len(back) == 10 and all(Ether(f)[Dot1Q].vlan == 42 for f in back)
        assert a.stats()["rx_vlan_restored"] >= 10 and a.stats()["rx_vlan_missing"] == 0


def test_a_stripped_tag_on_a_port_without_vlans_is_dropped_and_counted(tagging_sender):
    """Never forwarded untagged: the tag the driver took off is put back, and the port,
    which carries no VLAN, drops the frame and counts it."""
    a, b = tagged_port_pair(tagging_sender, ())
    with a, b:
        a.send(Batch.from_frames(udp_frames(a, b, 20)), np.arange(20))
        assert collect(b, 1, timeout=0.5, only_ipv4=False) == []
        st = b.stats()
        assert st["rx_vlan_restored"] == 20 and st["rx_vlan_unconfigured"] == 20


def test_a_vlan_port_refuses_generic_xdp(ns):
    """Generic XDP has no driver metadata: a tag left there would be invisible."""
    with netns.entered(ns):
        with pytest.raises(OSError, match="VLAN 42 needs native XDP"):
            af_xdp.AfXdpPort("b", mode="skb", frames=4096, ring_size=1024, vlans=(42,))
        b = af_xdp.AfXdpPort("b", mode="skb", frames=4096, ring_size=1024)  # the refused one detached
        b.close()


@pytest.fixture
def ns2():
    """A veth pair with two queues each way."""
    with veth_namespace(f"hn-t{os.getpid()}-xdpq", [("a", "b")], addresses=ADDRS, queues=2) as name:
        yield name


def test_each_queue_its_own_socket_one_program(ns2):
    """Two sockets on queues 0 and 1 of one port share its XDP program; the sender's
    flow hash spreads flows over the queues and each socket gets its queue's; the
    program stays while any socket of the port is open, and goes with the last."""
    with netns.entered(ns2):
        a = PacketMmapPort("a", vnet=False, qdisc_bypass=False)  # the flow hash picks the queue
        b0 = af_xdp.AfXdpPort("b", mode="native", frames=4096, ring_size=1024, queue=0)
        b1 = af_xdp.AfXdpPort("b", mode="native", frames=4096, ring_size=1024, queue=1)
    with a:
        assert not b0.xsk.joined and b1.xsk.joined and b1.xsk.vlan_kfunc == b0.xsk.vlan_kfunc == 1
        sent = udp_frames(a, b0, 200)
        a.send(Batch.from_frames(sent), np.arange(200))
        got0, got1 = collect(b0, 200, timeout=1.0), collect(b1, 200, timeout=0.5)
        assert sorted(got0 + got1) == sorted(sent) and got0 and got1, (len(got0), len(got1))
        b0.close()
        a.send(Batch.from_frames(sent), np.arange(200))
        assert collect(b1, len(got1), timeout=1.0) == got1  # queue 1 still served, in order
        assert "prog/xdp" in netns.run(ns2, ["ip", "-d", "link", "show", "b"]).stdout
        b1.close()
        assert "prog/xdp" not in netns.run(ns2, ["ip", "-d", "link", "show", "b"]).stdout

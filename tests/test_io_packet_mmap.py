"""PACKET_MMAP ports on a real veth pair in a namespace of the test's own.

    [ns hn-t<pid>-io]   a ══ veth ══ b      frames built with scapy, sent on one end's
                                            TX ring, read from the other end's RX ring
"""
import os

import numpy as np
import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from hypernat.io.base import Batch
from hypernat.lab import netns

pytestmark = pytest.mark.netns
packet_mmap = pytest.importorskip("hypernat.io.packet_mmap")
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
RINGS = ("v2", "v3")  # receive rings: TPACKET_V2 slots (the default), TPACKET_V3 blocks


@pytest.fixture
def ns():
    name = f"hn-t{os.getpid()}-io"
    pr_netns.create(name)
    try:
        netns.sysctl(name, "net.ipv6.conf.all.disable_ipv6", 1)
        netns.sysctl(name, "net.ipv6.conf.default.disable_ipv6", 1)
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="a", kind="veth", peer={"ifname": "b"})
            for n, mac in (("a", MAC_A), ("b", MAC_B)):
                idx = ipr.link_lookup(ifname=n)[0]
                ipr.link("set", index=idx, address=mac, state="up")
                netns.run(name, ["ethtool", "-K", n, "rx", "off", "tx", "off", "tso", "off", "gso", "off", "gro", "off"],
                          check=False)
        yield name
    finally:
        pr_netns.remove(name)


def ports(ns, **kw):
    with netns.entered(ns):
        return packet_mmap.PacketMmapPort("a", **kw), packet_mmap.PacketMmapPort("b", **kw)


def frames(n, size=0, dport=80):
    out = []
    for i in range(n):
        p = Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.0.1", dst="198.51.100.1") / UDP(sport=1000 + i, dport=dport)
        out.append(bytes(p / (b"x" * size)))
    return out


def recv_all(port, want, max_frames=256, tries=2000):
    """Collect `want` frames (polling; the veth delivers through a softirq)."""
    got = []
    for _ in range(tries):
        b = port.recv(max_frames)
        if b is not None:
            got += b.frames()
            port.release(b)
            if len(got) >= want:
                break
        else:
            import time

            time.sleep(0.001)
    return got


@pytest.mark.parametrize("ring", RINGS)
def test_frames_cross_the_veth_intact_and_in_order(ns, ring):
    a, b = ports(ns, rx_ring=ring)
    with a, b:
        sent = frames(300, size=40)
        batch = Batch.from_frames(sent)
        assert a.send(batch, np.arange(batch.n)) == 300
        got = recv_all(b, 300)
        assert got == sent
        st = b.stats()
        assert st["rx_frames"] == 300 and st["rx_truncated"] == 0 and st["rx_csum_partial"] == 0
        assert a.stats()["tx_frames"] == 300


def test_receive_does_not_see_own_transmissions(ns):
    a, b = ports(ns)
    with a, b:
        batch = Batch.from_frames(frames(10))
        assert a.send(batch, np.arange(10)) == 10
        assert len(recv_all(b, 10)) == 10
        assert a.recv() is None  # PACKET_IGNORE_OUTGOING


@pytest.mark.parametrize("ring", RINGS)
def test_batch_views_the_ring_and_rewrites_forward_with_one_copy(ns, ring):
    """Receive on b, rewrite in place in b's ring, send the same frames back from b to a.
    (V3: a 100 ms block timer, so the 20 frames land in one block even on a loaded machine.)"""
    a, b = ports(ns, rx_ring=ring, **({"rx_block_ms": 100} if ring == "v3" else {}))
    with a, b:
        sent = frames(20)
        a.send(Batch.from_frames(sent), np.arange(20))
        got = None
        for _ in range(2000):
            got = b.recv()
            if got is not None and got.n == 20:
                break
            if got is not None:
                b.release(got)
            import time

            time.sleep(0.001)
        assert got is not None and got.n == 20
        assert got.buf.base is not None  # a view, not a copy
        for i in range(got.n):
            o = int(got.offsets[i])
            got.buf[o + 30 : o + 34] = [203, 0, 113, 9]  # new destination address, in the ring
        b.set_macs(bytes.fromhex(MAC_B.replace(":", "")), bytes.fromhex(MAC_A.replace(":", "")))
        assert b.send(got, np.arange(got.n)) == 20
        b.release(got)
        back = recv_all(a, 20)
        assert len(back) == 20
        for f, orig in zip(back, sent):
            e = Ether(f)
            assert e.src == MAC_B and e.dst == MAC_A
            assert e[IP].dst == "203.0.113.9"
            assert e[UDP].sport == Ether(orig)[UDP].sport


def test_unreleased_frames_are_never_handed_out_twice(ns):
    a, b = ports(ns, rx_frames=16, tx_frames=64, frame_size=2048, rx_ring="v2")
    with a, b:
        ring_nr = b.rx_ring.frame_nr
        a.send(Batch.from_frames(frames(ring_nr)), np.arange(ring_nr))
        held = []
        import time

        deadline = time.monotonic() + 2
        while sum(h.n for h in held) < ring_nr and time.monotonic() < deadline:
            bt = b.recv(4)
            if bt is not None:
                held.append(bt)
        assert sum(h.n for h in held) == ring_nr
        # The ring is all ours now: more frames are dropped by the kernel, not delivered twice.
        a.send(Batch.from_frames(frames(8, dport=81)), np.arange(8))
        time.sleep(0.3)
        assert b.recv() is None
        assert b.stats()["kernel_rx_drops"] >= 8
        ports_seen = [UDP in Ether(f) and Ether(f)[UDP].sport for h in held for f in h.frames()]
        assert sorted(ports_seen) == list(range(1000, 1000 + ring_nr))
        for h in held:
            b.release(h)
            b.release(h)  # twice: a no-op
        assert b.rx_ring.outstanding == 0
        a.send(Batch.from_frames(frames(4, dport=82)), np.arange(4))
        assert len(recv_all(b, 4)) == 4


def test_bad_send_requests_are_counted_not_crashing(ns):
    a, b = ports(ns, tx_frames=16, frame_size=2048)
    with a, b:
        big = frames(1, size=3000)[0]  # larger than a 2048-byte ring frame
        tiny = b"\x01\x02"
        batch = Batch.from_frames([big, tiny] + frames(1))
        batch.offsets[2] = 10**9  # outside the buffer
        assert a.send(batch, np.array([0, 1, 2, 7, -1])) == 0
        st = a.stats()
        assert st["tx_too_big"] == 1
        assert st["tx_bad_frame"] == 4
        assert a.send(Batch.from_frames(frames(3)), np.arange(3)) == 3
        assert len(recv_all(b, 3)) == 3


def test_non_ip_frames_are_received_too(ns):
    a, b = ports(ns)
    with a, b:
        arp = bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2", hwsrc=MAC_A))
        a.send(Batch.from_frames([arp]), np.arange(1))
        got = recv_all(b, 1)
        assert got and Ether(got[0]).haslayer(ARP)


def test_mac_is_the_interfaces(ns):
    a, b = ports(ns)
    with a, b:
        assert a.mac() == bytes.fromhex(MAC_A.replace(":", ""))
        assert b.mac() == bytes.fromhex(MAC_B.replace(":", ""))


def test_unknown_interface_is_a_clear_error(ns):
    with netns.entered(ns), pytest.raises(packet_mmap.PacketMmapError, match="nosuch"):
        packet_mmap.PacketMmapPort("nosuch0")


def test_a_frame_whose_vlan_tag_the_kernel_stripped_is_never_handed_out_untagged(ns):
    """The receiving kernel takes an 802.1Q tag off every frame (its metadata keeps it):
    a port not configured for that VLAN drops the frame and counts it.  (On main it was
    handed out untagged and forwarded onto the wrong segment.)"""
    from scapy.layers.l2 import Dot1Q

    a, b = ports(ns)
    with a, b:
        tagged = bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=7) / IP(src="10.0.0.1", dst="198.51.100.1")
                       / UDP(sport=999, dport=80))
        if hasattr(a.tx_ring, "set_vlan"):
            a.tx_ring.set_vlan(None)  # a test sender: frames leave with the tags they have
        a.send(Batch.from_frames([tagged] + frames(2)), np.arange(3))
        got = recv_all(b, 2)
        assert len(got) == 2 and all(Dot1Q not in Ether(f) and Ether(f)[UDP].sport != 999 for f in got)
        assert b.stats()["rx_vlan_unconfigured"] == 1


@pytest.mark.parametrize("ring", RINGS)
def test_a_vlan_the_port_carries_gets_its_tag_back_in_place_and_leaves_tagged(ns, ring):
    from scapy.layers.l2 import Dot1Q

    with netns.entered(ns):
        a = packet_mmap.PacketMmapPort("a", vlans=(7,), rx_ring=ring)
        b = packet_mmap.PacketMmapPort("b", vlans=(7,), rx_ring=ring)
    with a, b:
        a.tx_ring.set_vlan(None)  # a test sender: frames leave with the tags they have
        tagged = [bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=v, prio=3) / IP(src="10.0.0.1", dst="198.51.100.1")
                        / UDP(sport=999 + v, dport=80) / b"payload") for v in (7, 8)]
        a.send(Batch.from_frames(tagged), np.arange(2))
        got = recv_all(b, 1)
        for _ in range(2000):  # the VLAN-8 frame (not carried) is dropped and counted, maybe a receive later
            if b.stats()["rx_vlan_unconfigured"]:
                break
            got += recv_all(b, 1, tries=1)
        assert got == [tagged[0]]  # byte for byte: tag, priority and all
        st = b.stats()
        assert st["rx_vlan_restored"] == 1 and st["rx_vlan_unconfigured"] == 1
        b.send(Batch.from_frames(got), np.arange(1))
        back = recv_all(a, 1)
        assert Ether(back[0])[Dot1Q].vlan == 7 and Ether(back[0])[Dot1Q].prio == 0  # b's own tag (TCI 7)
        assert back[0][:14] + back[0][16:] == got[0][:14] + got[0][16:]


def test_frames_leave_with_the_ports_tag_or_none(ns):
    """A router's egress: a port carrying VLAN 9 tags what it sends with 9 (an untagged
    frame gets the tag, a frame tagged otherwise gets 9 instead); a port without a VLAN
    sends untagged.  The super-frame metadata moves with the tag."""
    from scapy.layers.l2 import Dot1Q

    with netns.entered(ns):
        a = packet_mmap.PacketMmapPort("a", vlans=(9,))
        b = packet_mmap.PacketMmapPort("b", vlans=(9,))
        c = packet_mmap.PacketMmapPort("b", rx=False)
    with a, b, c:
        plain = frames(1, size=10)[0]
        other = bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=5) / Ether(plain).payload)
        a.send(Batch.from_frames([plain, other]), np.arange(2))
        got = recv_all(b, 2)
        assert [Ether(f)[Dot1Q].vlan for f in got] == [9, 9]
        assert all(bytes(Ether(f)[IP]) == bytes(Ether(plain)[IP]) for f in got)
        c.send(Batch.from_frames([other]), np.arange(1))  # no VLAN on c: untagged
        back = recv_all(a, 1, tries=200)
        assert not back and a.stats()["rx_vlan_missing"] == 1  # untagged on a VLAN-9 port: dropped, counted



def _offloads(ns, ifname, **kw):
    args = [x for k, v in kw.items() for x in (k, "on" if v else "off")]
    netns.run(ns, ["ethtool", "-K", ifname, *args], check=False)


def _super_frame(payload_len, mss):
    """A TCP super-frame as Linux hands one over: partial checksum (the field holds the
    pseudo-header sum) and its virtio_net_hdr."""
    from hypernat.io.base import META_DTYPE

    pkt = Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.0.1", dst="198.51.100.1", id=1) / TCP(
        sport=4000, dport=80, seq=1000, flags="A") / bytes(i % 251 for i in range(payload_len))
    f = bytearray(bytes(pkt))
    s = sum(int.from_bytes(f[26 + i:28 + i], "big") for i in (0, 2, 4, 6)) + 6 + (len(f) - 34)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    f[50:52] = s.to_bytes(2, "big")
    meta = np.zeros(1, META_DTYPE)
    meta[0] = (1, 1, 54, mss, 34, 16)  # NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, csum_offset
    b = Batch.from_frames([bytes(f)])
    b.meta = meta.view(np.uint8).copy()
    b.partial = np.ones(1, np.uint8)
    return pkt, b


@pytest.mark.parametrize("ring", RINGS)
def test_a_super_frame_crosses_whole_with_its_virtio_net_hdr(ns, ring):
    """Offloads on (veth passes a TSO super-frame through): sent with its GSO type and
    size, it arrives as one super-frame, left partial, its header intact."""
    for n in ("a", "b"):
        _offloads(ns, n, rx=True, tx=True, tso=True, gso=True, gro=True)
    a, b = ports(ns, rx_ring=ring)
    with a, b:
        pkt, batch = _super_frame(5000, 1200)
        assert a.send(batch, np.arange(1)) == 1
        got = None
        for _ in range(2000):
            got = b.recv()
            if got is not None:
                break
            import time

            time.sleep(0.001)
        assert got is not None and got.n == 1
        rec = got.meta_records()[0]
        assert (rec["gso_type"], rec["gso_size"], rec["csum_start"], rec["csum_offset"]) == (1, 1200, 34, 16)
        assert got.partial[0] == 1 and int(got.lengths[0]) == len(pkt)
        assert got.frames()[0] == bytes(Ether(bytes(pkt)))  # the copy finished the checksum: scapy's
        assert b.stats()["rx_super_frames"] == 1 and a.stats()["tx_super_frames"] == 1
        b.release(got)


def test_the_kernel_segments_a_super_frame_and_scapy_checks_the_segments(ns):
    """The sending link without TSO and checksum offload: the kernel cuts the super-frame
    into gso_size segments and finishes each checksum from the pseudo-header sum we
    left; the far side gets ordinary frames whose checksums scapy recomputes."""
    _offloads(ns, "a", tx=False, tso=False, gso=True)
    _offloads(ns, "b", rx=True, gro=False)
    a, b = ports(ns)
    with a, b:
        pkt, batch = _super_frame(3000, 1000)
        assert a.send(batch, np.arange(1)) == 1
        segs = recv_all(b, 3)
        assert len(segs) == 3
        data = b""
        for i, f in enumerate(segs):
            e = Ether(f)
            assert e[TCP].seq == 1000 + 1000 * i and len(e[TCP].payload) == 1000
            ck_ip, ck_tcp = e[IP].chksum, e[TCP].chksum
            del e[IP].chksum
            del e[TCP].chksum
            again = Ether(bytes(e))
            assert (again[IP].chksum, again[TCP].chksum) == (ck_ip, ck_tcp)
            data += bytes(e[TCP].payload)
        assert data == bytes(pkt[TCP].payload)


def test_a_link_whose_super_frames_exceed_64k_is_named_at_start(ns):
    """BIG TCP (gso/gro_max_size above 64 KB): an IPv4 super-frame that large has no
    total length; the port refuses to start and says what to set."""
    netns.run(ns, ["ip", "link", "set", "dev", "a", "gso_max_size", "131072", "gro_max_size", "131072"])
    with netns.entered(ns), pytest.raises(packet_mmap.PacketMmapError, match=r"a: gso_max_size 131072.*BIG TCP"):
        packet_mmap.PacketMmapPort("a")
    with netns.entered(ns):
        packet_mmap.PacketMmapPort("a", vnet=False).close()  # per-frame: nothing to refuse


def test_one_port_per_receive_queue_of_a_multi_queue_link():
    """A veth with 4 queues between two namespaces; the sender's flows spread over its
    transmit queues (the flow hash of each socket), each arriving on the peer's receive
    queue of that number: one port per queue gets its queue's frames only, and together
    they get every frame once (RSS being the switch)."""
    import socket
    import time

    tx_ns, rx_ns = f"hn-t{os.getpid()}-ioqa", f"hn-t{os.getpid()}-ioqb"
    for n in (tx_ns, rx_ns):
        pr_netns.create(n)
    try:
        for n in (tx_ns, rx_ns):
            netns.sysctl(n, "net.ipv6.conf.all.disable_ipv6", 1)
            netns.sysctl(n, "net.ipv6.conf.default.disable_ipv6", 1)
        netns.run(tx_ns, ["ip", "link", "add", "name", "a", "numtxqueues", "4", "numrxqueues", "4", "type", "veth",
                          "peer", "name", "b", "numtxqueues", "4", "numrxqueues", "4", "netns", rx_ns])
        for ns_, n, ip in ((tx_ns, "a", "10.9.0.1/24"), (rx_ns, "b", "10.9.0.2/24")):
            netns.run(ns_, ["ip", "addr", "add", ip, "dev", n])
            netns.run(ns_, ["ip", "link", "set", "dev", n, "up"])
        with netns.entered(rx_ns):
            qs = [packet_mmap.PacketMmapPort("b", tx=False, queue=q, rx_frames=256) for q in range(4)]
        try:
            for sport in range(3000, 3200):
                s = netns.ns_socket(tx_ns, socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("10.9.0.1", sport))
                s.sendto(b"q", ("10.9.0.2", 9))
                s.close()
                if sport == 3000:
                    time.sleep(0.1)  # the first one waits for ARP
            time.sleep(0.2)
            got = []
            for p in qs:
                fs = [Ether(f) for f in recv_all(p, 400, tries=30)]
                got.append(sorted(e[UDP].sport for e in fs if UDP in e and e[UDP].dport == 9))
            assert sorted(x for g in got for x in g) == list(range(3000, 3200))  # each once
            assert all(len(g) >= 10 for g in got), [len(g) for g in got]  # every queue used
        finally:
            for p in qs:
                p.close()
    finally:
        for n in (tx_ns, rx_ns):
            pr_netns.remove(n)


def test_a_frame_longer_than_the_link_without_a_gso_request_is_counted(ns):
    """A super-frame that left its batch as a copy (the slow path) has no GSO request
    any more: longer than the link's MTU, it is counted as too big, not sent."""
    a, b = ports(ns)
    with a, b:
        pkt, batch = _super_frame(3000, 1000)
        plain = Batch.from_frames(batch.frames())  # the copy: checksum finished, no metadata
        assert a.send(plain, np.arange(1)) == 0
        assert a.stats()["tx_too_big"] == 1
        assert a.send(batch, np.arange(1)) == 1  # with its GSO request it goes


# -- the TPACKET_V3 receive ring: blocks -------------------------------------------------------

def test_v3_blocks_held_by_batches_are_never_handed_out_twice_and_go_back_in_any_order(ns):
    """Two 4 KB blocks (29 small frames each): batches of 7 hold both, a batch may span
    the two.  While they are held the kernel drops what arrives (it never writes into a
    held block) and nothing is handed out twice; released in reverse order, twice each,
    the blocks go back and frames flow again."""
    import time

    # (a 100 ms block timer: a 1 ms one may retire the first block while the 40 frames are
    # still being sent on a loaded machine, and the third block they would need is not there)
    a, b = ports(ns, rx_ring="v3", rx_frames=2, frame_size=2048, rx_block_bytes=4096, rx_block_ms=100)
    with a, b:
        assert (b.rx_ring.block_nr, b.rx_ring.block_size) == (2, 4096)
        a.send(Batch.from_frames(frames(40)), np.arange(40))
        time.sleep(0.3)  # both blocks handed over (one full, one by its timer): a batch may span them
        held, deadline = [], time.monotonic() + 5
        while sum(h.n for h in held) < 40 and time.monotonic() < deadline:
            bt = b.recv(7)  # 29 frames a block (136 bytes each in 4048): no batch ends on the boundary
            if bt is not None:
                held.append(bt)
            else:
                time.sleep(0.001)
        assert sum(h.n for h in held) == 40 and b.rx_ring.outstanding >= 2
        assert any(h.token[1] == 2 for h in held), [h.token for h in held]  # spanning both: holds both
        a.send(Batch.from_frames(frames(8, dport=81)), np.arange(8))
        time.sleep(0.3)
        assert b.recv() is None  # both blocks are ours: the kernel drops, never overwrites
        assert b.stats()["kernel_rx_drops"] >= 8
        sports = sorted(Ether(f)[UDP].sport for h in held for f in h.frames())
        assert sports == list(range(1000, 1040))
        for h in reversed(held):
            b.release(h)
            b.release(h)  # twice: a no-op
        assert b.rx_ring.outstanding == 0
        a.send(Batch.from_frames(frames(4, dport=82)), np.arange(4))
        got = recv_all(b, 4)
        assert [Ether(f)[UDP].dport for f in got] == [82] * 4


def test_v3_a_lone_frame_is_handed_over_by_the_block_timer(ns):
    """One frame in a 256 KB block: the block is far from full, the retire timer hands it
    over and wakes a poll() on the socket (the worker's wait)."""
    import select
    import time

    a, b = ports(ns, rx_ring="v3")
    with a, b:
        assert b.rx_version == "v3" and b.rx_ring.block_size >= 256 << 10
        p = select.poll()
        p.register(b.fileno(), select.POLLIN)
        assert not b.rx_ring.ready()
        t0 = time.monotonic()
        a.send(Batch.from_frames(frames(1, dport=99)), np.arange(1))
        assert p.poll(2000), "the block timer never handed the lone frame over"
        waited = time.monotonic() - t0
        got = b.recv()
        assert got is not None and got.n == 1 and Ether(got.frame(0))[UDP].dport == 99
        b.release(got)
        print(f"lone frame handed over after {waited * 1e3:.2f} ms (rx_block_ms {b.rx_block_ms})")


@pytest.mark.parametrize("ring", RINGS)
def test_a_frame_longer_than_the_ring_takes_is_counted(ns, ring):
    """MTU 9000 on the veth, a receive ring for 2 KB frames (V2 slots of 2 KB, V3 blocks
    of 4 KB): a 6000-byte frame is cut by the kernel, counted as truncated, not handed out;
    the frame behind it arrives."""
    for n in ("a", "b"):
        netns.run(ns, ["ip", "link", "set", "dev", n, "mtu", "9000"])
    with netns.entered(ns):
        a = packet_mmap.PacketMmapPort("a", rx=False, vnet=False, frame_size=16384)
        b = packet_mmap.PacketMmapPort("b", tx=False, vnet=False, frame_size=2048, rx_ring=ring,
                                       rx_block_bytes=4096, rx_frames=64)
    with a, b:
        big, small = frames(1, size=6000)[0], frames(1, dport=7)[0]
        assert a.send(Batch.from_frames([big, small]), np.arange(2)) == 2
        assert recv_all(b, 1) == [small]
        assert b.stats()["rx_truncated"] == 1


@pytest.mark.parametrize("ring", RINGS)
def test_a_tag_added_by_a_vlan_device_comes_back_in_place(ns, ring):
    """The tag is written by a real 802.1Q device (a.7 on a) and taken off by the
    receiving kernel; the port carrying VLAN 7 gets it back from the ring's metadata.
    (A kernel without 8021q skips this; the tag sent by a ring, above, is the same path.)"""
    from scapy.layers.l2 import Dot1Q

    made = netns.run(ns, ["ip", "link", "add", "link", "a", "name", "a.7", "type", "vlan", "id", "7"], check=False)
    if made.returncode:
        pytest.skip(f"no 802.1Q devices in this kernel: {made.stderr.strip()}")
    netns.run(ns, ["ip", "link", "set", "dev", "a.7", "up"])
    with netns.entered(ns):
        a7 = packet_mmap.PacketMmapPort("a.7", rx=False, vnet=False)
        b = packet_mmap.PacketMmapPort("b", tx=False, vlans=(7,), rx_ring=ring)
    with a7, b:
        sent = frames(3, size=20)
        assert a7.send(Batch.from_frames(sent), np.arange(3)) == 3
        got = recv_all(b, 3)
        assert len(got) == 3 and b.stats()["rx_vlan_restored"] == 3
        for f, s in zip(got, sent):
            e = Ether(f)
            assert e.type == 0x8100 and e[Dot1Q].vlan == 7
            assert f[:12] == s[:12] and f[16:] == s[12:]  # the frame, the tag inserted, nothing else changed


@pytest.mark.parametrize("ring", RINGS)
def test_tso_super_frames_of_a_kernel_tcp_sender_arrive_whole(ring):
    """A kernel TCP sender with TSO on (namespace hn-t<pid>-iota) to a receiver in
    hn-t<pid>-iotb: veth passes the TSO super-frames through, the port beside the
    receiver gets them whole with their virtio_net_hdr, and their copies (checksum
    finished) carry exactly the bytes sent, checksums as scapy computes them."""
    import socket
    import threading

    ns1, ns2 = f"hn-t{os.getpid()}-iota", f"hn-t{os.getpid()}-iotb"
    for n in (ns1, ns2):
        pr_netns.create(n)
    try:
        netns.run(ns1, ["ip", "link", "add", "name", "a", "type", "veth", "peer", "name", "b", "netns", ns2])
        for n_, dev, ip in ((ns1, "a", "10.77.0.1/24"), (ns2, "b", "10.77.0.2/24")):
            netns.run(n_, ["ip", "addr", "add", ip, "dev", dev])
            netns.run(n_, ["ip", "link", "set", "dev", dev, "up"])
            netns.run(n_, ["ethtool", "-K", dev, "tso", "on", "gso", "on", "tx", "on", "rx", "on"], check=False)
        with netns.entered(ns2):
            port = packet_mmap.PacketMmapPort("b", tx=False, rx_ring=ring)
        data = bytes(i % 253 for i in range(300_000))
        srv = netns.ns_socket(ns2)
        srv.bind(("10.77.0.2", 5001))
        srv.listen(1)
        srv.settimeout(5)
        got_back = bytearray()

        def serve():
            c, _ = srv.accept()
            c.settimeout(5)
            with c:
                while len(got_back) < len(data):
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got_back.extend(chunk)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        cli = netns.ns_socket(ns1)
        cli.settimeout(5)
        with port, cli:
            cli.connect(("10.77.0.2", 5001))
            cli.sendall(data)
            t.join(10)
            assert bytes(got_back) == data
            segs = {}
            for f in recv_all(port, 10_000, tries=300):
                e = Ether(f)
                if TCP in e and e[TCP].dport == 5001 and len(e[TCP].payload):
                    segs[e[TCP].seq] = bytes(e[TCP].payload)
                    ck = e[TCP].chksum
                    del e[TCP].chksum
                    assert Ether(bytes(e))[TCP].chksum == ck
            st = port.stats()
            assert st["rx_super_frames"] > 0, st
            assert max(len(p) for p in segs.values()) > 1500
            first = min(segs)
            stream, pos = bytearray(), first
            while pos in segs:
                stream += segs[pos]
                pos += len(segs[pos])
            assert bytes(stream) == data
        srv.close()
    finally:
        for n in (ns1, ns2):
            pr_netns.remove(n)

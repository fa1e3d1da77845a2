"""The receive ring's reading of the kernel's per-frame metadata, on a ring laid out in
memory by the test (no kernel): virtio_net_hdr checks, checksum completion, 802.1Q
tags put back, and the ring's bytes outside each frame left alone (guard bytes), for
well-formed, inconsistent and random input (like tests/test_fastpath_robustness.py).
"""
import random
import struct

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, raw

ring = pytest.importorskip("hypernat.io._ring")
from hypernat.io.base import META_DTYPE  # noqa: E402

FS, NR = 4096, 64
MAC_OFF = 76  # where the kernel puts the Ethernet header with PACKET_VNET_HDR
USER, CSUMNOTREADY, VLAN_VALID, VLAN_TPID_VALID = 1, 8, 0x10, 0x40
DROPS = ("rx_truncated", "rx_vlan_unconfigured", "rx_vlan_missing", "rx_vnet_bad_gso", "rx_vnet_bad_csum")


def pseudo(frame: bytes, l3=14) -> int:
    ihl = (frame[l3] & 15) * 4
    s = sum(int.from_bytes(frame[l3 + 12 + i:l3 + 14 + i], "big") for i in (0, 2, 4, 6))
    s += frame[l3 + 9] + len(frame) - l3 - ihl
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def partial_frame(layer, size, ihl_opts=b""):
    pkt = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") / IP(src="10.0.0.1", dst="198.51.100.7",
                                                                      options=ihl_opts) / layer(sport=1234, dport=80)
    pkt = pkt / bytes(random.getrandbits(8) for _ in range(size))
    f = bytearray(raw(pkt))
    l4 = 14 + (f[14] & 15) * 4
    off = 16 if layer is TCP else 6
    f[l4 + off:l4 + off + 2] = pseudo(bytes(f)).to_bytes(2, "big")
    return bytes(f), l4, off, pkt


def lay(mem, slot, frame, vnet, status=USER | CSUMNOTREADY, tci=0, tpid=0):
    base = slot * FS
    struct.pack_into("IIIHHIIHH", mem, base, status, len(frame), len(frame), MAC_OFF, MAC_OFF + 14, 0, 0, tci, tpid)
    mem[base + MAC_OFF - 10:base + MAC_OFF] = np.frombuffer(bytes(vnet), np.uint8)
    mem[base + MAC_OFF:base + MAC_OFF + len(frame)] = np.frombuffer(frame, np.uint8)


def walk(mem, n, vlans=()):
    r = ring.RxRing(mem, FS, NR, True, vlans)
    offs, lens = np.zeros(NR, np.uint32), np.zeros(NR, np.uint32)
    meta, part = np.zeros(NR * 10, np.uint8), np.zeros(NR, np.uint8)
    start, taken, got = r.walk(offs, lens, NR, meta, part)
    assert taken == n
    c = r.counters()
    assert got + sum(c[k] for k in DROPS) == taken, c
    return r, offs[:got], lens[:got], meta[:got * 10].view(META_DTYPE), part[:got], c


def vnet(flags, gso, hdr_len, gso_size, cs, co):
    return np.array([(flags, gso, hdr_len, gso_size, cs, co)], META_DTYPE).view(np.uint8).tobytes()


def test_a_partial_frame_is_completed_and_a_super_frame_left_partial():
    mem = np.zeros(FS * NR, np.uint8)
    f1, l4, off, pkt1 = partial_frame(TCP, 300)
    f2, _, _, _ = partial_frame(UDP, 301)
    f3, _, _, _ = partial_frame(TCP, 3000)
    lay(mem, 0, f1, vnet(1, 0, 0, 0, l4, off))
    lay(mem, 1, f2, vnet(1, 0, 0, 0, 34, 6))
    lay(mem, 2, f3, vnet(1, 1, 54, 1000, 34, 16))
    r, offs, lens, meta, part, c = walk(mem, 3)
    assert list(part) == [0, 0, 1] and c["rx_csum_completed"] == 2 and c["rx_super_frames"] == 1
    for i in (0, 1):
        e = Ether(mem[offs[i]:offs[i] + lens[i]].tobytes())
        layer = TCP if i == 0 else UDP
        ck = e[layer].chksum
        del e[layer].chksum
        assert Ether(raw(e))[layer].chksum == ck  # scapy agrees with the finished checksum
        assert meta[i]["flags"] == 2  # DATA_VALID now, NEEDS_CSUM gone
    assert meta[2]["gso_size"] == 1000 and mem[offs[2] + 50:offs[2] + 52].tobytes() == f3[50:52]


BAD = [
    ("gso tcp on udp", UDP, vnet(1, 1, 42, 1000, 34, 6), "rx_vnet_bad_gso"),
    ("gso udp on tcp", TCP, vnet(1, 3, 54, 1000, 34, 16), "rx_vnet_bad_gso"),
    ("gso size 0", TCP, vnet(1, 1, 54, 0, 34, 16), "rx_vnet_bad_gso"),
    ("gso without csum", TCP, vnet(0, 1, 54, 1000, 34, 16), "rx_vnet_bad_gso"),
    ("unknown gso type", TCP, vnet(1, 9, 54, 1000, 34, 16), "rx_vnet_bad_gso"),
    ("csum offset past the end", TCP, vnet(1, 0, 0, 0, 34, 60000), "rx_vnet_bad_csum"),
    ("csum start past the end", UDP, vnet(1, 0, 0, 0, 65000, 6), "rx_vnet_bad_csum"),
    ("csum start not the l4 header", TCP, vnet(1, 0, 0, 0, 30, 16), "rx_vnet_bad_csum"),
    ("csum offset not tcp's", TCP, vnet(1, 0, 0, 0, 34, 6), "rx_vnet_bad_csum"),
]


@pytest.mark.parametrize("name,layer,hdr,counter", BAD, ids=[b[0] for b in BAD])
def test_an_inconsistent_virtio_net_hdr_is_dropped_and_counted(name, layer, hdr, counter):
    mem = np.zeros(FS * NR, np.uint8)
    f, _, _, _ = partial_frame(layer, 200)
    lay(mem, 0, f, hdr)
    r, offs, lens, meta, part, c = walk(mem, 1)
    assert len(offs) == 0 and c[counter] == 1


def test_a_frame_longer_than_its_slot_is_counted():
    mem = np.zeros(FS * NR, np.uint8)
    f, _, _, _ = partial_frame(UDP, 100)
    lay(mem, 0, f, vnet(0, 0, 0, 0, 0, 0))
    struct.pack_into("I", mem, 8, FS)  # snaplen past the slot's end
    r, offs, *_, c = walk(mem, 1)
    assert len(offs) == 0 and c["rx_truncated"] == 1


def test_a_stripped_tag_comes_back_with_csum_start_moved():
    mem = np.zeros(FS * NR, np.uint8)
    f, l4, off, pkt = partial_frame(TCP, 100)
    lay(mem, 0, f, vnet(1, 0, 0, 0, l4, off), status=USER | CSUMNOTREADY | VLAN_VALID, tci=(5 << 13) | 42)
    lay(mem, 1, f, vnet(1, 0, 0, 0, l4, off), status=USER | CSUMNOTREADY | VLAN_VALID, tci=43)
    r, offs, lens, meta, part, c = walk(mem, 2, vlans=(42,))
    assert c["rx_vlan_restored"] == 1 and c["rx_vlan_unconfigured"] == 1 and len(offs) == 1
    e = Ether(mem[offs[0]:offs[0] + lens[0]].tobytes())
    assert e.type == 0x8100 and e.vlan == 42 and e.prio == 5 and e[TCP].sport == 1234
    ck = e[TCP].chksum
    del e[TCP].chksum
    assert Ether(raw(e))[TCP].chksum == ck


@pytest.mark.parametrize("seed", range(4))
def test_random_headers_and_frames_never_escape_their_slot(seed):
    rng = random.Random(seed)
    random.seed(seed)
    mem = np.frombuffer(bytearray(rng.getrandbits(8) for _ in range(FS * NR)), np.uint8).copy()
    spans = []
    for slot in range(NR):
        kind = rng.randrange(3)
        if kind == 0:
            f = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        else:
            f, l4, off, _ = partial_frame(rng.choice((TCP, UDP)), rng.randrange(0, 400))
            f = bytearray(f)
            for _ in range(rng.randrange(0, 4)):  # a few bytes hit anywhere (IHL, protocol, lengths)
                f[rng.randrange(len(f))] = rng.getrandbits(8)
            f = bytes(f)
        hdr = bytes(rng.getrandbits(8) for _ in range(10)) if kind != 2 else vnet(
            rng.choice((0, 1)), rng.choice((0, 1, 3, 4, 5, 0x81)), rng.randrange(100), rng.randrange(3),
            rng.randrange(80), rng.choice((6, 16, rng.randrange(100))))
        status = USER | rng.choice((0, CSUMNOTREADY)) | rng.choice((0, VLAN_VALID, VLAN_VALID | VLAN_TPID_VALID))
        lay(mem, slot, f, hdr, status=status, tci=rng.getrandbits(16), tpid=rng.choice((0, 0x8100, 0x88A8)))
        spans.append(len(f))
    before = mem.copy()
    r, offs, lens, meta, part, c = walk(mem, NR, vlans=tuple(range(1, 4095, 3)))
    changed = np.flatnonzero(mem != before)
    for slot in range(NR):  # bytes written only from 4 bytes before the frame to its end
        lo, hi = slot * FS + MAC_OFF - 4, slot * FS + MAC_OFF + spans[slot]
        inside = changed[(changed >= slot * FS) & (changed < (slot + 1) * FS)]
        assert ((inside >= lo) & (inside < hi)).all(), (slot, inside)
    for o, n in zip(offs.tolist(), lens.tolist()):
        slot = o // FS
        assert o >= slot * FS + MAC_OFF - 4 and o + n <= slot * FS + MAC_OFF + spans[slot] and n >= spans[slot]

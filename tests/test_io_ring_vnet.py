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


class V2:
    """A TPACKET_V2 ring laid out by hand: one frame a slot of FS bytes."""
    kind = "v2"
    MAC = MAC_OFF

    def __init__(self):
        self.mem = np.zeros(FS * NR, np.uint8)
        self.spans = []  # per frame: (where a write may start, where it must end)

    def add(self, frame, vnet, status=USER | CSUMNOTREADY, tci=0, tpid=0, snaplen=None):
        base = len(self.spans) * FS
        struct.pack_into("IIIHHIIHH", self.mem, base, status, len(frame), len(frame) if snaplen is None else snaplen,
                         self.MAC, self.MAC + 14, 0, 0, tci, tpid)
        self._body(base, frame, vnet)
        return base

    def _body(self, base, frame, vnet):
        self.mem[base + self.MAC - 10:base + self.MAC] = np.frombuffer(bytes(vnet), np.uint8)
        self.mem[base + self.MAC:base + self.MAC + len(frame)] = np.frombuffer(frame, np.uint8)
        self.spans.append((base + self.MAC - 4, base + self.MAC + len(frame)))

    def ring(self, vlans=()):
        return ring.RxRing(self.mem, FS, NR, True, vlans), len(self.spans)

    def room(self, i):  # the bytes frame i's header may claim
        return FS


class V3:
    """A TPACKET_V3 ring laid out by hand as the kernel fills one: blocks of BS bytes,
    each a tpacket_block_desc and tpacket3_hdr entries back to back (8-byte aligned,
    tp_next_offset to the next), the Ethernet header at tp_mac of each entry."""
    kind = "v3"
    BS, NB = 16384, 24
    MAC = 92  # TPACKET3_HDRLEN (68) rounded with a 16-byte MAC reserve, + the virtio_net_hdr
    FIRST = 48  # the block descriptor, aligned

    def __init__(self):
        self.mem = np.zeros(self.BS * self.NB, np.uint8)
        self.spans = []
        self.block, self.pos, self.count, self.last = 0, self.FIRST, 0, None

    def _close(self):
        struct.pack_into("IIIIII", self.mem, self.block * self.BS, 3, 0, USER, self.count, self.FIRST, self.pos)
        self.block += 1
        self.pos, self.count, self.last = self.FIRST, 0, None

    def add(self, frame, vnet, status=USER | CSUMNOTREADY, tci=0, tpid=0, snaplen=None):
        size = (self.MAC + len(frame) + 7) & ~7
        if self.pos + size > self.BS:
            self._close()
        base = self.block * self.BS + self.pos
        if self.last is not None:
            struct.pack_into("I", self.mem, self.last, base - self.last)
        struct.pack_into("IIIIIIHHIIHH", self.mem, base, 0, 0, 0, len(frame) if snaplen is None else snaplen,
                         len(frame), status, self.MAC, self.MAC + 14, 0, tci, tpid, 0)
        V2._body(self, base, frame, vnet)
        self.last, self.pos, self.count = base, self.pos + size, self.count + 1
        return base

    def ring(self, vlans=()):
        if self.count:
            self._close()
        for b in range(self.block, self.NB):  # the rest still the kernel's
            struct.pack_into("I", self.mem, b * self.BS + 8, 0)
        return ring.RxRingV3(self.mem, self.BS, self.NB, True, vlans), len(self.spans)


@pytest.fixture(params=[V2, V3], ids=["v2", "v3"])
def layout(request):
    return request.param()


def walk(lay, vlans=()):
    r, n = lay.ring(vlans)
    offs, lens = np.zeros(NR, np.uint32), np.zeros(NR, np.uint32)
    meta, part = np.zeros(NR * 10, np.uint8), np.zeros(NR, np.uint8)
    start, taken, got = r.walk(offs, lens, NR, meta, part)
    c = r.counters()
    assert got + sum(c[k] for k in DROPS) == n, c
    assert c["rx_frames"] == got
    return r, offs[:got], lens[:got], meta[:got * 10].view(META_DTYPE), part[:got], c


def vnet(flags, gso, hdr_len, gso_size, cs, co):
    return np.array([(flags, gso, hdr_len, gso_size, cs, co)], META_DTYPE).view(np.uint8).tobytes()


def test_a_partial_frame_is_completed_and_a_super_frame_left_partial(layout):
    mem = layout.mem
    f1, l4, off, pkt1 = partial_frame(TCP, 300)
    f2, _, _, _ = partial_frame(UDP, 301)
    f3, _, _, _ = partial_frame(TCP, 3000)
    layout.add(f1, vnet(1, 0, 0, 0, l4, off))
    layout.add(f2, vnet(1, 0, 0, 0, 34, 6))
    layout.add(f3, vnet(1, 1, 54, 1000, 34, 16))
    r, offs, lens, meta, part, c = walk(layout)
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
def test_an_inconsistent_virtio_net_hdr_is_dropped_and_counted(name, layer, hdr, counter, layout):
    f, _, _, _ = partial_frame(layer, 200)
    layout.add(f, hdr)
    r, offs, lens, meta, part, c = walk(layout)
    assert len(offs) == 0 and c[counter] == 1


def test_a_frame_longer_than_its_slot_is_counted(layout):
    """Longer than what the kernel could write (tp_snaplen past the slot or the block;
    tp_len above tp_snaplen: the kernel cut it): counted, the next frame still read."""
    f, _, _, _ = partial_frame(UDP, 100)
    room = FS if layout.kind == "v2" else V3.BS
    layout.add(f, vnet(0, 0, 0, 0, 0, 0), snaplen=room)  # snaplen past the slot's (block's) end
    layout.add(f, vnet(0, 0, 0, 0, 0, 0), snaplen=len(f) - 1)  # cut short: tp_len > tp_snaplen
    layout.add(f, vnet(0, 0, 0, 0, 0, 0))
    r, offs, *_, c = walk(layout)
    assert len(offs) == 1 and c["rx_truncated"] == 2


def test_a_stripped_tag_comes_back_with_csum_start_moved(layout):
    mem = layout.mem
    f, l4, off, pkt = partial_frame(TCP, 100)
    layout.add(f, vnet(1, 0, 0, 0, l4, off), status=USER | CSUMNOTREADY | VLAN_VALID, tci=(5 << 13) | 42)
    layout.add(f, vnet(1, 0, 0, 0, l4, off), status=USER | CSUMNOTREADY | VLAN_VALID, tci=43)
    r, offs, lens, meta, part, c = walk(layout, vlans=(42,))
    assert c["rx_vlan_restored"] == 1 and c["rx_vlan_unconfigured"] == 1 and len(offs) == 1
    e = Ether(mem[offs[0]:offs[0] + lens[0]].tobytes())
    assert e.type == 0x8100 and e.vlan == 42 and e.prio == 5 and e[TCP].sport == 1234
    ck = e[TCP].chksum
    del e[TCP].chksum
    assert Ether(raw(e))[TCP].chksum == ck


@pytest.mark.parametrize("seed", range(4))
def test_random_headers_and_frames_never_escape_their_slot(seed, layout):
    rng = random.Random(seed)
    random.seed(seed)
    mem = layout.mem
    mem[:] = np.frombuffer(rng.randbytes(len(mem)), np.uint8)
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
        layout.add(f, hdr, status=status, tci=rng.getrandbits(16), tpid=rng.choice((0, 0x8100, 0x88A8)))
    r, _ = layout.ring()  # (closes the last V3 block)
    before = mem.copy()
    r, offs, lens, meta, part, c = walk(layout, vlans=tuple(range(1, 4095, 3)))
    changed = np.flatnonzero(mem != before)
    allowed = np.zeros(len(mem), bool)
    for lo, hi in layout.spans:  # bytes written only from 4 bytes before a frame to its end
        allowed[lo:hi] = True
    assert allowed[changed].all(), changed[~allowed[changed]]
    spans = dict((lo + 4, hi) for lo, hi in layout.spans)
    for o, n in zip(offs.tolist(), lens.tolist()):
        mac = o if o in spans else o + 4  # a restored tag starts 4 bytes early
        assert mac in spans and o + n <= spans[mac] + 4 and o + n >= spans[mac]


@pytest.mark.parametrize("seed", range(6))
def test_v3_random_block_headers_never_read_or_write_outside_the_ring(seed):
    """Garbage in the block descriptors and frame headers (num_pkts, offsets,
    tp_next_offset, tp_mac, tp_snaplen): every frame handed out lies inside its block,
    the guard bytes around the ring are untouched, and the walk ends."""
    rng = random.Random(seed)
    bs, nb, guard = 4096, 8, 4096
    whole = np.frombuffer(rng.randbytes(bs * nb + 2 * guard), np.uint8).copy()
    mem = whole[guard:guard + bs * nb]
    def sometimes(good, *bad):  # mostly what the kernel writes, now and then garbage
        return good if rng.random() < 0.8 else rng.choice(bad + (rng.randrange(2**32),))

    for b in range(nb):
        step, pos, entries = rng.choice((136, 160, 1000)), 48, []
        while pos + 48 <= bs:
            entries.append(pos)
            pos += step
        struct.pack_into("IIIIII", mem, b * bs, 3, 0, USER | rng.choice((0, 4)),
                         sometimes(len(entries), 0, 1, 2**32 - 1), sometimes(48, 0, 47, bs - 8, bs + 100), bs)
        for pos in entries:
            at = b * bs + pos
            ln = sometimes(60, 0, 13, 5000)
            struct.pack_into("IIIIIIHH", mem, at, sometimes(step, 0, 8, 1000, 2**32 - 8), 0, 0, ln,
                             sometimes(ln, 61, 2**31), USER | rng.choice((0, 8, 0x10, 0x50)),
                             sometimes(92, 0, 4, 70, bs, 2**16 - 1) & 0xFFFF, 106)
            if rng.random() < 0.7:
                mem[at + 82:at + 92] = 0  # no virtio_net_hdr request
    before = whole.copy()
    r = ring.RxRingV3(mem, bs, nb, True, tuple(range(1, 4095, 2)))
    offs, lens = np.zeros(4096, np.uint32), np.zeros(4096, np.uint32)
    meta, part = np.zeros(4096 * 10, np.uint8), np.zeros(4096, np.uint8)
    total = 0
    for _ in range(nb * 2):
        start, taken, n = r.walk(offs, lens, 4096, meta, part)
        for o, ln in zip(offs[:n].tolist(), lens[:n].tolist()):
            assert o // bs == (o + ln - 1) // bs  # inside one block
        total += n
        if taken:
            r.release(start, taken)
    assert (whole[:guard] == before[:guard]).all() and (whole[-guard:] == before[-guard:]).all()
    assert r.counters()["rx_outstanding"] == 0
    assert seed or total  # (seed 0 at least hands frames out: the walk is exercised, not only refused)

"""Fragments through the fast path: virtual reassembly in the fragment table.

    datagram ──► scapy fragment() ──► any order, any batching ──► Translator(frag=FragTable)
                                                                   │ translated in place
                                                                   │ released (held, then sent)
    the fragments that left ──► reassembled ══ scapy's own build of the translated datagram

Scapy is the oracle: it computes the translated datagram's checksums from scratch, and
the fragments that leave must reassemble to exactly that.  Both twins run every test;
``test_twins_agree_on_random_fragment_streams`` compares them frame for frame.
"""
import importlib
import ipaddress
import random

import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw, fragment

from hypernat.verdicts import FRAG_COUNTER_NAMES, IN, OUT, VERDICT_NAMES

TWINS = {"cython": ("hypernat._fastpath", "hypernat._frag"), "python": ("hypernat.fastpath_py", "hypernat.frag_py")}
I1, I2, R = "10.0.0.1", "10.0.0.2", "8.8.8.8"
E1, E2 = "198.18.0.5", "198.18.0.6"
P1, P2 = 40000, 40001
MAC_OUT = (bytes.fromhex("0200000000a1"), bytes.fromhex("0200000000a2"))  # src, dst toward outside
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # explicit: scapy would resolve MACs
MAC_IN = (bytes.fromhex("0200000000b1"), bytes.fromhex("0200000000b2"))


def a(s):
    return int(ipaddress.IPv4Address(s))


class Env:
    """A translator with a fragment table and sessions: I1:1000 <-> R:53 as E1:P1 (UDP),
    I1 echo id 7 as E1 id P1, I1:1000 -> E2:P2 hairpin to I2:2000 (UDP)."""

    def __init__(self, impl, entries=16, nbytes=64 * 2048, timeout=2, l2=True):
        fp, fr = (importlib.import_module(m) for m in TWINS[impl])
        self.out, self.inn = fp.FlowTable(64), fp.FlowTable(64)
        self.ft = fr.FragTable(entries, nbytes, timeout)
        self.tr = fp.Translator(self.out, self.inn, pool=[(a("198.18.0.0"), 24)], frag=self.ft)
        if l2:
            self.tr.set_l2(OUT, *MAC_OUT)
            self.tr.set_l2(IN, *MAC_IN)

    def sessions(self, udp=True, echo=True, hairpin=True, tcp=True):
        o, i = self.out, self.inn
        if udp:
            o.insert(17, a(I1), 1000, a(R), 53, a(E1), P1)
            i.insert(17, a(R), 53, a(E1), P1, a(I1), 1000)
        if tcp:
            o.insert(6, a(I1), 1000, a(R), 80, a(E1), P1)
            i.insert(6, a(R), 80, a(E1), P1, a(I1), 1000)
        if echo:
            o.insert(1, a(I1), 7, a(R), 7, a(E1), P1)
            i.insert(1, a(R), P1, a(E1), P1, a(I1), 7)
        if hairpin:
            o.insert(17, a(I1), 1000, a(E2), P2, a(E1), P1)
            i.insert(17, a(E1), P1, a(E2), P2, a(I2), 2000)
        return self

    def run(self, frames, direction, now=5):
        """(verdict names, frames as they are after the call, released [(exit, frame)])."""
        lens = np.array([len(f) for f in frames], np.uint32)
        offs = np.zeros(len(frames), np.uint32)
        if len(frames) > 1:
            offs[1:] = np.cumsum(lens)[:-1]
        buf = np.frombuffer(bytearray(b"".join(frames) or b"\0"), np.uint8).copy()
        v = np.zeros(len(frames), np.uint8)
        self.tr.translate(buf, offs, lens, direction, now, v)
        after = [bytes(buf[o:o + n]) for o, n in zip(offs.tolist(), lens.tolist())]
        rel = self.tr.generated()  # the one output area: released (and re-cut) fragments
        return [VERDICT_NAMES[x] for x in v], after, rel


@pytest.fixture(params=list(TWINS))
def impl(request):
    return request.param


def frags(pkt, size=1000):
    return [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / f) for f in fragment(pkt, fragsize=size)]


def sent(verdicts, after, rel, direction):
    """Every fragment that left, with the side it left by."""
    out = [(IN if v == "hairpin" else direction, f) for v, f in zip(verdicts, after) if v in ("translated", "hairpin")]
    return out + rel


def reassemble(frames):
    """The IP datagram the fragments make (bytes), checking each fragment's IP checksum."""
    ips = sorted((Ether(f)[IP] for f in frames), key=lambda x: x.frag)
    for x in ips:
        y = x.copy()
        del y.chksum
        assert IP(bytes(y)).chksum == x.chksum, "IP header checksum"
    first = ips[0]
    payload = b"".join(bytes(x.payload)[: x.len - x.ihl * 4] for x in ips)
    h = first.copy()
    h.remove_payload()
    h.flags, h.frag, h.len, h.chksum = 0, 0, None, None
    return bytes(IP(bytes(h / Raw(payload))))


def expected(pkt, src=None, dst=None, sport=None, dport=None, icmp_id=None):
    """What the whole datagram looks like translated, checksums by scapy from scratch."""
    p = pkt.copy()
    p.ttl -= 1
    if src:
        p.src = src
    if dst:
        p.dst = dst
    l4 = p.payload
    if sport is not None:
        l4.sport = sport
    if dport is not None:
        l4.dport = dport
    if icmp_id is not None:
        l4.id = icmp_id
    p.chksum = None
    l4.chksum = None
    p.flags, p.frag = 0, 0
    return bytes(IP(bytes(p)))


ORDERS = {
    "in order": lambda n: list(range(n)),
    "reversed": lambda n: list(range(n))[::-1],
    "first last": lambda n: list(range(1, n)) + [0],
    "shuffled": lambda n: random.Random(n).sample(range(n), n),
}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("batching", ["one batch", "one frame per batch"])
def test_udp_datagram_out_any_order(impl, order, batching):
    env = Env(impl).sessions()
    pkt = IP(src=I1, dst=R, id=4242, ttl=64) / UDP(sport=1000, dport=53) / Raw(bytes(range(256)) * 16)
    fr = frags(pkt)
    seq = [fr[k] for k in ORDERS[order](len(fr))]
    left = []
    if batching == "one batch":
        v, after, rel = env.run(seq, OUT)
        left += sent(v, after, rel, OUT)
    else:
        for f in seq:
            v, after, rel = env.run([f], OUT)
            left += sent(v, after, rel, OUT)
    assert len(left) == len(fr) and all(d == OUT for d, _ in left)
    assert all(f[:12] == MAC_OUT[1] + MAC_OUT[0] for _, f in left)
    assert reassemble([f for _, f in left]) == expected(pkt, src=E1, sport=P1)
    assert len(env.ft) == 0  # complete: freed at once
    assert env.ft.held == 0  # released chunks freed at release
    c = env.ft.counters_dict()
    assert c["frag_datagrams"] == 1 and c["frag_completed"] == 1


@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_udp_datagram_in_translated_by_the_external_endpoint(impl, order):
    env = Env(impl).sessions()
    pkt = IP(src=R, dst=E1, id=999, ttl=50) / UDP(sport=53, dport=P1) / Raw(b"A" * 4000)  # an EDNS answer
    fr = frags(pkt, 1480)
    v, after, rel = env.run([fr[k] for k in ORDERS[order](len(fr))], IN)
    left = sent(v, after, rel, IN)
    assert len(left) == len(fr) and all(d == IN for d, _ in left)
    assert reassemble([f for _, f in left]) == expected(pkt, dst=I1, dport=1000)


@pytest.mark.parametrize("order", ["in order", "reversed", "first last"])
@pytest.mark.parametrize("batching", ["one batch", "one frame per batch"])
def test_fragments_longer_than_the_exit_link_are_cut_again(impl, order, batching):
    """Fragments of 1420 bytes toward a 576-byte link: the first one, the later ones
    translated on arrival and the held ones released later all leave cut again, in the
    one output area -- none longer than the MTU, none DF, offsets and MF right (the
    pieces reassemble to scapy's translation)."""
    env = Env(impl).sessions()
    env.tr.set_router(outside_mtu=576)
    pkt = IP(src=I1, dst=R, id=4243, ttl=64) / UDP(sport=1000, dport=53) / Raw(bytes(range(256)) * 13)
    fr = frags(pkt, 1400)
    seq = [fr[k] for k in ORDERS[order](len(fr))]
    left, verdicts = [], []
    for part in ([seq] if batching == "one batch" else [[f] for f in seq]):
        v, after, rel = env.run(part, OUT)
        verdicts += v
        left += sent(v, after, rel, OUT)
    assert set(verdicts) <= {"fragmented", "fragment_held", "translated"} and "fragmented" in verdicts
    assert len(left) > len(fr) and all(d == OUT for d, _ in left)
    assert all(len(f) - 14 <= 576 and not Ether(f)[IP].flags.DF for _, f in left)
    assert reassemble([f for _, f in left]) == expected(pkt, src=E1, sport=P1)
    held = [len(f) - 14 for f, v in zip(seq, verdicts) if v == "fragment_held"]
    c = env.ft.counters_dict()
    assert c["frag_released"] == len(held) and c["frag_recut"] == sum(n > 576 for n in held)
    assert c["frag_completed"] == 1 and env.ft.held == 0


def test_icmp_echo_fragments_both_ways(impl):
    """ping -s 4000: the request out, the reply in (the identifier lives in the first fragment)."""
    env = Env(impl).sessions()
    req = IP(src=I1, dst=R, id=1, ttl=64) / ICMP(type=8, id=7, seq=1) / Raw(b"p" * 4000)
    v, after, rel = env.run(frags(req, 1480)[::-1], OUT)
    assert reassemble([f for _, f in sent(v, after, rel, OUT)]) == expected(req, src=E1, icmp_id=P1)
    rep = IP(src=R, dst=E1, id=2, ttl=64) / ICMP(type=0, id=P1, seq=1) / Raw(b"p" * 4000)
    v, after, rel = env.run(frags(rep, 1480), IN)
    assert reassemble([f for _, f in sent(v, after, rel, IN)]) == expected(rep, dst=I1, icmp_id=7)


def test_hairpinned_fragments_go_back_inside(impl):
    env = Env(impl).sessions()
    pkt = IP(src=I1, dst=E2, id=5, ttl=64) / UDP(sport=1000, dport=P2) / Raw(b"h" * 2500)
    fr = frags(pkt)
    v, after, rel = env.run([fr[2], fr[0], fr[1]], OUT)
    assert v == ["fragment_held", "hairpin", "hairpin"]
    left = sent(v, after, rel, OUT)
    assert [d for d, _ in left] == [IN, IN, IN]
    assert all(f[:12] == MAC_IN[1] + MAC_IN[0] for _, f in left)
    assert reassemble([f for _, f in left]) == expected(pkt, src=E1, dst=I2, sport=P1, dport=2000)


def test_first_fragment_miss_holds_the_rest_until_the_rule_comes(impl):
    """The first fragment takes the normal miss path (here: the rule arrives later, as
    from a fetch); the later ones wait and go out when the replayed first fragment is
    translated."""
    env = Env(impl).sessions(udp=False)
    pkt = IP(src=R, dst=E1, id=31, ttl=64) / UDP(sport=53, dport=P1) / Raw(b"d" * 2992)
    fr = frags(pkt)
    v, after, rel = env.run(fr, IN, now=5)
    assert v == ["miss_in", "fragment_held", "fragment_held"] and rel == []
    assert after[0] == fr[0]  # a miss is left untouched for the slow path
    env.sessions(echo=False, hairpin=False, tcp=False)  # the fetched rule
    v, after, rel = env.run([fr[0]], IN, now=6)  # the replay
    assert v == ["translated"] and len(rel) == 2
    assert reassemble([after[0]] + [f for _, f in rel]) == expected(pkt, dst=I1, dport=1000)
    c = env.ft.counters_dict()
    assert (c["frag_held"], c["frag_released"], c["frag_completed"]) == (2, 2, 1)


def test_held_fragments_time_out_counted(impl):
    env = Env(impl, timeout=2).sessions()
    pkt = IP(src=R, dst=E1, id=32, ttl=64) / UDP(sport=53, dport=P1) / Raw(b"d" * 2992)
    fr = frags(pkt)
    assert env.run(fr[1:], IN, now=10)[0] == ["fragment_held", "fragment_held"]
    env.ft.expire(11)
    assert len(env.ft) == 1
    env.ft.expire(12)
    assert len(env.ft) == 0 and env.ft.held == 0
    c = env.ft.counters_dict()
    assert (c["frag_expired_entries"], c["frag_expired_dropped"]) == (1, 2)
    # the late first fragment is translated alone (its datagram is gone: nothing to release)
    v, _, rel = env.run([fr[0]], IN, now=13)
    assert v == ["translated"] and rel == []


def test_icmp_error_quoting_a_first_fragment_is_translated(impl):
    """Fragmentation needed (or reassembly time exceeded) quotes the first fragment, which
    carries the ports: translated like any error (RFC 5508); scapy checks the result."""
    env = Env(impl).sessions()
    quote = bytes(IP(src=E1, dst=R, id=44, flags="MF", ttl=63) / UDP(sport=P1, dport=53, len=3008) / Raw(b"q" * 64))
    err = ETH / IP(src="192.0.2.1", dst=E1, ttl=64) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(quote[:28])
    v, after, _ = env.run([bytes(err)], IN)
    assert v == ["translated"]
    got = Ether(after[0])
    emb = IP(bytes(got[ICMP].payload))
    assert (got[IP].dst, emb.src, emb.flags.MF) == (I1, I1, True)
    assert int.from_bytes(bytes(got[ICMP].payload)[20:22], "big") == 1000  # the embedded source port
    c = got[ICMP].chksum
    g2 = got[ICMP].copy()
    del g2.chksum
    assert ICMP(bytes(g2)).chksum == c


def _raw_frag(src, dst, proto, ipid, off8, mf, payload, ttl=64):
    p = IP(src=src, dst=dst, proto=proto, id=ipid, frag=off8, flags="MF" if mf else 0, ttl=ttl) / Raw(payload)
    return bytes(ETH / p)


BAD = {
    # name: (frames, expected verdict of the last)
    "overlap": ([_raw_frag(R, E1, 17, 9, 1, True, b"x" * 16), _raw_frag(R, E1, 17, 9, 2, True, b"y" * 16)],
                "drop_frag_overlap"),
    "repeat": ([_raw_frag(R, E1, 17, 9, 1, True, b"x" * 16), _raw_frag(R, E1, 17, 9, 1, True, b"x" * 16)],
               "drop_frag_overlap"),
    "past 65535": ([_raw_frag(R, E1, 17, 9, 8189, False, b"x" * 100)], "drop_frag_offset"),
    "tcp at offset 8": ([_raw_frag(R, E1, 6, 9, 1, True, b"x" * 16)], "drop_frag_tiny"),
    "tiny tcp first": ([_raw_frag(R, E1, 6, 9, 0, True, b"\x00\x35" + bytes(6))], "drop_frag_tiny"),
    "tiny udp first": ([_raw_frag(R, E1, 17, 9, 0, True, b"\x00\x35\x9c\x40")], "drop_frag_tiny"),
    "ragged middle": ([_raw_frag(R, E1, 17, 9, 2, True, b"x" * 13)], "drop_frag_malformed"),
    "no data": ([_raw_frag(R, E1, 17, 9, 2, False, b"")], "drop_frag_malformed"),
    "data past the end": ([_raw_frag(R, E1, 17, 9, 4, False, b"x" * 8), _raw_frag(R, E1, 17, 9, 5, True, b"x" * 16)],
                          "drop_frag_malformed"),
    "second first fragment": ([bytes(ETH / IP(src=R, dst=E1, id=9, flags="MF") / UDP(sport=53, dport=P1) / Raw(b"z" * 8))] * 2,
                              "drop_frag_overlap"),
    "later fragment of GRE": ([_raw_frag(R, E1, 47, 9, 2, True, b"g" * 16)], "not_nat"),
    "icmp error quoting a later fragment": (
        [bytes(ETH / IP(src="1.2.3.4", dst=E1) / ICMP(type=3, code=4) /
               IP(src=E1, dst=R, id=9, frag=100, proto=17) / Raw(b"u" * 8))], "drop_icmp_error_fragment"),
    "fragmented icmp error": (
        [bytes(ETH / IP(src="1.2.3.4", dst=E1, flags="MF") / ICMP(type=11) / Raw(b"u" * 64))],
        "drop_icmp_error_fragment"),
    "icmp error about an icmp error": (
        [bytes(ETH / IP(src="1.2.3.4", dst=E1) / ICMP(type=3, code=4) /
               IP(src=E1, dst=R, proto=1) / ICMP(type=11) / Raw(b"u" * 4))], "drop_icmp_error_about_error"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fragments_dropped_by_reason(impl, case):
    env = Env(impl).sessions()
    frames, want = BAD[case]
    v, after, rel = env.run(frames, IN)
    assert v[-1] == want
    assert after[-1] == frames[-1] and rel == []  # a drop is left untouched
    assert env.tr.counters_dict()["in"][want] >= 1


def test_an_orphan_flood_cannot_grow_the_table(impl):
    """Later fragments of datagrams whose first never comes: the table keeps its bound,
    the rest are counted drops, and the entries expire."""
    env = Env(impl, entries=8, nbytes=64 * 2048).sessions()
    flood = [_raw_frag(R, E1, 17, k, 10, True, b"o" * 8) for k in range(100)]
    v, _, _ = env.run(flood, IN, now=100)
    assert v.count("fragment_held") == 8 and v.count("drop_frag_table_full") == 92
    assert len(env.ft) == 8 and env.ft.held == 8
    # bytes bound: few chunks, many datagrams
    env2 = Env(impl, entries=64, nbytes=4 * 2048).sessions()
    v, _, _ = env2.run(flood[:10], IN, now=100)
    assert v.count("fragment_held") == 4 and v.count("drop_frag_hold_full") == 6
    # time bound: after the timeout, legitimate datagrams get room again
    pkt = IP(src=R, dst=E1, id=5000, ttl=64) / UDP(sport=53, dport=P1) / Raw(b"d" * 1992)
    v, after, rel = env.run(frags(pkt)[::-1], IN, now=102)
    assert v[-1] == "translated" and len(rel) == 1
    assert env.ft.counters_dict()["frag_expired_dropped"] == 8


def test_without_a_fragment_table_fragments_are_counted_drops(impl):
    fp = importlib.import_module(TWINS[impl][0])
    tr = fp.Translator(fp.FlowTable(8), fp.FlowTable(8))
    pkt = IP(src=R, dst=E1, id=5, ttl=64) / UDP(sport=53, dport=P1) / Raw(b"d" * 2000)
    fr = frags(pkt)[:2]
    buf = np.frombuffer(bytearray(b"".join(fr)), np.uint8).copy()
    lens = np.array([len(f) for f in fr], np.uint32)
    offs = np.array([0, len(fr[0])], np.uint32)
    v = np.zeros(2, np.uint8)
    tr.translate(buf, offs, lens, IN, 1, v)
    assert [VERDICT_NAMES[x] for x in v] == ["fragment", "fragment"]


def _stream(rng, n_dgrams=12):
    """Fragments of several datagrams (some without a first fragment, some repeated or
    overlapping, some over other flows), interleaved at random."""
    out = []
    for k in range(n_dgrams):
        kind = rng.choice(["udp_in", "udp_out", "echo", "hairpin", "orphan", "dup"])
        size = rng.choice([1000, 1480, 600])
        n = rng.randrange(1500, 6000)
        if kind in ("udp_in", "orphan", "dup"):
            pkt = IP(src=R, dst=E1, id=100 + k, ttl=64) / UDP(sport=53, dport=P1) / Raw(bytes([k]) * n)
            d = IN
        elif kind == "udp_out":
            pkt = IP(src=I1, dst=R, id=100 + k, ttl=64) / UDP(sport=1000, dport=53) / Raw(bytes([k]) * n)
            d = OUT
        elif kind == "echo":
            pkt = IP(src=I1, dst=R, id=100 + k, ttl=64) / ICMP(type=8, id=7) / Raw(bytes([k]) * n)
            d = OUT
        else:
            pkt = IP(src=I1, dst=E2, id=100 + k, ttl=64) / UDP(sport=1000, dport=P2) / Raw(bytes([k]) * n)
            d = OUT
        fr = frags(pkt, size)
        if kind == "orphan":
            fr = fr[1:]
        if kind == "dup":
            fr = fr + [fr[rng.randrange(len(fr))]]
        out += [(d, f) for f in fr]
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_twins_agree_on_random_fragment_streams(seed):
    rng = random.Random(seed)
    stream = _stream(rng)
    envs = [Env(i, entries=6, nbytes=12 * 2048, timeout=3).sessions() for i in TWINS]
    mtu = rng.choice((0, 576, 1000))  # fragments cut again (on arrival and at release) or not
    for e in envs:
        e.tr.set_router(outside_mtu=mtu, inside_mtu=mtu)
    now, pos = 100, 0
    while pos < len(stream):
        d = stream[pos][0]
        m = rng.randrange(1, 8)
        batch = []
        while pos < len(stream) and stream[pos][0] == d and len(batch) < m:
            batch.append(stream[pos][1])
            pos += 1
        res = [e.run(batch, d, now) for e in envs]
        assert res[0] == res[1], f"batch at {pos} differs"
        now += rng.choice([0, 0, 1])
    for e in envs[1:]:
        assert np.array_equal(e.tr.counters, envs[0].tr.counters)
        assert e.ft.counters_dict() == envs[0].ft.counters_dict()
        assert (len(e.ft), e.ft.held) == (len(envs[0].ft), envs[0].ft.held)
        assert np.array_equal(e.tr.router_events, envs[0].tr.router_events)


def test_frag_counters_declared_once():
    fr = importlib.import_module("hypernat._frag")
    assert list(fr.FragTable(4, 4096, 2).counters_dict()) == list(FRAG_COUNTER_NAMES)


@pytest.mark.parametrize("args", [(0, 4096, 2), (4, 100, 2), (4, 4096, 0)])
def test_bad_sizes_refused(impl, args):
    fr = importlib.import_module(TWINS[impl][1])
    with pytest.raises(ValueError):
        fr.FragTable(*args)


@pytest.mark.parametrize("seed", range(4))
def test_twins_agree_on_mangled_fragments(seed):
    """Fragments with random header bytes (flags, offsets, lengths, protocol, IHL, TTL),
    truncated or overlong: both twins give the same verdicts, frames, released frames
    and counters, and never fail."""
    rng = random.Random(1000 + seed)
    base = _stream(rng, n_dgrams=6)
    envs = [Env(i, entries=4, nbytes=8 * 2048, timeout=2).sessions() for i in TWINS]
    now = 50
    for k in range(0, len(base), 5):
        d = base[k][0]
        batch = []
        for dd, f in base[k:k + 5]:
            if dd != d:
                continue
            f = bytearray(f)
            for _ in range(rng.randrange(0, 3)):
                pos = 14 + rng.choice([0, 2, 3, 6, 7, 8, 9, 20, 21, 24, 25, rng.randrange(len(f) - 14)])
                if pos < len(f):
                    f[pos] = rng.randrange(256)
            if rng.random() < 0.1:
                f = f[: rng.randrange(14, len(f))]
            batch.append(bytes(f))
        if not batch:
            continue
        res = [e.run(batch, d, now) for e in envs]
        assert res[0] == res[1], (k, [f.hex() for f in batch])
        now += rng.choice([0, 1])
    assert np.array_equal(envs[0].tr.counters, envs[1].tr.counters)
    assert envs[0].ft.counters_dict() == envs[1].ft.counters_dict()

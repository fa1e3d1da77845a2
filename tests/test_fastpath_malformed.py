"""Every malformed or not-for-NAT frame gets its verdict and is left as it was.

The expected verdicts follow docs/fastpath.md's order of checks (first failing check
decides).  Each frame runs in a batch with guard bytes around it (the runner checks
them), with a keys array pre-filled with junk: frames that never got as far as a key
must have theirs zeroed.  Then the counters, and misuse of the Python API.
"""
from collections import Counter

import numpy as np
import pytest
from scapy.all import ARP, GRE, ICMP, IP, TCP, UDP, Dot1Q, Ether, IPOption_Router_Alert, IPv6, Raw, raw

from fixtures.fastpath_oracle import E1, I1, R, eth, expected, key_tuple, run_frames, standard_env
from hypernat import layout
from hypernat.verdicts import IN, N_VERDICTS, OUT, VERDICT, VERDICT_NAMES

ZERO_KEY = (0,) * 8
TCP_OPTS = [("MSS", 1460), ("WScale", 2), ("NOP", None), ("NOP", None)]


def tcp_out(**ip):
    """A frame that hits the standard TCP session going out, with IP fields `ip`."""
    return eth() / IP(src=I1, dst=R, **ip) / TCP(sport=1111, dport=80, flags="S", options=TCP_OPTS) / b"data"


def _patch(frame: bytes, pos: int, data: bytes) -> bytes:
    return frame[:pos] + data + frame[pos + len(data):]


IP0 = 14  # IPv4 header offset in an untagged frame


def with_ip_byte(pkt, off, value):
    return _patch(raw(pkt), IP0 + off, bytes([value]))


def with_ip_word(pkt, off, value):
    return _patch(raw(pkt), IP0 + off, value.to_bytes(2, "big"))


def case(desc, frame, verdict, direction=OUT):
    return pytest.param(frame if isinstance(frame, bytes) else raw(frame), verdict, direction, id=desc)


plain = raw(tcp_out())
CASES = [
    # --- Ethernet -------------------------------------------------------------------
    case("arp", Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=I1, pdst=R), "not_nat"),
    case("ipv6", eth() / IPv6(src="fd00::1", dst="2001:db8::1") / TCP(sport=1111, dport=80), "not_nat"),
    case("qinq 0x88a8", Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88A8) / Dot1Q(vlan=5) / IP(src=I1, dst=R) / TCP(sport=1111, dport=80), "not_nat"),
    case("two 802.1Q tags", eth(3) / Dot1Q(vlan=4) / IP(src=I1, dst=R) / TCP(sport=1111, dport=80), "not_nat"),
    case("802.1Q then ipv6", eth(3) / IPv6() / UDP(), "not_nat"),
    case("802.3 length field", Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x0100) / Raw(b"\0" * 50), "not_nat"),
    case("lldp", Ether(src="02:00:00:00:00:01", dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\1" * 50), "not_nat"),
    case("empty frame", b"", "drop_truncated"),
    case("13 bytes", plain[:13], "drop_truncated"),
    case("ethernet header only", plain[:14], "drop_truncated"),
    case("802.1Q tag cut", raw(eth(3) / IP(src=I1, dst=R) / TCP())[:17], "drop_truncated"),
    case("802.1Q, no IPv4 header", raw(eth(3) / IP(src=I1, dst=R) / TCP())[:37], "drop_truncated"),
    # --- IPv4 header ----------------------------------------------------------------
    case("ipv4 header cut at 19", plain[:IP0 + 19], "drop_truncated"),
    *[case(f"version {v}", with_ip_byte(tcp_out(), 0, (v << 4) | 5), "drop_bad_version") for v in (0, 1, 5, 6, 15)],
    *[case(f"ihl {n}", with_ip_byte(tcp_out(), 0, 0x40 | n), "drop_bad_ihl") for n in range(5)],
    case("ihl 15 beyond the frame", with_ip_byte(eth() / IP(src=I1, dst=R, proto=6) / Raw(b"\0" * 20), 0, 0x4F), "drop_bad_ihl"),
    case("ihl 6, header only", with_ip_byte(eth() / IP(src=I1, dst=R, proto=6), 0, 0x46), "drop_bad_ihl"),
    case("version checked before ihl", with_ip_byte(tcp_out(), 0, 0x60), "drop_bad_version"),
    case("total length 0", with_ip_word(tcp_out(), 2, 0), "drop_bad_total_length"),
    case("total length 19", with_ip_word(tcp_out(), 2, 19), "drop_bad_total_length"),
    case("total length < ihl (options)", with_ip_word(eth() / IP(src=I1, dst=R, options=[IPOption_Router_Alert()]) / TCP(), 2, 22), "drop_bad_total_length"),
    case("total length one beyond the frame", with_ip_word(tcp_out(), 2, len(plain) - IP0 + 1), "drop_bad_total_length"),
    case("total length 65535", with_ip_word(tcp_out(), 2, 65535), "drop_bad_total_length"),
    # --- fragments ------------------------------------------------------------------
    case("first fragment (MF)", tcp_out(flags="MF"), "fragment"),
    case("middle fragment", tcp_out(flags="MF", frag=100), "fragment"),
    case("last fragment", tcp_out(frag=185), "fragment"),
    case("max fragment offset", tcp_out(frag=0x1FFF), "fragment"),
    case("DF + MF", tcp_out(flags="DF+MF"), "fragment"),
    case("fragment of GRE", eth() / IP(src=I1, dst=R, flags="MF", proto=47) / Raw(b"\0" * 30), "fragment"),
    case("fragment with ttl 1", tcp_out(flags="MF", ttl=1), "fragment"),
    case("ihl checked before fragment", with_ip_byte(tcp_out(flags="MF"), 0, 0x44), "drop_bad_ihl"),
    # --- protocol -------------------------------------------------------------------
    case("gre", eth() / IP(src=I1, dst=R) / GRE() / IP() / UDP(), "not_nat"),
    case("sctp", eth() / IP(src=I1, dst=R, proto=132) / Raw(b"\0" * 40), "not_nat"),
    case("ipv6 in ipv4", eth() / IP(src=I1, dst=R, proto=41) / IPv6() / UDP(), "not_nat"),
    case("protocol 0", eth() / IP(src=I1, dst=R, proto=0) / Raw(b"\0" * 20), "not_nat"),
    case("protocol 255, ttl 1", eth() / IP(src=I1, dst=R, proto=255, ttl=1) / Raw(b"\0" * 20), "not_nat"),
    # --- L4 headers -----------------------------------------------------------------
    *[case(f"tcp data offset {d}", eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, dataofs=d) / (b"\0" * 40), "drop_bad_l4_header") for d in range(5)],
    case("tcp data offset 15 beyond the segment", eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, dataofs=15) / (b"\0" * 39), "drop_bad_l4_header"),
    case("tcp data offset 15 exactly fits", eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, dataofs=15) / (b"\0" * 40), "translated"),
    case("tcp header 19 bytes", eth() / IP(src=I1, dst=R, proto=6) / Raw(raw(TCP(sport=1111, dport=80))[:19]), "drop_bad_l4_header"),
    case("tcp header beyond total length (padding present)", with_ip_word(tcp_out(), 2, 20 + 19), "drop_bad_l4_header"),
    case("tcp, no l4 bytes", eth() / IP(src=I1, dst=R, proto=6), "drop_bad_l4_header"),
    case("tcp bad l4 with ttl 1", eth() / IP(src=I1, dst=R, ttl=1) / TCP(sport=1111, dport=80, dataofs=4) / (b"\0" * 20), "drop_bad_l4_header"),
    *[case(f"udp length {n}", eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53, len=n) / b"abcdefgh", "drop_bad_l4_header") for n in (0, 1, 7)],
    case("udp length beyond the datagram", eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53, len=17) / b"abcdefgh", "drop_bad_l4_header"),
    case("udp header 7 bytes", eth() / IP(src=I1, dst=R, proto=17) / Raw(b"\x08\xae\x00\x35\x00\x08\x00"), "drop_bad_l4_header"),
    case("udp length 8, payload beyond it", eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53, len=8) / b"trailing", "translated"),
    case("icmp 7 bytes", eth() / IP(src=I1, dst=R, proto=1) / Raw(b"\x08\x00\x00\x00\x00\x07\x00"), "drop_bad_l4_header"),
    case("icmp 8 bytes", eth() / IP(src=I1, dst=R) / ICMP(type=8, id=7), "translated"),
    # --- TTL --------------------------------------------------------------------------
    case("tcp ttl 1 hit", tcp_out(ttl=1), "ttl_exceeded"),
    case("tcp ttl 0 hit", tcp_out(ttl=0), "ttl_exceeded"),
    case("udp ttl 1 miss", eth() / IP(src=I1, dst=R, ttl=1) / UDP(sport=9, dport=9), "ttl_exceeded"),
    case("icmp echo ttl 1", eth() / IP(src=I1, dst=R, ttl=1) / ICMP(type=8, id=7), "ttl_exceeded"),
    case("icmp unsupported ttl 0", eth() / IP(src=I1, dst=R, ttl=0) / ICMP(type=13, ts_ori=1, ts_rx=2, ts_tx=3), "ttl_exceeded"),
    case("incoming tcp ttl 1", eth() / IP(src=R, dst=E1, ttl=1) / TCP(sport=80, dport=40001), "ttl_exceeded", IN),
    case("incoming udp ttl 0", eth() / IP(src=R, dst=E1, ttl=0) / UDP(sport=53, dport=40002), "ttl_exceeded", IN),
    case("hairpin ttl 1", eth() / IP(src=I1, dst=E1, ttl=1) / TCP(sport=5555, dport=6666), "ttl_exceeded"),
    case("vlan ttl 1", eth(5) / IP(src=I1, dst=R, ttl=1) / TCP(sport=1111, dport=80), "ttl_exceeded"),
    case("reserved flag bit is not a fragment", tcp_out(flags="evil"), "translated"),
]


@pytest.mark.parametrize("frame, verdict, direction", CASES)
def test_verdict(fp, frame, verdict, direction):
    env = standard_env(fp)
    before = (env.out.slots.copy(), env.inn.slots.copy())
    out, v, k = env.one(frame, direction)
    assert v == verdict
    if verdict == "translated":
        assert out != frame
        return
    assert out == frame
    assert key_tuple(k) == ZERO_KEY or verdict.startswith("miss")
    assert np.array_equal(before[0], env.out.slots) and np.array_equal(before[1], env.inn.slots)


def test_translated_edge_frames_match_scapy(fp):
    """The 'translated' rows above that scapy can rebuild: byte for byte."""
    env = standard_env(fp)
    for frame, rewrite in [
        (raw(tcp_out(flags="evil")), dict(src=E1, sport=40001)),
        (raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, dataofs=15) / (b"\1" * 40)), dict(src=E1, sport=40001)),
        (raw(eth() / IP(src=I1, dst=R) / ICMP(type=8, id=7)), dict(src=E1, icmp_id=40003)),
    ]:
        out, v, _ = env.one(frame, OUT)
        assert (v, out) == ("translated", expected(frame, **rewrite))


def _trunc_verdict(length, l3, ihl, total):
    """docs/fastpath.md steps 2-3 for a frame cut to `length` bytes."""
    if length < 14 or (l3 == 18 and length < 18) or length - l3 < 20:
        return "drop_truncated"
    if length - l3 < ihl:
        return "drop_bad_ihl"
    if length - l3 < total:
        return "drop_bad_total_length"
    return "translated"


@pytest.mark.parametrize("vlan", [None, 12], ids=["untagged", "vlan"])
@pytest.mark.parametrize("proto", [6, 17, 1], ids=["tcp", "udp", "icmp"])
@pytest.mark.parametrize("direction", [OUT, IN], ids=["out", "in"])
def test_truncated_at_every_length(fp, vlan, proto, direction):
    """One batch: the frame cut at every length from 0 to full, each in its own place."""
    src, dst = (I1, R) if direction == OUT else (R, E1)
    ports = {OUT: {6: (1111, 80), 17: (2222, 53)}, IN: {6: (80, 40001), 17: (53, 40002)}}
    ip = IP(src=src, dst=dst, options=[IPOption_Router_Alert()])
    if proto == 1:
        l4 = ICMP(type=8 if direction == OUT else 0, id=7 if direction == OUT else 40003) / b"0123456789"
    elif proto == 6:
        l4 = TCP(sport=ports[direction][6][0], dport=ports[direction][6][1], options=TCP_OPTS) / b"abc"
    else:
        l4 = UDP(sport=ports[direction][17][0], dport=ports[direction][17][1]) / b"abc"
    full = raw(eth(vlan) / ip / l4)
    l3 = 18 if vlan is not None else 14
    frames = [full[:n] for n in range(len(full) + 1)]
    out, verdicts, keys = run_frames(standard_env(fp).tr, frames, direction)
    for n, (f, o, v, k) in enumerate(zip(frames, out, verdicts, keys)):
        want = _trunc_verdict(n, l3, 24, len(full) - l3)
        assert VERDICT_NAMES[v] == want, f"cut at {n}"
        if want != "translated":
            assert o == f and key_tuple(k) == ZERO_KEY, f"cut at {n}"


def test_frames_beyond_the_buffer(fp):
    """offset + length beyond the buffer (including 32-bit wrap-around) -> truncated,
    nothing read or written."""
    env = standard_env(fp)
    frame = raw(tcp_out())
    buf = np.frombuffer(bytearray(frame * 2), dtype=np.uint8)
    L = len(frame)
    cases = [
        (L, L, "translated"),  # the second copy, exactly at the end: fine
        (L, L + 1, "drop_truncated"),
        (L + 1, L, "drop_truncated"),
        (2 * L, 0, "drop_truncated"),  # empty frame at the end: too short
        (2 * L, 1, "drop_truncated"),
        (0xFFFFFFFF, 1, "drop_truncated"),
        (0xFFFFFFFF, 0xFFFFFFFF, "drop_truncated"),
        (0xFFFFFFF0, 0x20, "drop_truncated"),  # wraps to 0x10 in 32 bits
        (0x10, 0xFFFFFFF8, "drop_truncated"),  # wraps to 8
        (1, 0xFFFFFFFF, "drop_truncated"),  # wraps to 0
        (0, 2 * L + 1, "drop_truncated"),
    ]
    for off, length, want in cases:
        b = buf.copy()
        v = np.zeros(1, np.uint8)
        env.tr.translate(b, np.array([off], np.uint32), np.array([length], np.uint32), OUT, 1, v)
        assert VERDICT_NAMES[v[0]] == want, (off, length)
        if want != "translated":
            assert np.array_equal(b, buf), (off, length)
        else:
            assert b[:L].tobytes() == frame


def test_counters_match_verdicts(fp):
    env = standard_env(fp)
    from fixtures.fastpath_oracle import E2

    frames = [c.values[0] for c in CASES] + [
        raw(eth() / IP(src=I1, dst=R) / TCP(sport=4, dport=80)),  # miss_out / miss_in
        raw(eth() / IP(src=I1, dst=E2) / TCP(sport=5555, dport=6666)),  # hairpin / miss_in
        raw(eth() / IP(src=R, dst=E1) / ICMP(type=13, ts_ori=1, ts_rx=2, ts_tx=3)),  # drop_icmp_unsupported
        raw(eth() / IP(src=R, dst=E1) / UDP(sport=53, dport=40002)),  # miss_hairpin / translated
    ]
    assert env.tr.counters.shape == (2, N_VERDICTS) and env.tr.counters.dtype == np.uint64
    live = env.tr.counters
    want = {"out": Counter(), "in": Counter()}
    for direction, name in ((OUT, "out"), (IN, "in"), (OUT, "out")):
        _, verdicts, _ = run_frames(env.tr, frames, direction, keys=(direction == IN))
        want[name].update(VERDICT_NAMES[v] for v in verdicts)
        got = env.tr.counters_dict()
        assert set(got) == {"out", "in"}
        for d in ("out", "in"):
            assert set(got[d]) == set(VERDICT_NAMES)
            assert got[d] == {n: want[d][n] for n in VERDICT_NAMES}
    assert env.tr.counters is live  # live array, updated in place
    assert int(live[OUT, VERDICT["translated"]]) == want["out"]["translated"] > 0
    assert len(want["out"]) >= 12 and len(want["in"]) >= 11  # the batches really are mixed
    env.tr.reset_counters()
    assert all(n == 0 for d in env.tr.counters_dict().values() for n in d.values())
    assert not live.any()


def test_empty_batch(fp):
    env = standard_env(fp)
    env.tr.translate(bytearray(b"x"), np.zeros(0, np.uint32), np.zeros(0, np.uint32), OUT, 0, np.zeros(0, np.uint8))
    assert not env.tr.counters.any()


# ---------------------------------------------------------------------------------------
# API misuse: clear errors, never a crash
# ---------------------------------------------------------------------------------------

MISUSE = (ValueError, TypeError)


def _args(n=1):
    frame = raw(tcp_out())
    return dict(
        buf=np.frombuffer(bytearray(frame * n), dtype=np.uint8),
        offsets=np.arange(n, dtype=np.uint32) * len(frame),
        lengths=np.full(n, len(frame), np.uint32),
        direction=OUT, now=1, verdicts=np.zeros(n, np.uint8), keys=np.zeros(n, layout.KEY_DTYPE),
    )


@pytest.mark.parametrize("change", [
    dict(direction=2), dict(direction=-1),
    dict(offsets=np.zeros(1, np.int64)), dict(lengths=np.zeros(1, np.float64)),
    dict(offsets=np.zeros(2, np.uint32)), dict(lengths=np.zeros(3, np.uint32)),
    dict(verdicts=np.zeros(0, np.uint8)), dict(verdicts=np.zeros(1, np.int32)),
    dict(keys=np.zeros(1, np.uint8)), dict(keys=np.zeros(0, layout.KEY_DTYPE)),
    dict(buf=b"read-only bytes" * 10), dict(buf=np.zeros(100, np.uint32)),
    dict(buf="a string"), dict(offsets=[0]), dict(buf=np.zeros(200, np.uint8)[::2]),
], ids=lambda c: f"{list(c)[0]}={type(list(c.values())[0]).__name__}")
def test_translate_rejects_misuse(fp, change):
    env = standard_env(fp)
    a = {**_args(), **change}
    with pytest.raises(MISUSE):
        env.tr.translate(a["buf"], a["offsets"], a["lengths"], a["direction"], a["now"], a["verdicts"], a["keys"])
    assert not env.tr.counters.any()


def test_translate_rejects_strided_arrays(fp):
    env = standard_env(fp)
    a = _args(2)
    for name in ("offsets", "lengths", "verdicts"):
        b = dict(a)
        b[name] = np.repeat(a[name], 2)[::2]  # same values, stride 2
        with pytest.raises(MISUSE):
            env.tr.translate(b["buf"], b["offsets"], b["lengths"], OUT, 1, b["verdicts"])


def test_translate_accepts_bytearray_and_numpy(fp):
    env = standard_env(fp)
    frame = raw(tcp_out())
    for buf in (bytearray(frame), np.frombuffer(bytearray(frame), dtype=np.uint8)):
        v = np.zeros(1, np.uint8)
        env.tr.translate(buf, np.zeros(1, np.uint32), np.full(1, len(frame), np.uint32), OUT, 1, v)
        assert v[0] == VERDICT["translated"] and bytes(buf) == expected(frame, src=E1, sport=40001)


@pytest.mark.parametrize("args", [
    (-1, 1, 1, 1, 1, 1, 1), (6, 2**32, 1, 1, 1, 1, 1), (6, 1, 65536, 1, 1, 1, 1),
    (256, 1, 1, 1, 1, 1, 1), (6, 1, 1, 1, -5, 1, 1), (6, 1, 1, 1, 1, 2**32, 1), (6, 1, 1, 1, 1, 1, 70000),
])
def test_table_rejects_out_of_range(fp, args):
    t = fp.FlowTable(8, hugepages=False)
    with pytest.raises((ValueError, TypeError, OverflowError)):
        t.insert(*args)
    assert len(t) == 0 and not t.slots.view(np.uint8).any()


def test_table_rejects_bad_capacity(fp):
    for cap in (0, -1):
        with pytest.raises((ValueError, OverflowError)):
            fp.FlowTable(cap, hugepages=False)

"""Translated frames against scapy, byte for byte (both implementations).

Table-driven: each case is {description, input frame, direction, expected verdict,
expected rewrite}; the expected frame is built by scapy from the input with the
rewritten fields and recomputed checksums (``fixtures.fastpath_oracle.expected``).
Then random packets (hypothesis, and one big seeded batch) go the same way.
"""
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPOption_Router_Alert, IPOption_RR, Padding, raw

from fixtures.fastpath_oracle import (
    E1, E2, I1, I2, R, A, Env, eth, expected, key_tuple, run_frames, standard_env,
)
from hypernat import layout
from hypernat.verdicts import IN, OUT, VERDICT

TCP_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 654321)), ("NOP", None), ("WScale", 7)]
IP_OPTS = [IPOption_Router_Alert()]
IP_OPTS_RR = [IPOption_RR(routers=["192.0.2.1", "192.0.2.2", "192.0.2.3"])]


def case(desc, pkt, direction, verdict, key=None, **rewrite):
    """A row of the table. key: (proto, saddr, sport, daddr, dport) expected in keys[i]
    (kind, flags and type are derived from the frame); rewrite: fields for `expected`
    (empty for a frame that must come out unchanged)."""
    return pytest.param(raw(pkt), direction, verdict, key, rewrite, id=desc)


CASES = [
    # --- outgoing: the source becomes the external endpoint ---------------------------
    case("tcp syn out", eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="S"),
         OUT, "translated", (6, I1, 1111, R, 80), src=E1, sport=40001),
    case("tcp options + payload out",
         eth() / IP(src=I1, dst=R, ttl=33) / TCP(sport=1111, dport=80, flags="PA", options=TCP_OPTS) / (b"GET / HTTP/1.1\r\n" * 5),
         OUT, "translated", (6, I1, 1111, R, 80), src=E1, sport=40001),
    case("tcp, ip router-alert option, out",
         eth() / IP(src=I1, dst=R, options=IP_OPTS) / TCP(sport=1111, dport=80, flags="A") / b"x",
         OUT, "translated", (6, I1, 1111, R, 80), src=E1, sport=40001),
    case("tcp, ip RR option + tcp options, out",
         eth() / IP(src=I1, dst=R, options=IP_OPTS_RR) / TCP(sport=1111, dport=80, flags="S", options=TCP_OPTS),
         OUT, "translated", (6, I1, 1111, R, 80), src=E1, sport=40001),
    case("udp out", eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53) / b"\x12\x34query",
         OUT, "translated", (17, I1, 2222, R, 53), src=E1, sport=40002),
    case("udp odd-length payload out", eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53) / b"abc",
         OUT, "translated", (17, I1, 2222, R, 53), src=E1, sport=40002),
    case("udp zero checksum out stays zero",
         eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53, chksum=0) / b"no checksum",
         OUT, "translated", (17, I1, 2222, R, 53), src=E1, sport=40002, udp_zero=True),
    case("icmp echo request out", eth() / IP(src=I1, dst=R) / ICMP(type=8, id=7, seq=3) / (b"ping" * 8),
         OUT, "translated", (1, I1, 7, R, 7), src=E1, icmp_id=40003),
    case("vlan tcp out", eth(vlan=42) / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="S", options=TCP_OPTS),
         OUT, "translated", (6, I1, 1111, R, 80), src=E1, sport=40001),
    case("vlan icmp echo out, ip options", eth(vlan=4095) / IP(src=I1, dst=R, options=IP_OPTS) / ICMP(type=8, id=7) / b"p",
         OUT, "translated", (1, I1, 7, R, 7), src=E1, icmp_id=40003),
    case("ttl 2 out goes with ttl 1", eth() / IP(src=I1, dst=R, ttl=2) / TCP(sport=1111, dport=80),
         OUT, "translated", (6, I1, 1111, R, 80), src=E1, sport=40001),
    case("df set is not a fragment", eth() / IP(src=I1, dst=R, flags="DF") / TCP(sport=1111, dport=80, flags="A"),
         OUT, "translated", (6, I1, 1111, R, 80), src=E1, sport=40001),
    case("ethernet padding after total_length kept",
         eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53) / b"q" / Padding(b"\xaa" * 17),
         OUT, "translated", (17, I1, 2222, R, 53), src=E1, sport=40002),
    # --- incoming: the destination becomes the inside endpoint ------------------------
    case("tcp syn-ack in", eth() / IP(src=R, dst=E1) / TCP(sport=80, dport=40001, flags="SA", options=TCP_OPTS),
         IN, "translated", (6, R, 80, E1, 40001), dst=I1, dport=1111),
    case("tcp fin in, ip RR option", eth() / IP(src=R, dst=E1, options=IP_OPTS_RR) / TCP(sport=80, dport=40001, flags="FA") / b"bye",
         IN, "translated", (6, R, 80, E1, 40001), dst=I1, dport=1111),
    case("udp in", eth() / IP(src=R, dst=E1) / UDP(sport=53, dport=40002) / (b"answer" * 30),
         IN, "translated", (17, R, 53, E1, 40002), dst=I1, dport=2222),
    case("udp zero checksum in stays zero", eth() / IP(src=R, dst=E1) / UDP(sport=53, dport=40002, chksum=0) / b"a",
         IN, "translated", (17, R, 53, E1, 40002), dst=I1, dport=2222, udp_zero=True),
    case("icmp echo reply in", eth() / IP(src=R, dst=E1) / ICMP(type=0, id=40003, seq=9) / b"pong",
         IN, "translated", (1, R, 40003, E1, 40003), dst=I1, icmp_id=7),
    case("vlan udp in, ip options", eth(vlan=7) / IP(src=R, dst=E2, options=IP_OPTS) / UDP(sport=53, dport=40004) / b"z",
         IN, "translated", (17, R, 53, E2, 40004), dst=I2, dport=5353),
    # --- hairpin: inside to an external-pool endpoint ---------------------------------
    case("hairpin tcp", eth() / IP(src=I1, dst=E2) / TCP(sport=5555, dport=6666, flags="S", options=TCP_OPTS),
         OUT, "hairpin", (6, I1, 5555, E2, 6666), src=E1, sport=41000, dst=I2, dport=7777),
    case("hairpin tcp vlan", eth(vlan=9) / IP(src=I1, dst=E2, options=IP_OPTS) / TCP(sport=5555, dport=6666, flags="A") / b"hi",
         OUT, "hairpin", (6, I1, 5555, E2, 6666), src=E1, sport=41000, dst=I2, dport=7777),
    case("hairpin icmp echo", eth() / IP(src=I1, dst=E2) / ICMP(type=8, id=8, seq=1) / b"abc",
         OUT, "hairpin", (1, I1, 8, E2, 8), src=E1, dst=I2, icmp_id=9),
    case("hairpin, in half missing", eth() / IP(src=I1, dst=E2) / UDP(sport=5556, dport=6667),
         OUT, "miss_hairpin", (17, I1, 5556, E2, 6667)),
    case("hairpin, out half missing", eth() / IP(src=I2, dst=E1) / TCP(sport=1, dport=40001),
         OUT, "miss_hairpin", (6, I2, 1, E1, 40001)),
    # --- misses: unchanged, keyed ----------------------------------------------------
    case("new tcp connection out", eth() / IP(src=I1, dst=R) / TCP(sport=1112, dport=80, flags="S"),
         OUT, "miss_out", (6, I1, 1112, R, 80)),
    case("new udp flow out", eth() / IP(src=I2, dst=R) / UDP(sport=2222, dport=53),
         OUT, "miss_out", (17, I2, 2222, R, 53)),
    case("icmp echo with unknown id out", eth() / IP(src=I1, dst=R) / ICMP(type=8, id=8),
         OUT, "miss_out", (1, I1, 8, R, 8)),
    case("unknown incoming tcp", eth() / IP(src=R, dst=E1) / TCP(sport=81, dport=40001, flags="S"),
         IN, "miss_in", (6, R, 81, E1, 40001)),
    case("outgoing frame given as IN misses", eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80),
         IN, "miss_in", (6, I1, 1111, R, 80)),
    case("incoming frame given as OUT misses", eth() / IP(src=R, dst=E1) / UDP(sport=53, dport=40002),
         OUT, "miss_hairpin", (17, R, 53, E1, 40002)),  # E1 is in the pool; no out entry
    case("same ports, other protocol misses", eth() / IP(src=I1, dst=R) / UDP(sport=1111, dport=80),
         OUT, "miss_out", (17, I1, 1111, R, 80)),
]


@pytest.mark.parametrize("frame, direction, verdict, key, rewrite", CASES)
def test_case(fp, frame, direction, verdict, key, rewrite):
    env = standard_env(fp)
    out, v, k = env.one(frame, direction)
    assert v == verdict
    if rewrite:
        assert out == expected(frame, **rewrite)
        assert out != frame
    else:
        assert out == frame
    if key is not None:
        proto, sa, sp, da, dp = key
        p = Ether(frame)
        tcp_flags = int(p[TCP].flags) if TCP in p else 0
        icmp_type = p[ICMP].type if ICMP in p else 0
        assert key_tuple(k) == (proto, A(sa), sp, A(da), dp, layout.KIND_PLAIN, tcp_flags, icmp_type)


def test_translated_frames_are_valid_for_scapy(fp):
    """Independent of `expected`: scapy's own checksum recomputation of the output
    changes nothing (every checksum the fast path wrote is right)."""
    env = standard_env(fp)
    frame = raw(eth() / IP(src=I1, dst=R, options=IP_OPTS) / TCP(sport=1111, dport=80, options=TCP_OPTS) / b"data!")
    out, v, _ = env.one(frame, OUT)
    assert v == "translated"
    p = Ether(out)
    assert (p[IP].src, p[TCP].sport, p[IP].ttl) == (E1, 40001, 63)
    del p[IP].chksum
    del p[TCP].chksum
    assert raw(p) == out


def test_hit_refreshes_session(fp):
    """A hit writes last_seen = now, sets F_ACTIVE and ORs FIN/SYN/RST into tcp_state."""
    env = standard_env(fp)
    syn = raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="S"))
    fin = raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="FPA"))
    key = (6, A(I1), 1111, A(R), 80)
    rec = env.out.get(*key)
    assert rec["last_seen"] == 0 and rec["flags"] == layout.F_OCCUPIED and rec["tcp_state"] == 0
    env.run([syn], OUT, now=1234)
    rec = env.out.get(*key)
    assert rec["last_seen"] == 1234
    assert rec["flags"] == layout.F_OCCUPIED | layout.F_ACTIVE
    assert rec["tcp_state"] == layout.TCP_SYN
    env.run([fin], OUT, now=1300)
    rec = env.out.get(*key)
    assert rec["last_seen"] == 1300 and rec["tcp_state"] == layout.TCP_SYN | layout.TCP_FIN
    # The in direction is untouched by outgoing traffic.
    assert env.inn.get(6, A(R), 80, A(E1), 40001)["last_seen"] == 0
    # A miss changes nothing in the tables.
    before = (env.out.slots.copy(), env.inn.slots.copy())
    env.run([raw(eth() / IP(src=I1, dst=R) / TCP(sport=999, dport=80, flags="R"))], OUT, now=2000)
    assert np.array_equal(before[0], env.out.slots) and np.array_equal(before[1], env.inn.slots)


def test_hairpin_refreshes_both_halves(fp):
    env = standard_env(fp)
    frame = raw(eth() / IP(src=I1, dst=E2) / TCP(sport=5555, dport=6666, flags="R"))
    _, v, _ = env.one(frame, OUT, now=77)
    assert v == "hairpin"
    for rec in (env.out.get(6, A(I1), 5555, A(E2), 6666), env.inn.get(6, A(E1), 41000, A(E2), 6666)):
        assert rec["last_seen"] == 77 and rec["flags"] & layout.F_ACTIVE and rec["tcp_state"] == layout.TCP_RST


def test_miss_hairpin_refreshes_nothing(fp):
    """The out half hits but the in half is missing: nothing is sent, nothing refreshed."""
    env = standard_env(fp)
    before = (env.out.slots.copy(), env.inn.slots.copy())
    _, v, _ = env.one(raw(eth() / IP(src=I1, dst=E2) / UDP(sport=5556, dport=6667)), OUT, now=55)
    assert v == "miss_hairpin"
    assert np.array_equal(before[0], env.out.slots) and np.array_equal(before[1], env.inn.slots)


def test_icmp_echo_refresh_does_not_touch_tcp_state(fp):
    env = standard_env(fp)
    env.one(raw(eth() / IP(src=I1, dst=R) / ICMP(type=8, id=7)), OUT, now=5)
    rec = env.out.get(1, A(I1), 7, A(R), 7)
    assert rec["last_seen"] == 5 and rec["tcp_state"] == 0


# ---------------------------------------------------------------------------------------
# set_l2: MAC rewriting by exit direction
# ---------------------------------------------------------------------------------------

OUT_SRC, OUT_DST = bytes.fromhex("0200000000f1"), bytes.fromhex("0200000000f2")
IN_SRC, IN_DST = bytes.fromhex("0200000000e1"), bytes.fromhex("0200000000e2")


def _with_macs(frame, src, dst):
    return dst + src + frame[12:]


@pytest.mark.parametrize("vlan", [None, 3])
def test_set_l2(fp, vlan):
    env = standard_env(fp)
    out_f = raw(eth(vlan) / IP(src=I1, dst=R) / TCP(sport=1111, dport=80))
    in_f = raw(eth(vlan) / IP(src=R, dst=E1) / UDP(sport=53, dport=40002))
    hp_f = raw(eth(vlan) / IP(src=I1, dst=E2) / TCP(sport=5555, dport=6666))
    miss_f = raw(eth(vlan) / IP(src=I1, dst=R) / TCP(sport=1, dport=80))
    # Only OUT's pair set: IN frames keep their MACs.
    env.tr.set_l2(OUT, OUT_SRC, OUT_DST)
    (o, m), v, _ = env.run([out_f, miss_f], OUT)
    assert list(v) == [VERDICT["translated"], VERDICT["miss_out"]]
    assert o == _with_macs(expected(out_f, src=E1, sport=40001), OUT_SRC, OUT_DST)
    assert m == miss_f
    (i,), _, _ = env.run([in_f], IN)
    assert i == expected(in_f, dst=I1, dport=2222)
    (h,), _, _ = env.run([hp_f], OUT)
    assert h == expected(hp_f, src=E1, sport=41000, dst=I2, dport=7777)
    # Both set: IN frames and hairpin frames (which go back inside) get IN's pair.
    env.tr.set_l2(IN, IN_SRC, IN_DST)
    (i,), _, _ = env.run([in_f], IN)
    assert i == _with_macs(expected(in_f, dst=I1, dport=2222), IN_SRC, IN_DST)
    (h,), v, _ = env.run([hp_f], OUT)
    assert v[0] == VERDICT["hairpin"]
    assert h == _with_macs(expected(hp_f, src=E1, sport=41000, dst=I2, dport=7777), IN_SRC, IN_DST)


def test_set_l2_rejects_bad_macs(fp):
    env = standard_env(fp)
    with pytest.raises((ValueError, TypeError)):
        env.tr.set_l2(OUT, b"\x01" * 5, b"\x02" * 6)
    with pytest.raises((ValueError, TypeError)):
        env.tr.set_l2(2, b"\x01" * 6, b"\x02" * 6)


# ---------------------------------------------------------------------------------------
# Random packets: translated == scapy-rebuilt
# ---------------------------------------------------------------------------------------

addr = st.integers(0x01000000, 0xDFFFFFFF)  # unicast-looking, never in 100.64.0.0/24 by chance: pool=()
port = st.integers(0, 65535)
TCP_OPTION_SETS = [[], TCP_OPTS, [("MSS", 536)], [("NOP", None)] * 3 + [("WScale", 14)], [("SAckOK", b""), ("EOL", None)]]
IP_OPTION_SETS = [[], IP_OPTS, IP_OPTS_RR, [IPOption_RR(routers=["1.1.1.1"] * 9)]]


@st.composite
def flows(draw):
    proto = draw(st.sampled_from([6, 17, 1]))
    return dict(
        proto=proto,
        inside=draw(addr), iport=draw(port), remote=draw(addr), rport=draw(port),
        ext=draw(addr), eport=draw(port),
        direction=draw(st.sampled_from([OUT, IN])),
        ttl=draw(st.integers(2, 255)),
        tos=draw(st.integers(0, 255)), ipid=draw(port),
        vlan=draw(st.sampled_from([None, None, 1, 4094])),
        ipopts=draw(st.sampled_from(range(len(IP_OPTION_SETS)))),
        tcpopts=draw(st.sampled_from(range(len(TCP_OPTION_SETS)))),
        tcpflags=draw(st.integers(0, 255)),
        seq=draw(st.integers(0, 2**32 - 1)),
        udp_zero=draw(st.booleans()) if proto == 17 else False,
        icmp_type=draw(st.sampled_from([0, 8])),
        payload=draw(st.binary(max_size=80)),
    )


def build_random(f):
    """(frame, expected frame, session args) for one drawn flow."""
    from fixtures.fastpath_oracle import S

    inside, remote, ext = S(f["inside"]), S(f["remote"]), S(f["ext"])
    if f["direction"] == OUT:
        src, dst, sport, dport = inside, remote, f["iport"], f["rport"]
    else:
        src, dst, sport, dport = remote, ext, f["rport"], f["eport"]
    ip = IP(src=src, dst=dst, ttl=f["ttl"], tos=f["tos"], id=f["ipid"], options=IP_OPTION_SETS[f["ipopts"]])
    proto = f["proto"]
    if proto == 6:
        l4 = TCP(sport=sport, dport=dport, flags=f["tcpflags"], seq=f["seq"], options=TCP_OPTION_SETS[f["tcpopts"]])
    elif proto == 17:
        l4 = UDP(sport=sport, dport=dport, chksum=0 if f["udp_zero"] else None)
    else:
        l4 = ICMP(type=f["icmp_type"], id=sport, seq=f["seq"] & 0xFFFF)
    frame = raw(eth(f["vlan"]) / ip / l4 / f["payload"])
    if proto == 1:  # the identifier is both "ports"
        f = dict(f, rport=f["iport"], eport=f["eport"])
        sess = (1, inside, f["iport"], remote, f["iport"], ext, f["eport"])
        if f["direction"] == OUT:
            exp = expected(frame, src=ext, icmp_id=f["eport"])
        else:
            frame = raw(eth(f["vlan"]) / IP(src=remote, dst=ext, ttl=f["ttl"], tos=f["tos"], id=f["ipid"],
                                            options=IP_OPTION_SETS[f["ipopts"]])
                        / ICMP(type=f["icmp_type"], id=f["eport"], seq=f["seq"] & 0xFFFF) / f["payload"])
            sess = (1, inside, f["iport"], remote, f["eport"], ext, f["eport"])
            exp = expected(frame, dst=inside, icmp_id=f["iport"])
        return frame, exp, sess
    sess = (proto, inside, f["iport"], remote, f["rport"], ext, f["eport"])
    if f["direction"] == OUT:
        exp = expected(frame, src=ext, sport=f["eport"], udp_zero=f["udp_zero"])
    else:
        exp = expected(frame, dst=inside, dport=f["iport"], udp_zero=f["udp_zero"])
    return frame, exp, sess


def _install(env, sess, direction):
    proto, inside, iport, remote, rport, ext, eport = sess
    if direction == OUT:
        assert env.out.insert(proto, A(inside), iport, A(remote), rport, A(ext), eport)
    else:
        assert env.inn.insert(proto, A(remote), rport, A(ext), eport, A(inside), iport)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(f=flows())
def test_random_packet_matches_scapy(fp, f):
    # The all-zero echo reply (checksum 0xFFFF) has its own test in test_fastpath_checksum.
    assume(not (f["proto"] == 1 and f["icmp_type"] == 0 and not f["seq"] & 0xFFFF and not f["payload"].strip(b"\0")
                and not (f["eport"] if f["direction"] == OUT else f["iport"])))
    frame, exp, sess = build_random(f)
    env = Env(fp, 8, pool=())
    _install(env, sess, f["direction"])
    out, v, _ = env.one(frame, f["direction"])
    assert v == "translated"
    assert out == exp


def test_random_batch_matches_scapy(fp):
    """300 random frames in one batch per direction, each with its own session, mixed
    with frames that miss; every translated frame equals scapy's."""
    rng = random.Random(20261126)
    for direction in (OUT, IN):
        env = Env(fp, 400, pool=())
        frames, exps = [], []
        for n in range(300):
            f = _random_flow(rng, direction)
            frame, exp, sess = build_random(f)
            if n % 5 == 4:
                exp = frame  # no session: a miss, unchanged
            elif (env.out if direction == OUT else env.inn).lookup(*_key(sess, direction)) < 0:
                _install(env, sess, direction)
            else:
                exp = None  # colliding random key: skip the comparison
            frames.append(frame)
            exps.append(exp)
        out, verdicts, _ = run_frames(env.tr, frames, direction)
        for o, e, frame, v in zip(out, exps, frames, verdicts):
            if e is None:
                continue
            assert o == e
            want = "translated" if e != frame else ("miss_out" if direction == OUT else "miss_in")
            assert v == VERDICT[want]


def _key(sess, direction):
    proto, inside, iport, remote, rport, ext, eport = sess
    if direction == OUT:
        return proto, A(inside), iport, A(remote), rport
    return proto, A(remote), rport, A(ext), eport


def _random_flow(rng, direction):
    proto = rng.choice([6, 17, 1])
    r = lambda lo, hi: rng.randint(lo, hi)  # noqa: E731
    return dict(
        proto=proto, inside=r(0x01000000, 0xDFFFFFFF), iport=r(0, 65535), remote=r(0x01000000, 0xDFFFFFFF),
        rport=r(0, 65535), ext=r(0x01000000, 0xDFFFFFFF), eport=r(0, 65535), direction=direction,
        ttl=r(2, 255), tos=r(0, 255), ipid=r(0, 65535), vlan=rng.choice([None, None, 5]),
        ipopts=r(0, len(IP_OPTION_SETS) - 1), tcpopts=r(0, len(TCP_OPTION_SETS) - 1), tcpflags=r(0, 255),
        seq=r(0, 2**32 - 1), udp_zero=proto == 17 and rng.random() < 0.2, icmp_type=rng.choice([0, 8]),
        payload=bytes(rng.randrange(256) for _ in range(r(0, 64))),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(proto=st.sampled_from([6, 17, 1]), i1=addr, i2=addr, e1=st.integers(0, 0xFFFF), e2=st.integers(0, 0xFFFF),
       p1=port, p2=port, q1=port, q2=port, vlan=st.sampled_from([None, 3]),
       ipopts=st.sampled_from(range(len(IP_OPTION_SETS))), payload=st.binary(max_size=40), ttl=st.integers(2, 255))
def test_random_hairpin_matches_scapy(fp, proto, i1, i2, e1, e2, p1, p2, q1, q2, vlan, ipopts, payload, ttl):
    """I1:p1 -> E2:q2 (the mapping of I2:p2) becomes E1:q1 -> I2:p2, back inside."""
    from fixtures.fastpath_oracle import S

    E1_, E2_ = S(0x64400000 | e1), S(0x64400000 | e2)  # 100.64.0.0/16
    env = Env(fp, 8, pool=[("100.64.0.0", 16)])
    dport = p1 if proto == 1 else q2  # echo: the identifier is both ports
    assert env.out.insert(proto, i1, p1, A(E2_), dport, A(E1_), q1)
    assert env.inn.insert(proto, A(E1_), q1, A(E2_), dport, i2, p2)
    ip = IP(src=S(i1), dst=E2_, ttl=ttl, options=IP_OPTION_SETS[ipopts])
    if proto == 6:
        l4, rw = TCP(sport=p1, dport=q2, flags="A"), dict(sport=q1, dport=p2)
    elif proto == 17:
        l4, rw = UDP(sport=p1, dport=q2), dict(sport=q1, dport=p2)
    else:
        l4, rw = ICMP(type=8, id=p1, seq=1), dict(icmp_id=p2)
    frame = raw(eth(vlan) / ip / l4 / payload)
    out, v, _ = env.one(frame, OUT)
    assert v == "hairpin"
    assert out == expected(frame, src=E1_, dst=S(i2), **rw)

"""ICMP errors (RFC 5508): translated through the session of the packet they carry.

    IN:   router X ──► E1        "your packet E1:40001 -> R:80 was too big"
          outer dst E1 -> I1;  embedded src E1:40001 -> I1:1111   (in-table session)
    OUT:  I1 ──► R               "port unreachable for R:53 -> I1:2222"
          outer src I1 -> E1;  embedded dst I1:2222 -> E1:40002   (out-table session)

The expected frame is built by scapy from the *translated* embedded packet (its own
checksums recomputed by scapy), cut to the same length as the input's, inside an
outer IPv4/ICMP whose checksums scapy computes.  A truncated embedded packet (the
classic IP header + 8 bytes) keeps whatever L4 checksum bytes are not there.
"""
import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPOption_Router_Alert, Raw, raw

from fixtures.fastpath_oracle import E1, I1, R, X, A, eth, icmp_error, key_tuple, standard_env
from hypernat import layout
from hypernat.verdicts import IN, OUT

TCP_OPTS = [("MSS", 1400), ("SAckOK", b""), ("WScale", 3)]


def inner(proto, src, dst, sport, dport, ipopts=False, udp_zero=False):
    """The embedded packet (raw IPv4), every field but the endpoints fixed."""
    ip = IP(src=src, dst=dst, ttl=17, id=4242, flags="DF", options=[IPOption_Router_Alert()] if ipopts else [])
    if proto == 6:
        l4 = TCP(sport=sport, dport=dport, seq=1000, ack=2000, flags="PA", options=TCP_OPTS) / (b"payload!" * 4)
    elif proto == 17:
        l4 = UDP(sport=sport, dport=dport, chksum=0 if udp_zero else None) / b"odd-length-payload"
    else:
        l4 = ICMP(type=8 if dport == 0 else 0, id=sport, seq=5) / (b"ping" * 5)
    return raw(ip / l4)


# Session endpoints of standard_env, per protocol: (inside port, remote port, ext port).
PORTS = {6: (1111, 80, 40001), 17: (2222, 53, 40002), 1: (7, 7, 40003)}

ERRORS = [
    dict(type_=3, code=4, nexthopmtu=1400),  # fragmentation needed (path-MTU discovery)
    dict(type_=3, code=1),  # host unreachable
    dict(type_=11, code=0),  # time exceeded in transit
    dict(type_=12, code=0, ptr=20),  # parameter problem
]


def _cut(emb: bytes, cut):
    """Embedded length for a cut name: full, 'l4+8' (RFC 792), or an exact L4 length."""
    ihl = (emb[0] & 0x0F) * 4
    if cut == "full":
        return len(emb)
    return ihl + cut


def _error_pair(proto, direction, err, cut, ipopts=False, udp_zero=False):
    """(input frame, expected frame) of one ICMP error case."""
    iport, rport, eport = PORTS[proto]
    if proto == 1:
        # ICMP echo embedded: IN errors carry our echo request E1:id=eport -> R;
        # OUT errors carry the echo reply R -> I1:id=iport after our translation.
        if direction == IN:
            emb_in = inner(1, E1, R, eport, 0, ipopts)
            emb_out = inner(1, I1, R, iport, 0, ipopts)
        else:
            emb_in = inner(1, R, I1, iport, 1, ipopts)
            emb_out = inner(1, R, E1, eport, 1, ipopts)
    elif direction == IN:
        emb_in = inner(proto, E1, R, eport, rport, ipopts, udp_zero)
        emb_out = inner(proto, I1, R, iport, rport, ipopts, udp_zero)
    else:
        emb_in = inner(proto, R, I1, rport, iport, ipopts, udp_zero)
        emb_out = inner(proto, R, E1, rport, eport, ipopts, udp_zero)
    n = _cut(emb_in, cut)
    emb_exp = bytearray(emb_out[:n])
    ihl = (emb_in[0] & 0x0F) * 4
    if proto == 6 and n < ihl + 18:
        # The TCP checksum is not (wholly) inside: its present bytes stay as they were.
        emb_exp[ihl + 16 : n] = emb_in[ihl + 16 : n]
    err = dict(err)
    type_, code = err.pop("type_"), err.pop("code")
    if direction == IN:
        frame = icmp_error(X, E1, emb_in, type_, code, ttl=50, cut=n, **err)
        exp = icmp_error(X, I1, bytes(emb_exp), type_, code, ttl=49, **err)
    else:
        frame = icmp_error(I1, R, emb_in, type_, code, ttl=64, cut=n, **err)
        exp = icmp_error(E1, R, bytes(emb_exp), type_, code, ttl=63, **err)
    return frame, exp


def _session_key(proto, direction):
    """The key the frame must report: the embedded flow reversed, oriented like the
    table of `direction`."""
    iport, rport, eport = PORTS[proto]
    if direction == IN:
        return (proto, A(R), eport if proto == 1 else rport, A(E1), eport)
    return (proto, A(I1), iport, A(R), iport if proto == 1 else rport)


@pytest.mark.parametrize("cut", ["full", 8, 17, 18], ids=lambda c: f"cut-{c}")
@pytest.mark.parametrize("err", ERRORS, ids=lambda e: f"type{e['type_']}-code{e['code']}")
@pytest.mark.parametrize("proto", [6, 17, 1], ids=["tcp", "udp", "echo"])
@pytest.mark.parametrize("direction", [IN, OUT], ids=["in", "out"])
def test_icmp_error_translated(fp, direction, proto, err, cut):
    frame, exp = _error_pair(proto, direction, err, cut)
    env = standard_env(fp)
    before = (env.out.slots.copy(), env.inn.slots.copy())
    out, v, k = env.one(frame, direction, now=999)
    assert v == "translated"
    assert out == exp
    assert key_tuple(k) == _session_key(proto, direction) + (layout.KIND_ICMP_ERROR, 0, err["type_"])
    # An error is no sign of life: no last_seen / flags / tcp_state change.
    assert np.array_equal(before[0], env.out.slots) and np.array_equal(before[1], env.inn.slots)


@pytest.mark.parametrize("direction", [IN, OUT], ids=["in", "out"])
@pytest.mark.parametrize("proto", [6, 17, 1], ids=["tcp", "udp", "echo"])
def test_icmp_error_with_ip_options_inside(fp, direction, proto):
    for cut in ("full", 8):
        frame, exp = _error_pair(proto, direction, ERRORS[0], cut, ipopts=True)
        out, v, _ = standard_env(fp).one(frame, direction)
        assert (v, out) == ("translated", exp)


@pytest.mark.parametrize("direction", [IN, OUT], ids=["in", "out"])
def test_icmp_error_embedded_udp_zero_checksum_stays_zero(fp, direction):
    frame, exp = _error_pair(17, direction, ERRORS[2], "full", udp_zero=True)
    out, v, _ = standard_env(fp).one(frame, direction)
    assert (v, out) == ("translated", exp)
    assert UDP(raw(IP(raw(Ether(out)[ICMP].payload)).payload)).chksum == 0


def test_icmp_error_checksums_valid_for_scapy(fp):
    """Independent of the expected-frame builder: the output's outer IP and ICMP
    checksums and the full embedded packet's checksums are what scapy computes."""
    frame, _ = _error_pair(6, IN, ERRORS[0], "full")
    out, v, _ = standard_env(fp).one(frame, IN)
    assert v == "translated"
    p = Ether(out)
    assert p[IP].dst == I1
    emb = IP(raw(p[ICMP].payload))
    assert (emb.src, emb[TCP].sport) == (I1, 1111)
    del emb.chksum
    del emb[TCP].chksum
    assert raw(emb) == raw(p[ICMP].payload)
    del p[IP].chksum
    del p[ICMP].chksum
    assert raw(p) == out


@pytest.mark.parametrize("direction", [IN, OUT], ids=["in", "out"])
@pytest.mark.parametrize("proto", [6, 17, 1], ids=["tcp", "udp", "echo"])
def test_icmp_error_miss(fp, direction, proto):
    """No session for the embedded flow: miss_icmp_error with the session key, frame
    unchanged (the slow path fetches the rule from its owner)."""
    env = standard_env(fp)
    if direction == IN:
        emb = inner(proto, E1, R, 40999, 0 if proto == 1 else 81)
        frame = icmp_error(X, E1, emb, 3, 4, cut=28, nexthopmtu=1280)
        key = (proto, A(R), 40999 if proto == 1 else 81, A(E1), 40999)
    else:
        emb = inner(proto, R, I1, 81 if proto != 1 else 1234, 1 if proto == 1 else 1234)
        frame = icmp_error(I1, R, emb, 3, 3)
        key = (proto, A(I1), 1234, A(R), 1234 if proto == 1 else 81)
    out, v, k = env.one(frame, direction)
    assert (v, out) == ("miss_icmp_error", frame)
    assert key_tuple(k) == key + (layout.KIND_ICMP_ERROR, 0, 3)


@pytest.mark.parametrize("direction", [IN, OUT], ids=["in", "out"])
def test_icmp_error_bad_checksum_dropped(fp, direction):
    """RFC 5508 REQ-3: verified before anything else, dropped, frame unchanged."""
    frame, _ = _error_pair(17, direction, ERRORS[0], "full")
    icmp = 14 + 20
    for corrupt in (icmp + 2, icmp + 3, icmp + 8 + 12, len(frame) - 1):
        bad = bytearray(frame)
        bad[corrupt] ^= 0x01
        out, v, k = standard_env(fp).one(bytes(bad), direction)
        assert (v, out) == ("drop_bad_icmp_checksum", bytes(bad))
        assert key_tuple(k) == (0,) * 8


def _rechecksum(frame: bytes) -> bytes:
    """Recompute the outer ICMP checksum (scapy) of a hand-corrupted error frame."""
    p = Ether(frame)
    del p[ICMP].chksum
    return raw(p)


MALFORMED_EMBEDDED = [
    ("embedded shorter than an IPv4 header", lambda e: e[:19]),
    ("embedded version 6", lambda e: bytes([0x65]) + e[1:]),
    ("embedded IHL 4", lambda e: bytes([0x44]) + e[1:]),
    ("embedded IHL beyond the payload", lambda e: bytes([0x4F]) + e[1:40]),
    ("embedded L4 shorter than 8 bytes", lambda e: e[:27]),
    ("embedded protocol GRE", lambda e: e[:9] + bytes([47]) + e[10:]),
    ("embedded ICMP error (not echo)", lambda e: e[:20] + bytes([3]) + e[21:]),
    ("embedded ICMP timestamp", lambda e: e[:20] + bytes([13]) + e[21:]),
]


@pytest.mark.parametrize("desc, mangle", MALFORMED_EMBEDDED, ids=[m[0] for m in MALFORMED_EMBEDDED])
def test_icmp_error_malformed_embedded(fp, desc, mangle):
    proto = 1 if "ICMP" in desc else 17
    emb = inner(proto, E1, R, 40003 if proto == 1 else 40002, 0 if proto == 1 else 53)
    frame = icmp_error(X, E1, mangle(emb), 3, 4, nexthopmtu=1400)
    out, v, k = standard_env(fp).one(frame, IN)
    # an error about an ICMP message other than echo has a reason of its own (RFC 1122)
    want = "drop_icmp_error_about_error" if desc.startswith("embedded ICMP") else "drop_icmp_error_malformed"
    assert (v, out) == (want, frame)
    assert key_tuple(k) == (0,) * 8


def test_icmp_error_exactly_eight_l4_bytes_is_enough(fp):
    emb = inner(17, E1, R, 40002, 53)
    frame = icmp_error(X, E1, emb, 3, 4, cut=28, nexthopmtu=1400)
    _, v, _ = standard_env(fp).one(frame, IN)
    assert v == "translated"


@pytest.mark.parametrize("type_", [5, 4, 9, 10, 13, 14, 17, 18, 30, 255])
def test_other_icmp_types_unsupported(fp, type_):
    frame = raw(eth() / IP(src=R, dst=E1) / ICMP(type=type_, code=0, ts_ori=1, ts_rx=2, ts_tx=3) / Raw(inner(17, E1, R, 40002, 53)))
    out, v, k = standard_env(fp).one(frame, IN)
    assert (v, out) == ("drop_icmp_unsupported", frame)
    assert key_tuple(k) == (0,) * 8


def test_icmp_error_ttl_one_not_forwarded(fp):
    emb = inner(17, E1, R, 40002, 53)
    frame = icmp_error(X, E1, emb, 11, 0, ttl=1)
    out, v, _ = standard_env(fp).one(frame, IN)
    assert (v, out) == ("ttl_exceeded", frame)


def test_icmp_error_set_l2(fp):
    env = standard_env(fp)
    env.tr.set_l2(OUT, b"\x02" * 6, b"\x04" * 6)
    env.tr.set_l2(IN, b"\x06" * 6, b"\x08" * 6)
    frame, exp = _error_pair(6, IN, ERRORS[0], 8)
    out, v, _ = env.one(frame, IN)
    assert v == "translated" and out == b"\x08" * 6 + b"\x06" * 6 + exp[12:]
    frame, exp = _error_pair(6, OUT, ERRORS[0], 8)
    out, v, _ = env.one(frame, OUT)
    assert v == "translated" and out == b"\x04" * 6 + b"\x02" * 6 + exp[12:]


def test_embedded_udp_checksum_landing_on_zero_is_sent_as_ffff(fp):
    """RFC 768 inside the error too: the translated embedded UDP checksum computes to
    0x0000 and is written 0xFFFF, as scapy builds the embedded packet."""
    def emb(src, sport, w):
        return raw(IP(src=src, dst=R, ttl=17, id=4242) / UDP(sport=sport, dport=53) / (w.to_bytes(2, "big") + b"xy"))

    w = UDP(raw(IP(emb(I1, 2222, 0)).payload)).chksum  # checksum with w = 0 ...
    emb_out = emb(I1, 2222, w)  # ... so that with w it sums to -0: computed 0, sent 0xFFFF
    assert IP(emb_out)[UDP].chksum == 0xFFFF
    frame = icmp_error(X, E1, emb(E1, 40002, w), 3, 4, nexthopmtu=1400)
    exp = icmp_error(X, I1, emb_out, 3, 4, ttl=63, nexthopmtu=1400)
    out, v, _ = standard_env(fp).one(frame, IN)
    assert (v, out) == ("translated", exp)


def test_icmp_error_checksum_ffff_for_zero_is_accepted(fp):
    """RFC 1071 verification sums the whole message, checksum included, to -0; a stored
    0xFFFF where 0x0000 was computed is the same number in one's complement and passes."""
    emb = inner(17, E1, R, 40002, 53)
    frame = bytearray(icmp_error(X, E1, emb, 11, 0))
    icmp = 14 + 20
    # Choose the 'unused' word so that the computed checksum is 0x0000.
    frame[icmp + 6 : icmp + 8] = Ether(bytes(frame))[ICMP].chksum.to_bytes(2, "big")
    p = Ether(bytes(frame))
    del p[ICMP].chksum
    good = raw(p)
    assert Ether(good)[ICMP].chksum == 0
    alt = bytearray(good)
    alt[icmp + 2 : icmp + 4] = b"\xff\xff"
    for f in (good, bytes(alt)):
        out, v, _ = standard_env(fp).one(f, IN)
        assert v == "translated"
        o = Ether(out)
        assert o[IP].dst == I1
        del o[ICMP].chksum
        assert raw(o) == out  # the outer checksum is recomputed from scratch: canonical


# ---------------------------------------------------------------------------------------
# Random ICMP errors against scapy
# ---------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fixtures.fastpath_oracle import S, Env  # noqa: E402

_addr = st.integers(0x01000000, 0xDFFFFFFF).map(S)
_port = st.integers(0, 65535)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(proto=st.sampled_from([6, 17, 1]), direction=st.sampled_from([IN, OUT]), inside=_addr, ext=_addr,
       remote=_addr, router=_addr, iport=_port, eport=_port, rport=_port,
       err=st.sampled_from(ERRORS), ipopts=st.booleans(), udp_zero=st.booleans(),
       payload=st.binary(max_size=40), cut=st.one_of(st.none(), st.integers(8, 60)), ttl=st.integers(2, 255))
def test_random_icmp_errors_match_scapy(fp, proto, direction, inside, ext, remote, router, iport, eport, rport,
                                        err, ipopts, udp_zero, payload, cut, ttl):
    """Random endpoints, embedded protocol, IP options, payload and cut: the translated
    error equals the error scapy builds around the translated embedded packet."""
    opts = [IPOption_Router_Alert()] if ipopts else []

    def emb(src, dst, sport, dport):
        ip = IP(src=src, dst=dst, ttl=9, id=77, options=opts)
        if proto == 6:
            l4 = TCP(sport=sport, dport=dport, flags="S", seq=5) / payload
        elif proto == 17:
            l4 = UDP(sport=sport, dport=dport, chksum=0 if udp_zero else None) / payload
        else:  # echo: the identifier is the "port" (IN carries our request, OUT the reply)
            l4 = ICMP(type=8 if direction == IN else 0, id=sport if direction == IN else dport, seq=3) / payload
        return raw(ip / l4)

    env = Env(fp, 8, pool=())
    if proto == 1:
        rport = iport if direction == OUT else eport
    env.session(proto, inside, iport, remote, rport, ext, eport)
    if direction == IN:  # our packet E:e -> R:r went out; the router reports on it
        e_in, e_out = emb(ext, remote, eport, rport), emb(inside, remote, iport, rport)
        outer_in, outer_out = (router, ext), (router, inside)
    else:  # R:r -> I:i came in (translated); I reports on it
        e_in, e_out = emb(remote, inside, rport, iport), emb(remote, ext, rport, eport)
        outer_in, outer_out = (inside, remote), (ext, remote)
    ihl = (e_in[0] & 0x0F) * 4
    n = len(e_in) if cut is None else min(len(e_in), ihl + cut)
    exp_emb = bytearray(e_out[:n])
    if proto == 6 and n < ihl + 18:
        exp_emb[ihl + 16 : n] = e_in[ihl + 16 : n]  # checksum (partly) absent: unchanged
    e = dict(err)
    t, c = e.pop("type_"), e.pop("code")
    frame = icmp_error(*outer_in, e_in, t, c, ttl=ttl, cut=n, **e)
    exp = icmp_error(*outer_out, bytes(exp_emb), t, c, ttl=ttl - 1, **e)
    out, v, _ = env.one(frame, direction)
    assert (v, out) == ("translated", exp)

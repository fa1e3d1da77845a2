"""Checksum edge cases of the incremental update (RFC 1624, RFC 768), against scapy.

One's-complement arithmetic has two zeros, +0 (0x0000) and -0 (0xFFFF).  A checksum
computed over data is 0x0000 when the data sum to -0, and 0xFFFF only for all-zero
data; UDP transmits a computed 0x0000 as 0xFFFF because 0 means "no checksum".  Each
test *constructs* a packet whose checksum after translation lands on such an edge
(by choosing two payload bytes or the IP id), checks with scapy that it does, then
compares the translated frame with the packet scapy builds.

    want checksum(expected) == 0:  put w = checksum(expected with w = 0) into the
    packet: fold(S + w) = fold(S) + ~fold(S) = 0xFFFF, so ~0xFFFF = 0.
"""
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, raw

from fixtures.fastpath_oracle import E1, I1, R, eth, expected, standard_env
from hypernat.verdicts import IN, OUT


def _chk(pkt, layer):
    return Ether(raw(pkt))[layer].chksum


def _zeroing_word(build, layer):
    """The 16-bit word w for which build(w)'s `layer` checksum is 0x0000 (scapy's
    computation; UDP shows it as 0xFFFF)."""
    w = _chk(build(0), layer)
    got = _chk(build(w), layer)
    assert got == (0xFFFF if layer is UDP else 0), "construction failed"
    return w


def _translated(fp, frame, direction):
    env = standard_env(fp)
    out, v, _ = env.one(frame, direction)
    assert v == "translated"
    return out


# The translated form and the original form of the same flow (addresses per direction).
FORMS = {
    (TCP, OUT): (dict(src=E1, dst=R, sport=40001, dport=80), dict(src=I1, dst=R, sport=1111, dport=80),
                 dict(src=E1, sport=40001)),
    (TCP, IN): (dict(src=R, dst=I1, sport=80, dport=1111), dict(src=R, dst=E1, sport=80, dport=40001),
                dict(dst=I1, dport=1111)),
    (UDP, OUT): (dict(src=E1, dst=R, sport=40002, dport=53), dict(src=I1, dst=R, sport=2222, dport=53),
                 dict(src=E1, sport=40002)),
    (UDP, IN): (dict(src=R, dst=I1, sport=53, dport=2222), dict(src=R, dst=E1, sport=53, dport=40002),
                dict(dst=I1, dport=2222)),
}


def _pkt(layer, form, ttl, payload, ipid=1):
    ip = IP(src=form["src"], dst=form["dst"], ttl=ttl, id=ipid)
    return eth() / ip / layer(sport=form["sport"], dport=form["dport"]) / payload


@pytest.mark.parametrize("layer", [TCP, UDP], ids=["tcp", "udp"])
@pytest.mark.parametrize("direction", [OUT, IN], ids=["out", "in"])
def test_l4_checksum_lands_on_zero(fp, layer, direction):
    """After translation the L4 data sum to -0: TCP sends 0x0000, UDP 0xFFFF."""
    after, before, rewrite = FORMS[layer, direction]
    w = _zeroing_word(lambda w: _pkt(layer, after, 63, w.to_bytes(2, "big") + b"tail"), layer)
    frame = raw(_pkt(layer, before, 64, w.to_bytes(2, "big") + b"tail"))
    out = _translated(fp, frame, direction)
    assert out == expected(frame, **rewrite)
    assert Ether(out)[layer].chksum == (0xFFFF if layer is UDP else 0)


@pytest.mark.parametrize("layer", [TCP, UDP], ids=["tcp", "udp"])
@pytest.mark.parametrize("direction", [OUT, IN], ids=["out", "in"])
def test_l4_checksum_leaves_zero(fp, layer, direction):
    """The reverse edge: the *input* checksum is the edge value (TCP 0x0000, UDP 0xFFFF)."""
    after, before, rewrite = FORMS[layer, direction]
    w = _zeroing_word(lambda w: _pkt(layer, before, 64, w.to_bytes(2, "big") + b"x"), layer)
    frame = raw(_pkt(layer, before, 64, w.to_bytes(2, "big") + b"x"))
    assert Ether(frame)[layer].chksum == (0xFFFF if layer is UDP else 0)
    assert _translated(fp, frame, direction) == expected(frame, **rewrite)


@pytest.mark.parametrize("direction", [OUT, IN], ids=["out", "in"])
def test_udp_zero_checksum_stays_zero_even_on_edge_data(fp, direction):
    """RFC 768: checksum 0 = none; the update must not invent one, whatever the data."""
    after, before, rewrite = FORMS[UDP, direction]
    w = _zeroing_word(lambda w: _pkt(UDP, after, 63, w.to_bytes(2, "big")), UDP)
    p = _pkt(UDP, before, 64, w.to_bytes(2, "big"))
    p[UDP].chksum = 0
    frame = raw(p)
    out = _translated(fp, frame, direction)
    assert Ether(out)[UDP].chksum == 0
    assert out == expected(frame, udp_zero=True, **rewrite)


@pytest.mark.parametrize("direction", [OUT, IN], ids=["out", "in"])
def test_ip_header_checksum_lands_on_zero(fp, direction):
    """TTL and address change together (one RFC 1624 update) and land on 0x0000."""
    after, before, rewrite = FORMS[TCP, direction]
    ipid = _zeroing_word(lambda w: _pkt(TCP, after, 63, b"", ipid=w), IP)
    frame = raw(_pkt(TCP, before, 64, b"", ipid=ipid))
    out = _translated(fp, frame, direction)
    assert Ether(out)[IP].chksum == 0
    assert out == expected(frame, **rewrite)


@pytest.mark.parametrize("direction", [OUT, IN], ids=["out", "in"])
def test_ip_header_checksum_leaves_zero(fp, direction):
    after, before, rewrite = FORMS[TCP, direction]
    ipid = _zeroing_word(lambda w: _pkt(TCP, before, 64, b"", ipid=w), IP)
    frame = raw(_pkt(TCP, before, 64, b"", ipid=ipid))
    assert Ether(frame)[IP].chksum == 0
    assert _translated(fp, frame, direction) == expected(frame, **rewrite)


@pytest.mark.parametrize("direction", [OUT, IN], ids=["out", "in"])
def test_icmp_echo_checksum_lands_on_zero(fp, direction):
    if direction == OUT:
        build = lambda w, ident: eth() / IP(src=I1 if ident == 7 else E1, dst=R) / ICMP(type=8, id=ident) / w.to_bytes(2, "big")  # noqa: E731
        old, new, rewrite = 7, 40003, dict(src=E1, icmp_id=40003)
    else:
        build = lambda w, ident: eth() / IP(src=R, dst=E1 if ident == 40003 else I1) / ICMP(type=0, id=ident) / w.to_bytes(2, "big")  # noqa: E731
        old, new, rewrite = 40003, 7, dict(dst=I1, icmp_id=7)
    w = _zeroing_word(lambda w: build(w, new), ICMP)
    frame = raw(build(w, old))
    out = _translated(fp, frame, direction)
    assert Ether(out)[ICMP].chksum == 0
    assert out == expected(frame, **rewrite)


def test_icmp_echo_all_zero_message_gets_ffff(fp):
    """An echo reply that is all zeros after translation (id 0, seq 0, no payload)
    sums to +0: its checksum is 0xFFFF (what scapy and any full recomputation give),
    not the 0x0000 a bare RFC 1624 eqn. 3 yields.  A receiver verifying a 0x0000
    here sums to +0 and drops the packet (Linux's csum_fold gives 0xFFFF != 0)."""
    from fixtures.fastpath_oracle import A, Env

    env = Env(fp, 8, pool=())
    env.session(1, I1, 0, R, 0, E1, 9)
    frame = raw(eth() / IP(src=R, dst=E1) / ICMP(type=0, id=9, seq=0))
    out, v, _ = env.one(frame, IN)
    assert v == "translated"
    assert Ether(out)[ICMP].chksum == 0xFFFF
    assert out == expected(frame, dst=I1, icmp_id=0)
    assert A(Ether(out)[IP].dst) == A(I1)

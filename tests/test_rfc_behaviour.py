"""RFC requirements that docs/rfc.md lists and no other test pinned.

Each test names its requirement; docs/rfc.md names the test.  Where HyperNAT does not
do what an RFC recommends, the test pins what it does instead, so the table's answer
cannot drift from the code without a test failing.  Frames are built by scapy and go
through a real Translator (both twins where the fast path alone decides); the slow path
is a real RuleBuilder over real flow tables (test_rules' helpers).
"""
import ipaddress

import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP as sTCP, UDP as sUDP, Ether, Raw, raw

from fixtures.fastpath_oracle import E1, I1, R, X, eth, icmp_error, run_frames, standard_env
from hypernat import config
from hypernat.fastpath import Translator
from hypernat.rules import ACT_DROP, ACT_REPLAY, REASON
from hypernat.verdicts import IN, OUT, VERDICT
from test_rules import ICMP as P_ICMP, TCP, UDP, hosts_of, ip, make_cfg, make_rb, mapping_of, miss

R1, R2 = ip("198.51.100.1"), ip("198.51.100.2")


def S(a: int) -> str:
    return str(ipaddress.IPv4Address(a))


def test_default_timeouts_meet_the_recommendations():
    """RFC 4787 REQ-5c (UDP default >= 5 min), RFC 5382 REQ-5 (established >= 2 h 4 min),
    RFC 7857 §2.1 (transitory default 4 min), RFC 5508 REQ-2 (ICMP >= 60 s), RFC 6888
    REQ-8 (a freed port waits 120 s): the defaults, with no timeouts key at all."""
    cfg = config.from_dict({"internal": {"prefixes": ["10.0.0.0/8"]},
                            "external": {"pool": ["198.18.0.0/30"]},
                            "nics": [{"id": 0, "inside": "a", "outside": "b"}]}, "t.yaml")  # fmt: skip
    t = cfg.timeouts
    assert (t.udp, t.tcp_established, t.tcp_transitory, t.icmp, t.reuse_delay) == (300, 7440, 240, 60, 120)
    assert not t.force


@pytest.mark.parametrize("mapping", ["endpoint-independent", "address-and-port-dependent"])
def test_mappings_and_filters_are_per_protocol(mapping):
    """RFC 7857 §5 and §6: mappings and filters are protocol-dependent.  A host's TCP and
    UDP flows from the same port get separate mappings (on the host's one address: RFC 7857
    §4, paired pooling across protocols), and with endpoint-independent filtering a UDP
    packet to the external endpoint of a TCP mapping is not let in."""
    rb = make_rb(make_cfg(1, mapping=mapping, filtering="endpoint-independent"))
    (h,) = hosts_of(rb, 1)
    rows = [(p, h, sp, R1, 80) for p in (TCP, UDP) for sp in (5000, 5001, 5002)]
    assert (miss(rb, OUT, rows, 10).action == ACT_REPLAY).all()
    tcp = {mapping_of(rb, TCP, h, sp, R1, 80) for sp in (5000, 5001, 5002)}
    udp = {mapping_of(rb, UDP, h, sp, R1, 80) for sp in (5000, 5001, 5002)}
    assert len({e[0] for e in tcp | udp}) == 1  # one external address for the host, whatever the protocol
    assert rb.stats()["mappings"] == 6
    only_tcp, only_udp = sorted(tcp - udp), sorted(udp - tcp)
    assert only_tcp and only_udp
    # UDP from anywhere to a UDP mapping: admitted (EIF); to a TCP mapping's endpoint: no mapping
    assert miss(rb, IN, [(UDP, R2, 9999, *only_udp[0])], 11).action[0] == ACT_REPLAY
    d = miss(rb, IN, [(UDP, R2, 9999, *only_tcp[0])], 11)
    assert d.action[0] == ACT_DROP and d.reason[0] == REASON["no_mapping"]
    # and TCP (not a SYN) to a UDP mapping's endpoint finds no TCP mapping either
    assert miss(rb, IN, [(TCP, R2, 9999, *only_tcp[0], 0x10)], 11).action[0] == ACT_REPLAY
    d = miss(rb, IN, [(TCP, R2, 9999, *only_udp[0], 0x10)], 11)
    assert d.action[0] == ACT_DROP and d.reason[0] == REASON["no_mapping"]


def _tcp(src, sport, dst, dport, flags):
    return raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst, ttl=64)
               / sTCP(sport=sport, dport=dport, flags=flags, seq=1000))


def test_tcp_simultaneous_open():
    """RFC 5382 REQ-2a: the remote's SYN (not a SYN-ACK) that crosses ours is translated
    once our SYN has created the session; before it, an unsolicited SYN is dropped
    silently (REQ-4a), and the remote's retransmitted SYN then meets the session."""
    cfg = make_cfg(1)
    rb = make_rb(cfg)
    tr = Translator(rb.out, rb.inn, pool=cfg.pool_ranges)
    (h,) = hosts_of(rb, 1)
    syn_out = _tcp(S(h), 5000, S(R1), 80, "S")
    _, v, k = run_frames(tr, [syn_out], OUT, now=10)
    assert v[0] == VERDICT["miss_out"] and rb.handle_misses(OUT, v, k, 10).action[0] == ACT_REPLAY
    out, v, _ = run_frames(tr, [syn_out], OUT, now=10)
    assert v[0] == VERDICT["translated"]
    e, ep = Ether(out[0])[IP].src, Ether(out[0])[sTCP].sport
    # the remote's own SYN toward our external endpoint: a session hit, a plain SYN inside
    out, v, _ = run_frames(tr, [_tcp(S(R1), 80, e, ep, "S")], IN, now=11)
    assert v[0] == VERDICT["translated"]
    p = Ether(out[0])
    assert (p[IP].dst, p[sTCP].dport, str(p[sTCP].flags)) == (S(h), 5000, "S")
    # our SYN-ACK to it leaves through the same mapping
    out, v, _ = run_frames(tr, [_tcp(S(h), 5000, S(R1), 80, "SA")], OUT, now=11)
    assert v[0] == VERDICT["translated"] and (Ether(out[0])[IP].src, Ether(out[0])[sTCP].sport) == (e, ep)
    # a SYN from a remote we never sent to: silently dropped, counted under its reason
    _, v, k = run_frames(tr, [_tcp(S(R2), 80, e, ep, "S")], IN, now=12)
    assert v[0] == VERDICT["miss_in"]
    d = rb.handle_misses(IN, v, k, 12)
    assert d.action[0] == ACT_DROP and d.reason[0] == REASON["unsolicited_syn"]


ALG_BAIT = b"INVITE sip:bob@" + I1.encode() + b" c=IN IP4 " + I1.encode() + b" raw:" + ipaddress.IPv4Address(I1).packed


@pytest.mark.parametrize("l4", ["udp", "tcp"])
def test_payload_is_never_rewritten(fp, l4):
    """RFC 4787 REQ-10 / RFC 5382 REQ-6: no ALG.  A payload that quotes the internal
    address (as text and as 4 bytes, the way SIP and FTP do) leaves as it came; only the
    headers are translated."""
    env = standard_env(fp)
    sport, dport = (2222, 53) if l4 == "udp" else (1111, 80)
    L4 = sUDP(sport=sport, dport=dport) if l4 == "udp" else sTCP(sport=sport, dport=dport, flags="PA")
    frame = raw(eth() / IP(src=I1, dst=R, ttl=64) / L4 / Raw(ALG_BAIT))
    out, v, _ = env.one(frame, OUT)
    assert v == "translated"
    p = Ether(out)
    assert p[IP].src == E1 and bytes(p[IP].payload.payload) == ALG_BAIT


def test_icmp_identifier_mapping_is_remote_independent():
    """RFC 5508 REQ-1 and REQ-1a: echo requests from inside are let through, and one
    identifier keeps one external identifier whatever host it pings (EIM)."""
    rb = make_rb(make_cfg(1))
    (h,) = hosts_of(rb, 1)
    d = miss(rb, OUT, [(P_ICMP, h, 77, R1, 77), (P_ICMP, h, 77, R2, 77)], 10)
    assert (d.action == ACT_REPLAY).all()
    assert mapping_of(rb, P_ICMP, h, 77, R1, 77) == mapping_of(rb, P_ICMP, h, 77, R2, 77) is not None


def test_external_port_comes_from_the_configured_range():
    """RFC 4787 REQ-3a (RECOMMENDED, not followed): a privileged source port gets an
    external port from ``external.ports`` like any other, not one below 1024."""
    rb = make_rb(make_cfg(1, ports=(1024, 2047)))
    (h,) = hosts_of(rb, 1)
    d = miss(rb, OUT, [(UDP, h, sp, R1, 53) for sp in (123, 500, 1023)], 10)
    assert (d.action == ACT_REPLAY).all()
    assert all(1024 <= mapping_of(rb, UDP, h, sp, R1, 53)[1] <= 2047 for sp in (123, 500, 1023))


def _ip_checksum_ok(hdr: bytes) -> bool:
    s = sum(int.from_bytes(hdr[i:i + 2], "big") for i in range(0, len(hdr), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def test_icmp_error_with_a_bad_embedded_ip_checksum_is_translated(fp):
    """RFC 5508 REQ-3a (SHOULD drop, not followed): the embedded IP header's checksum is
    not verified.  The error is translated, and the incremental update keeps the embedded
    checksum exactly as wrong as it came, so the host that reads it can still tell."""
    emb = bytearray(raw(IP(src=E1, dst=R, ttl=17, id=4242) / sUDP(sport=40002, dport=53) / b"query"))
    emb[10] ^= 0x5A  # corrupt the embedded header checksum
    assert not _ip_checksum_ok(bytes(emb[:20]))
    frame = icmp_error(X, E1, bytes(emb), 3, 3)
    out, v, _ = standard_env(fp).one(frame, IN)
    assert v == "translated"
    p = Ether(out)
    assert p[IP].dst == I1
    inner = bytes(p[ICMP].payload)
    assert IP(inner).src == I1 and not _ip_checksum_ok(inner[:20])
    # against the same error with a correct checksum: the outputs differ only there
    emb[10] ^= 0x5A
    good, v2, _ = standard_env(fp).one(icmp_error(X, E1, bytes(emb), 3, 3), IN)
    assert v2 == "translated"
    a, b = np.frombuffer(out, np.uint8), np.frombuffer(good, np.uint8)
    assert set(np.nonzero(a != b)[0].tolist()) <= {14 + 20 + 2, 14 + 20 + 3, 14 + 20 + 8 + 10, 14 + 20 + 8 + 11}

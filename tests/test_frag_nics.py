"""Fragments across NICs, in process: two NIC workers and a coordinator over memory
ports.  The switch hashes fragments on addresses and protocol (docs/fastpath.md
"Fragments"), so all fragments of a datagram reach one NIC -- not the one that holds
the rule.  That NIC fetches the rule by the first fragment's ports (the normal miss
path), holds the fragments that came before it, and sends them all."""
import ipaddress

import pytest
from scapy.all import IP, UDP as SUDP, Ether, Raw, fragment

from hypernat.lab.emulated import UDP, build_frame, emulated_config, parse_frame
from hypernat.nic.worker import spin
from nickit import nics

pytestmark = pytest.mark.timeout(60)
R1 = "192.0.2.5"


def s(a):
    return str(ipaddress.IPv4Address(a))


@pytest.fixture
def two(tmp_path):
    cfg = emulated_config(2, mapping="endpoint-independent")
    with nics(cfg, 2, tmp_path) as (_, ws):
        yield ws


def frames_of(pkt, order):
    fr = [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / f) for f in fragment(pkt, fragsize=1000)]
    return [fr[k] for k in order(len(fr))]


def whole(frames):
    """Reassembled payload after the UDP header, and the UDP header fields, checked by scapy."""
    ips = sorted((Ether(f)[IP] for f in frames), key=lambda x: x.frag)
    data = b"".join(bytes(x.payload)[: x.len - x.ihl * 4] for x in ips)
    h = ips[0]
    full = IP(src=h.src, dst=h.dst, id=h.id, proto=17) / Raw(data)
    u = IP(bytes(full))[SUDP]
    ok = IP(bytes(IP(src=h.src, dst=h.dst) / SUDP(sport=u.sport, dport=u.dport) / Raw(u.load)))[SUDP].chksum == u.chksum
    return h.src, h.dst, u.sport, u.dport, bytes(u.load), ok


@pytest.mark.parametrize("order", ["later ones first", "in order"])
def test_fragments_on_the_nic_without_the_rule_both_directions(two, order):
    ws = two
    workers = [w for w, _, _ in ws]
    w0 = workers[0]
    host = next(h for h in range(0x0A000001, 0x0A000200) if w0.partition.eim_owner(h) == 0)
    seq = (lambda n: list(range(1, n)) + [0]) if order == "later ones first" else (lambda n: list(range(n)))
    (_, in0, out0), (w1, in1, out1) = ws
    # the mapping is made on NIC 0 (the host's owner) by an ordinary packet
    in0.inject([build_frame(UDP, host, 5353, int(ipaddress.IPv4Address(R1)), 53, payload=b"q")])
    assert spin(workers, lambda: len(out0._tx) == 1)
    e = parse_frame(out0.take_tx()[0])
    # a big answer's fragments all land on NIC 1: fetched (IN) by the first fragment's ports
    body = bytes(range(256)) * 14
    ans = IP(src=R1, dst=s(e.src), id=77, ttl=60) / SUDP(sport=53, dport=e.sport) / Raw(body)
    fr = frames_of(ans, seq)
    out1.inject(fr)
    assert spin(workers, lambda: len(in1._tx) == len(fr), 3), (w1.counters, w1.frag.counters_dict())
    assert whole(in1.take_tx()) == (R1, s(host), 53, 5353, body, True)
    # and the host's big datagram out through NIC 1, which must fetch the mapping (OUT)
    q = IP(src=s(host), dst=R1, id=78, ttl=60) / SUDP(sport=5353, dport=53) / Raw(body)
    fr = frames_of(q, seq)
    in1.inject(fr)
    assert spin(workers, lambda: len(out1._tx) == len(fr), 3), (w1.counters, w1.frag.counters_dict())
    assert whole(out1.take_tx()) == (s(e.src), R1, e.sport, 53, body, True)
    c = w1.frag.counters_dict()
    assert c["frag_completed"] == 2 and c["frag_expired_dropped"] == 0
    assert w1.agent.counters["fetches"] >= 1
    # ... and the metrics endpoint shows them
    from prometheus_client import generate_latest

    from hypernat.nic.metrics import registry_for

    text = generate_latest(registry_for(w1)).decode()
    assert 'hypernat_nic_fragments_total{event="frag_completed",nic="1"} 2.0' in text
    assert w1.gauges()["frag_datagrams"] == 0

"""Hole punching across NICs, in process: two NIC workers and a coordinator over memory
ports, endpoint-independent mapping and address-and-port-dependent filtering.

Inside host A's mappings are owned by NIC 0.  Remote B probes A's external endpoint
first (the packet lands on NIC 1, which fetches from NIC 0: filtered, NACK), then A
sends to B (through NIC 0: the session opens), then B's reply lands on NIC 1 again.
That reply must reach A: the NACK NIC 1 got a moment earlier said nothing lasting.
"""
import pytest

from hypernat.lab.emulated import UDP, build_frame, emulated_config, parse_frame
from hypernat.nic.worker import spin
from nickit import nics

pytestmark = pytest.mark.timeout(60)
R1 = 0xC0000205  # 192.0.2.5: the rendezvous server
B = 0xCB007107  # 203.0.113.7: the peer


@pytest.fixture
def two(tmp_path):
    cfg = emulated_config(2, mapping="endpoint-independent", filtering="address-and-port-dependent")
    with nics(cfg, 2, tmp_path) as (_, ws):
        yield ws


def test_reply_after_hole_punch_reaches_host_on_a_nic_that_was_refused_before(two):
    ws = two
    workers = [w for w, _, _ in ws]
    (w0, in0, out0), (w1, in1, out1) = ws
    a = next(h for h in range(0x0A000001, 0x0A000200) if w0.partition.eim_owner(h) == 0)
    pa, pb = 6000, 7000
    # A learns its external endpoint from the rendezvous server, through NIC 0
    in0.inject([build_frame(UDP, a, pa, R1, 3478, payload=b"stun")])
    assert spin(workers, lambda: len(out0._tx) == 1, 3)
    p = parse_frame(out0.take_tx()[0])
    ea, eap = p.src, p.sport
    # B punches first: its probe lands on NIC 1 and is filtered at the owner (NACK)
    out1.inject([build_frame(UDP, B, pb, ea, eap, payload=b"probe")])
    assert spin(workers, lambda: w1.agent.counters["fetch_nack"] >= 1, 3), w1.agent.counters
    assert not in1._tx
    # A punches: through NIC 0, to B, delivered
    in0.inject([build_frame(UDP, a, pa, B, pb, payload=b"punch")])
    assert spin(workers, lambda: len(out0._tx) == 1, 3)
    p = parse_frame(out0.take_tx()[0])
    assert (p.src, p.sport, p.dst, p.dport) == (ea, eap, B, pb)
    # B's next packet lands on NIC 1 again, well within the negative cache's 2 s: delivered
    out1.inject([build_frame(UDP, B, pb, ea, eap, payload=b"reply")])
    ok = spin(workers, lambda: len(in1._tx) == 1, 3)
    assert ok, (w1.agent.counters["fetch_negative_cached"], w1.counters)
    f = in1.take_tx()[0]
    p = parse_frame(f)
    assert f.endswith(b"reply") and (p.src, p.sport, p.dst, p.dport) == (B, pb, a, pa) and p.checksum_ok
    assert w1.agent.counters["fetch_negative_cached"] == 0

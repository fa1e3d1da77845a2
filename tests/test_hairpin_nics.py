"""Hairpinning on any NIC, in process: three NIC workers and a coordinator over memory
ports.  Host A's mappings are owned by NIC 0, host B's by NIC 1, and the hairpinned
packet (A -> B's external endpoint, and B's answer) lands on NIC 2, which holds neither
half: it fetches both, and the *first* packet is delivered, every time."""
import pytest

from hypernat.lab.emulated import UDP, build_frame, emulated_config, parse_frame
from hypernat.nic.worker import spin
from nickit import nics

pytestmark = pytest.mark.timeout(60)
R1 = 0xC0000205  # 192.0.2.5


@pytest.fixture
def three(tmp_path):
    cfg = emulated_config(3, mapping="endpoint-independent", filtering="endpoint-independent")
    with nics(cfg, 3, tmp_path) as (_, ws):
        yield ws


def _external(ws, k, host, port):
    """host:port's external endpoint, learnt by sending to R1 through NIC k."""
    workers = [w for w, _, _ in ws]
    ws[k][1].inject([build_frame(UDP, host, port, R1, 53, payload=b"stun")])
    assert spin(workers, lambda: len(ws[k][2]._tx) == 1)
    p = parse_frame(ws[k][2].take_tx()[0])
    return p.src, p.sport


def test_first_hairpinned_packet_delivered_when_both_halves_live_on_other_nics(three):
    ws = three
    workers = [w for w, _, _ in ws]
    w0 = workers[0]
    hosts = range(0x0A000001, 0x0A000200)
    a = next(h for h in hosts if w0.partition.eim_owner(h) == 0)
    b = next(h for h in hosts if w0.partition.eim_owner(h) == 1)
    in2 = ws[2][1]
    for rnd in range(5):  # fresh mappings each round
        pa, pb = 6000 + rnd, 7000 + rnd
        ea = _external(ws, 0, a, pa)
        eb = _external(ws, 1, b, pb)
        # A -> E_B, once, on NIC 2: delivered to B from A's external endpoint
        in2.inject([build_frame(UDP, a, pa, eb[0], eb[1], payload=b"a-to-b")])
        assert spin(workers, lambda: len(in2._tx) == 1, 3), (rnd, workers[2].counters, workers[2].agent.counters)
        f = in2.take_tx()[0]
        p = parse_frame(f)
        assert f.endswith(b"a-to-b")
        assert ((p.src, p.sport), (p.dst, p.dport)) == (ea, (b, pb)) and p.checksum_ok
        # B -> E_A, once, on NIC 2: delivered to A from B's external endpoint
        in2.inject([build_frame(UDP, b, pb, ea[0], ea[1], payload=b"b-to-a")])
        assert spin(workers, lambda: len(in2._tx) == 1, 3), (rnd, workers[2].counters)
        f = in2.take_tx()[0]
        p = parse_frame(f)
        assert f.endswith(b"b-to-a")
        assert ((p.src, p.sport), (p.dst, p.dport)) == (eb, (a, pa)) and p.checksum_ok
    c = workers[2].counters
    assert c["hairpin_unresolved"] == 0 and c["hairpin_replayed"] >= 10

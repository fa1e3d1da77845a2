"""pcap I/O and the offline translation (run_pcap), with scapy as the oracle."""
import ipaddress
import json
import os

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import PcapNgWriter, PcapWriter as ScapyPcapWriter, rdpcap

from hypernat import config as cfgmod
from hypernat.io import pcap

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "testbed.yaml")
I, R, E = "10.77.0.5", "198.51.100.1", "198.18.77.3"
ip = lambda s: int(ipaddress.IPv4Address(s))  # noqa: E731


def eth(p):
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / p


def test_roundtrip_keeps_bytes_order_and_timestamps(tmp_path):
    frames = [bytes(eth(IP(src=I, dst=R) / UDP(sport=1000 + i, dport=53) / (b"q" * i))) for i in range(50)]
    path = str(tmp_path / "a.pcap")
    with pcap.PcapWriter(path) as w:
        for i, f in enumerate(frames):
            w.write(f, 1700000000 + i * 0.001)
    got = list(pcap.read_frames(path))
    assert [f for _, f in got] == frames
    assert got[7][0] == pytest.approx(1700000000.007, abs=2e-6)
    assert [bytes(p) for p in rdpcap(path)] == frames  # scapy reads what we wrote


@pytest.mark.parametrize("variant", ["nano", "bigendian", "pcapng"])
def test_reads_what_scapy_writes(tmp_path, variant):
    pkts = [eth(IP(src=I, dst=R) / TCP(sport=2000 + i, dport=80)) for i in range(10)]
    for i, p in enumerate(pkts):
        p.time = 1700000000 + i / 4
    path = str(tmp_path / f"x.{variant}")
    if variant == "pcapng":
        w = PcapNgWriter(path)
    elif variant == "nano":
        w = ScapyPcapWriter(path, nano=True)
    else:
        w = ScapyPcapWriter(path, endianness=">")
    for p in pkts:
        w.write(p)
    w.close()
    got = list(pcap.read_frames(path))
    assert [f for _, f in got] == [bytes(p) for p in pkts]
    assert got[3][0] == pytest.approx(1700000000.75, abs=1e-5)


@pytest.mark.parametrize("cut", [3, 30, 45])
def test_truncated_files_raise_a_clear_error(tmp_path, cut):
    path = str(tmp_path / "t.pcap")
    with pcap.PcapWriter(path) as w:
        w.write(bytes(eth(IP(src=I, dst=R) / UDP())))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut])
    with pytest.raises(pcap.PcapError, match="truncated"):
        list(pcap.read_frames(path))


def test_not_a_pcap(tmp_path):
    path = str(tmp_path / "n.pcap")
    open(path, "wb").write(b"hello world, this is not a capture file")
    with pytest.raises(pcap.PcapError, match="not a pcap"):
        list(pcap.read_frames(path))


def test_pcap_port_replays_and_records(tmp_path):
    frames = [bytes(eth(IP(src=I, dst=R) / UDP(sport=i))) for i in range(300)]
    src = str(tmp_path / "in.pcap")
    with pcap.PcapWriter(src) as w:
        for f in frames:
            w.write(f)
    port = pcap.PcapPort(src)
    got = []
    while True:
        b = port.recv(128)
        if b is None:
            break
        got += b.frames()
        import numpy as np

        port.send(b, np.arange(b.n))
    assert got == frames and port.sent == frames
    port.close()


def _prefill(out_t, in_t):
    # One TCP session and one UDP session, mapped to E.
    out_t.insert(6, ip(I), 40000, ip(R), 80, ip(E), 50000)
    in_t.insert(6, ip(R), 80, ip(E), 50000, ip(I), 40000)
    out_t.insert(17, ip(I), 5353, ip(R), 53, ip(E), 50001)
    in_t.insert(17, ip(R), 53, ip(E), 50001, ip(I), 5353)


def test_run_pcap_translates_in_order_with_a_filled_table(tmp_path):
    pkts = [
        eth(IP(src=I, dst=R) / TCP(sport=40000, dport=80, flags="S", seq=1)),
        eth(IP(src=R, dst=E) / TCP(sport=80, dport=50000, flags="SA", seq=9, ack=2)),
        Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=I, pdst="10.77.255.254"),
        eth(IP(src=I, dst=R) / UDP(sport=5353, dport=53) / b"query"),
        eth(IP(src="192.0.2.9", dst=R) / UDP(sport=1, dport=2)),  # neither internal nor to the pool
        eth(IP(src=I, dst=R) / TCP(sport=40001, dport=80, flags="S")),  # no session: a miss
        eth(IP(src=R, dst=E) / UDP(sport=53, dport=50001) / b"answer"),
    ]
    src, dst = str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap")
    with pcap.PcapWriter(src) as w:
        for i, p in enumerate(pkts):
            w.write(bytes(p), 1700000000 + i)
    s = pcap.run_pcap(cfgmod.load(CONF), 0, src, dst, prefill=_prefill, use_rules=False)
    assert s["frames_in"] == 7 and s["frames_out"] == 4
    assert s["unclassified"] == 2 and s["outgoing"] == 3 and s["incoming"] == 2
    assert s["verdicts"]["out"]["translated"] == 2 and s["verdicts"]["out"]["miss_out"] == 1
    assert s["verdicts"]["in"]["translated"] == 2
    assert s["slow"] == {"undecided_miss": 1}
    json.dumps(s)  # the summary is JSON as it is
    out = rdpcap(dst)
    expect = [(E, R, 50000, 80), (R, I, 80, 40000), (E, R, 50001, 53), (R, I, 53, 5353)]
    for p, (sa, da, sp, dp) in zip(out, expect):
        assert (p[IP].src, p[IP].dst, p.sport, p.dport) == (sa, da, sp, dp)
        # Checksums are what scapy computes from scratch.
        q = p.copy()
        del q[IP].chksum
        l4 = q[TCP] if TCP in q else q[UDP]
        del l4.chksum
        q = Ether(bytes(q))
        assert p[IP].chksum == q[IP].chksum
        assert (p[TCP] if TCP in p else p[UDP]).chksum == (q[TCP] if TCP in q else q[UDP]).chksum
    assert [float(p.time) for p in out] == [1700000000, 1700000001, 1700000003, 1700000006]


def test_run_pcap_survives_garbage_frames(tmp_path):
    import random

    rnd = random.Random(5)
    src, dst = str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap")
    base = bytes(eth(IP(src=I, dst=R) / TCP(sport=40000, dport=80)))
    with pcap.PcapWriter(src) as w:
        for _ in range(300):
            f = bytearray(base[: rnd.randrange(0, len(base) + 1)])
            for _ in range(rnd.randrange(0, 4)):
                if f:
                    f[rnd.randrange(len(f))] = rnd.randrange(256)
            w.write(bytes(f))
    s = pcap.run_pcap(CONF, 0, src, dst, prefill=_prefill, use_rules=False)
    assert s["frames_in"] == 300
    total = sum(sum(c.values()) for c in s["verdicts"].values())
    assert total == s["outgoing"] + s["incoming"]  # every classified frame has exactly one verdict
    assert s["frames_out"] == len(rdpcap(dst))


def test_run_pcap_with_the_rule_builder_allocates(tmp_path):
    src, dst = str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap")
    cfg = cfgmod.load(CONF)
    # With EIM, host h belongs to NIC eim_owner(h): pick hosts NIC 0 owns.
    with pcap.PcapWriter(src) as w:
        for i in range(20):
            w.write(bytes(eth(IP(src=f"10.77.1.{i + 1}", dst=R) / UDP(sport=3000 + i, dport=53) / b"x")), 1700000000)
    s = pcap.run_pcap(cfg, 0, src, dst)
    assert s["slow_path"] == "RuleBuilder", s["slow_path"]
    out = rdpcap(dst)
    assert s["slow"].get("replayed", 0) == len(out)
    assert len(out) + s["slow"].get("fetch_offline", 0) == 20
    pool = ipaddress.ip_network(str(cfg.pool[0]))
    assert all(ipaddress.ip_address(p[IP].src) in pool for p in out)

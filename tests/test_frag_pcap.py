"""The offline translation (``hypernat-nic --pcap-in/--pcap-out``, ``io.pcap.run_pcap``)
translates fragments as a NIC does: a datagram out of order, its first fragment a miss
the rule builder decides; the fragments that come out reassemble (scapy) to the
translated datagram."""
import os

from hypernat.partition import Partition
from scapy.all import IP, UDP, Ether, Raw, fragment, rdpcap

from hypernat import config as cfgmod
from hypernat.io import pcap

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "testbed.yaml")
I, R = "10.77.0.5", "198.51.100.1"


def test_run_pcap_translates_a_fragmented_datagram_out_of_order(tmp_path):
    cfg = cfgmod.load(CONF)
    dgram = IP(src=I, dst=R, id=4321, ttl=64) / UDP(sport=5353, dport=53) / Raw(bytes(range(200)) * 15)
    frs = [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / f for f in fragment(dgram, fragsize=1000)]
    assert len(frs) == 4
    src, dst = str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap")
    with pcap.PcapWriter(src) as w:
        for k, f in enumerate([frs[3], frs[1], frs[0], frs[2]]):
            w.write(bytes(f), 1700000000 + k)
    # the NIC that owns the host's mappings (endpoint-independent: h(host) mod N) builds the rule
    owner = Partition.from_config(cfg).eim_owner(int.from_bytes(bytes(map(int, I.split("."))), "big"))
    s = pcap.run_pcap(cfg, owner, src, dst)
    assert s["frames_out"] == 4, s
    # the first fragment is a miss in its batch (decided after it): all three later ones wait
    assert s["fragments"]["frag_held"] == 3 and s["fragments"]["frag_released"] == 3, s
    out = sorted((p[IP] for p in rdpcap(dst)), key=lambda x: x.frag)
    data = b"".join(bytes(x.payload)[: x.len - x.ihl * 4] for x in out)
    h = out[0]
    u = IP(bytes(IP(src=h.src, dst=h.dst, id=h.id, proto=17) / Raw(data)))[UDP]
    assert h.src in {str(a) for a in cfg.pool[0]} and u.dport == 53 and u.load == bytes(dgram[Raw])
    ref = IP(bytes(IP(src=h.src, dst=R) / UDP(sport=u.sport, dport=53) / Raw(u.load)))[UDP]
    assert ref.chksum == u.chksum  # scapy's checksum of the translated datagram

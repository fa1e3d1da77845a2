"""The NIC worker sends what the fast path generated (issue 13): ICMP errors back out of
the port the frame came in by, fragments out of the other, replays included; the
router settings come from the config (tcp_mss_clamp, per-NIC MTUs, icmp section) and
from the interfaces.  Memory ports, one NIC, no coordinator."""
import dataclasses

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, defragment, raw

from hypernat.lab.emulated import emulated_config
from hypernat.nic.worker import NicWorker, spin

pytestmark = pytest.mark.timeout(60)

I1, R1, GW_IN = "10.0.0.10", "192.0.2.5", "10.0.255.254"


def worker(tmp_path, outside_mtu=576):
    cfg = emulated_config(1)
    nic = dataclasses.replace(cfg.nics[0], outside_mtu=outside_mtu)
    cfg = dataclasses.replace(cfg, nics=(nic,), tcp_mss_clamp=1200,
                              icmp=dataclasses.replace(cfg.icmp, inside_source=GW_IN))
    from hypernat.io.memory import MemoryPort

    inside, outside = MemoryPort("in0"), MemoryPort("out0")
    w = NicWorker(cfg, 0, inside, outside, state_dir=str(tmp_path / "nic0"), standalone=True)
    return w, inside, outside, cfg


def eth():
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def test_router_settings_from_config_and_interfaces(tmp_path):
    w, *_ , cfg = worker(tmp_path)
    s = w.set_links(inside_mtu=9000, outside_mtu=1500, inside_address=0x0A0000FE)
    assert s["outside_mtu"] == 576 and s["inside_mtu"] == 9000  # the config wins, else the interface
    assert s["inside_address"] == 0x0A00FFFE and s["mss_clamp"] == 1200 and s["icmp_rate"] == 1000
    assert cfg.in_pool(s["outside_address"])
    assert w.translator.router == s
    w.close()


def test_time_exceeded_goes_back_inside(tmp_path):
    w, inside, outside, _ = worker(tmp_path)
    f = raw(eth() / IP(src=I1, dst=R1, ttl=1) / UDP(sport=3333, dport=33434) / b"probe")
    inside.inject([f])
    assert spin([w], lambda: len(inside._tx) > 0, 2)
    g = Ether(inside.take_tx()[0])
    assert g[IP].src == GW_IN and g[IP].dst == I1 and g[ICMP].type == 11 and g.dst == "02:00:00:00:00:01"
    assert not outside._tx
    c = w.counters_dict()
    assert c["router_out_icmp_time_exceeded"] == 1 and c["loop_generated"] == 1
    w.close()


def test_first_packet_fragmented_on_replay_and_df_answered(tmp_path):
    """A first packet (a miss: the rule is built, the frame replayed) longer than the
    outside MTU leaves as fragments; a DF one is answered with fragmentation needed."""
    w, inside, outside, cfg = worker(tmp_path)
    big = raw(eth() / IP(src=I1, dst=R1, id=7) / UDP(sport=4444, dport=53) / (b"d" * 1400))
    inside.inject([big])
    assert spin([w], lambda: len(outside._tx) >= 3, 2)
    frags = [Ether(x)[IP] for x in outside.take_tx()]
    assert all(len(raw(f)) <= 576 for f in frags) and len(frags) == 3
    whole = defragment(frags)[0]
    assert cfg.in_pool(int.from_bytes(bytes(map(int, whole.src.split("."))), "big"))  # translated
    assert raw(whole[UDP].payload) == b"d" * 1400
    df = raw(eth() / IP(src=I1, dst=R1, flags="DF") / TCP(sport=5555, dport=80, flags="A") / (b"x" * 600))
    inside.inject([df])
    assert spin([w], lambda: len(inside._tx) > 0, 2)
    g = Ether(inside.take_tx()[0])
    assert g[ICMP].type == 3 and g[ICMP].code == 4 and g[ICMP].nexthopmtu == 576 and g[IP].src == GW_IN
    c = w.counters_dict()
    assert c["fastpath_out_fragmented"] == 1 and c["fastpath_out_frag_needed"] == 1
    assert c["router_out_fragments"] == 3 and c["loop_generated"] == 4
    w.close()


def test_syn_mss_clamped(tmp_path):
    w, inside, outside, _ = worker(tmp_path)
    syn = raw(eth() / IP(src=I1, dst=R1) / TCP(sport=6666, dport=443, flags="S", options=[("MSS", 1460)]))
    inside.inject([syn])
    assert spin([w], lambda: len(outside._tx) > 0, 2)
    out = Ether(outside.take_tx()[0])
    assert dict(out[TCP].options)["MSS"] == 1200
    chk = out.copy()
    del chk[TCP].chksum
    assert raw(Ether(raw(chk))) == raw(out)  # scapy agrees with the updated checksum
    assert w.counters_dict()["router_out_mss_clamped"] == 1
    w.close()


def test_config_router_keys_are_checked():
    import os

    from hypernat import config as cfgmod

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "conf", "testbed.yaml")) as f:
        import yaml

        tree = yaml.safe_load(f)
    ok = cfgmod.from_dict(dict(tree, tcp_mss_clamp=1400, icmp={"rate_limit": 0, "inside_source": "10.77.255.1",
                                                               "outside_source": "198.18.77.3"}), "gw.yaml")
    assert ok.tcp_mss_clamp == 1400 and ok.icmp.rate_limit == 0 and ok.icmp.outside_source == "198.18.77.3"
    assert cfgmod.from_dict(tree, "gw.yaml").tcp_mss_clamp == 0  # off by default
    bad = [
        (dict(tcp_mss_clamp=40), "gw.yaml: tcp_mss_clamp: 40 is below 88"),
        (dict(tcp_mss_clamp="big"), "gw.yaml: tcp_mss_clamp: expected an integer"),
        (dict(icmp={"outside_source": "192.0.2.1"}), "gw.yaml: icmp.outside_source: 192.0.2.1 is not in external.pool"),
        (dict(icmp={"inside_source": "10.77.0.300"}), "gw.yaml: icmp.inside_source: '10.77.0.300' is not an IPv4"),
        (dict(icmp={"rate": 5}), "gw.yaml: icmp.rate: unknown key"),
        (dict(nics=[dict(tree["nics"][0], outside_mtu=67), tree["nics"][1]]), "gw.yaml: nics[0].outside_mtu: 67 is out"),
    ]
    for change, msg in bad:
        with pytest.raises(cfgmod.ConfigError) as e:
            cfgmod.from_dict(dict(tree, **change), "gw.yaml")
        assert str(e.value).startswith(msg), str(e.value)

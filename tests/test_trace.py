"""The trace generator: deterministic, shaped as it claims, and readable by others (scapy).

Each test asserts a property the module docstring promises; the distributions are
checked with tolerances wide enough for any seed, narrow enough to catch a wrong shape.
"""
import ipaddress
import os

import numpy as np
import pytest

from hypernat import trace as T
from hypernat.io.pcap import read_frames

scapy = pytest.importorskip("scapy.all")


@pytest.fixture(scope="module")
def tr():
    return T.generate(T.Params(flows=4000, seed=7))


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.pcap", tmp_path / "b.pcap", tmp_path / "c.pcap"
    T.write_pcap(T.generate(T.Params(flows=500, seed=3)), str(a))
    T.write_pcap(T.generate(T.Params(flows=500, seed=3)), str(b))
    T.write_pcap(T.generate(T.Params(flows=500, seed=4)), str(c))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_flow_sizes_heavy_tailed(tr):
    n = tr.f_packets
    assert len(n) == 4000
    # mice: the median flow is a handful of packets; elephants: the largest 1% of flows
    # carry a large share of all packets, and the max is far above the median
    assert np.median(n) <= 10
    top = np.sort(n)[-40:].sum() / n.sum()
    assert top > 0.1
    assert n.max() > 20 * np.median(n)
    assert n.max() <= T.Params.max_packets + 4


def test_packet_size_mix_bimodal(tr):
    ln = tr.p_len
    small, large = (ln <= 128).mean(), (ln >= 1400).mean()
    assert 0.3 < small < 0.6, small
    assert 0.3 < large < 0.6, large
    assert ln.min() >= T.ETH_MIN and ln.max() <= T.MTU_FRAME


def test_tcp_handshake_and_teardown_per_flow(tr):
    tcp = np.flatnonzero(tr.f_proto == T.TCP)
    assert 0.7 < len(tcp) / tr.n_flows < 0.9  # some UDP (default 20 %)
    order = np.lexsort((tr.p_seq, tr.p_flow))
    flow, flags = tr.p_flow[order], tr.p_flags[order]
    starts = np.searchsorted(flow, np.arange(tr.n_flows))
    ends = np.append(starts[1:], len(flow))
    for f in tcp[:500]:
        fl = flags[starts[f]:ends[f]]
        assert fl[0] == T.SYN and fl[1] == T.ACK
        assert fl[-2] == T.FIN | T.ACK and fl[-1] == T.ACK
        assert (fl == T.SYN).sum() == 1
    udp = np.flatnonzero(tr.f_proto == T.UDP)
    assert (tr.p_flags[np.isin(tr.p_flow, udp)] == 0).all()


def test_time_ordered_and_flows_spread(tr):
    assert (np.diff(tr.p_ts) >= 0).all()
    # packets of a flow go forward in time, in sequence
    order = np.lexsort((tr.p_seq, tr.p_flow))
    same = np.diff(tr.p_flow[order]) == 0
    assert (np.diff(tr.p_ts[order])[same] >= 0).all()


def test_addresses_inside_and_outside():
    internal = ["10.8.0.0/16", "172.20.0.0/24"]
    pool = ["198.51.100.0/24"]
    tr = T.generate(T.Params(flows=2000, seed=2), internal=internal, exclude=pool)
    nets = [ipaddress.ip_network(n) for n in internal]
    for a in np.unique(tr.f_iaddr):
        assert any(ipaddress.ip_address(int(a)) in n for n in nets)
    for a in np.unique(tr.f_raddr):
        ip = ipaddress.ip_address(int(a))
        assert ip.is_global and not any(ip in n for n in nets + [ipaddress.ip_network(pool[0])])
    key = set(zip(tr.f_proto.tolist(), tr.f_iaddr.tolist(), tr.f_iport.tolist(), tr.f_raddr.tolist(),
                  tr.f_rport.tolist()))
    assert len(key) == tr.n_flows  # distinct 5-tuples


def l4_flags(ip):
    return int(ip[scapy.TCP].flags)


def test_pcap_reads_back_with_scapy(tmp_path, tr):
    p = tmp_path / "t.pcap"
    T.write_pcap(tr, str(p), snaplen=96)
    pkts = scapy.rdpcap(str(p), count=3000)
    ours = list(read_frames(str(p)))
    assert len(ours) == tr.n_packets
    for i, pk in enumerate(pkts):
        assert pk.haslayer(scapy.IP)
        ip = pk[scapy.IP]
        f = tr.p_flow[i]
        assert int(ipaddress.ip_address(ip.src)) == tr.f_iaddr[f]
        assert int(ipaddress.ip_address(ip.dst)) == tr.f_raddr[f]
        assert ip.len == tr.p_iplen[i]  # the header capture keeps the real length
        assert len(pk) == min(tr.p_len[i], 96)
        if ip.proto == 6 and l4_flags(ip) & T.SYN:
            assert ip.len == 40 and pk.wirelen == 60  # a bare SYN, padded on the wire
        assert pk.wirelen == tr.p_len[i]
        hdr = scapy.IP(bytes(ip)[:20])
        want = hdr.chksum
        del hdr.chksum
        assert scapy.IP(bytes(hdr)).chksum == want  # the IP checksum verifies
        l4 = ip[scapy.TCP] if ip.proto == 6 else ip[scapy.UDP]
        assert l4.sport == tr.f_iport[f] and l4.dport == tr.f_rport[f]


def test_replay_frames_checksums_verify_with_scapy(tr):
    frames = T.replay_frames(tr, 64)[:2000]
    for f in frames:
        pk = scapy.Ether(f)
        ip = pk[scapy.IP]
        assert ip.len <= len(f) - 14
        want_ip, want_l4 = ip.chksum, (ip[scapy.TCP] if ip.proto == 6 else ip[scapy.UDP]).chksum
        del ip.chksum
        l4 = ip[scapy.TCP] if ip.proto == 6 else ip[scapy.UDP]
        del l4.chksum
        again = scapy.Ether(bytes(pk))
        assert again[scapy.IP].chksum == want_ip
        assert (again[scapy.TCP] if ip.proto == 6 else again[scapy.UDP]).chksum == want_l4


def test_full_packet_checksums_in_header_capture():
    """The capture's checksums are those of the full packet (zero payload)."""
    tr = T.generate(T.Params(flows=200, seed=9))
    a, incl = T.headers(tr, 96, fixlen=False)
    for i in range(0, tr.n_packets, 7):
        full = (bytes(a[i, : incl[i]]) + b"\0" * int(tr.p_len[i] - incl[i]))[: 14 + tr.p_iplen[i]]
        pk = scapy.Ether(full)
        ip = pk[scapy.IP]
        want = (ip[scapy.TCP] if ip.proto == 6 else ip[scapy.UDP]).chksum
        l4 = ip[scapy.TCP] if ip.proto == 6 else ip[scapy.UDP]
        del l4.chksum
        del ip.chksum
        again = scapy.Ether(bytes(pk))
        assert (again[scapy.TCP] if ip.proto == 6 else again[scapy.UDP]).chksum == want
        assert again[scapy.IP].chksum == scapy.Ether(full)[scapy.IP].chksum


def test_info_and_load_replay_of_a_real_capture(tmp_path):
    """A capture written by scapy (not by us, truncated by a snaplen) is summarised and
    made replayable: lengths cut to what is present, checksums valid."""
    pkts = [scapy.Ether() / scapy.IP(src="10.0.0.5", dst="93.184.216.34") /
            scapy.TCP(sport=40000 + i, dport=443, flags="S") / (b"z" * 300) for i in range(20)]
    pkts += [scapy.Ether() / scapy.IP(src="10.0.0.6", dst="1.1.1.1") / scapy.UDP(sport=5353, dport=53) / (b"q" * 20)]
    p = tmp_path / "real.pcap"
    scapy.wrpcap(str(p), pkts, snaplen=80)
    d = T.info(str(p))
    assert d["packets"] == 21 and d["flows"] == 21 and d["tcp_flows"] == 20 and d["syn"] == 20
    frames = T.load_replay(str(p))
    assert len(frames) == 21
    for f in frames:
        pk = scapy.Ether(f)
        assert pk[scapy.IP].len == len(f) - 14
        l4 = pk[scapy.TCP] if pk[scapy.IP].proto == 6 else pk[scapy.UDP]
        want = l4.chksum
        del l4.chksum
        del pk[scapy.IP].chksum
        again = scapy.Ether(bytes(pk))
        assert (again[scapy.TCP] if again[scapy.IP].proto == 6 else again[scapy.UDP]).chksum == want


def test_cli_gen_and_info(tmp_path, capsys):
    out = tmp_path / "t1.pcap"
    assert T.main(["gen", "--flows", "300", "--seed", "5", "-o", str(out)]) == 0
    assert os.path.getsize(out) > 1000
    assert T.main(["info", "--json", str(out)]) == 0
    assert '"flows": 300' in capsys.readouterr().out
    assert T.main(["info", str(tmp_path / "missing.pcap")]) == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        T.generate(T.Params(flows=0))
    with pytest.raises(ValueError):
        T.headers(T.generate(T.Params(flows=10)), snaplen=40)

"""benchmarks/bench_bulk.py's verdict on an iperf3 run: what it accepts as "bytes flowed
through this mode, translated as the mode must", fed iperf3 -J documents shaped like
the real ones (client: end.sum_received / sum_sent / streams; server: start.connected)."""
import importlib.util
import json
import os

import pytest

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_bulk.py")
_spec = importlib.util.spec_from_file_location("bench_bulk", _path)
bench_bulk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_bulk)

POOL, HOST = "198.18.77.0/28", "10.77.0.1"


def report(peer="198.18.77.1", received=125_000_000, streams=None, client_error=None, server_error=None):
    streams = bench_bulk.STREAMS if streams is None else streams
    c = {"start": {}, "end": {"streams": [{}] * streams,
                              "sum_sent": {"bytes": received + 1000, "retransmits": 3},
                              "sum_received": {"bytes": received, "bits_per_second": received * 8.0, "seconds": 1.0}}}
    s = {"start": {"connected": [{"remote_host": peer, "remote_port": 40000 + i} for i in range(streams)]}}
    if client_error:
        c = {"start": {}, "end": {}, "error": client_error}
    if server_error:
        s["error"] = server_error
    return {"client": c, "server": s}


@pytest.mark.parametrize("mode,peer", [("linux", "198.18.77.1"), ("hypernat", "198.18.77.14"), ("noop", HOST)])
def test_accepts_a_good_run(mode, peer):
    r = bench_bulk.summarize("m", mode, "packet_mmap", report(peer=peer))
    assert r["gbps"] == pytest.approx(1.0) and r["bytes"] == 125_000_000 and r["retransmits"] == 3
    assert r["server_saw"] == [peer]
    bench_bulk.check_flowed(r, POOL, HOST)


@pytest.mark.parametrize("mode,rep,why", [
    ("linux", report(client_error="unable to connect to server: Connection timed out"), "iperf3 reported"),
    ("hypernat", report(server_error="the server has terminated"), "iperf3 reported"),
    ("hypernat", report(received=0), "no bytes"),
    ("linux", report(streams=2), "2 of"),
    ("hypernat", report(peer=HOST), "not translated"),          # a NAT that let the inside address out
    ("linux", report(peer="198.18.77.16"), "not translated"),   # just outside the /28 pool
    ("noop", report(peer="198.18.77.1"), "untranslated"),       # the no-op must not translate
])
def test_rejects(mode, rep, why):
    r = bench_bulk.summarize("m", mode, "af_xdp", rep)
    with pytest.raises(AssertionError, match=why):
        bench_bulk.check_flowed(r, POOL, HOST)


def test_server_without_json_is_an_error():
    rep = report()
    rep["server"] = {"error": "server wrote no JSON (exit 1): 'bind failed'"}
    r = bench_bulk.summarize("m", "linux", "packet_mmap", rep)
    with pytest.raises(AssertionError, match="no JSON"):
        bench_bulk.check_flowed(r, POOL, HOST)


def test_busy_and_softirq_fractions():
    from hypernat.lab.onecore import cpu_split

    before = {0: (100, 10, 1000), 1: (0, 0, 1000)}
    after = {0: (150, 30, 1100), 1: (100, 50, 1100), 2: (5, 0, 10)}
    assert cpu_split(before, after) == {0: {"busy": 0.5, "softirq": 0.2}, 1: {"busy": 1.0, "softirq": 0.5}}


def test_the_ratio_line_is_one_json_line():
    res = {1500: {"linux": {"gbps": 10.0}, "noop_packet_mmap": {"gbps": 8.0}, "hypernat_packet_mmap": {"gbps": 6.0}}}
    line = bench_bulk.ratio_line(res)
    assert "\n" not in line and line.startswith("BULK_RATIOS ")
    assert json.loads(line.split(" ", 1)[1]) == {"mtu1500_hypernat_packet_mmap_over_linux": 0.6,
                                                 "mtu1500_hypernat_packet_mmap_over_noop": 0.75}

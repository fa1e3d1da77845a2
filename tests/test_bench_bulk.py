"""benchmarks/bench_bulk.py's verdict on an iperf3 run: what it accepts as "bytes flowed
through this mode, translated as the mode must", fed iperf3 -J documents shaped like
the real ones (client: end.sum_received / sum_sent / streams; server: start.connected)."""
import importlib.util
import json
import os
import time

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


def test_io_summary_is_per_run_and_per_batch():
    from hypernat.lab.benchkit import io_summary

    before = {"loop_batches": 10, "port_inside0_rx_frames": 100, "port_outside0_rx_frames": 50,
              "port_inside0_tx_frames": 40, "port_outside0_tx_frames": 90, "port_outside0_tx_kicks": 5}
    after = {"loop_batches": 30, "port_inside0_rx_frames": 900, "port_outside0_rx_frames": 450,
             "port_inside0_tx_frames": 440, "port_outside0_tx_frames": 790, "port_outside0_tx_kicks": 15,
             "port_inside0_kernel_rx_drops": 7, "port_inside0_rx_super_frames": 3}
    s = io_summary(after, before)
    assert s["rx_frames"] == 1200 and s["batches"] == 20 and s["frames_per_batch"] == 60.0
    assert s["tx_frames"] == 1100 and s["tx_kicks"] == 10 and s["frames_per_kick"] == 110.0
    assert s["kernel_rx_drops"] == 7 and s["rx_super_frames"] == 3
    assert io_summary({})["frames_per_batch"] is None  # no batch: no ratio, not a division by zero


def test_softirq_runs_and_thread_times_come_from_proc():
    import threading

    from hypernat.lab.onecore import cpu_times, softirq_split, softirqs, thread_times

    s0 = softirqs()
    assert set(s0) == set(cpu_times()) and all({"NET_RX", "NET_TX"} <= set(v) for v in s0.values())
    assert all(v >= 0 for c in softirq_split(s0, softirqs()).values() for v in c.values())
    tid = threading.get_native_id()
    (t0, _), = thread_times([tid]).values()
    end = time.process_time() + 0.05
    while time.process_time() < end:  # 50 ms of this thread's own CPU time
        pass
    (t1, cpu), = thread_times([tid]).values()
    assert t1 - t0 >= 0.03 and cpu in os.sched_getaffinity(0)
    assert thread_times([2 ** 22 + 1]) == {}  # no such thread: left out, no error


@pytest.mark.netns
@pytest.mark.skipif(bool(bench_bulk.unavailable_reason()), reason=str(bench_bulk.unavailable_reason()))
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,backend", [("hypernat", "packet_mmap"), ("noop", "af_xdp")])
def test_the_gateway_gets_one_core_kernel_work_included(mode, backend):
    """benchkit's lab as bench_e2e and bench_bulk use it: every thread of the forwarder
    (HyperNAT's NIC daemon: its journal and metrics threads too) on the gateway's CPU at
    SCHED_FIFO rt, the links' NAPI threads (AF_XDP: XDP attached) there at rt - 1, and
    the receive work of real traffic shows up there; the MTU and receive ring asked for
    are the ones the links and the forwarder have."""
    from hypernat.lab import udpgen
    from hypernat.lab.benchkit import io_counters, io_summary, one_nic_lab, tag

    if backend == "af_xdp":
        pytest.importorskip("hypernat.io.af_xdp")
    mtu, ring = (9000, "v3") if backend == "packet_mmap" else (1500, None)
    with one_nic_lab(tag("tbk", mode, backend), mode, backend, gw_cpu=1, ends_cpu=0, rt=10, mtu=mtu,
                     rx_ring=ring) as lab:
        topo = lab.topo
        for pid in lab.forwarder_pids:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            assert len(tids) > 1 or mode == "noop"
            for t in tids:
                assert os.sched_getaffinity(t) == {1} and os.sched_getscheduler(t) == os.SCHED_FIFO, (pid, t)
                assert os.sched_getparam(t).sched_priority == 10
        for t in lab.steered["napi_threads"]:
            assert os.sched_getaffinity(t) == {1} and os.sched_getparam(t).sched_priority == 9
        assert bool(lab.steered["napi_threads"]) == (backend == "af_xdp")
        from pyroute2 import IPRoute

        with IPRoute(netns=topo.gw) as ipr:
            assert ipr.get_links(ipr.link_lookup(ifname=topo.inside(0))[0])[0].get("IFLA_MTU") == mtu
        udpgen.install_counter(topo.inet, topo.far(0), "0.0.0.0/0")
        src, sport = udpgen.flow_endpoints(2000, 20, topo.addr.internal)
        with udpgen.Generator(topo.vpc, topo.far(0)) as gen:
            gen.load(udpgen.build_frames(src, sport, topo.addr.server(0), 9, gen.mac(),
                                         topo.mac(topo.gw, topo.inside(0))))
            lab.mark()
            for _ in range(10 if mode == "hypernat" else 1):  # HyperNAT: sessions set up in the first
                gen.send_all(rate=50_000)
        got, _ = udpgen.settle(topo.inet, 0, {"translated": 0, "other": 0}, time.monotonic(), timeout=5)
        k = lab.kernel()
        raw = None
        if mode == "hypernat":  # the daemon's counters reach ctl with its periodic stats: wait for them
            deadline = time.monotonic() + 5
            while True:
                raw = io_counters(lab)
                if io_summary(raw)["rx_frames"] >= got["translated"] or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        if lab.config:
            import yaml

            with open(lab.config) as f:
                nic = yaml.safe_load(f)["nics"][0]
    raw = raw if raw is not None else io_counters(lab)  # the no-op's: written as it stopped
    io = io_summary(raw)
    assert got["translated"] > 1000, got
    assert io["rx_frames"] >= got["translated"] and io["frames_per_batch"] >= 1, io
    if backend == "af_xdp":
        assert k["napi"]["cpus"] == [1] and k["napi"]["cpu_s"] >= 0, k
    assert k["net_rx"][1] > 0 and k["forwarder"]["cpus"] == [1] and k["forwarder"]["cpu_s"] > 0, k
    if ring == "v3":  # HyperNAT's receive ring is its config's: the lab's config says v3, the ring has blocks
        assert nic["rx_ring"] == "v3" and nic["io"] == backend, nic
        assert raw.get("port_inside0_rx_blocks", 0) > 0, raw

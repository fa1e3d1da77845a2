"""benchmarks/bench_cps.py: the flows it sends (each frame its own 5-tuple, checked by
scapy), its verdict on a run, its ratio line, its profile summary, and the generator and
counter for real through a lab whose NAT is broken (the benchmark must fail there)."""
import importlib.util
import json
import os

import numpy as np
import pytest

from hypernat.lab import udpgen

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_cps.py")
_spec = importlib.util.spec_from_file_location("bench_cps", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_every_flow_is_its_own_endpoint_and_hosts_take_turns():
    src, sport = udpgen.flow_endpoints(1_000_000, 1000, "10.77.0.0/16")
    key = src.astype(np.uint64) << 16 | sport
    assert len(np.unique(key)) == 1_000_000
    assert len(np.unique(src)) == 1000 and (sport >= 1024).all()
    assert len(np.unique(src[:1000])) == 1000  # the first 1000 frames: one per host
    with pytest.raises(ValueError, match="64000"):
        udpgen.flow_endpoints(1_000_000, 10, "10.77.0.0/16")


def test_frames_are_valid_udp_as_scapy_reads_them():
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    src, sport = udpgen.flow_endpoints(50, 7, "10.77.0.0/16")
    fr = udpgen.build_frames(src, sport, "198.51.100.1", 9, b"\x02" * 6, b"\x04" * 6)
    assert fr.shape == (50, udpgen.FRAME)
    seen = set()
    for i in range(50):
        p = Ether(fr[i].tobytes())
        ck = p[IP].chksum
        del p[IP].chksum
        assert Ether(bytes(p))[IP].chksum == ck  # scapy recomputes the same checksum
        assert p[IP].dst == "198.51.100.1" and p[UDP].dport == 9 and p[IP].len == 46
        seen.add((p[IP].src, p[UDP].sport))
    assert len(seen) == 50


def passes(new=500, other=0, est=700, flows=1000, fill=(600, 995), tl=None):
    p = lambda n, o=0: {"translated": n, "other": o, "per_s": float(n), "seconds": 1.0, "sent": flows}  # noqa: E731
    return {"label": "hypernat_packet_mmap", "mode": "hypernat", "new": p(new, other),
            "fill": [p(n) for n in fill], "established": p(est), "translation_log": {"block": 16} if tl is None else tl}


def test_accepts_a_good_run():
    bench.check_passed(passes(), 1000)


@pytest.mark.parametrize("r,why", [
    (passes(other=3), "outside the pool"),        # an internal source let out
    (passes(new=0), "no new connection"),
    (passes(new=1001), "counted twice"),
    (passes(fill=(400, 850)), "last paced pass: 850 of 1000"),  # sessions lost (or never set up)
    (passes(fill=()), "last paced pass: 0 of 1000"),
    (passes(est=0), "nothing got through in the established pass"),
    (passes(tl={}), "translation log per block expected"),                      # log off
    (passes(tl={"create": 900, "block": 2}), "translation log per block expected"),  # per rule
])
def test_rejects(r, why):
    with pytest.raises(AssertionError, match=why):
        bench.check_passed(r, 1000)


def test_the_ratio_line_is_one_json_line():
    r = lambda new, est: {"new": {"per_s": new}, "established": {"per_s": est}}  # noqa: E731
    line = bench.ratio_line({"linux": r(100.0, 200.0), "hypernat_packet_mmap": r(150.0, 300.0)})
    assert "\n" not in line and line.startswith("CPS_RATIOS ")
    assert json.loads(line.split(" ", 1)[1]) == {"hypernat_packet_mmap_new_over_established": 0.5,
                                                 "hypernat_packet_mmap_new_over_linux_new": 1.5,
                                                 "linux_new_over_established": 0.5}


def test_profile_summary_of_collapsed_stacks():
    raw = ("process 1:python;run (hypernat/nic/worker.py:1059);run_once (hypernat/nic/worker.py:970);"
           "decide (hypernat/rules.py:10) 30\n"
           "process 1:python;run (hypernat/nic/worker.py:1059);run_once (hypernat/nic/worker.py:980) 10\n")
    from hypernat.lab.benchkit import profile_summary

    raw += "process 1:python;run (hypernat/nic/worker.py:1059);Poller.poll (zmq/sugar/poll.py:80) 60\n"
    s = profile_summary(raw)
    assert s["samples"] == 100 and s["waiting"] == 0.6  # poll() is waiting, not work
    assert s["self"][0] == ("decide rules.py", 0.75)
    assert dict(s["inclusive"])["run_once worker.py"] == 1.0


def test_translation_log_events(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"event": "block", "ports": [1024, 1087]}\n{"event": "block"}\n{"event": "block-free"}\nnot json\n')
    assert bench.translation_log_events(str(p)) == {"block": 2, "block-free": 1, "unreadable": 1}
    assert bench.translation_log_events(str(tmp_path / "none")) == {}


def test_capacity_leaves_room():
    assert bench._capacity(1_000_000) == 1 << 21 and bench._capacity(10) == 1 << 16


def needs_lab(f):
    """The testbed (root, namespaces: the ``netns`` marker skips without) and what the
    benchmark itself needs."""
    return pytest.mark.netns(pytest.mark.skipif(bool(bench.unavailable_reason()),
                                                reason=str(bench.unavailable_reason()))(f))


@needs_lab
@pytest.mark.timeout(60)
def test_a_nat_that_does_not_translate_fails_the_benchmark():
    """A real lab: through Linux's NAT the generator's frames arrive translated, each
    pass counted under its own mark; with the NAT rule gone (Linux still forwards) they
    reach inet untranslated, the counter says so, and the verdict rejects the run."""
    from hypernat.lab import netns
    from hypernat.lab.benchkit import one_nic_lab, tag
    from hypernat.lab.peer import TABLE

    with one_nic_lab(tag("tcps", "linux", "p"), "linux", "packet_mmap", rt=0) as lab:
        topo, a = lab.topo, lab.topo.addr
        udpgen.install_counter(topo.inet, topo.far(0), a.pool)
        src, sport = udpgen.flow_endpoints(2000, 20, a.internal)
        with udpgen.Generator(topo.vpc, topo.far(0)) as gen:
            fr = udpgen.build_frames(src, sport, a.server(0), 9, gen.mac(), topo.mac(topo.gw, topo.inside(0)))
            gen.load(fr)
            # through the working NAT, paced: counted under their pass's mark only
            good = bench._pass(gen, fr, topo.inet, 2, rate=20_000)
            assert udpgen.counted(topo.inet, 3)["translated"] == 0
            netns.run(topo.gw, ["nft", "delete", "table", "ip", TABLE])
            r = {"label": "linux", "mode": "linux", "new": bench._pass(gen, fr, topo.inet, 0, rate=20_000)}
            r["fill"], r["established"] = [good], good
    assert good["sent"] == 2000 and good["translated"] >= 1900 and good["other"] == 0, good
    assert r["new"]["sent"] == 2000 and r["new"]["other"] > 1000, r  # the frames did cross, untranslated
    with pytest.raises(AssertionError, match="outside the pool"):
        bench.check_passed(r, 2000)


@needs_lab
def test_conntrack_max_is_raised_and_restored():
    path = bench.conntrack_max.PATH
    with bench.conntrack_max(1):  # never lowered
        pass
    if not os.path.exists(path):
        pytest.skip("nf_conntrack not loaded")
    with open(path) as f:
        before = int(f.read())
    with bench.conntrack_max(before + 1):
        with open(path) as f:
            assert int(f.read()) == before + 1
    with open(path) as f:
        assert int(f.read()) == before

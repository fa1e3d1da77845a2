"""benchmarks/bench_latency.py: its verdict on a run (what counts as "every exchange went
through the gateway, translated as the mode must"), its ratio line, and the compiled
ping-pong client for real: on loopback, and through a lab whose NAT is broken (the
benchmark must fail there, not report)."""
import importlib.util
import json
import os

import numpy as np
import pytest

from hypernat.lab import netns, pingpong

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_latency.py")
_spec = importlib.util.spec_from_file_location("bench_latency", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

POOL, HOST = "198.18.77.0/28", "10.77.0.1"
COUNT, CONNS = 100, 10


def result(mode="hypernat", peer="198.18.77.3", n=None, client_error=None, server_error=None, echoed=None):
    tests = {}
    for name, cmode, _size in bench.plan([64]):
        k = (COUNT if cmode == "persist" else CONNS) if n is None else n
        tests[name] = {"us": np.full(k, 50.0), "error": client_error,
                       "server": {"peers": [peer] if peer else [], "conns": 1, "error": server_error,
                                  "exchanges": (k + bench.WARMUP) if echoed is None else echoed}}
    return {"label": mode, "mode": mode, "backend": "packet_mmap", "tests": tests}


@pytest.mark.parametrize("mode,peer", [("hypernat", "198.18.77.14"), ("linux", "198.18.77.1"), ("noop", HOST),
                                       ("loopback", "127.0.0.1")])
def test_accepts_a_good_run(mode, peer):
    bench.check_passed(result(mode, peer), POOL, HOST, COUNT, CONNS)


@pytest.mark.parametrize("r,why", [
    (result(client_error="pingpong: connect (exchange 3): Operation now in progress"), "client failed"),
    (result(n=COUNT - 1), "exchanges measured"),
    (result(server_error="pingpong: accept: Resource temporarily unavailable"), "server failed"),
    (result(echoed=7), "echoed 7"),
    (result(peer=None), "no peer"),
    (result(peer=HOST), "not translated"),                 # a NAT that let the inside address out
    (result(peer="198.18.77.16"), "not translated"),       # just outside the /28
    (result("noop", peer="198.18.77.1"), "untranslated"),  # the no-op must not translate
])
def test_rejects(r, why):
    with pytest.raises(AssertionError, match=why):
        bench.check_passed(r, POOL, HOST, COUNT, CONNS)


def test_the_ratio_line_is_one_json_line():
    p = lambda v: {"p50_us": v, "p99_us": 2 * v, "p999_us": 4 * v}  # noqa: E731
    summary = {"linux": {"persist_64": p(40.0)}, "noop_packet_mmap": {"persist_64": p(50.0)},
               "hypernat_packet_mmap": {"persist_64": p(60.0)}, "loopback": {"persist_64": p(10.0)}}
    line = bench.ratio_line(summary)
    assert "\n" not in line and line.startswith("LATENCY_RATIOS ")
    got = json.loads(line.split(" ", 1)[1])
    assert got == {f"persist_64_{q}_hypernat_packet_mmap_over_{b}": r
                   for q in ("p50", "p99", "p999") for b, r in (("linux", 1.5), ("noop", 1.2))}


def test_percentiles():
    p = pingpong.percentiles(np.arange(1, 1001, dtype=np.float64))
    assert p["n"] == 1000 and p["p50_us"] == 500.5 and p["max_us"] == 1000.0
    assert p["p50_us"] < p["p99_us"] < p["p999_us"] <= p["max_us"]


def test_client_output_parsing():
    ok = pingpong.parse_client("1500\n2500\ndone 2\n", "", 0, 2)
    assert ok["error"] is None and list(ok["us"]) == [1.5, 2.5]
    cut = pingpong.parse_client("1500\n", "pingpong: no echo (exchange 1): Resource temporarily unavailable", 1, 2)
    assert "no echo" in cut["error"] and len(cut["us"]) == 0
    s = pingpong.parse_server("listening\npeer 198.18.77.2\npeer 198.18.77.3\nserved conns=2 exchanges=9\n", "", 0)
    assert s == {"peers": ["198.18.77.2", "198.18.77.3"], "conns": 2, "exchanges": 9, "error": None}


def needs_lab(f):
    """The testbed (root, namespaces: the ``netns`` marker skips without) and what the
    benchmark itself needs."""
    return pytest.mark.netns(pytest.mark.skipif(bool(bench.unavailable_reason()),
                                                reason=str(bench.unavailable_reason()))(f))


@pytest.fixture
def lo_ns():
    from pyroute2 import netns as pr_netns

    name = f"hn-t{os.getpid()}-pp"
    pr_netns.create(name)
    netns.run(name, ["ip", "link", "set", "lo", "up"])
    yield name
    pr_netns.remove(name)


@needs_lab
def test_pingpong_on_loopback(lo_ns):
    """The compiled client and server for real: every exchange timed and echoed, the
    server names its peer; per connection too."""
    exe = pingpong.build()
    for mode, n, conns in (("persist", 200, 1), ("conn", 20, 20 + bench.WARMUP)):
        srv = pingpong.Server(exe, lo_ns, "127.0.0.1", 7101, 64, conns, 2000).start()
        try:
            c = pingpong.run_client(exe, lo_ns, "127.0.0.1", "127.0.0.1", 7101, 64, n, mode, 2000, bench.WARMUP)
            s = srv.finish(10)
        finally:
            srv.kill()
        r = {"label": "loopback", "mode": "loopback", "tests": {"persist_64" if mode == "persist" else "conn_64":
                                                                {**c, "server": s}}}
        bench.check_passed(r, POOL, HOST, 200, 20)
        assert (c["us"] > 0).all() and s["conns"] == conns


@needs_lab
def test_a_silent_path_fails_in_bounded_time(lo_ns):
    """Frames dropped on the way: the client gives up after its timeout with a message,
    and the benchmark's verdict rejects the run."""
    import time

    netns.run(lo_ns, ["nft", "-f", "-"], input_="table inet t {\n chain o {\n  type filter hook output priority 0;\n"
                                                "  tcp dport 7102 drop\n }\n}\n")
    exe = pingpong.build()
    srv = pingpong.Server(exe, lo_ns, "127.0.0.1", 7102, 64, 1, 300).start()
    try:
        t0 = time.monotonic()
        c = pingpong.run_client(exe, lo_ns, "127.0.0.1", "127.0.0.1", 7102, 64, 10, "persist", 300, 0)
        assert time.monotonic() - t0 < 5
    finally:
        srv.kill()
    assert c["error"] and "connect" in c["error"]
    r = {"label": "x", "mode": "hypernat", "tests": {"persist_64": {**c, "server": {"peers": [], "error": None,
                                                                                    "exchanges": 0}}}}
    with pytest.raises(AssertionError, match="client failed"):
        bench.check_passed(r, POOL, HOST, 10, 10)


@needs_lab
@pytest.mark.timeout(60)
def test_a_nat_that_does_not_translate_fails_the_benchmark():
    """A real lab whose NAT rule is gone (Linux forwards the inside address untranslated,
    and inet has no route back to it): the exchange fails and the verdict says so."""
    from hypernat.lab.benchkit import one_nic_lab, tag
    from hypernat.lab.peer import TABLE

    exe = pingpong.build()
    with one_nic_lab(tag("tlat", "linux", "p"), "linux", "packet_mmap", rt=0) as lab:
        topo, a = lab.topo, lab.topo.addr
        netns.run(topo.gw, ["nft", "delete", "table", "ip", TABLE])
        r = {"label": "linux", "mode": "linux", "tests": {
            "persist_64": bench.exchange(exe, topo.vpc, topo.inet, a.host(0), a.server(0), 7103, "persist", 64, 20)}}
    with pytest.raises(AssertionError, match="linux persist_64: the (client|server) failed"):
        bench.check_passed(r, a.pool, a.host(0), 20, 20)

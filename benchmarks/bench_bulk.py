"""Bulk TCP through the gateway at MTU 1500 and 9000, offloads on: HyperNAT against
Linux's own NAT and against the no-op forwarder, same run.

The paper's last end-to-end claim (issue 5): on bulk transfers HyperNAT keeps up with
the kernel's NAT given the same offload settings (target ≥ 1.0×).  The testbed is the
one of bench_e2e.py, one NIC; only what sits in ``gw`` changes between modes:

    hn-T-vpc                  hn-T-gw                                    hn-T-inet
    iperf3 client ─► nic0 ══ inside0 ┤ linux NAT | no-op | HyperNAT ├ outside0 ══ nic0 ─► iperf3 server
    10.77.0.1, -P 4          MTU 1500 / 9000; checksum/TSO/GSO on          198.51.100.1:5201
    MSS = MTU - 40           every veth end (the lab's setting; off for AF_XDP)

* traffic: iperf3 (``-J``), ``-P 4`` TCP streams from a VPC host to a server, MSS
  from MTU 1500; the rate is iperf3's receiver-side sum (bytes the server's
  application got), so a stream that stalls or retransmits costs what it costs;
* offloads on, as on any Linux box: super-frames cross the gateway whole (PACKET_MMAP
  reads and writes them with their virtio_net_hdr; Linux forwards them as they are);
  AF_XDP is per-frame and runs with offloads off;
* CPUs: one core for the gateway, kernel work included (``hypernat.lab.benchkit.one_nic_lab``,
  as every end-to-end benchmark): RPS of the gateway's links → CPU 1 (Linux's NAT runs
  there, and the AF_PACKET copy), RPS of the far ends → CPU 0, threaded NAPI on the
  gateway's links pinned to CPU 1 at SCHED_FIFO one step below the forwarder; the
  forwarder process (no-op, or HyperNAT's NIC daemon), every thread of it, pinned there
  too at SCHED_FIFO ``HYPERNAT_BULK_RT`` (default 10; 0 = normal); both iperf3 ends run
  on CPU 0.  With two cores the endpoints' TCP stacks and the gateway each get one: the
  figures are the gateway's ceiling only while CPU 0 is not the bottleneck — compare
  the same run's modes (the no-op forwarder is the I/O path's own ceiling), not
  absolute Gbit/s;
* AF_XDP on veth: attaching XDP gives the receiving veth a NAPI; threaded and pinned
  to CPU 1 (above), the redirect into the socket runs on the gateway's core, like the
  other modes' receive work (``kernel`` in the results shows where it ran);
* translation is checked, not assumed: the server's own JSON names the address its
  connections came from, which must be in the pool for ``linux`` and ``hypernat``
  and the VPC host itself for ``noop`` (plain routing);
* CPU: how busy each core was during the transfer (/proc/stat, everyone's work), NET_RX
  softirq runs per CPU and the NAPI threads' CPU time and CPU (``kernel``), and what the
  forwarder's I/O did (``io``: frames and super-frames per receive batch, per transmit
  kick, receive-ring drops) are recorded per mode, so a reader can tell a gateway-bound
  figure (CPU 1 ~100%) from an endpoint-bound one (CPU 0);
* rounds: every mode once per round, modes interleaved (a burst of load from elsewhere
  on this shared machine hits all alike), the median round per mode reported, with
  its ratio to Linux's NAT of the same run.

    .venv/bin/python -m pytest benchmarks/bench_bulk.py -s                   (as root)
    HYPERNAT_BULK_MTUS=1500 ...                                               one MTU only
    HYPERNAT_BULK_RX_RINGS=v2,v3 ...                          PACKET_MMAP modes on both receive rings
    (the last line printed: ``BULK_RATIOS {...}``, the same run's ratios)
    HYPERNAT_BULK_SECONDS=8 HYPERNAT_BULK_ROUNDS=5 ...                        longer, more rounds
    .venv/bin/python -m pytest benchmarks/bench_bulk.py --benchmark-disable   CI: 1 s per mode,
                                                   asserts bytes flowed through every mode, no speed
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time

import pytest

from hypernat.lab import netns
from hypernat.lab.preflight import netns_unavailable_reason

SECONDS = float(os.environ.get("HYPERNAT_BULK_SECONDS", "5"))
ROUNDS = int(os.environ.get("HYPERNAT_BULK_ROUNDS", "3"))
STREAMS = int(os.environ.get("HYPERNAT_BULK_STREAMS", "4"))
RT_PRIORITY = int(os.environ.get("HYPERNAT_BULK_RT", "10"))
OMIT = 1  # seconds of slow start iperf3 leaves out of its figures (timed runs only)
MTUS = [int(x) for x in os.environ.get("HYPERNAT_BULK_MTUS", "1500,9000").split(",")]
# PACKET_MMAP receive rings to compare (the first is the default; others add modes `..._v3`)
RX_RINGS = os.environ.get("HYPERNAT_BULK_RX_RINGS", "v2").split(",")
MTU = MTUS[0]
PORT = 5201
ENDPOINT_CPU, GW_CPU = 0, 1
CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "testbed.yaml")

pytestmark = pytest.mark.netns


def unavailable_reason() -> str | None:
    """Why this benchmark cannot run here (None: it can)."""
    reason = netns_unavailable_reason()
    if reason:
        return reason
    if shutil.which("iperf3") is None:
        return "iperf3 is not installed (tools/install-deps.sh installs it)"
    if shutil.which("ethtool") is None:
        return "ethtool is not installed (the lab turns offloads off with it)"
    if os.cpu_count() < 2:
        return "needs 2 CPUs: one for the iperf3 ends, one for the gateway"
    return None


def runs(mtu: int = 1500) -> list:
    """(label, lab mode, I/O backend) of every mode to compare; AF_XDP where built and
    the MTU fits its 2048-byte frames (multi-buffer AF_XDP is not implemented)."""
    out = [("linux", "linux", "packet_mmap"), ("noop_packet_mmap", "noop", "packet_mmap"),
           ("hypernat_packet_mmap", "hypernat", "packet_mmap")]
    for ring in RX_RINGS[1:]:  # (labels name the ring: measure() reads it from there)
        out += [(f"noop_packet_mmap_{ring}", "noop", "packet_mmap"), (f"hypernat_packet_mmap_{ring}", "hypernat", "packet_mmap")]
    try:
        import hypernat.io.af_xdp  # noqa: F401
    except ImportError:
        return out
    if mtu > 1500:
        return out
    return out + [("noop_af_xdp", "noop", "af_xdp"), ("hypernat_af_xdp", "hypernat", "af_xdp")]


def _wait_listening(ns: str, port: int, server: subprocess.Popen, timeout: float = 5.0) -> None:
    """Until something listens on TCP `port` in `ns` (the iperf3 server is up)."""
    deadline = time.monotonic() + timeout
    while True:
        p = netns.run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        if p.stdout.strip():
            return
        if server.poll() is not None:
            raise RuntimeError(f"iperf3 server in {ns} exited with {server.returncode}: {server.stderr.read()!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"iperf3 server in {ns} not listening on {port} after {timeout:g} s")
        time.sleep(0.05)


def iperf3(topo, seconds: float, streams: int = STREAMS, omit: int = 0, cpu: int | None = ENDPOINT_CPU,
           mtu: int = MTU) -> dict:
    """One iperf3 run from VPC host 0 to server 0 through the lab: both JSON reports.

    Returns ``{"client": ..., "server": ...}`` (iperf3's ``-J`` documents).  The
    server runs once (``-1``) and exits with the client; if the client hangs, both are
    killed at a deadline and the error says so."""
    a = topo.addr
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    server = subprocess.Popen(netns.exec_argv(topo.inet, pin + ["iperf3", "-s", "-1", "-J", "-B", a.server(0),
                                                                "-p", str(PORT)]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_listening(topo.inet, PORT, server)
        client = netns.run(topo.vpc, pin + ["iperf3", "-c", a.server(0), "-B", a.host(0), "-p", str(PORT), "-J",
                                            "-t", f"{seconds:g}", "-O", str(omit), "-P", str(streams),
                                            "-M", str(mtu - 40), "--connect-timeout", "3000"],
                           check=False, timeout=seconds + omit + 30)
        out, err = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 9)
            server.wait()
    try:
        c = json.loads(client.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 client wrote no JSON (exit {client.returncode}): "
                           f"{client.stderr.strip()!r}") from None
    try:
        s = json.loads(out)
    except json.JSONDecodeError:
        s = {"error": f"server wrote no JSON (exit {server.returncode}): {err.strip()!r}"}
    return {"client": c, "server": s}


def summarize(label: str, mode: str, backend: str, rep: dict) -> dict:
    """The figures of one iperf3 run; ``error`` is None only if both ends report none."""
    c, s = rep["client"], rep["server"]
    error = c.get("error") or s.get("error")
    end = c.get("end", {})
    recv, sent = end.get("sum_received", {}), end.get("sum_sent", {})
    peers = sorted({x.get("remote_host") for x in s.get("start", {}).get("connected", [])} - {None})
    return {"label": label, "mode": mode, "backend": backend, "error": error,
            "gbps": recv.get("bits_per_second", 0.0) / 1e9, "bytes": recv.get("bytes", 0),
            "retransmits": sent.get("retransmits"), "seconds": recv.get("seconds", 0.0),
            "streams": len(end.get("streams", [])), "server_saw": peers}


def measure(label: str, mode: str, backend: str, seconds: float, omit: int = 0, rt: int = RT_PRIORITY,
            mtu: int = MTU) -> dict:
    """Build a one-NIC lab in `mode` (``hypernat.lab.benchkit``: the gateway on one
    core), run iperf3 through it, remove it.  Offloads stay on (checksum, TSO, GSO)
    except for AF_XDP, which is per-frame."""
    from hypernat.lab import benchkit

    ring = next((r for r in RX_RINGS[1:] if label.endswith(f"_{r}")), RX_RINGS[0])
    with benchkit.one_nic_lab(benchkit.tag("bk", mode, backend), mode, backend, gw_cpu=GW_CPU,
                              ends_cpu=ENDPOINT_CPU, rt=rt, mtu=mtu, rx_ring=ring) as lab:
        io0 = benchkit.io_counters(lab) if mode == "hypernat" else {}
        lab.mark()
        rep = iperf3(lab.topo, seconds, omit=omit, mtu=mtu)
        r = summarize(label, mode, backend, rep)
        r["mtu"] = mtu
        # Is the gateway's core the limit (busy ~1.0) or the endpoints' (CPU 0)?
        r["cpu"], r["kernel"] = lab.cpu(), lab.kernel()
        r["napi_threads"] = len(lab.steered["napi_threads"])
        r["io"] = benchkit.io_summary(benchkit.io_counters(lab), io0) if mode == "hypernat" else None
    if mode == "noop":  # its counters: written when the lab stopped it
        r["io"] = benchkit.io_summary(benchkit.io_counters(lab))
    return r


def check_flowed(r: dict, pool: str, internal_host: str) -> None:
    """Bytes went through this mode, without error, translated as the mode must."""
    where = f"{r['label']}: "
    assert r["error"] is None, where + f"iperf3 reported {r['error']!r}"
    assert r["bytes"] > 0, where + "iperf3's server received no bytes"
    assert r["streams"] == STREAMS, where + f"{r['streams']} of {STREAMS} streams reported"
    assert r["server_saw"], where + "the server's report names no peer"
    for peer in r["server_saw"]:
        if r["mode"] == "noop":
            assert peer == internal_host, where + f"no-op should route untranslated, server saw {peer}"
        else:
            assert ipaddress.ip_address(peer) in ipaddress.ip_network(pool), \
                where + f"server saw {peer}, not a pool address of {pool}: not translated"


def ratio_line(results: dict) -> str:
    """The same run's ratios as one line a script can read: ``BULK_RATIOS {json}`` with
    HyperNAT / Linux NAT and HyperNAT / no-op per I/O path and MTU."""
    out = {}
    for mtu, res in sorted(results.items()):
        lin = res.get("linux", {}).get("gbps")
        for io in ["packet_mmap"] + [f"packet_mmap_{r}" for r in RX_RINGS[1:]] + ["af_xdp"]:
            h, n = res.get(f"hypernat_{io}"), res.get(f"noop_{io}")
            if h and lin:
                out[f"mtu{mtu}_hypernat_{io}_over_linux"] = round(h["gbps"] / lin, 3)
            if h and n and n["gbps"]:
                out[f"mtu{mtu}_hypernat_{io}_over_noop"] = round(h["gbps"] / n["gbps"], 3)
        for ring in RX_RINGS[1:]:  # the default receive ring over the other, same run
            for m in ("noop", "hypernat"):
                a, b = res.get(f"{m}_packet_mmap"), res.get(f"{m}_packet_mmap_{ring}")
                if a and b and b["gbps"]:
                    out[f"mtu{mtu}_{m}_{RX_RINGS[0]}_over_{ring}"] = round(a["gbps"] / b["gbps"], 3)
    return "BULK_RATIOS " + json.dumps(out, sort_keys=True)


def test_bulk_tcp_vs_linux_nat(benchmark):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    from hypernat.lab.topology import Addressing

    addr = Addressing.from_config(CONF)
    timed = benchmark.enabled
    seconds, omit, rounds = (SECONDS, OMIT, ROUNDS) if timed else (1.0, 0, 1)  # CI: once, short
    mtus = MTUS if timed else MTUS[:1]
    samples = {(mtu, label): [] for mtu in mtus for label, _, _ in runs(mtu)}

    def run():
        for _ in range(rounds):
            for mtu in mtus:
                for label, mode, backend in runs(mtu):
                    samples[(mtu, label)].append(measure(label, mode, backend, seconds, omit, mtu=mtu))

    benchmark.pedantic(run, rounds=1, iterations=1)

    for rs in samples.values():
        for r in rs:
            check_flowed(r, addr.pool, addr.host(0))
    results = {}
    for (mtu, label), rs in samples.items():
        rs.sort(key=lambda r: r["gbps"])
        results.setdefault(mtu, {})[label] = rs[len(rs) // 2]
    info = benchmark.extra_info
    info.update(rounds=rounds, seconds=seconds, streams=STREAMS, mtus=mtus, rt_priority=RT_PRIORITY,
                load_average=os.getloadavg(),
                offloads="on (af_xdp: off, per-frame)")
    for mtu, res in results.items():
        for label, r in res.items():
            key = f"mtu{mtu}_{label}"
            info[f"{key}_gbps"] = round(r["gbps"], 3)
            info[f"{key}_gbps_rounds"] = [round(x["gbps"], 3) for x in samples[(mtu, label)]]
            info[f"{key}_retransmits"] = r["retransmits"]
            info[f"{key}_cpu"] = {f"cpu{c}": v for c, v in r["cpu"].items()}
            info[f"{key}_kernel"] = r["kernel"]
            if r["io"]:
                info[f"{key}_io"] = r["io"]
    line = ratio_line(results)
    info.update(json.loads(line.split(" ", 1)[1]))
    print("\n" + json.dumps(info, indent=1))
    print(line)

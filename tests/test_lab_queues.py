"""One worker per queue: ``hypernat lab up --queues 2`` builds one port pair whose veths
have two queues each, and two hypernat-nic workers serve queue 0 and queue 1 of the
same interfaces, each with its own partition (two NIC entries naming ``queue``), on
PACKET_MMAP (a socket filter keeps each worker's queue) and on AF_XDP (each worker's
socket bound to its queue; the port's one XDP program redirects by receive queue).

    vpc ─ nic0 ══ inside0 [q0: worker 0 | q1: worker 1] outside0 ══ nic0 ─ inet
          flows spread over the queues by the sender's flow hash (RSS, as a NIC would),
          independently per direction: a connection whose reply lands on the other
          queue is translated there by a clone (two-direction consistency)

Linux TCP either connects through the gateway or it does not; every queue is used;
some connections crossed queues (clones installed).
"""
import asyncio
import os
import time

import pytest
import yaml

from hypernat.lab import cli, traffic
from hypernat.lab.topology import Addressing, Topology

pytestmark = pytest.mark.netns
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "testbed-queues.yaml")


@pytest.mark.parametrize("backend", ["packet_mmap", "af_xdp"])
def test_two_workers_serve_the_two_queues_of_one_port(tmp_path, backend):
    if backend == "af_xdp":
        pytest.importorskip("hypernat.io.af_xdp", reason="hypernat.io._xsk not built (libxdp/libbpf missing)")
    with open(CONF) as f:
        doc = yaml.safe_load(f)
    assert [n["queue"] for n in doc["nics"]] == [0, 1]
    for n in doc["nics"]:
        n["io"] = backend  # AF_XDP: each worker's socket on its queue, one XDP program for the port
    doc["state_dir"] = str(tmp_path / "state")
    conf = str(tmp_path / "gw-queues.yaml")
    with open(conf, "w") as f:
        yaml.safe_dump(doc, f)
    topo = Topology(tag=f"t{os.getpid()}ioq", nics=1, queues=2, mode="hypernat", addr=Addressing.from_config(conf),
                    offloads=backend != "af_xdp")  # AF_XDP is per-frame
    try:
        topo.up()
        cli.start_gateway(topo, conf)

        async def go():
            return (await traffic.tcp_echo(topo, n_conns=60, seed=5, timeout=60, sniff=False),
                    await traffic.udp_echo(topo, n_flows=10))

        tcp, udp = asyncio.run(go())
        assert tcp.summary()["intact"] == 60, tcp.summary()
        assert udp["answered"] == 10, udp
        time.sleep(1.3)  # the NICs send STATS every second
        c = cli.gateway_counters(topo)
        with cli._ctl(topo) as ctl:
            nics = ctl.query("counters")["per_nic"]
        per_nic = {k: sum(v for name, v in nics[k].items() if "translated" in name and isinstance(v, int))
                   for k in ("nic0", "nic1")}
        assert all(v > 0 for v in per_nic.values()), (per_nic, c)  # every queue used
        assert sum(v for k, v in c.items() if "clones_installed" in k) > 0, c  # TDC across queues
    finally:
        topo.down()

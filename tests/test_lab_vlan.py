"""A VLAN-tagged VPC through the testbed: the inside link carries 802.1Q tag 42 (the
VPC side tags with tc BPF, lab/vlan.py), the gateway's inside port is configured for
VLAN 42 (``inside_vlans``), offloads on.

    vpc ─[tag 42]═ nic0 ══ inside0 [HyperNAT, PACKET_MMAP | AF_XDP] outside0 ══ nic0 ─ inet
                                    restores the tag the kernel took off, sends
                                    toward the VPC with tag 42, toward inet untagged

(PACKET_MMAP: from ``tp_vlan_tci``; AF_XDP: the XDP program asks the driver for the
tag it took off, ``bpf_xdp_metadata_rx_vlan_tag``, and puts it back in the frame.)

Linux TCP either connects through the gateway or it does not; a watcher on the VPC's
link end (a PACKET_MMAP port of VLAN 42, receive only) sees every frame coming back
from the gateway tagged, none untagged.
"""
import asyncio
import os
import time

import pytest
import yaml

from hypernat.lab import cli, netns, traffic
from hypernat.lab.topology import Addressing, Topology

pytestmark = pytest.mark.netns
packet_mmap = pytest.importorskip("hypernat.io.packet_mmap")
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "testbed.yaml")
VLAN = 42


@pytest.mark.parametrize("backend", ["packet_mmap", "af_xdp"])
def test_a_vlan_tagged_vpc_through_hypernat(tmp_path, backend):
    if backend == "af_xdp":
        pytest.importorskip("hypernat.io.af_xdp", reason="hypernat.io._xsk not built (libxdp/libbpf missing)")
    with open(CONF) as f:
        doc = yaml.safe_load(f)
    doc["nics"] = [dict(doc["nics"][0], inside_vlans=[VLAN], io=backend)]
    doc["state_dir"] = str(tmp_path / "state")
    conf = str(tmp_path / "gw-vlan.yaml")
    with open(conf, "w") as f:
        yaml.safe_dump(doc, f)
    topo = Topology(tag=f"t{os.getpid()}iovl", nics=1, mode="hypernat", addr=Addressing.from_config(conf),
                    vlan=VLAN, offloads=backend != "af_xdp")  # AF_XDP is per-frame
    watcher = None
    try:
        topo.up()
        with netns.entered(topo.vpc):
            watcher = packet_mmap.PacketMmapPort(topo.far(0), tx=False, vlans=(VLAN,), rx_frames=256)
        cli.start_gateway(topo, conf)

        async def go():
            return (await traffic.tcp_echo(topo, n_conns=20, seed=3, timeout=60, sniff=False),
                    await traffic.udp_echo(topo, n_flows=5))

        tcp, udp = asyncio.run(go())
        assert tcp.summary()["intact"] == 20, tcp.summary()
        assert udp["answered"] == 5, udp
        seen = {"rx_vlan_restored": 0, "rx_vlan_missing": 0}
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            b = watcher.recv(256)
            if b is None:
                time.sleep(0.01)
                continue
            watcher.release(b)
        st = watcher.stats()
        assert st["rx_vlan_restored"] > 40 and st["rx_vlan_missing"] == 0, st
        time.sleep(1.3)  # the NIC sends STATS every second
        c = cli.gateway_counters(topo)
        restored = sum(v for k, v in c.items() if "rx_vlan_restored" in k)
        assert restored > 40, c
        assert sum(v for k, v in c.items() if "rx_vlan_unconfigured" in k or "rx_vlan_missing" in k) == 0, c
    finally:
        if watcher is not None:
            watcher.close()
        topo.down()
        for name in ("coord", "nic-0"):
            p = os.path.join(os.path.dirname(topo.state_path()), f"{topo.tag}-{name}.log")
            if os.path.exists(p):
                os.unlink(p)

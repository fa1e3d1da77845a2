"""What the tests on real veth pairs share: a network namespace of their own with veth
pairs in it, up, set up as asked, removed at the end whatever the test did (pyroute2)."""
import contextlib

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from hypernat.lab import netns

OFFLOADS = ("rx", "tx", "tso", "gso", "gro")


@contextlib.contextmanager
def veth_namespace(name, pairs, *, addresses=None, macs=None, queues=0, offloads=True, ipv6=True):
    """Namespace `name` holding the veth `pairs` [(one end, the other), ...], every end
    up; yields `name`.  `addresses` {end: "a.b.c.d/len"} and `macs` {end: "02:..."} are
    set on those ends; `queues` > 0 gives each end that many receive and transmit
    queues; ``offloads=False`` turns checksum offload, TSO, GSO and GRO off (ethtool:
    frames leave as built); ``ipv6=False`` turns IPv6 off in the namespace (no router
    solicitations or DAD frames in the rings)."""
    addresses, macs = addresses or {}, macs or {}
    pr_netns.create(name)
    try:
        if not ipv6:
            for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
                netns.sysctl(name, key, 1)
        q = {"num_rx_queues": queues, "num_tx_queues": queues} if queues else {}
        with IPRoute(netns=name) as ipr:
            for a, b in pairs:
                ipr.link("add", ifname=a, kind="veth", **q, peer={"ifname": b, **q})
            for end in [e for pair in pairs for e in pair]:
                idx = ipr.link_lookup(ifname=end)[0]
                if end in macs:
                    ipr.link("set", index=idx, address=macs[end])
                if end in addresses:
                    addr, plen = addresses[end].split("/")
                    ipr.addr("add", index=idx, address=addr, prefixlen=int(plen))
                ipr.link("set", index=idx, state="up")
                if not offloads:
                    off = [x for o in OFFLOADS for x in (o, "off")]
                    netns.run(name, ["ethtool", "-K", end, *off], check=False)
        yield name
    finally:
        pr_netns.remove(name)

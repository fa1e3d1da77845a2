"""The VPC router's controller: the servers' default routes (BGP) -> a Linux resilient
nexthop group, so that a server's failure or return moves only the hosts that must move.

FRR 8.4 installs BGP multipath as a plain hash group: when a member comes or goes the
kernel rehashes every flow, and a host whose hash lands on another server gets a new
external address (its live connections break).  Linux's *resilient* groups (5.13+)
keep a table of buckets instead::

    host ─src-address hash─► bucket (of B) ─► next hop (a server)
    a member leaves   : only its buckets are given to the others, at once
    a member arrives  : it takes buckets only as they fall idle (idle_timer); busy
                        buckets (hosts with traffic) stay where they are
    a member drains   : weight 1 against 256: it wants no bucket, so its idle buckets
                        go to the others and its busy ones stay (unbalanced_timer 0)

The router hashes on the source address alone (``fib_multipath_hash_policy=3``,
``fib_multipath_hash_fields=0x1``): one host, one bucket, one server, one external
address -- endpoint-independent mapping holds across the fleet.

This controller runs inside the router's namespace beside FRR.  It reads the BGP
paths for the default route (``show bgp ipv4 unicast 0.0.0.0/0 json``: every path,
with its community, GRACEFUL_SHUTDOWN = draining), and programs one resilient group
and the route ``default nhid G`` in a table of its own, looked up for traffic from the
internal prefixes (``ip rule from I lookup T``).  It wakes on every kernel route change
(netlink: zebra's update follows bgpd's withdrawal at once) and at least every
``resync`` seconds.  FRR's own route in the main table stays, unused by the hosts.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import select
import subprocess
import sys
import time

from .frr import FrrError, FrrInstance

log = logging.getLogger("hypernat.fleet.resilient")

WEIGHT = 256  # a serving server
WEIGHT_DRAINING = 1  # against 256 it rounds to no bucket (buckets <= 128 per two servers)
# Nexthop object ids: between zebra's own (small ones for single next hops, from 0x1E0000
# for its groups).  Each server is two members of the group ("twins", same gateway): a
# group of one member picks no path by hash, and so marks no bucket busy -- a server
# returning next to a lone survivor would then take busy buckets and break connections.
NH_ID_BASE = 1_000_000
TWINS = 2


def nexthops_from_bgp(paths_json: dict) -> dict:
    """{next hop address: weight} from ``show bgp ipv4 unicast PREFIX json``: every valid
    path; one carrying GRACEFUL_SHUTDOWN (65535:0) is draining."""
    out = {}
    for p in paths_json.get("paths", []) or []:
        if not p.get("valid"):
            continue
        comm = (p.get("community") or {}).get("list", []) or []
        draining = "gracefulShutdown" in comm or "65535:0" in comm
        for nh in p.get("nexthops", []) or []:
            if nh.get("accessible", True) and nh.get("ip"):
                w = WEIGHT_DRAINING if draining else WEIGHT
                out[nh["ip"]] = max(out.get(nh["ip"], 0), w)
    if out and all(w == WEIGHT_DRAINING for w in out.values()):
        out = dict.fromkeys(out, WEIGHT)  # every server draining: spread over them all the same
    return out


def _ip(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=5)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def _batch(cmds: list, check: bool) -> None:
    p = subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(cmds) + "\n", capture_output=True, text=True,
                       timeout=5)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip -batch {cmds}: {p.stderr.strip()}")


class ResilientRoutes:
    """Programs the group; `apply(nexthops)` is idempotent and moves only what changed."""

    def __init__(self, internal, *, table: int = 50, group_id: int = 50, buckets: int = 128,
                 idle_timer: float = 2.0, rule_pref: int = 100):
        self.internal = [str(ipaddress.ip_network(n)) for n in internal]
        self.table, self.group_id, self.buckets, self.idle_timer = table, group_id, buckets, idle_timer
        self.rule_pref = rule_pref
        self.current: dict = {}
        self.members: dict = {}  # next hop address -> nexthop object id
        self.changes = 0

    def setup(self) -> None:
        for i, net in enumerate(self.internal):
            _ip("rule", "del", "pref", str(self.rule_pref + i), check=False)
            _ip("rule", "add", "pref", str(self.rule_pref + i), "from", net, "lookup", str(self.table))
        _ip("route", "replace", "unreachable", "default", "table", str(self.table))

    @staticmethod
    def nh_ids(addr: str) -> tuple:
        base = NH_ID_BASE + TWINS * (int(ipaddress.IPv4Address(addr)) & 0xFFFF)
        return tuple(base + j for j in range(TWINS))

    def apply(self, nexthops: dict) -> bool:
        """Program the group for `nexthops` ({address: weight}); one ``ip -batch`` for the
        change (a failure's withdrawal costs one process, not one per command)."""
        if nexthops == self.current:
            return False
        t = str(self.table)
        cmds, cleanup = [], []
        if not nexthops:
            cmds.append(f"route replace unreachable default table {t}")
            cleanup.append(f"nexthop del id {self.group_id}")
        else:
            for addr in nexthops:
                if addr not in self.members:
                    dev = _ip("route", "get", addr).stdout.split(" dev ")[1].split()[0]
                    cmds += [f"nexthop replace id {i} via {addr} dev {dev}" for i in self.nh_ids(addr)]
                    self.members[addr] = self.nh_ids(addr)
            group = "/".join(f"{i},{w}" for a, w in sorted(nexthops.items()) for i in self.members[a])
            timers = f"idle_timer {self.idle_timer:g} unbalanced_timer 0"
            if self.current:
                cmds.append(f"nexthop replace id {self.group_id} group {group} type resilient {timers}")
            else:
                _ip("nexthop", "del", "id", str(self.group_id), check=False)
                cmds.append(f"nexthop add id {self.group_id} group {group} type resilient buckets {self.buckets} {timers}")
            cmds.append(f"route replace default nhid {self.group_id} table {t}")
        for addr in [a for a in self.members if a not in nexthops]:
            cleanup += [f"nexthop del id {i}" for i in self.members.pop(addr)]
        _batch(cmds, check=True)
        if cleanup:
            _batch(cleanup, check=False)
        log.info("servers %s (was %s)", nexthops or "none", self.current or "none")
        self.current = dict(nexthops)
        self.changes += 1
        return True

    def buckets_by_member(self) -> dict:
        """{next hop address: buckets} as the kernel has them now."""
        out = _ip("nexthop", "bucket", "show", "id", str(self.group_id), check=False).stdout
        by_id = {i: k for k, ids in self.members.items() for i in ids}
        counts: dict = {}
        for line in out.splitlines():
            if " nhid " in line:
                nid = int(line.split(" nhid ")[1].split()[0])
                a = by_id.get(nid, str(nid))
                counts[a] = counts.get(a, 0) + 1
        return counts


def run(frr: FrrInstance, routes: ResilientRoutes, prefix: str = "0.0.0.0/0", resync: float = 1.0,
        stop=lambda: False) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE

    routes.setup()
    with IPRoute() as ipr:
        ipr.bind(groups=RTMGRP_IPV4_ROUTE)
        while not stop():
            try:
                routes.apply(nexthops_from_bgp(frr.json(f"show bgp ipv4 unicast {prefix}")))
            except (FrrError, ValueError, RuntimeError) as exc:
                log.error("%s", exc)
            r, _, _ = select.select([ipr.fileno()], [], [], resync)
            if r:
                ipr.get()  # drain what woke us; the truth is read from bgpd
                time.sleep(0.01)  # let a burst of updates settle


def main(argv=None) -> int:
    import signal

    ap = argparse.ArgumentParser(prog="python -m hypernat.fleet.resilient", description=__doc__.split("\n\n")[0])
    ap.add_argument("--frr-dir", required=True, help="the router's FRR instance directory (vty sockets)")
    ap.add_argument("--internal", action="append", required=True, help="internal prefix (repeat)")
    ap.add_argument("--table", type=int, default=50)
    ap.add_argument("--buckets", type=int, default=128)
    ap.add_argument("--idle-timer", type=float, default=2.0)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    routes = ResilientRoutes(args.internal, table=args.table, buckets=args.buckets, idle_timer=args.idle_timer)
    run(FrrInstance(args.frr_dir), routes, stop=lambda: bool(stop))
    return 0


if __name__ == "__main__":
    sys.exit(main())

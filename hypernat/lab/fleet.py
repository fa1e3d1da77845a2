"""The fleet on the testbed: N gateway servers of M NICs each behind two FRR routers.

::

    hn-T-hosts: hosts 10.77.0.1..H on lo ══ r ══
    hn-T-vpc: VPC router (FRR AS65100)          hn-T-edgeS: server S's edge          hn-T-gwS: server S
                                                 (its switch ports + host kernel,      NIC k = inside<k> / outside<k>
      ip rule from 10.77/16 -> table 50:          FRR speaker AS65001, BFD)            coordinator, NIC daemons
      default nhid 50 = resilient group   ══ s<S> ═ vpc   in<k> ══ inside<k>  [NIC k]
      (src-address hash, controller                in: ECMP (L4) over the NICs
       resilient.py reads bgpd)                    out: ECMP (L4) over the NICs  outside<k> ══ out<k>
    hn-T-inet: Internet router (FRR AS65200) ══ s<S> ═ inet
      servers 198.51.100.1.. on lo, learns each pool prefix from its server

The hosts sit behind the VPC router, not on it: a resilient group marks a bucket busy
when a *forwarded* packet uses it, while a local socket keeps its route cached and
would leave its bucket looking idle.  Link addresses: hosts ↔ vpc 172.29.0.2/.1,
vpc ↔ edge S 172.30.S.1/.2, inet ↔ edge S 172.31.S.1/.2; inside each
server 172.16.k.0/24 and 172.17.k.0/24 as in the one-server lab.  The fleet's pool
(``external.pool`` of the template, conf/testbed.yaml) is cut into N equal prefixes,
one per server.  Every daemon's configuration is derived from the topology and
written into the run's directory (``/run/hypernat-lab/T.d``), beside the logs, FRR's
files and the NICs' state; ``down`` removes all of it.

`fail(S)` SIGKILLs every process of server S (NIC daemons, coordinator, speaker, FRR);
`recover(S)` starts them again; `drain(S)` asks its coordinator to drain, waits for
the speaker to withdraw and then stops the server's daemons (speaker first).
"""
from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from . import netns
from .topology import NS_PREFIX, STATE_DIR, Topology, _terminate

VPC_ASN, INET_ASN, SERVER_ASN = 65100, 65200, 65001
VPC_ROUTER, INET_ROUTER = "vpc-router", "inet-router"
ROUTERS = {VPC_ROUTER: ("vpc", VPC_ASN), INET_ROUTER: ("internet", INET_ASN)}
TABLE = 50  # the VPC router's table for the hosts (resilient group)
GROUP = 50
BUCKETS = 128
IDLE_TIMER = 2.0  # seconds a bucket must be idle before it moves (return, drain)
SERVERS_NET = "198.51.100.0/24"
ECHO_PORT = 7100
# BFD in the lab: 200 ms x 5, a failure seen in 1 s; five packets in a row must be late
# before a session falls (the CI test asserts 0 session-down events in steady state).
# 100 ms x 5 flapped once in a full CI run on a loaded 2-vCPU machine.
BFD_INTERVAL_MS, BFD_MULTIPLIER = 200, 5


class FleetError(RuntimeError):
    pass


def vpc_link(s: int, end: str) -> str:
    return f"172.30.{s}.{1 if end == 'router' else 2}"


def inet_link(s: int, end: str) -> str:
    return f"172.31.{s}.{1 if end == 'router' else 2}"


def split_pool(pool: str, n: int) -> list:
    """The fleet pool cut into n equal prefixes (the next power of two, first n)."""
    net = ipaddress.ip_network(pool)
    bits = max(0, (n - 1).bit_length())
    if net.prefixlen + bits > 32:
        raise FleetError(f"pool {net} cannot be split over {n} servers")
    return [str(p) for p in list(net.subnets(prefixlen_diff=bits))[:n]]


def server_tree(template: dict, s: int, n_servers: int, nics: int, run_dir: str) -> dict:
    """Server s's configuration (1-based), derived from the template and the topology."""
    t = copy.deepcopy(template)
    fleet_pool = t["external"]["pool"]
    fleet_pool = fleet_pool if isinstance(fleet_pool, list) else [fleet_pool]
    own = split_pool(fleet_pool[0], n_servers)[s - 1]
    d = os.path.join(run_dir, f"gw{s}")
    t["external"]["pool"] = [own]
    t["nics"] = [{"id": k, "inside": f"inside{k}", "outside": f"outside{k}", "io": "packet_mmap"} for k in range(nics)]
    t["coordinator"] = dict(t.get("coordinator") or {}, endpoint=f"ipc://{d}/coord.sock")
    t["state_dir"] = os.path.join(d, "state")
    if "translation_log" in t:
        t["translation_log"] = dict(t["translation_log"], path=os.path.join(d, "translations.jsonl"))
    t["fleet"] = {
        "server": f"gw{s}", "id": s, "pool": fleet_pool, "asn": SERVER_ASN, "router_id": f"10.255.0.{s}",
        "bfd": {"interval_ms": BFD_INTERVAL_MS, "multiplier": BFD_MULTIPLIER},
        "peers": [
            {"name": VPC_ROUTER, "side": "vpc", "address": vpc_link(s, "router"), "asn": VPC_ASN, "local": vpc_link(s, "server")},
            {"name": INET_ROUTER, "side": "internet", "address": inet_link(s, "router"), "asn": INET_ASN,
             "local": inet_link(s, "server")},
        ],
        "health": {"min_nics_up": 1, "max_utilisation": 0.95, "drain_timeout": 8, "interval": 0.2},
        "frr_dir": os.path.join(d, "frr"),
    }
    return t


def derived_config(template_path: str, nics: int, run_dir: str, io: str | None = None) -> str:
    """A one-server lab's config for `nics` NICs, derived from the template when the
    template names fewer (or other) NICs, or when ``io`` (a backend for every NIC) differs
    from the template's: written into the run's directory."""
    import yaml

    from ..config import load

    cfg = load(template_path)
    # kept as it is when its NICs serve exactly the lab's links, each entry one pair
    # inside<j>/outside<j> (several entries on one pair: one worker per queue of it)
    links = [n.inside[len("inside"):] for n in cfg.nics
             if n.inside.startswith("inside") and n.outside == "outside" + n.inside[len("inside"):]]
    same_io = io is None or all(n.io == io for n in cfg.nics)
    if len(links) == cfg.n_nics and sorted(set(links)) == sorted(str(j) for j in range(nics)):
        if same_io:
            return os.path.abspath(template_path)
        with open(template_path) as f:
            t = yaml.safe_load(f)
        t["nics"] = [dict(n, io=io) for n in t["nics"]]  # the same entries (queues too), another backend
    else:
        with open(template_path) as f:
            t = yaml.safe_load(f)
        t["nics"] = [{"id": k, "inside": f"inside{k}", "outside": f"outside{k}",
                      "io": io or cfg.nics[min(k, cfg.n_nics - 1)].io} for k in range(nics)]
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "gateway.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(t, f, sort_keys=False)
    load(path)  # strict: the derived file is as valid as the template
    return path


def coord_endpoint(tag: str, server: int | None = None) -> str:
    """The coordinator of a lab run (`hypernat ctl --tag T [--server S]`)."""
    run = os.path.join(STATE_DIR, f"{tag}.d")
    if os.path.exists(os.path.join(STATE_DIR, f"{tag}.fleet.json")):
        f = Fleet.load(tag)
        s = server or 1
        if not 1 <= s <= f.servers:
            raise FleetError(f"lab {tag} has servers 1..{f.servers}, not {s}")
        return f"ipc://{run}/gw{s}/coord.sock"
    if server not in (None, 1):
        raise FleetError(f"lab {tag} is one server")
    try:
        return Topology.load(tag).endpoint or f"ipc://{run}/coord.sock"
    except FileNotFoundError:
        raise FleetError(f"no lab {tag!r} on this machine (hypernat lab list)") from None


@dataclass
class Fleet:
    tag: str
    servers: int = 2
    nics: int = 2
    hosts: int = 24
    template: str = "conf/testbed.yaml"
    internal: str = "10.77.0.0/16"
    pool: str = ""
    configs: list = field(default_factory=list)  # the servers' YAML files
    pids: dict = field(default_factory=dict)  # "vpc", "inet", "gw1", ... -> [pid]

    # names --------------------------------------------------------------------------
    @property
    def vpc(self) -> str:
        return f"{NS_PREFIX}{self.tag}-vpc"

    @property
    def inet(self) -> str:
        return f"{NS_PREFIX}{self.tag}-inet"

    @property
    def hostns(self) -> str:
        return f"{NS_PREFIX}{self.tag}-hosts"

    def gw(self, s: int) -> str:
        return f"{NS_PREFIX}{self.tag}-gw{s}"

    def edge(self, s: int) -> str:
        return f"{NS_PREFIX}{self.tag}-edge{s}"

    @property
    def namespaces(self) -> list:
        return [self.hostns, self.vpc, self.inet] + [n for s in self.server_ids for n in (self.edge(s), self.gw(s))]

    @property
    def server_ids(self) -> range:
        return range(1, self.servers + 1)

    def run_dir(self) -> str:
        return os.path.join(STATE_DIR, f"{self.tag}.d")

    def server_dir(self, s: int) -> str:
        return os.path.join(self.run_dir(), f"gw{s}")

    def host(self, i: int) -> str:
        return str(ipaddress.ip_network(self.internal)[1 + i])

    def internet_server(self, i: int = 0) -> str:
        return str(ipaddress.ip_network(SERVERS_NET)[1 + i])

    def server_pool(self, s: int) -> str:
        return split_pool(self.pool, self.servers)[s - 1]

    def server_of(self, external_ip: str) -> int | None:
        a = ipaddress.ip_address(external_ip)
        for s in self.server_ids:
            if a in ipaddress.ip_network(self.server_pool(s)):
                return s
        return None

    # state --------------------------------------------------------------------------
    def state_path(self) -> str:
        return os.path.join(STATE_DIR, f"{self.tag}.fleet.json")

    def save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        with open(self.state_path() + ".tmp", "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(self.state_path() + ".tmp", self.state_path())

    @classmethod
    def load(cls, tag: str) -> "Fleet":
        with open(os.path.join(STATE_DIR, f"{tag}.fleet.json")) as f:
            return cls(**json.load(f))

    # configuration ------------------------------------------------------------------
    def write_configs(self, trees=None) -> list:
        """Write the servers' YAML (derived from the template, or `trees` as given) and
        check them as a fleet against the routers the lab builds; FleetError names every
        problem, before anything is started."""
        import yaml

        from ..config import load
        from ..fleet.spec import load_fleet

        with open(self.template) as f:
            template = yaml.safe_load(f)
        t_pool = template["external"]["pool"]
        self.pool = t_pool[0] if isinstance(t_pool, list) else t_pool
        self.internal = str(load(self.template).internal[0])
        if trees is None:
            trees = [server_tree(template, s, self.servers, self.nics, self.run_dir()) for s in self.server_ids]
        if len(trees) != self.servers:
            raise FleetError(f"{len(trees)} server configuration(s) for {self.servers} servers")
        os.makedirs(self.run_dir(), exist_ok=True)
        paths = []
        for s, t in zip(self.server_ids, trees):
            path = os.path.join(self.run_dir(), f"gw{s}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(t, f, sort_keys=False)
            paths.append(path)
        configs, errs = load_fleet(paths, ROUTERS)
        if not errs:
            for s, c in zip(self.server_ids, configs):
                if c.n_nics != self.nics:
                    errs.append(f"{c.path}: nics: {c.n_nics} NIC(s), the lab builds {self.nics}")
                for p in c.fleet.peers:
                    want = vpc_link(s, "router") if p.side == "vpc" else inet_link(s, "router")
                    if p.address != want:
                        errs.append(f"{c.path}: fleet.peers: {p.name} is at {want} in this lab, not {p.address}")
        if errs:
            raise FleetError("fleet refused:\n  " + "\n  ".join(map(str, errs)))
        self.configs = paths
        return configs

    # build --------------------------------------------------------------------------
    def up(self, trees=None) -> "Fleet":
        from ..fleet import frr

        if not frr.available():
            raise FleetError("FRR is not installed (tools/install-deps.sh installs Debian's frr)")
        if any(os.path.exists(netns.ns_path(n)) for n in self.namespaces) or os.path.exists(self.state_path()):
            raise FleetError(f"lab {self.tag!r} exists already: `hypernat lab down --tag {self.tag}` first")
        if os.path.exists(self.run_dir()):
            shutil.rmtree(self.run_dir())
        configs = self.write_configs(trees)  # refused here: nothing built, nothing announced
        self.save()
        try:
            self._build(configs)
            self._start_routers()
            for s in self.server_ids:
                self.start_server(s)
            self.wait_routes(set(self.server_ids), timeout=30)
        except BaseException:
            self.down()
            raise
        return self

    def _build(self, configs) -> None:
        from pyroute2 import IPRoute
        from pyroute2 import netns as pr_netns

        for n in self.namespaces:
            pr_netns.create(n)
            for key, v in (("net.ipv4.conf.all.rp_filter", 0), ("net.ipv4.conf.default.rp_filter", 0),
                           ("net.ipv6.conf.all.disable_ipv6", 1), ("net.ipv6.conf.default.disable_ipv6", 1)):
                netns.sysctl(n, key, v)
            netns.run(n, ["ip", "link", "set", "lo", "up"])
        # The VPC router hashes hosts by source address only: one host, one server.
        netns.sysctl(self.vpc, "net.ipv4.fib_multipath_hash_policy", 3)
        netns.sysctl(self.vpc, "net.ipv4.fib_multipath_hash_fields", 1)
        netns.sysctl(self.vpc, "net.ipv4.ip_forward", 1)
        netns.sysctl(self.inet, "net.ipv4.ip_forward", 1)
        for i in range(self.hosts):
            netns.run(self.hostns, ["ip", "addr", "add", f"{self.host(i)}/32", "dev", "lo"])
        with IPRoute(netns=self.hostns) as ipr:
            ipr.link("add", ifname="r", kind="veth", peer={"ifname": "hosts", "net_ns_fd": self.vpc})
        for ns, dev, a in ((self.hostns, "r", "172.29.0.2"), (self.vpc, "hosts", "172.29.0.1")):
            netns.run(ns, ["ip", "addr", "add", f"{a}/24", "dev", dev])
            netns.run(ns, ["ip", "link", "set", dev, "up"])
            Topology._offloads_off(ns, dev)
        netns.run(self.hostns, ["ip", "route", "add", "default", "via", "172.29.0.1"])
        netns.run(self.vpc, ["ip", "route", "add", self.internal, "via", "172.29.0.2"])
        for i in range(2):
            netns.run(self.inet, ["ip", "addr", "add", f"{self.internet_server(i)}/32", "dev", "lo"])
        for s, cfg in zip(self.server_ids, configs):
            edge, gw = self.edge(s), self.gw(s)
            netns.sysctl(edge, "net.ipv4.ip_forward", 1)
            netns.sysctl(edge, "net.ipv4.fib_multipath_hash_policy", 1)  # the per-NIC spread: 5-tuple
            netns.sysctl(gw, "net.ipv4.ip_forward", 0)
            with IPRoute(netns=edge) as ipr:
                ipr.link("add", ifname="vpc", kind="veth", peer={"ifname": f"s{s}", "net_ns_fd": self.vpc})
                ipr.link("add", ifname="inet", kind="veth", peer={"ifname": f"s{s}", "net_ns_fd": self.inet})
                for k in range(self.nics):
                    ipr.link("add", ifname=f"in{k}", kind="veth", peer={"ifname": f"inside{k}", "net_ns_fd": gw})
                    ipr.link("add", ifname=f"out{k}", kind="veth", peer={"ifname": f"outside{k}", "net_ns_fd": gw})
            addrs = [(self.vpc, f"s{s}", vpc_link(s, "router")), (edge, "vpc", vpc_link(s, "server")),
                     (self.inet, f"s{s}", inet_link(s, "router")), (edge, "inet", inet_link(s, "server"))]
            for k in range(self.nics):
                addrs += [(edge, f"in{k}", f"172.16.{k}.2"), (gw, f"inside{k}", f"172.16.{k}.1"),
                          (edge, f"out{k}", f"172.17.{k}.2"), (gw, f"outside{k}", f"172.17.{k}.1")]
            for ns, dev, a in addrs:
                netns.run(ns, ["ip", "addr", "add", f"{a}/24", "dev", dev])
                netns.run(ns, ["ip", "link", "set", dev, "up"])
                Topology._offloads_off(ns, dev)
            # The edge: from the VPC router over the NICs' inside ports, from the Internet
            # router over their outside ports (ECMP, 5-tuple); what the NICs send on, by
            # destination (main table).
            ins = [x for k in range(self.nics) for x in ("nexthop", "via", f"172.16.{k}.1", "dev", f"in{k}")]
            outs = [x for k in range(self.nics) for x in ("nexthop", "via", f"172.17.{k}.1", "dev", f"out{k}")]
            netns.run(edge, ["ip", "route", "add", "default", "table", "10", *ins])
            netns.run(edge, ["ip", "route", "add", str(cfg.pool[0]), "table", "20", *outs])
            netns.run(edge, ["ip", "rule", "add", "pref", "100", "iif", "vpc", "lookup", "10"])
            netns.run(edge, ["ip", "rule", "add", "pref", "101", "iif", "inet", "lookup", "20"])
            netns.run(edge, ["ip", "route", "add", "default", "via", inet_link(s, "router")])
            netns.run(edge, ["ip", "route", "add", self.internal, "via", vpc_link(s, "router")])
            # The server: NIC k's next hops (tables 100+k out, 200+k in), IPv4 left to the
            # NIC daemons (as the one-server lab's hypernat mode).
            for k in range(self.nics):
                netns.run(gw, ["ip", "route", "add", "default", "via", f"172.17.{k}.2", "table", str(100 + k)])
                netns.run(gw, ["ip", "route", "add", self.internal, "via", f"172.16.{k}.2", "table", str(200 + k)])
            chains = "\n".join(
                f'    chain in_{d} {{ type filter hook ingress device "{d}" priority 0; policy accept; '
                f"meta protocol ip counter drop; }}" for k in range(self.nics) for d in (f"inside{k}", f"outside{k}"))
            netns.run(gw, ["nft", "-f", "-"], input_=f"table netdev hypernat_gw {{\n{chains}\n}}\n")

    def _start(self, key: str, ns: str, argv: list, log_name: str) -> int:
        logs = os.path.join(self.run_dir(), "logs")
        os.makedirs(logs, exist_ok=True)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(os.path.join(logs, log_name + ".log"), "ab") as out:
            p = subprocess.Popen(netns.exec_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.pids.setdefault(key, []).append(p.pid)
        self.save()
        return p.pid

    def router_frr(self, which: str):
        from ..fleet.frr import FrrInstance

        return FrrInstance(os.path.join(self.run_dir(), f"{which}-frr"), netns=self.vpc if which == "vpc" else self.inet)

    def server_frr(self, s: int):
        from ..fleet.frr import FrrInstance

        return FrrInstance(os.path.join(self.server_dir(s), "frr"), netns=self.edge(s))

    def _start_routers(self) -> None:
        from ..config import load
        from ..fleet.frr import render_router

        bfd = load(self.configs[0]).fleet.bfd
        for which, asn, rid, link in (("vpc", VPC_ASN, "10.254.0.1", vpc_link), ("inet", INET_ASN, "10.254.0.2", inet_link)):
            r = self.router_frr(which)
            r.start(render_router(asn, rid, [(link(s, "server"), SERVER_ASN) for s in self.server_ids], bfd))
            self.pids.setdefault(which, []).extend(p.pid for p in r.procs.values())
        self.save()
        py = sys.executable
        self._start("vpc", self.vpc, [py, "-m", "hypernat.fleet.resilient", "--frr-dir", self.router_frr("vpc").dir,
                                      "--internal", self.internal, "--table", str(TABLE), "--buckets", str(BUCKETS),
                                      "--idle-timer", f"{IDLE_TIMER:g}"], "vpc-resilient")

    def start_server(self, s: int, wait: float = 20.0) -> None:
        """Coordinator, NIC daemons (gw S), then the speaker (edge S)."""
        from ..coord.ctl import CtlClient, CtlError

        py, cfg, d = sys.executable, self.configs[s - 1], self.server_dir(s)
        ep = f"ipc://{d}/coord.sock"
        self.pids[f"gw{s}"] = []
        self._start(f"gw{s}", self.gw(s), [py, "-m", "hypernat.coord", "--config", cfg, "--endpoint", ep], f"gw{s}-coord")
        for k in range(self.nics):
            self._start(f"gw{s}", self.gw(s), [py, "-m", "hypernat.nic", "--config", cfg, "--nic", str(k),
                                               "--endpoint", ep, "--state-dir", os.path.join(d, f"nic{k}")],
                        f"gw{s}-nic{k}")
        deadline = time.monotonic() + wait
        last = "no answer"
        while True:
            try:
                with CtlClient(ep, timeout=1.0) as c:
                    up = c.query("status")["nics_up"]
                if up >= self.nics:
                    break
                last = f"{up} of {self.nics} NICs up"
            except CtlError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise FleetError(f"server {s} did not come up in {wait:g} s ({last}); logs in {self.run_dir()}/logs")
            time.sleep(0.2)
        self._start(f"gw{s}", self.edge(s), [py, "-m", "hypernat.fleet", "--config", cfg, "--endpoint", ep,
                                             "--status", self.status_path(s)], f"gw{s}-speaker")

    def status_path(self, s: int) -> str:
        return os.path.join(self.server_dir(s), "speaker.json")

    def speaker_status(self, s: int) -> dict:
        try:
            with open(self.status_path(s)) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}

    # what the routers see -----------------------------------------------------------
    def group(self) -> dict:
        """The VPC router's resilient group as the kernel has it: {server: weight}."""
        p = netns.run(self.vpc, ["ip", "-j", "nexthop", "show"], check=False)
        rows = json.loads(p.stdout or "[]") if p.returncode == 0 else []
        by_id = {r["id"]: r for r in rows}
        grp = by_id.get(GROUP)
        out = {}
        for m in (grp or {}).get("group", []):
            gw = by_id.get(m["id"], {}).get("gateway")
            if gw:  # (a member deleted between two reads: the next read has it right)
                out[int(gw.split(".")[2])] = m.get("weight", 1)
        return out

    def inet_routes(self) -> set:
        """Servers whose pool the Internet router routes now."""
        p = netns.run(self.inet, ["ip", "-j", "route", "show", "proto", "bgp"], check=False)
        out = set()
        for r in json.loads(p.stdout or "[]"):
            s = self.server_of(r["dst"].split("/")[0]) if r.get("dst") not in (None, "default") else None
            if s:
                out.add(s)
        return out

    def wait_routes(self, servers: set, timeout: float = 20.0, serving_only: bool = True) -> float:
        """Until the VPC router's group is exactly `servers` (serving) and the Internet
        router routes their pools; the seconds it took."""
        t0 = time.monotonic()
        while True:
            g = self.group()
            got = {s for s, w in g.items() if w > 1 or not serving_only}
            if got == servers and servers <= self.inet_routes():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise FleetError(f"routers: VPC group {g}, Internet routes {sorted(self.inet_routes())}; "
                                 f"wanted servers {sorted(servers)} (logs in {self.run_dir()}/logs)")
            time.sleep(0.02)

    def bfd_counters(self, which: str = "vpc") -> dict:
        """{peer address: session-down events} on a router."""
        j = self.router_frr(which).json("show bfd peers counters")
        return {p.get("peer"): p.get("session-down", 0) for p in (j if isinstance(j, list) else [])}

    # failures and operations --------------------------------------------------------
    def server_pids(self, s: int) -> list:
        pids = set(self.pids.get(f"gw{s}", []))
        for ns in (self.gw(s), self.edge(s)):
            if os.path.exists(netns.ns_path(ns)):
                pids.update(netns.pids_in(ns))
        pids.discard(os.getpid())
        return sorted(pids)

    def fail(self, s: int) -> list:
        """SIGKILL every daemon of server s (NICs, coordinator, speaker, its FRR)."""
        pids = self.server_pids(s)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            _reap(pid)
        self.pids[f"gw{s}"] = []
        self.save()
        return pids

    def recover(self, s: int) -> None:
        for name in ("frr",):
            for f in ("zserv.api", "bgpd.vty", "bfdd.vty", "zebra.vty"):
                try:
                    os.unlink(os.path.join(self.server_dir(s), name, f))
                except FileNotFoundError:
                    pass
        self.start_server(s)

    def drain(self, s: int, timeout: float | None = None) -> dict:
        """`hypernat ctl drain` on server s, then wait until its speaker has withdrawn
        everything (mappings gone or drain_timeout), then stop its daemons, speaker
        first.  The speaker's last status."""
        from ..config import load
        from ..coord.ctl import CtlClient

        with CtlClient(f"ipc://{self.server_dir(s)}/coord.sock", timeout=2.0) as c:
            c.query("drain")
        limit = timeout if timeout is not None else load(self.configs[s - 1]).fleet.health.drain_timeout + 10
        self.wait_speaker(s, "drained", limit)
        self.stop_server(s)
        return self.speaker_status(s)

    def wait_speaker(self, s: int, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.speaker_status(s).get("state") != state:
            if time.monotonic() > deadline:
                raise FleetError(f"server {s}: speaker not {state} within {timeout:g} s: {self.speaker_status(s)}")
            time.sleep(0.05)

    def stop_server(self, s: int) -> None:
        """Graceful stop: the speaker (it withdraws and stops FRR), then the NAT daemons."""
        edge = [p for p in self.server_pids(s) if p in set(netns.pids_in(self.edge(s)))]
        _terminate(edge, grace=5.0)
        _terminate(self.server_pids(s), grace=5.0)
        self.pids[f"gw{s}"] = []
        self.save()

    # teardown -----------------------------------------------------------------------
    def down(self) -> None:
        """Stop everything, delete the namespaces (also those of a fleet whose state file
        is gone: every hn-TAG-{hosts,edgeN,gwN}), the state and the run's directory."""
        import re

        from pyroute2 import netns as pr_netns

        pat = re.compile(re.escape(f"{NS_PREFIX}{self.tag}-") + r"(hosts|vpc|inet|edge\d+|gw\d+)")
        names = list(dict.fromkeys(self.namespaces + [n for n in pr_netns.listnetns() if pat.fullmatch(n)]))
        victims = {p for ps in self.pids.values() for p in ps}
        for n in names:
            if os.path.exists(netns.ns_path(n)):
                victims.update(netns.pids_in(n))
        victims.discard(os.getpid())
        _terminate(victims)
        for n in names:
            if os.path.exists(netns.ns_path(n)):
                try:
                    pr_netns.remove(n)
                except OSError:
                    pass
        for path in (self.state_path(),):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.run_dir(), ignore_errors=True)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ---------------------------------------------------------------------------------------
# Traffic: long-lived TCP connections from many hosts, each echoing a small message


HDR = struct.Struct("!IQ")  # connection id, sequence


class Conn:
    __slots__ = ("cid", "host", "external", "ok", "broken", "opened", "closed", "task")

    def __init__(self, cid: int, host: str):
        self.cid, self.host = cid, host
        self.external = None  # (ip, port) the Internet server saw
        self.ok = 0  # echoes received
        self.broken = None  # (time, why) once broken
        self.opened = None
        self.closed = False
        self.task = None


class LongLived:
    """Connections vpc → inet driven by one asyncio loop in a thread of its own.

    Each connection sends a 12-byte record every `period` and reads its echo back;
    any error or an echo later than `stall` seconds counts it broken (with the time).
    `open(hosts, per_host)` and `connect_once(host)` are called from other threads."""

    def __init__(self, fleet: Fleet, period: float = 0.2, stall: float = 3.0, port: int = ECHO_PORT):
        self.fleet, self.period, self.stall, self.port = fleet, period, stall, port
        self.conns: list = []
        self.seen: dict = {}  # cid -> external endpoint (written by the server)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server = None
        self._handlers: set = set()
        self._cid = 0

    def __enter__(self):
        self._thread.start()
        self._call(self._listen(), 5)
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _listen(self):
        s = netns.ns_socket(self.fleet.inet, socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.fleet.internet_server(0), self.port))
        s.listen(4096)
        s.setblocking(False)

        async def serve(reader, writer):
            peer = writer.get_extra_info("peername")[:2]
            self._handlers.add(asyncio.current_task())
            try:
                while True:
                    rec = await reader.readexactly(HDR.size)
                    cid, _ = HDR.unpack(rec)
                    self.seen[cid] = peer
                    writer.write(rec)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            finally:
                writer.close()
                self._handlers.discard(asyncio.current_task())

        self._server = await asyncio.start_server(serve, sock=s, backlog=4096)

    async def _connect(self, host: str, timeout: float):
        sock = netns.ns_socket(self.fleet.hostns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((host, 0))
            await asyncio.wait_for(self.loop.sock_connect(sock, (self.fleet.internet_server(0), self.port)), timeout)
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _run(self, c: Conn, reader, writer):
        seq = 0
        try:
            while not c.closed:
                seq += 1
                writer.write(HDR.pack(c.cid, seq))
                await writer.drain()
                rec = await asyncio.wait_for(reader.readexactly(HDR.size), self.stall)
                if HDR.unpack(rec) != (c.cid, seq):
                    raise ValueError("echo mismatch")
                c.ok += 1
                if c.external is None:
                    c.external = self.seen.get(c.cid)
                await asyncio.sleep(self.period)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            if not c.closed:
                c.broken = (time.monotonic(), type(exc).__name__)
        finally:
            writer.close()

    async def _open(self, hosts, per_host: int, timeout: float):
        async def one(host):
            c = Conn(self._next_cid(), host)
            try:
                reader, writer = await self._connect(host, timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                c.broken = (time.monotonic(), "connect:" + type(exc).__name__)
                return c
            c.opened = time.monotonic()
            c.task = asyncio.ensure_future(self._run(c, reader, writer))
            return c

        conns = await asyncio.gather(*[one(h) for h in hosts for _ in range(per_host)])
        self.conns += conns
        await asyncio.sleep(2 * self.period + 0.2)  # a first echo each: the external endpoint is known
        return conns

    def _next_cid(self) -> int:
        self._cid += 1
        return self._cid

    def open(self, hosts, per_host: int = 2, timeout: float = 5.0) -> list:
        return self._call(self._open(list(hosts), per_host, timeout), timeout + 10)

    async def _once(self, host: str, timeout: float):
        c = Conn(self._next_cid(), host)
        reader, writer = await self._connect(host, timeout)
        try:
            writer.write(HDR.pack(c.cid, 1))
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(HDR.size), timeout)
            return self.seen.get(c.cid)
        finally:
            writer.close()

    def connect_once(self, host: str, timeout: float = 0.3):
        """One short connection from `host`; the external endpoint it left from, or an exception."""
        return self._call(self._once(host, timeout), 2 * timeout + 5)

    def close_conns(self, conns) -> None:
        for c in conns:
            c.closed = True

    def close(self) -> None:
        if not self.loop.is_running():
            return
        for c in self.conns:
            c.closed = True

        async def stop():
            tasks = [c.task for c in self.conns if c.task is not None and not c.task.done()]
            if tasks:
                await asyncio.wait(tasks, timeout=2 * self.period + 1)
            if self._server is not None:
                self._server.close()
            handlers = list(self._handlers)
            if handlers:
                _, pending = await asyncio.wait(handlers, timeout=1.0)
                for t in pending:
                    t.cancel()
                await asyncio.sleep(0)

        try:
            self._call(stop(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    # views ------------------------------------------------------------------------------
    def server_of_conn(self, c: Conn) -> int | None:
        ext = c.external or self.seen.get(c.cid)
        return self.fleet.server_of(ext[0]) if ext else None

    def hosts_by_server(self, conns=None) -> dict:
        """{host: {servers its connections left from}}."""
        out: dict = {}
        for c in conns if conns is not None else self.conns:
            s = self.server_of_conn(c)
            out.setdefault(c.host, set()).add(s)
        return out


def run_report(fleet: Fleet, hosts: int | None = None, per_host: int = 2, seconds: float = 2.0) -> dict:
    """`hypernat lab run` on a fleet: connections from every host, kept `seconds`; per server."""
    n = min(hosts or fleet.hosts, fleet.hosts)
    with LongLived(fleet) as ll:
        conns = ll.open([fleet.host(i) for i in range(n)], per_host)
        time.sleep(seconds)
        broken_before_close = [c for c in conns if c.broken]
        ll.close()
    per = {s: {"hosts": set(), "connections": 0, "intact": 0, "echoes": 0} for s in fleet.server_ids}
    unknown = 0
    for c in conns:
        s = ll.server_of_conn(c)
        if s is None:
            unknown += 1
            continue
        per[s]["hosts"].add(c.host)
        per[s]["connections"] += 1
        per[s]["echoes"] += c.ok
        per[s]["intact"] += c not in broken_before_close
    split = [h for h, ss in ll.hosts_by_server(conns).items() if len(ss) > 1]
    out = {"servers": {f"gw{s}": dict(v, hosts=len(v["hosts"]), pool=fleet.server_pool(s),
                                      speaker=fleet.speaker_status(s).get("state") if fleet.server_pids(s) else "down")
                       for s, v in per.items()},
           "connections": len(conns), "broken": len(broken_before_close), "no_server": unknown,
           "hosts_on_two_servers": split, "group": fleet.group(), "internet_routes": sorted(fleet.inet_routes())}
    return out


# ---------------------------------------------------------------------------------------
# hypernat lab up --servers N | run | fail | recover | drain (called by lab/cli.py)


def cli(args) -> int:
    if args.cmd == "up":
        f = Fleet(tag=args.tag, servers=args.servers, nics=args.nics, hosts=args.hosts, template=args.config)
        trees = None
        if args.fleet:
            import yaml

            from ..fleet.spec import fleet_files

            trees = []
            for path in fleet_files([args.fleet]):
                with open(path) as fh:
                    trees.append(yaml.safe_load(fh))
        try:
            f.up(trees)
        except FleetError as exc:
            print(f"hypernat lab up: {exc}", file=sys.stderr)
            return 1
        print(f"lab {f.tag}: fleet up: {f.servers} servers x {f.nics} NICs behind FRR routers (BGP + BFD); "
              f"VPC router's group {f.group()}")
        for s in f.server_ids:
            print(f"  gw{s}: pool {f.server_pool(s)}, {f.configs[s - 1]}, hypernat ctl --tag {f.tag} --server {s} status")
        print(f"  namespaces {', '.join(f.namespaces)}; logs in {f.run_dir()}/logs")
        return 0
    try:
        f = Fleet.load(args.tag)
    except FileNotFoundError:
        print(f"hypernat lab {args.cmd}: no fleet {args.tag!r} (hypernat lab up --tag {args.tag} --servers 2)",
              file=sys.stderr)
        return 2
    if args.cmd in ("fail", "recover", "drain") and not 1 <= args.server <= f.servers:
        print(f"hypernat lab {args.cmd}: servers are 1..{f.servers}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "fail":
            t0 = time.monotonic()
            pids = f.fail(args.server)
            took = f.wait_routes(set(f.server_ids) - {args.server}, timeout=10)
            print(f"gw{args.server}: {len(pids)} processes killed; routers dropped it in {1000 * took:.0f} ms")
        elif args.cmd == "recover":
            f.recover(args.server)
            took = f.wait_routes(set(f.server_ids), timeout=30, serving_only=False)
            print(f"gw{args.server}: up again; routers took it back ({f.group()})")
        elif args.cmd == "drain":
            st = f.drain(args.server)
            print(f"gw{args.server}: drained and stopped ({st.get('state')}); routers: {f.group()}")
        elif args.cmd == "run":
            rep = run_report(f, hosts=None, per_host=max(1, args.conns // max(1, f.hosts)))
            if args.json:
                print(json.dumps(rep, indent=1, default=str))
            else:
                for name, v in rep["servers"].items():
                    print(f"{name}  pool {v['pool']:<18} speaker {v['speaker'] or '-':<9} hosts {v['hosts']:>3}  "
                          f"TCP {v['intact']}/{v['connections']} intact, {v['echoes']} echoes")
                print(f"hosts on two servers: {len(rep['hosts_on_two_servers'])}; connections from no server's pool: "
                      f"{rep['no_server']}; VPC router group {rep['group']}; Internet routes to {rep['internet_routes']}")
            return 0 if rep["broken"] == 0 and rep["no_server"] == 0 and not rep["hosts_on_two_servers"] else 1
    except FleetError as exc:
        print(f"hypernat lab {args.cmd}: {exc}", file=sys.stderr)
        return 1
    return 0

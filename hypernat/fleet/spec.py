"""The ``fleet:`` section of a gateway server's YAML, and the checks across a fleet.

A fleet is N gateway servers, each described by its own file.  A server's
``external.pool`` is the part of the fleet's pool that it owns (one external address
belongs to one server); ``fleet.pool`` is the whole fleet's pool, the same in every
file.  ``fleet`` names the server, gives its BGP identity and says what it announces::

    fleet:
      server: gw1                  # unique in the fleet
      id: 1                        # unique in the fleet, 1..65535
      pool: [198.18.77.0/28]       # the whole fleet's pool; external.pool lies inside it
      asn: 65001
      router_id: 10.255.0.1        # unique in the fleet
      bfd: {interval_ms: 150, multiplier: 5}
      peers:
        - {name: vpc-router, side: vpc, address: 172.30.1.1, asn: 65100, local: 172.30.1.2}
        - {name: inet-router, side: internet, address: 172.31.1.1, asn: 65200, local: 172.31.1.2}
      announce:
        vpc: [0.0.0.0/0]           # toward the VPC: only while the server can take new hosts
        internet: []               # toward the Internet (default: external.pool); inside external.pool
      health: {min_nics_up: 1, max_utilisation: 0.95, drain_timeout: 300, interval: 0.25}

One file is checked when it is loaded (``hypernat.config``): what is announced toward
the Internet lies inside what the server owns, its pool inside the fleet's, BFD timers
in range.  ``check_fleet`` checks the files together: one server per name, id and
router id; pools pairwise disjoint and the fleet pool the same everywhere; a router
(peer name) seen with one ASN and one side by every server; every server has a peer
on each side.  Each problem names the file and the key.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Optional

SIDES = ("vpc", "internet")

# BFD timers below these flap on a busy 2-vCPU machine (the lab's measured floor):
# a detection time under 300 ms is refused.
BFD_MIN_INTERVAL_MS = 50
BFD_MIN_DETECT_MS = 300


@dataclasses.dataclass(frozen=True)
class BfdTimers:
    interval_ms: int = 150  # transmit and receive interval
    multiplier: int = 5  # detection time = interval_ms * multiplier

    @property
    def detect_ms(self) -> int:
        return self.interval_ms * self.multiplier


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str  # the router's name, the same in every server's file
    side: str  # vpc | internet
    address: str  # the router's address on the link
    asn: int
    local: str  # this server's address on the link (BGP and BFD source)


@dataclasses.dataclass(frozen=True)
class Health:
    min_nics_up: int = 1
    max_utilisation: float = 0.95  # pool utilisation above which no new host is taken
    drain_timeout: float = 300.0  # seconds a drain waits for mappings to end
    interval: float = 0.25  # seconds between two health checks


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    server: str
    id: int
    pool: tuple  # the fleet's whole pool (IPv4Network)
    asn: int
    router_id: str
    peers: tuple  # of Peer
    announce_vpc: tuple  # of IPv4Network
    announce_internet: tuple  # of IPv4Network
    bfd: BfdTimers = BfdTimers()
    health: Health = Health()
    frr_dir: str = ""  # where the FRR instance keeps its files (default: state_dir/frr)

    def peers_on(self, side: str) -> tuple:
        return tuple(p for p in self.peers if p.side == side)


_KEYS = {"server", "id", "pool", "asn", "router_id", "bfd", "peers", "announce", "health", "frr_dir"}


def read(r, node, owned: tuple, n_nics: int) -> Optional[FleetConfig]:
    """The ``fleet`` section through config's key-path reader `r`; `owned` is
    external.pool (what this server owns)."""
    if node is None:
        return None
    p = "fleet"
    r.mapping(node, p, _KEYS, required=("server", "id", "pool", "asn", "router_id", "peers"))
    server = r.string(node, "server", p, required=True)
    sid = r.integer(node, "id", p, lo=1, hi=65535)
    pool = r.prefixes(node, "pool", p)
    for i, net in enumerate(owned):
        if not any(net.subnet_of(f) for f in pool):
            raise r.err(f"external.pool[{i}]", f"{net} is not inside fleet.pool ({', '.join(map(str, pool))})")
    asn = r.integer(node, "asn", p, lo=1, hi=4294967295)
    router_id = _address(r, node, "router_id", p)

    bn = r.mapping(node.get("bfd"), f"{p}.bfd", {"interval_ms", "multiplier"})
    bfd = BfdTimers(interval_ms=r.integer(bn, "interval_ms", f"{p}.bfd", 150, lo=BFD_MIN_INTERVAL_MS, hi=60000),
                    multiplier=r.integer(bn, "multiplier", f"{p}.bfd", 5, lo=2, hi=255))
    if bfd.detect_ms < BFD_MIN_DETECT_MS:
        raise r.err(f"{p}.bfd", f"detection time {bfd.detect_ms} ms (interval_ms x multiplier) is below "
                                f"{BFD_MIN_DETECT_MS} ms: such timers flap on a busy machine")

    peers_node = node["peers"]
    if not isinstance(peers_node, list) or not peers_node:
        raise r.err(f"{p}.peers", "expected a non-empty list of BGP peers")
    peers, seen = [], {}
    for i, pn in enumerate(peers_node):
        pp = f"{p}.peers[{i}]"
        r.mapping(pn, pp, {"name", "side", "address", "asn", "local"}, required=("name", "side", "address", "asn", "local"))
        peer = Peer(name=r.string(pn, "name", pp, required=True), side=r.string(pn, "side", pp, choices=SIDES, required=True),
                    address=_address(r, pn, "address", pp), asn=r.integer(pn, "asn", pp, lo=1, hi=4294967295),
                    local=_address(r, pn, "local", pp))
        for key in ("name", "address"):
            v = getattr(peer, key)
            if (key, v) in seen:
                raise r.err(f"{pp}.{key}", f"{v!r} is already {seen[(key, v)]}")
            seen[(key, v)] = f"{pp}.{key}"
        if peer.address == peer.local:
            raise r.err(f"{pp}.local", f"{peer.local} is the peer's own address")
        peers.append(peer)
    for side in SIDES:
        if not any(x.side == side for x in peers):
            raise r.err(f"{p}.peers", f"no peer on the {side} side (each server peers with both sides)")

    an = r.mapping(node.get("announce"), f"{p}.announce", {"vpc", "internet"})
    vpc = r.prefixes(an, "vpc", f"{p}.announce", required=False) or (ipaddress.IPv4Network("0.0.0.0/0"),)
    inet = r.prefixes(an, "internet", f"{p}.announce", required=False) or tuple(owned)
    for i, net in enumerate(inet):
        if not any(net.subnet_of(o) for o in owned):
            raise r.err(f"{p}.announce.internet[{i}]", f"{net} is not owned by this server (external.pool: "
                                                      f"{', '.join(map(str, owned))}): refusing to announce it")

    hn = r.mapping(node.get("health"), f"{p}.health", {f.name for f in dataclasses.fields(Health)})
    d = Health()
    health = Health(min_nics_up=r.integer(hn, "min_nics_up", f"{p}.health", d.min_nics_up, lo=1, hi=n_nics),
                    max_utilisation=r.number(hn, "max_utilisation", f"{p}.health", d.max_utilisation, lo=0),
                    drain_timeout=r.number(hn, "drain_timeout", f"{p}.health", d.drain_timeout, lo=0),
                    interval=r.number(hn, "interval", f"{p}.health", d.interval, lo=0.01))
    if health.max_utilisation > 1:
        raise r.err(f"{p}.health.max_utilisation", f"{health.max_utilisation} is above 1")
    return FleetConfig(server=server, id=sid, pool=pool, asn=asn, router_id=router_id, peers=tuple(peers),
                       announce_vpc=vpc, announce_internet=inet, bfd=bfd, health=health,
                       frr_dir=r.string(node, "frr_dir", p, ""))


def _address(r, node, key, path) -> str:
    v = r.string(node, key, path, required=True)
    try:
        return str(ipaddress.IPv4Address(v))
    except ValueError:
        raise r.err(f"{path}.{key}", f"{v!r} is not an IPv4 address") from None


# ---------------------------------------------------------------------------------------
# A fleet: several files checked together


def fleet_files(paths) -> list:
    """The YAML files named by `paths` (files, or directories: their *.yaml / *.yml), sorted."""
    import os

    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith((".yaml", ".yml")))
        else:
            out.append(p)
    return out


def check_fleet(configs, routers: Optional[dict] = None) -> list:
    """Problems (ConfigError) of a fleet's configs taken together; [] when it is sound.

    `routers` (optional) is what the routers really are, ``{name: (side, asn)}`` (the
    lab passes its own): a peer that names another ASN or side is refused too."""
    from ..config import ConfigError

    errs = []
    if not configs:
        return [ConfigError("<fleet>", "", "no server configuration given")]
    first = {}  # (what, value) -> "file: key"
    routers_seen = dict((k, (v[0], v[1], "the routers")) for k, v in (routers or {}).items())
    for cfg in configs:
        f = cfg.fleet
        if f is None:
            errs.append(ConfigError(cfg.path, "fleet", "missing: a fleet member's file names its server and BGP identity"))
            continue
        for what, key, value in (("server name", "fleet.server", f.server), ("server id", "fleet.id", f.id),
                                 ("router id", "fleet.router_id", f.router_id)):
            if (what, value) in first:
                errs.append(ConfigError(cfg.path, key, f"duplicate {what} {value!r} (also {first[(what, value)]})"))
            else:
                first[(what, value)] = f"{cfg.path}: {key}"
        for i, peer in enumerate(f.peers):
            key = f"fleet.peers[{i}]"
            if ("local", peer.local) in first:
                errs.append(ConfigError(cfg.path, f"{key}.local", f"address {peer.local} is also {first[('local', peer.local)]}"))
            else:
                first[("local", peer.local)] = f"{cfg.path}: {key}.local"
            if peer.name in routers_seen:
                side, asn, where = routers_seen[peer.name]
                if asn != peer.asn:
                    errs.append(ConfigError(cfg.path, f"{key}.asn", f"router {peer.name!r} has ASN {asn} ({where}), not {peer.asn}"))
                if side != peer.side:
                    errs.append(ConfigError(cfg.path, f"{key}.side", f"router {peer.name!r} is on the {side} side ({where}), not {peer.side}"))
            elif routers is not None:
                errs.append(ConfigError(cfg.path, f"{key}.name", f"no router {peer.name!r} (routers: {', '.join(sorted(routers))})"))
            else:
                routers_seen[peer.name] = (peer.side, peer.asn, f"{cfg.path}: {key}")
            if peer.asn == f.asn:
                errs.append(ConfigError(cfg.path, f"{key}.asn", f"{peer.asn} is the server's own ASN (the fleet peers over eBGP)"))
    ref = next((c for c in configs if c.fleet is not None), None)
    if ref is not None:
        for cfg in configs:
            if cfg.fleet is None:
                continue
            if set(cfg.fleet.pool) != set(ref.fleet.pool):
                errs.append(ConfigError(cfg.path, "fleet.pool", f"{', '.join(map(str, cfg.fleet.pool))} differs from "
                                                               f"{ref.path}'s {', '.join(map(str, ref.fleet.pool))}"))
            if set(cfg.internal) != set(ref.internal):
                errs.append(ConfigError(cfg.path, "internal.prefixes", f"differs from {ref.path}'s"))
    for a_i, a in enumerate(configs):
        for b in configs[a_i + 1:]:
            for i, na in enumerate(a.pool):
                for j, nb in enumerate(b.pool):
                    if na.overlaps(nb):
                        errs.append(ConfigError(b.path, f"external.pool[{j}]", f"{nb} overlaps {a.path}: external.pool[{i}] "
                                                                              f"({na}): one external address belongs to one server"))
    return errs


def load_fleet(paths, routers: Optional[dict] = None):
    """(configs, problems): every file loaded (a file that does not load is a problem),
    then the fleet checks."""
    from ..config import ConfigError, load

    configs, errs = [], []
    files = fleet_files(paths)
    if not files:
        errs.append(ConfigError(", ".join(paths), "", "no .yaml file"))
    for path in files:
        try:
            configs.append(load(path))
        except ConfigError as exc:
            errs.append(exc)
    if configs:
        errs += check_fleet(configs, routers)
    return configs, errs


def check_fleet_main(paths, quiet: bool = False) -> int:
    """`hypernat check A.yaml B.yaml` / `hypernat check DIR`: exit 1 on any problem."""
    import sys

    configs, errs = load_fleet(paths)
    for e in errs:
        print(f"hypernat check: {e}", file=sys.stderr)
    if errs:
        return 1
    if not quiet:
        print(f"fleet of {len(configs)} server(s): OK")
        for c in sorted(configs, key=lambda c: c.fleet.id):
            f = c.fleet
            peers = ", ".join(f"{p.name} ({p.side}, AS{p.asn})" for p in f.peers)
            print(f"  {f.id:>3} {f.server:<10} {c.path}: pool {', '.join(map(str, c.pool))}, {c.n_nics} NIC(s), "
                  f"AS{f.asn} id {f.router_id}, BFD {f.bfd.interval_ms} ms x {f.bfd.multiplier}; peers {peers}")
    return 0

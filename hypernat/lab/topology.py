"""The namespace testbed: the paper's Fig. 3 on one machine.

Three network namespaces per run, named ``hn-<tag>-vpc``, ``hn-<tag>-gw`` and
``hn-<tag>-inet`` (the tag keeps parallel runs apart), and two veth pairs per NIC::

      hn-<tag>-vpc                      hn-<tag>-gw                       hn-<tag>-inet
   hosts 10.0.0.1..H (lo)                                              servers 198.51.100.1..S (lo)
   ECMP default route ─┬─ nic0 ══ inside0  [NIC 0]  outside0 ══ nic0 ─┬─ ECMP route to the pool
   (L4 hash)           └─ nic1 ══ inside1  [NIC 1]  outside1 ══ nic1 ─┘  (L4 hash)
                         172.16.k.2/24   172.16.k.1   172.17.k.1   172.17.k.2/24

Each side spreads flows over the NICs with the kernel's multipath hash over the
5-tuple (``fib_multipath_hash_policy=1``), independently per direction, so about half
of all connections leave on one NIC and come back on the other: the situation
HyperNAT's rule cloning exists for.

What runs in ``gw`` is the *mode*:

``hypernat``  ip_forward off (the kernel sees every frame on AF_PACKET and must not
              forward it as well) and IPv4 dropped at gw's ingress hook, after the
              AF_PACKET taps took their copy; the NIC daemons own the links.
``linux``     the peer (peer.py): Linux's own NAT, nftables snat to a pool address,
              conntrack, policy routes so NIC k's traffic stays on NIC k's port pair.
``noop``      as ``hypernat``; the no-op forwarder moves frames inside_k ↔ outside_k
              untranslated, and ``inet`` routes the internal prefix back over the
              outside links (plain routing, the same-run ceiling of the I/O path).

Offloads (checksum, TSO, GSO) stay on, as on any Linux box (``offloads``): the NIC
daemons read and write super-frames with their ``virtio_net_hdr`` on PACKET_MMAP.
With ``offloads=False`` they are off on both ends of every veth (a frame read from
AF_PACKET then carries complete checksums and is never a GSO super-frame): the
setting for AF_XDP, which is per-frame.  ``queues`` > 1 gives every veth that many
receive and transmit queues (one worker per queue pair, RSS being the switch).

Optionally (``steer_seed``) ``inet`` chooses the return link by a hash the project can
reproduce (nftables jhash with a fixed seed → fwmark → per-mark routes, steering.py),
so active install can be exercised for real.

Addresses come from ``conf/testbed.yaml`` where it has them (``internal`` prefixes,
the external ``pool``), else from the defaults above (pool 203.0.113.0/24).
Everything a run creates lives inside its namespaces, so ``down`` is just: stop the
processes inside them, delete them.  It is idempotent and safe after a failure.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from . import netns

log = logging.getLogger("hypernat.lab")

STATE_DIR = "/run/hypernat-lab"
NS_PREFIX = "hn-"
MODES = ("hypernat", "linux", "noop")


@dataclass
class Addressing:
    """Every address the testbed uses; defaults documented in the module docstring."""

    internal: str = "10.0.0.0/16"  # VPC space I
    hosts: int = 2  # VPC hosts 10.0.0.1 .. (on vpc's lo)
    pool: str = "203.0.113.0/24"  # external space E
    snat_address: str = ""  # the peer's snat target; default: first pool address
    servers_net: str = "198.51.100.0/24"  # Internet R
    servers: int = 2
    inside_net: str = "172.16.{k}.0/24"  # link NIC k inside: gw .1, vpc .2
    outside_net: str = "172.17.{k}.0/24"  # link NIC k outside: gw .1, inet .2

    def host(self, i: int) -> str:
        return str(ipaddress.ip_network(self.internal)[1 + i])

    def server(self, i: int) -> str:
        return str(ipaddress.ip_network(self.servers_net)[1 + i])

    def snat(self) -> str:
        return self.snat_address or str(ipaddress.ip_network(self.pool)[1])

    def link(self, side: str, k: int, end: str) -> str:
        """Address of `end` ('gw' or 'far') on NIC k's `side` ('inside'/'outside') link."""
        net = ipaddress.ip_network((self.inside_net if side == "inside" else self.outside_net).format(k=k))
        return str(net[1] if end == "gw" else net[2])

    @classmethod
    def from_config(cls, path: str | None) -> "Addressing":
        """The internal prefix and the pool of a HyperNAT config (``hypernat.config``);
        a missing file keeps the defaults.  A ``lab:`` section is not part of the
        gateway's config: the lab's own link addresses stay the documented defaults."""
        a = cls()
        if not path or not os.path.exists(path):
            return a
        from .. import config as cfgmod

        cfg = cfgmod.load(path)  # strict: a bad config is an error here as everywhere
        a.internal = str(cfg.internal[0])
        a.pool = str(cfg.pool[0])
        return a


@dataclass
class Topology:
    """One testbed run.  `up()` builds it, `down()` removes it (idempotent)."""

    tag: str
    nics: int = 2
    mode: str = "linux"
    addr: Addressing = field(default_factory=Addressing)
    mtu: int = 1500
    steer_seed: int | None = None  # steer inet's return traffic by nftables jhash (steering.py)
    narrow_mtu: int = 0  # >0: a server behind a link of this MTU (path-MTU discovery through the NAT)
    offloads: bool = True  # checksum/TSO/GSO on every veth (False: all off, for AF_XDP)
    queues: int = 1  # receive/transmit queues per veth
    vlan: int = 0  # >0: the inside links carry this 802.1Q tag (a tagged VPC, lab/vlan.py)
    outside_mtu: int = 0  # >0: the outside links at this MTU, the gateway the narrow point (its own ICMP)
    config: str = ""  # the gateway config the daemons run (hypernat mode)
    endpoint: str = ""  # their coordinator endpoint: per run, so parallel runs do not meet
    pids: list = field(default_factory=list)

    # names ------------------------------------------------------------------
    @property
    def vpc(self) -> str:
        return f"{NS_PREFIX}{self.tag}-vpc"

    @property
    def gw(self) -> str:
        return f"{NS_PREFIX}{self.tag}-gw"

    @property
    def inet(self) -> str:
        return f"{NS_PREFIX}{self.tag}-inet"

    @property
    def srv(self) -> str:
        return f"{NS_PREFIX}{self.tag}-srv"

    @property
    def namespaces(self) -> tuple:
        return (self.vpc, self.gw, self.inet) + ((self.srv,) if self.narrow_mtu else ())

    def far_server(self) -> str:
        """The server behind the narrow link (``narrow_mtu``)."""
        return str(ipaddress.ip_network(self.addr.servers_net)[200])

    @staticmethod
    def inside(k: int) -> str:
        return f"inside{k}"

    @staticmethod
    def outside(k: int) -> str:
        return f"outside{k}"

    @staticmethod
    def far(k: int) -> str:
        """The vpc's (and inet's) end of NIC k's link."""
        return f"nic{k}"

    # state ------------------------------------------------------------------
    def state_path(self) -> str:
        return os.path.join(STATE_DIR, f"{self.tag}.json")

    def save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        d = asdict(self)
        with open(self.state_path() + ".tmp", "w") as f:
            json.dump(d, f, indent=1)
        os.replace(self.state_path() + ".tmp", self.state_path())

    @classmethod
    def load(cls, tag: str) -> "Topology":
        with open(os.path.join(STATE_DIR, f"{tag}.json")) as f:
            d = json.load(f)
        d["addr"] = Addressing(**d["addr"])
        return cls(**d)

    def exists(self) -> bool:
        return any(os.path.exists(netns.ns_path(n)) for n in self.namespaces)

    # build ------------------------------------------------------------------
    def up(self) -> "Topology":
        if self.mode not in MODES:
            raise ValueError(f"unknown lab mode {self.mode!r} (one of {', '.join(MODES)})")
        if self.exists():
            raise RuntimeError(f"testbed {self.tag!r} exists already: `hypernat lab down --tag {self.tag}` first")
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self.save()
        return self

    def _build(self) -> None:
        a = self.addr
        for n in self.namespaces:
            pr_netns.create(n)
        for n in self.namespaces:
            # rp_filter would drop the return half of asymmetric ECMP paths.
            for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
                netns.sysctl(n, key, 0)
            netns.sysctl(n, "net.ipv4.fib_multipath_hash_policy", 1)
            # No IPv6 on the testbed: router solicitations and DAD would only add noise.
            netns.sysctl(n, "net.ipv6.conf.all.disable_ipv6", 1)
            netns.sysctl(n, "net.ipv6.conf.default.disable_ipv6", 1)
            with IPRoute(netns=n) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        netns.sysctl(self.gw, "net.ipv4.ip_forward", 1 if self.mode == "linux" else 0)
        netns.sysctl(self.vpc, "net.ipv4.ip_forward", 0)
        netns.sysctl(self.inet, "net.ipv4.ip_forward", 0)

        with IPRoute(netns=self.gw) as gw:
            for k in range(self.nics):
                # Created from gw with the peer placed straight into vpc / inet: no name
                # ever appears in the root namespace, so parallel runs cannot collide.
                q = {} if self.queues == 1 else {"num_rx_queues": self.queues, "num_tx_queues": self.queues}
                gw.link("add", ifname=self.inside(k), kind="veth", **q,
                        peer={"ifname": self.far(k), "net_ns_fd": self.vpc, **q})
                gw.link("add", ifname=self.outside(k), kind="veth", **q,
                        peer={"ifname": self.far(k), "net_ns_fd": self.inet, **q})
                for side, name in (("inside", self.inside(k)), ("outside", self.outside(k))):
                    idx = gw.link_lookup(ifname=name)[0]
                    gw.link("set", index=idx, mtu=self.link_mtu(side))
                    gw.addr("add", index=idx, address=a.link(side, k, "gw"), prefixlen=24)
                    gw.link("set", index=idx, state="up")

        for ns, side in ((self.vpc, "inside"), (self.inet, "outside")):
            with IPRoute(netns=ns) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                if ns == self.vpc:
                    for i in range(a.hosts):
                        ipr.addr("add", index=lo, address=a.host(i), prefixlen=32)
                else:
                    for i in range(a.servers):
                        ipr.addr("add", index=lo, address=a.server(i), prefixlen=32)
                for k in range(self.nics):
                    idx = ipr.link_lookup(ifname=self.far(k))[0]
                    ipr.link("set", index=idx, mtu=self.link_mtu(side))
                    ipr.addr("add", index=idx, address=a.link(side, k, "far"), prefixlen=24)
                    ipr.link("set", index=idx, state="up")

        for ns in self.namespaces:
            names = [self.far(k) for k in range(self.nics)] if ns != self.gw else [
                n for k in range(self.nics) for n in (self.inside(k), self.outside(k))]
            for name in names:
                if self.offloads:
                    self._offloads_on(ns, name)
                else:
                    self._offloads_off(ns, name)

        hop = lambda side, k: {"gateway": a.link(side, k, "gw")}  # noqa: E731
        with IPRoute(netns=self.vpc) as vpc:
            self._ecmp(vpc, "0.0.0.0/0", [hop("inside", k) for k in range(self.nics)], prefsrc=a.host(0))
        with IPRoute(netns=self.gw) as gw:
            # NIC k's next hops, one table each way (100+k outward, 200+k inward).  In
            # the hypernat and noop modes these route nothing (ip_forward is off): they
            # tell the NIC daemon whom to send to (hypernat.l2.next_hop_mac).
            for k in range(self.nics):
                gw.route("add", dst="0.0.0.0/0", gateway=a.link("outside", k, "far"), table=100 + k)
                gw.route("add", dst=a.internal, gateway=a.link("inside", k, "far"), table=200 + k)
        with IPRoute(netns=self.inet) as inet:
            self._ecmp(inet, a.pool, [hop("outside", k) for k in range(self.nics)])
            if self.mode == "noop":
                self._ecmp(inet, a.internal, [hop("outside", k) for k in range(self.nics)])
        if self.vlan:
            from .vlan import tag_vpc_links

            tag_vpc_links(self, self.vlan)
        if self.outside_mtu:
            # inet's hosts still advertise an MSS of 1460 toward the pool: the clients'
            # full-size segments reach the gateway, which must answer "fragmentation
            # needed" itself (RFC 1191)
            hops = [w for k in range(self.nics) for w in ("nexthop", "via", a.link("outside", k, "gw"))]
            netns.run(self.inet, ["ip", "route", "replace", a.pool, "advmss", "1460", *hops])
        if self.steer_seed is not None:
            from .steering import install

            install(self, self.steer_seed)
        if self.narrow_mtu:
            self._narrow_link()
        if self.mode == "linux":
            from .peer import install_linux_nat

            install_linux_nat(self)
        else:
            self._kernel_ignores_ipv4()
        self.wait_ready()

    def _kernel_ignores_ipv4(self) -> None:
        """Drop IPv4 at gw's ingress hook: AF_PACKET taps have their copy by then
        (they run before the hook), and the kernel's IP stack is spared a route lookup
        and an ``ip_error`` per frame that the NIC daemon forwards anyway.  ARP still
        reaches the kernel, which answers for the link addresses."""
        chains = "\n".join(
            f'    chain in_{name} {{ type filter hook ingress device "{name}" priority 0; policy accept; '
            f"meta protocol ip counter drop; }}"
            for k in range(self.nics) for name in (self.inside(k), self.outside(k)))
        netns.run(self.gw, ["nft", "-f", "-"], input_=f"table netdev hypernat_gw {{\n{chains}\n}}\n")

    def _narrow_link(self) -> None:
        """inet ══(MTU narrow_mtu)══ srv, a server on srv's lo that still advertises an
        MSS of 1460: the client's full-size segments reach inet, which must send ICMP
        "fragmentation needed" back to the client's *external* address — through
        whichever NIC the ECMP hash picks for it::

            vpc ─ gw ─ inet (router) ═══ narrow ═══ srv: 198.51.100.200
        """
        with IPRoute(netns=self.inet) as inet:
            inet.link("add", ifname="narrow", kind="veth", peer={"ifname": "up", "net_ns_fd": self.srv})
            idx = inet.link_lookup(ifname="narrow")[0]
            inet.link("set", index=idx, mtu=self.narrow_mtu)
            inet.addr("add", index=idx, address="172.18.0.1", prefixlen=24)
            inet.link("set", index=idx, state="up")
            inet.route("add", dst=self.far_server() + "/32", gateway="172.18.0.2")
        with IPRoute(netns=self.srv) as srv:
            lo = srv.link_lookup(ifname="lo")[0]
            srv.addr("add", index=lo, address=self.far_server(), prefixlen=32)
            idx = srv.link_lookup(ifname="up")[0]
            srv.link("set", index=idx, mtu=self.narrow_mtu)
            srv.addr("add", index=idx, address="172.18.0.2", prefixlen=24)
            srv.link("set", index=idx, state="up")
        # (iproute2 here: the advmss route metric is plain there.)
        netns.run(self.srv, ["ip", "route", "add", "default", "via", "172.18.0.1", "advmss", "1460"])
        netns.sysctl(self.inet, "net.ipv4.ip_forward", 1)
        for ns, name in ((self.inet, "narrow"), (self.srv, "up")):
            if not self.offloads:
                self._offloads_off(ns, name)

    def link_mtu(self, side: str) -> int:
        """The MTU of NIC k's `side` link ('inside' or 'outside'), both ends."""
        return self.outside_mtu if side == "outside" and self.outside_mtu else self.mtu

    @staticmethod
    def _ecmp(ipr, dst, hops, **kw):
        if len(hops) == 1:
            ipr.route("add", dst=dst, gateway=hops[0]["gateway"], **kw)
        else:
            ipr.route("add", dst=dst, multipath=hops, **kw)

    @staticmethod
    def _offloads_on(ns: str, ifname: str) -> None:
        """Checksum offload, TSO and GSO on (veth's defaults, set anyway: a super-frame
        then crosses every link whole, as from a NIC with TSO)."""
        netns.run(ns, ["ethtool", "-K", ifname, "rx", "on", "tx", "on", "tso", "on", "gso", "on"], check=False)

    @staticmethod
    def _offloads_off(ns: str, ifname: str) -> None:
        netns.run(ns, ["ethtool", "-K", ifname, "rx", "off", "tx", "off", "tso", "off", "gso", "off", "gro", "off"],
                  check=False)
        p = netns.run(ns, ["ethtool", "-k", ifname], check=False)
        bad = [ln.strip() for ln in p.stdout.splitlines()
               if ln.split(":")[0].strip() in ("tx-checksumming", "tcp-segmentation-offload", "generic-segmentation-offload",
                                               "generic-receive-offload") and ": on" in ln]
        if p.returncode == 0 and bad:
            raise RuntimeError(f"offloads still on for {ifname} in {ns}: {bad}")

    def wait_ready(self, timeout=5.0) -> None:
        """Wait until every veth is up (carrier) — the moment traffic can flow."""
        deadline = time.monotonic() + timeout
        for ns in self.namespaces:
            with IPRoute(netns=ns) as ipr:
                while True:
                    links = [l for l in ipr.get_links() if l.get("ifname") != "lo"]
                    if all(l.get("operstate") == "UP" for l in links):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"links in {ns} not up: {[(l.get('ifname'), l.get('operstate')) for l in links]}")
                    time.sleep(0.02)

    # run-time helpers -------------------------------------------------------
    def mac(self, ns: str, ifname: str) -> bytes:
        with IPRoute(netns=ns) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
            return bytes.fromhex(link.get("IFLA_ADDRESS").replace(":", ""))

    def link_counters(self) -> dict:
        """rx/tx packets of every gw link: {ifname: (rx_packets, tx_packets)}."""
        out = {}
        with IPRoute(netns=self.gw) as ipr:
            for l in ipr.get_links():
                if l.get("ifname") == "lo":
                    continue
                st = l.get("IFLA_STATS64")
                out[l.get("ifname")] = (st["rx_packets"], st["tx_packets"])
        return out

    def log_path(self, argv: list) -> str:
        """Where a process started by `start` logs: /run/hypernat-lab/<tag>-<module>[-<nic>].log."""
        name = argv[argv.index("-m") + 1].rsplit(".", 1)[-1] if "-m" in argv else os.path.basename(argv[0])
        for flag in ("--nic", "--inside"):
            if flag in argv:
                name += "-" + argv[argv.index(flag) + 1]
        return os.path.join(STATE_DIR, f"{self.tag}-{name}.log")

    def start(self, ns: str, argv: list, **popen_kw):
        """Start a process inside `ns`, in its own session, its output to `log_path`
        (never the caller's terminal: `hypernat lab up` returns while it runs);
        recorded so `down` stops it."""
        import subprocess

        os.makedirs(STATE_DIR, exist_ok=True)
        log_file = None
        if "stdout" not in popen_kw:
            log_file = open(self.log_path(argv), "ab")
            popen_kw.update(stdout=log_file, stderr=subprocess.STDOUT)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        popen_kw.setdefault("start_new_session", True)

        env = dict(popen_kw.pop("env", None) or os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            p = subprocess.Popen(netns.exec_argv(ns, argv), env=env, **popen_kw)
        finally:
            if log_file is not None:
                log_file.close()  # the child has its own descriptor
        self.pids.append(p.pid)
        self.save()
        return p

    # teardown ---------------------------------------------------------------
    def down(self) -> None:
        """Stop every process in our namespaces, delete the namespaces.  Idempotent."""
        victims = set(self.pids)
        every = tuple(dict.fromkeys(self.namespaces + (self.srv,)))
        for n in every:
            if os.path.exists(netns.ns_path(n)):
                victims.update(netns.pids_in(n))
        victims.discard(os.getpid())
        _terminate(victims)
        for n in every:
            if os.path.exists(netns.ns_path(n)):
                try:
                    pr_netns.remove(n)
                except OSError as exc:  # already gone under our feet
                    log.debug("remove %s: %s", n, exc)
        try:
            os.unlink(self.state_path())
        except FileNotFoundError:
            pass
        import shutil

        shutil.rmtree(self.run_dir(), ignore_errors=True)
        for path in self.run_logs():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def run_logs(self) -> list:
        """The log files `start` wrote for this run (``<tag>-<module>[-<nic>].log``), and
        not those of another run whose tag begins with this one (``<tag>-x``)."""
        import re

        pat = re.compile(re.escape(self.tag) + r"-[a-z_]+(-[a-z_]*\d+)?\.log$")
        try:
            names = os.listdir(STATE_DIR)
        except FileNotFoundError:
            return []
        return [os.path.join(STATE_DIR, n) for n in names if pat.fullmatch(n)]

    def run_dir(self) -> str:
        """Per-run files of the daemons (coordinator socket, snapshots, journals)."""
        return os.path.join(STATE_DIR, f"{self.tag}.d")


def _terminate(pids, grace=3.0) -> None:
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.add(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    alive.discard(pid)
                    continue
            except ChildProcessError:  # not our child: poll for existence
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    alive.discard(pid)
                    continue
            # A zombie we cannot reap still counts as dead for our purposes.
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ", 1)[1].startswith("Z"):
                        alive.discard(pid)
            except (FileNotFoundError, IndexError):
                alive.discard(pid)
        time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def list_runs() -> list:
    """Tags of testbeds whose namespaces exist."""
    tags = set()
    for n in pr_netns.listnetns():
        if n.startswith(NS_PREFIX) and n.rsplit("-", 1)[-1] in ("vpc", "gw", "inet"):
            tags.add(n[len(NS_PREFIX):].rsplit("-", 1)[0])
    return sorted(tags)

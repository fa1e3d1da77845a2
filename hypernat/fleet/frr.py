"""FRR as the fleet's BGP speaker: configuration rendered from YAML, daemons supervised.

Why FRR (zebra + bfdd + bgpd, Debian's ``frr``) and not ExaBGP: failover within a
second needs BFD, and ExaBGP has none (its sessions would fall back on BGP hold
timers, 3 s at the very least, 9 s or more in practice); FRR's bfdd runs BFD (RFC 5880)
on every session and tells bgpd, which tears the session down at once.  The same
package runs the lab's routers, so both ends of every session are the real thing.

HyperNAT never asks anyone to edit FRR's files: ``render_speaker`` writes them from the
server's ``fleet:`` section, ``FrrInstance`` runs one FRR in a directory of its own
(config, vty sockets, zserv socket, pid and log files: several instances on one host,
one per namespace, never meet) and ``vtysh`` changes what is announced at run time.

What a server's bgpd announces is gated by two outbound route-maps: toward VPC-side
peers only the ``announce.vpc`` prefixes (the default route), toward Internet-side
peers only ``announce.internet`` (the server's pool).  A prefix is announced by adding
its ``network`` statement (``no bgp network import-check``: nothing is needed in the
RIB) and withdrawn by removing it; draining adds the RFC 8326 GRACEFUL_SHUTDOWN
community (65535:0) to the VPC-side announcement first (``network 0.0.0.0/0 route-map
GSHUT``): routers keep sending the server's existing hosts, and no new ones.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time

log = logging.getLogger("hypernat.fleet.frr")

FRR_BIN = "/usr/lib/frr"
VTYSH = "vtysh"
DAEMONS = ("zebra", "bfdd", "bgpd")
GSHUT = "graceful-shutdown"  # RFC 8326 well-known community 65535:0


class FrrError(RuntimeError):
    """FRR did not start, or a vtysh command failed."""


def available() -> bool:
    return all(os.access(os.path.join(FRR_BIN, d), os.X_OK) for d in DAEMONS)


def _bfd_profile(name: str, interval_ms: int, multiplier: int) -> list:
    return [f" profile {name}", f"  detect-multiplier {multiplier}", f"  receive-interval {interval_ms}",
            f"  transmit-interval {interval_ms}", " exit"]


def render_speaker(fleet) -> dict:
    """{daemon: config text} for a gateway server's FRR, from its FleetConfig.  Nothing is
    announced at start: the speaker adds the ``network`` statements once healthy."""
    b = fleet.bfd
    bfdd = ["bfd", *_bfd_profile("fleet", b.interval_ms, b.multiplier), "exit"]
    bgp = [f"router bgp {fleet.asn}", f" bgp router-id {fleet.router_id}", " no bgp ebgp-requires-policy",
           " no bgp network import-check", " no bgp default ipv4-unicast", " timers bgp 3 9"]
    for p in fleet.peers:
        bgp += [f" neighbor {p.address} remote-as {p.asn}", f" neighbor {p.address} update-source {p.local}",
                f" neighbor {p.address} bfd", f" neighbor {p.address} bfd profile fleet",
                f" neighbor {p.address} timers connect 1", f" neighbor {p.address} advertisement-interval 0"]
    bgp += [" address-family ipv4 unicast"]
    for p in fleet.peers:
        bgp += [f"  neighbor {p.address} activate", f"  neighbor {p.address} route-map FLEET-IN in",
                f"  neighbor {p.address} route-map {'TO-VPC' if p.side == 'vpc' else 'TO-INTERNET'} out"]
    bgp += [" exit-address-family", "exit"]
    pl = [f"ip prefix-list VPC seq {5 * (i + 1)} permit {n}" for i, n in enumerate(fleet.announce_vpc)]
    pl += [f"ip prefix-list INTERNET seq {5 * (i + 1)} permit {n}" for i, n in enumerate(fleet.announce_internet)]
    rm = ["route-map FLEET-IN deny 10", "exit",
          "route-map TO-VPC permit 10", " match ip address prefix-list VPC", "exit",
          "route-map GSHUT permit 10", " set community 65535:0 additive", "exit",
          "route-map TO-INTERNET permit 10", " match ip address prefix-list INTERNET", "exit"]
    cl = []
    return {"zebra": "\n".join(["hostname " + fleet.server, "log stdout informational"]) + "\n",
            "bfdd": "\n".join(bfdd) + "\n",
            "bgpd": "\n".join(pl + cl + rm + bgp) + "\n"}


def render_router(asn: int, router_id: str, neighbors, bfd, *, announce_to_servers: bool = False) -> dict:
    """{daemon: config text} for a lab router: eBGP + BFD to every server, multipath
    across them, nothing sent back to the servers.  `neighbors` is [(address, asn)]."""
    bfdd = ["bfd", *_bfd_profile("fleet", bfd.interval_ms, bfd.multiplier), "exit"]
    bgp = [f"router bgp {asn}", f" bgp router-id {router_id}", " no bgp ebgp-requires-policy",
           " bgp bestpath as-path multipath-relax", " no bgp default ipv4-unicast", " timers bgp 3 9"]
    for addr, nasn in neighbors:
        bgp += [f" neighbor {addr} remote-as {nasn}", f" neighbor {addr} bfd", f" neighbor {addr} bfd profile fleet",
                f" neighbor {addr} timers connect 1", f" neighbor {addr} advertisement-interval 0"]
    bgp += [" address-family ipv4 unicast", "  maximum-paths 64"]
    for addr, _ in neighbors:
        bgp += [f"  neighbor {addr} activate"]
        if not announce_to_servers:
            bgp += [f"  neighbor {addr} route-map NOTHING out"]
    bgp += [" exit-address-family", "exit"]
    return {"zebra": "log stdout informational\n", "bfdd": "\n".join(bfdd) + "\n",
            "bgpd": "\n".join(["route-map NOTHING deny 10", "exit"] + bgp) + "\n"}


class FrrInstance:
    """One FRR (zebra, bfdd, bgpd) whose every file lives in `directory`, started in the
    caller's network namespace (or `netns`, through ``ip netns exec``).

    The daemons run as ``frr`` and so cannot share the starter's fate by
    PR_SET_PDEATHSIG (a change of credentials clears it): whoever runs a speaker must
    stop its FRR with it (the lab kills a server's namespaces whole; a systemd unit
    binds FRR to the speaker with ``BindsTo=``)."""

    def __init__(self, directory: str, netns: str | None = None):
        self.dir = os.path.abspath(directory)
        self.netns = netns
        self.procs: dict = {}

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _prefix(self) -> list:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def write(self, configs: dict) -> None:
        """The daemons run as Debian's ``frr`` user (they keep the capabilities they need;
        as root they would insist that root be in the ``frrvty`` group): the directory
        and its files are given to it."""
        import pwd

        os.makedirs(self.dir, exist_ok=True)
        for daemon, text in configs.items():
            with open(self.path(f"{daemon}.conf"), "w") as f:
                f.write(text)
        try:
            pw = pwd.getpwnam("frr")
        except KeyError:
            return  # no frr user: the daemons will say what they need
        for name in [self.dir] + [self.path(n) for n in os.listdir(self.dir)]:
            os.chown(name, pw.pw_uid, pw.pw_gid)

    def argv(self, daemon: str) -> list:
        a = [os.path.join(FRR_BIN, daemon), "-f", self.path(f"{daemon}.conf"), "-i", self.path(f"{daemon}.pid"),
             "--vty_socket", self.dir, "-z", self.path("zserv.api"), "-P", "0",
             "--log", f"file:{self.path(daemon + '.log')}", "--log-level", "informational"]
        if daemon == "bfdd":
            a += ["--bfdctl", self.path("bfdd.sock")]
        return self._prefix() + a

    def start(self, configs: dict | None = None, timeout: float = 10.0) -> None:
        """Start zebra, then bfdd and bgpd; return when vtysh reaches all three."""
        if configs:
            self.write(configs)
        for daemon in DAEMONS:
            out = open(self.path(f"{daemon}.out"), "ab")
            try:
                self.procs[daemon] = subprocess.Popen(self.argv(daemon), stdin=subprocess.DEVNULL, stdout=out,
                                                      stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                self.stop()
                raise FrrError(f"cannot start FRR's {daemon}: {exc}") from None
            finally:
                out.close()
            if daemon == "zebra":
                self._wait_for(lambda: os.path.exists(self.path("zserv.api")), timeout, "zebra's socket")
        self._wait_for(lambda: all(os.path.exists(self.path(f"{d}.vty")) for d in DAEMONS), timeout, "the vty sockets")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.vtysh("show bgp summary json")
                return
            except FrrError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            dead = [d for d, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise FrrError(f"FRR {', '.join(dead)} exited (see {self.dir}/*.out, *.log)")
            if time.monotonic() > deadline:
                raise FrrError(f"FRR in {self.dir}: {what} did not appear within {timeout:g} s")
            time.sleep(0.05)

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs.values())

    def vtysh(self, *commands: str, timeout: float = 5.0) -> str:
        """Run vtysh commands (each one -c); the output, FrrError on failure."""
        argv = self._prefix() + [VTYSH, "--vty_socket", self.dir]
        for c in commands:
            argv += ["-c", c]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FrrError(f"vtysh {commands!r}: no answer within {timeout:g} s") from None
        out = p.stdout + p.stderr
        if p.returncode != 0 or "% " in out and "Unknown" in out or "Exiting from" in out:
            raise FrrError(f"vtysh {commands!r} failed ({p.returncode}): {out.strip()[:300]}")
        return p.stdout

    def json(self, command: str):
        out = self.vtysh(command + (" json" if not command.endswith("json") else ""))
        return json.loads(out) if out.strip() else {}

    def configure(self, *lines: str) -> None:
        self.vtysh("configure terminal", *lines)

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM bgpd first (it sends Cease to its peers: they drop our routes at once),
        then bfdd and zebra; SIGKILL what is left after `grace`."""
        for daemon in ("bgpd", "bfdd", "zebra"):
            p = self.procs.get(daemon)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(1.0)
        self.procs.clear()


"""``python -m hypernat.fleet``: a gateway server's health-gated BGP speaker.

One per server, beside its coordinator.  It renders FRR's configuration from the
server's YAML, starts FRR (zebra, bfdd, bgpd: stop them with the speaker, see
frr.FrrInstance) and then, every ``health.interval``:

    coordinator ──status, counters──► health ──► what is announced (vtysh network / no network)

    toward the VPC     the default route      only while healthy: the coordinator answers,
                                              ``min_nics_up`` NICs are up, no NIC's pool
                                              utilisation is above ``max_utilisation``,
                                              and no drain was asked for
    toward the Internet the server's pool     from the first healthy moment until the
                                              server is gone or its mappings drained

Draining (``hypernat ctl drain``, seen in the coordinator's status; sticky): the default
route is re-announced with the RFC 8326 GRACEFUL_SHUTDOWN community, which the VPC
router's controller (resilient.py) reads as "no new hosts, keep the existing ones";
once no mapping is left (the NICs' reports say so for ``DRAIN_SETTLE_S``: a report
from before the last connections would say 0 too) or ``drain_timeout`` passed, both
announcements are withdrawn and the status says ``drained``.  On SIGTERM (shutdown): withdraw everything, wait
for the withdrawals to leave, stop bgpd (Cease to every peer), then bfdd and zebra:
routers have dropped the server before its NAT daemons stop.

Nothing is announced that the server does not own: every ``network`` statement passes
``guard``, which refuses (logs, counts ``refused_announcements``) a prefix outside the
server's ``announce`` lists or, toward the Internet, outside its ``external.pool``.
A speaker whose FRR does not come up announces nothing and exits 1; peer flaps are
counted (``peer_flaps``) and logged.  State and counters go to
``<state_dir>/fleet-speaker.json`` (atomic rewrite) and, where ``--metrics-port`` is
given, to Prometheus.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from .frr import FrrError, FrrInstance, render_speaker

log = logging.getLogger("hypernat.fleet")

# The NICs report their gauges every second: "no mapping left" counts only once it has
# held this long after the drain began (a report older than the last connections says 0).
DRAIN_SETTLE_S = 2.5

COUNTERS = ("announcements", "withdrawals", "refused_announcements", "health_failures", "peer_flaps",
            "coordinator_unreachable", "frr_errors")


class Speaker:
    def __init__(self, cfg, endpoint: str | None = None, frr_dir: str | None = None, clock=time.monotonic):
        if cfg.fleet is None:
            raise ValueError(f"{cfg.path}: no fleet: section (this server is not part of a fleet)")
        self.cfg, self.fleet = cfg, cfg.fleet
        self.endpoint = endpoint or cfg.coordinator.endpoint
        self.frr = FrrInstance(frr_dir or self.fleet.frr_dir or os.path.join(cfg.state_dir, "frr"))
        self.clock = clock
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.announced: dict = {}  # prefix -> "normal" | "gshut"
        self.state = "starting"
        self.draining_since = None
        self.empty_since = None  # while draining: since when the NICs report no mapping
        self.health: dict = {}
        self._peers_up: dict = {}
        self._next_peer_check = 0.0
        self._ctl = None

    # -- what may be announced -------------------------------------------------------------
    def guard(self, side: str, prefix) -> bool:
        """True if this server may announce `prefix` toward `side`; else logged and counted."""
        import ipaddress

        net = ipaddress.ip_network(str(prefix))
        if side == "vpc":
            ok = net in self.fleet.announce_vpc
        else:
            ok = net in self.fleet.announce_internet and any(net.subnet_of(o) for o in self.cfg.pool)
        if not ok:
            self.counters["refused_announcements"] += 1
            log.error("refusing to announce %s toward the %s side: not this server's (external.pool %s)",
                      net, side, ", ".join(map(str, self.cfg.pool)))
        return ok

    def _network(self, prefix, how: str | None) -> None:
        """Announce `prefix` (how: 'normal' or 'gshut') or withdraw it (None)."""
        if self.announced.get(str(prefix)) == how:
            return
        lines = ["router bgp %d" % self.fleet.asn, "address-family ipv4 unicast"]
        if how is None:
            lines.append(f"no network {prefix}")
        else:
            lines.append(f"network {prefix}" + (" route-map GSHUT" if how == "gshut" else ""))
            if how == "normal" and self.announced.get(str(prefix)) == "gshut":
                lines.insert(2, f"no network {prefix}")  # drop the route-map with the statement
        self.frr.configure(*lines)
        if how is None:
            self.announced.pop(str(prefix), None)
            self.counters["withdrawals"] += 1
        else:
            self.announced[str(prefix)] = how
            self.counters["announcements"] += 1
        log.info("%s %s", "withdrew" if how is None else f"announced ({how})", prefix)

    def set_vpc(self, how: str | None) -> None:
        for p in self.fleet.announce_vpc:
            if how is None or self.guard("vpc", p):
                self._network(p, how)

    def set_internet(self, on: bool) -> None:
        for p in self.fleet.announce_internet:
            if not on or self.guard("internet", p):
                self._network(p, "normal" if on else None)

    # -- health ----------------------------------------------------------------------------
    def read_health(self) -> dict:
        """The coordinator's view: {'ok', 'why', 'draining', 'mappings'}."""
        from ..coord.ctl import CtlClient, CtlError

        try:
            if self._ctl is None:
                self._ctl = CtlClient(self.endpoint, timeout=min(1.0, max(0.2, 2 * self.fleet.health.interval)))
            st = self._ctl.query("status")
            ct = self._ctl.query("counters")
        except (CtlError, OSError) as exc:
            if self._ctl is not None:
                self._ctl.close()
                self._ctl = None
            self.counters["coordinator_unreachable"] += 1
            return {"ok": False, "why": f"coordinator: {exc}", "draining": False, "mappings": None}
        gauges = (ct or {}).get("gauges", {})
        util = max([float(g.get("utilisation", 0.0)) for g in gauges.values()] or [0.0])
        mappings = sum(int(g.get("out_entries", 0)) for g in gauges.values())
        h = self.fleet.health
        why = ""
        if st.get("nics_up", 0) < h.min_nics_up:
            why = f"{st.get('nics_up', 0)} NIC(s) up, fewer than {h.min_nics_up}"
        elif util > h.max_utilisation:
            why = f"pool utilisation {util:.2f} above {h.max_utilisation:.2f}"
        return {"ok": not why, "why": why, "draining": bool(st.get("draining")), "mappings": mappings,
                "nics_up": st.get("nics_up", 0), "utilisation": util}

    def step(self) -> None:
        """One health check and what follows from it."""
        now = self.clock()
        h = self.read_health()
        was_ok = self.health.get("ok")
        self.health = h
        if h["draining"] and self.draining_since is None and self.state != "drained":
            self.draining_since = now
            log.warning("draining: no new hosts (GRACEFUL_SHUTDOWN toward the VPC); existing ones stay")
        if self.state == "drained":
            pass
        elif self.draining_since is not None:
            left = h["mappings"]
            if left == 0:
                self.empty_since = now if self.empty_since is None else self.empty_since
            else:
                self.empty_since = None
            empty = self.empty_since is not None and now - self.empty_since >= DRAIN_SETTLE_S
            if empty or now - self.draining_since >= self.fleet.health.drain_timeout:
                self.set_vpc(None)
                self.set_internet(False)
                self.state = "drained"
                log.warning("drained (%s mappings left after %.1f s): nothing announced",
                            left, now - self.draining_since)
            else:
                self.set_vpc("gshut")
                self.state = "draining"
        elif h["ok"]:
            self.set_internet(True)
            self.set_vpc("normal")
            self.state = "serving"
        else:
            if was_ok is not False:
                self.counters["health_failures"] += 1
                log.warning("unhealthy (%s): default route withdrawn", h["why"])
            self.set_vpc(None)  # the pool stays: live mappings' return traffic needs it
            self.state = "unhealthy"
        if now >= self._next_peer_check:
            self._next_peer_check = now + 1.0
            self.check_peers()

    def check_peers(self) -> None:
        try:
            summary = self.frr.json("show bgp ipv4 unicast summary")
        except (FrrError, ValueError) as exc:
            self.counters["frr_errors"] += 1
            log.error("FRR: %s", exc)
            return
        for addr, p in (summary.get("peers") or {}).items():
            up = p.get("state") == "Established"
            if self._peers_up.get(addr) and not up:
                self.counters["peer_flaps"] += 1
                log.warning("peer %s went down (%s)", addr, p.get("state"))
            self._peers_up[addr] = up

    def snapshot(self) -> dict:
        return {"server": self.fleet.server, "state": self.state, "announced": dict(self.announced),
                "health": self.health, "peers_up": dict(self._peers_up), "counters": dict(self.counters),
                "time": time.time()}

    def write_status(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f)
        os.replace(tmp, path)

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        self.frr.start(render_speaker(self.fleet))
        log.info("FRR up in %s: AS%d, router id %s, peers %s", self.frr.dir, self.fleet.asn, self.fleet.router_id,
                 ", ".join(f"{p.name} {p.address} (AS{p.asn}, {p.side})" for p in self.fleet.peers))

    def shutdown(self) -> None:
        """Withdraw, let the UPDATEs leave, stop FRR (bgpd first)."""
        try:
            if self.frr.alive():
                self.set_vpc(None)
                self.set_internet(False)
                time.sleep(0.3)
        except FrrError as exc:
            log.error("withdrawing at shutdown: %s", exc)
        self.frr.stop()
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        self.state = "stopped"


def main(argv=None) -> int:
    from ..config import ConfigError, load

    ap = argparse.ArgumentParser(prog="hypernat-fleet", description="A gateway server's health-gated BGP speaker (FRR).")
    ap.add_argument("--config", required=True)
    ap.add_argument("--endpoint", help="the coordinator (default: the config's)")
    ap.add_argument("--frr-dir", help="FRR's files (default: fleet.frr_dir, else state_dir/frr)")
    ap.add_argument("--status", help="status file (default: state_dir/fleet-speaker.json)")
    ap.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load(args.config)
        sp = Speaker(cfg, endpoint=args.endpoint, frr_dir=args.frr_dir)
    except (ConfigError, ValueError) as exc:
        print(f"hypernat-fleet: {exc}", file=sys.stderr)
        return 2
    status = args.status or os.path.join(cfg.state_dir, "fleet-speaker.json")
    os.makedirs(os.path.dirname(os.path.abspath(status)), exist_ok=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    try:
        sp.start()
    except FrrError as exc:
        log.error("FRR did not come up: %s; announcing nothing", exc)
        sp.frr.stop()
        return 1
    if args.metrics_port:
        _serve_metrics(sp, cfg.metrics.address, args.metrics_port)
    try:
        while not stop:
            t0 = time.monotonic()
            try:
                sp.step()
            except FrrError as exc:
                sp.counters["frr_errors"] += 1
                log.error("FRR: %s", exc)
                if not sp.frr.alive():
                    log.error("FRR died: stopping (announcing nothing)")
                    return 1
            sp.write_status(status)
            time.sleep(max(0.0, sp.fleet.health.interval - (time.monotonic() - t0)))
    finally:
        sp.shutdown()
        sp.write_status(status)
    return 0


def _serve_metrics(sp: Speaker, address: str, port: int) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self):
            c = CounterMetricFamily("hypernat_fleet_events", "fleet speaker events", labels=["event"])
            for k, v in sp.counters.items():
                c.add_metric([k], v)
            yield c
            g = GaugeMetricFamily("hypernat_fleet_announced", "prefixes announced", labels=["prefix", "how"])
            for p, how in sp.announced.items():
                g.add_metric([p, how], 1)
            yield g

    reg = CollectorRegistry()
    reg.register(Collector())
    start_http_server(port, addr=address, registry=reg)

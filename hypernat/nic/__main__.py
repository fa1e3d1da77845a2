"""``hypernat-nic --config gw.yaml --nic N``: one NIC worker as a daemon.

A thin shell over ``NicWorker``: read the config, open the NIC's two ports with the
backend the config names, pin / prioritise if asked, serve metrics, run the loop until
SIGTERM / SIGINT, then write the snapshot (graceful stop: no rule lost).

Offline: ``hypernat-nic --config C --nic K --pcap-in IN.pcap --pcap-out OUT.pcap``
translates a capture as NIC K would (``hypernat.io.pcap.run_pcap``: outgoing and
incoming frames told apart by their addresses, misses decided by the RuleBuilder, a
miss that would need a fetch counted as ``fetch_offline``), writes what the NIC would
send, and prints the JSON summary (counters by verdict and reason) on exit.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def open_port(backend: str, ifname: str, vlans=(), queue=None, rx_ring=None, rx_block_ms=None):
    """A Port for interface `ifname` with the named backend (from hypernat.io);
    ``vlans``: the 802.1Q VLAN IDs the link carries, ``queue``: the receive queue this
    NIC serves (PACKET_MMAP, AF_XDP), ``rx_ring`` / ``rx_block_ms``: the receive ring
    (PACKET_MMAP)."""
    if backend == "packet_mmap":
        from ..io.packet_mmap import PacketMmapPort as P
    elif backend == "af_xdp":
        from ..io.af_xdp import AfXdpPort as P
    elif backend == "pcap":
        from ..io.pcap import PcapPort as P
    elif backend == "memory":
        raise SystemExit("hypernat-nic: the memory backend exists only inside the emulated deployment "
                         "(hypernat demo / hypernat.lab.emulated)")
    else:
        raise SystemExit(f"hypernat-nic: unknown I/O backend {backend!r}")
    kw = {}
    if vlans:
        kw["vlans"] = vlans
    if queue is not None:
        kw["queue"] = queue
    if kw and backend not in ("packet_mmap", "af_xdp"):
        raise SystemExit(f"hypernat-nic: {ifname}: {', '.join(kw)} need the packet_mmap or af_xdp backend")
    if rx_ring is not None:
        kw["rx_ring"] = rx_ring
    if rx_block_ms is not None:
        kw["rx_block_ms"] = rx_block_ms
    if (rx_ring is not None or rx_block_ms is not None) and backend != "packet_mmap":
        raise SystemExit(f"hypernat-nic: {ifname}: rx_ring/rx_block_ms need the packet_mmap backend")
    return P(ifname, **kw)


def _rss_params(cfg, nc):
    """``switch.hash: toeplitz``: the outside port's RSS key (``switch.toeplitz_key``
    overrides it) and indirection table, and which NIC serves each of its queues, so
    active install predicts the queue a reply lands on.  None (the defaults) otherwise,
    or where the port has no RSS (veth): active install then falls back to passive."""
    if cfg.switch.hash != "toeplitz":
        return None
    import dataclasses

    from ..switchhash import read_rss
    from .worker import agent_params

    rss = read_rss(nc.outside)
    if rss is None:
        logging.warning("nic%d: switch.hash toeplitz, but %s has no RSS key/indirection table (ethtool -x): "
                        "replies are fetched (passive install)", nc.id, nc.outside)
        return None
    key, table = rss
    if cfg.switch.toeplitz_key:
        key = bytes.fromhex(cfg.switch.toeplitz_key.replace(":", ""))
    nics = [cfg.nic(i) for i in range(cfg.n_nics)]
    served = {n.queue: n.id for n in nics if n.outside == nc.outside and n.queue is not None}
    return dataclasses.replace(agent_params(cfg), switch_rss=(key, tuple(table), served))


def _forwarding() -> bool:
    """Does this namespace's kernel forward IPv4?  (AF_PACKET leaves every frame to it too.)"""
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _addresses(ifname: str) -> list:
    """The IPv4 addresses configured on an interface (the ones ARP must answer for)."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx[0], family=2)] if idx else []
    except Exception as exc:  # noqa: BLE001 - no answer for those then; logged
        logging.warning("%s: cannot read its addresses (%s): ARP for them goes unanswered", ifname, exc)
        return []


def _mtu(ifname: str) -> int:
    """The interface's MTU (0 if it cannot be read: no limit is applied then)."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            return int(ipr.get_links(idx[0])[0].get_attr("IFLA_MTU")) if idx else 0
    except Exception as exc:  # noqa: BLE001 - logged; the config's mtu (if any) still applies
        logging.warning("%s: cannot read its MTU (%s): no size limit unless the config sets one", ifname, exc)
        return 0


def _set_links(w, nc) -> None:
    """The fast path's router settings: the config's, else the interfaces' MTUs and the
    inside interface's address (ICMP errors toward the VPC come from it)."""
    from .. import messages as M

    addrs = _addresses(nc.inside)
    s = w.set_links(inside_mtu=_mtu(nc.inside), outside_mtu=_mtu(nc.outside),
                    inside_address=M.ip_int(addrs[0]) if addrs else 0)
    logging.info("nic%d: router: MTU inside %d outside %d, ICMP from %s / %s at most %d/s, MSS clamp %s", nc.id,
                 s["inside_mtu"], s["outside_mtu"], M.ip_str(s["inside_address"]), M.ip_str(s["outside_address"]),
                 s["icmp_rate"], s["mss_clamp"] or "off")
    if not s["inside_address"]:
        logging.warning("nic%d: %s has no IPv4 address and icmp.inside_source is not set: no ICMP errors toward "
                        "the VPC (traceroute shows a silent hop)", nc.id, nc.inside)


def _set_macs(w, inside, outside, nc) -> None:
    """Frames leave with the port's own MAC toward the next hop's (l2.next_hop_mac)."""
    from ..l2 import next_hop_mac

    try:
        w.set_l2(inside.mac(), next_hop_mac(nc.inside), outside.mac(), next_hop_mac(nc.outside))
        logging.info("nic%d: MAC addresses resolved for %s and %s", nc.id, nc.inside, nc.outside)
    except (OSError, ValueError, TimeoutError) as exc:
        logging.warning("nic%d: next-hop MACs not resolved (%s): frames keep their MAC addresses", nc.id, exc)


def _offline(cfg, args) -> int:
    """--pcap-in / --pcap-out: one offline run, its JSON summary on stdout."""
    from ..io.pcap import run_pcap

    try:
        summary = run_pcap(cfg, args.nic, args.pcap_in, args.pcap_out)
    except (OSError, ValueError) as exc:
        print(f"hypernat-nic: {args.pcap_in} -> {args.pcap_out}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1, sort_keys=True, default=str))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hypernat-nic", description=__doc__.split("\n")[0])
    ap.add_argument("--config", "-c", required=True, help="gateway YAML file")
    ap.add_argument("--nic", "-n", type=int, required=True, help="this NIC's id")
    ap.add_argument("--endpoint", help="coordinator endpoint (default: from the config)")
    ap.add_argument("--state-dir", help="snapshot and journal directory (default: config state_dir/nic<N>)")
    ap.add_argument("--no-metrics", action="store_true")
    ap.add_argument("--keep-macs", action="store_true",
                    help="do not rewrite MAC addresses (default: own MAC -> next hop's, resolved at start)")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--pcap-in", metavar="IN.pcap", help="translate this capture offline (needs --pcap-out)")
    ap.add_argument("--pcap-out", metavar="OUT.pcap", help="where the offline run writes what it would send")
    args = ap.parse_args(argv)
    if (args.pcap_in is None) != (args.pcap_out is None):
        ap.error("--pcap-in and --pcap-out go together")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from .. import config as cfgmod
    from .worker import NicWorker

    try:
        cfg = cfgmod.load(args.config)
    except (OSError, cfgmod.ConfigError) as exc:
        print(f"hypernat-nic: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.nic < cfg.n_nics:
        print(f"hypernat-nic: NIC {args.nic} is not in {args.config} (0..{cfg.n_nics - 1})", file=sys.stderr)
        return 2
    if args.pcap_in is not None:
        return _offline(cfg, args)
    nc = cfg.nic(args.nic)
    if nc.cpu is not None:
        try:
            os.sched_setaffinity(0, {nc.cpu})
        except OSError as exc:
            logging.warning("cannot pin to CPU %d: %s", nc.cpu, exc)
    if nc.rt_priority:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(nc.rt_priority))
        except OSError as exc:
            logging.warning("cannot set SCHED_FIFO %d: %s", nc.rt_priority, exc)
    try:
        ring = {"rx_ring": nc.rx_ring, "rx_block_ms": nc.rx_block_ms} if nc.io == "packet_mmap" else {}
        inside = open_port(nc.io, nc.inside, nc.inside_vlans, nc.queue, **ring)
        outside = open_port(nc.io, nc.outside, nc.outside_vlans, nc.queue, **ring)
        if nc.io == "packet_mmap" and _forwarding():
            logging.warning("nic%d: net.ipv4.ip_forward is on in this namespace: the kernel forwards every "
                            "frame HyperNAT forwards too (turn it off, or drop IPv4 at ingress)", nc.id)
    except (OSError, ImportError) as exc:
        print(f"hypernat-nic: cannot open {nc.inside}/{nc.outside} with {nc.io}: {exc}", file=sys.stderr)
        return 1
    arp = None
    if nc.io == "af_xdp":  # the kernel never sees these frames: answer ARP ourselves
        from ..l2 import ArpResponder

        arp = {role: ArpResponder(port.mac(), owned=_addresses(ifname))
               for role, port, ifname in (("inside", inside, nc.inside), ("outside", outside, nc.outside))}
    from .journal import FormatError, JournalError

    try:
        w = NicWorker(cfg, args.nic, inside, outside, endpoint=args.endpoint, state_dir=args.state_dir, arp=arp,
                      params=_rss_params(cfg, nc))
    except (FormatError, JournalError) as exc:  # a state file of another version, or unwritable
        print(f"hypernat-nic: {exc}", file=sys.stderr)
        inside.close()
        outside.close()
        return 2
    if nc.io in ("packet_mmap", "af_xdp"):
        _set_links(w, nc)
    if nc.io in ("packet_mmap", "af_xdp") and not args.keep_macs:
        _set_macs(w, inside, outside, nc)
    if cfg.metrics.enabled and not args.no_metrics:
        from .metrics import serve

        serve(w, cfg.metrics.address, cfg.metrics.port + 1 + args.nic)
    w.install_signal_handlers()
    import hypernat

    from ..fastpath import IMPL

    logging.info("nic%d: running (%s, %s/%s, coordinator %s; fast path %s, slow path compiled: %s)", args.nic,
                 nc.io, nc.inside, nc.outside, args.endpoint or cfg.coordinator.endpoint, IMPL,
                 ", ".join(m.rsplit(".", 1)[-1] for m in hypernat.compiled_modules()) or "none")
    try:
        w.run()
    finally:
        w.shutdown(snapshot=True)
        inside.close()
        outside.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

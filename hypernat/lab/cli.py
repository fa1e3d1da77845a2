"""`hypernat lab up | run | down | list`: the namespace testbed from the command line.

    hypernat lab up   [--tag T] [--nics N] [--peer linux|hypernat|noop] [--config C] [--steer-seed S]
    hypernat lab up   [--tag T] --servers N [--nics M] [--config C] [--fleet DIR]     a fleet (fleet.py)
    hypernat lab run  [--tag T] [--conns 200] [--udp 50] [--pings 5] [--json]
    hypernat lab fail | recover | drain SERVER [--tag T]                             a fleet's server
    hypernat lab down [--tag T | --all]
    hypernat lab list

`up` builds the namespaces (topology.py) and starts what runs in ``gw``: nothing more
for ``--peer linux`` (Linux's NAT is configured in the kernel), the no-op forwarders
for ``noop``, the coordinator and one NIC daemon per NIC for ``hypernat``.  `run`
drives TCP, UDP and ping through it and prints a report; its exit status is 0 only if
every byte arrived.  `down` stops every process inside the run's namespaces and
deletes them; it is idempotent, so it is also the cleanup after a failed `up`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_TAG = "lab"


def _parser():
    p = argparse.ArgumentParser(prog="hypernat lab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the testbed")
    up.add_argument("--tag", default=DEFAULT_TAG, help="run name; namespaces are hn-TAG-{vpc,gw,inet}")
    up.add_argument("--nics", type=int, default=2, help="NICs (per server); the daemons' config is derived to match")
    up.add_argument("--servers", type=int, default=0,
                    help="a fleet of N gateway servers behind FRR routers (BGP, BFD, resilient ECMP); 0: one gateway")
    up.add_argument("--hosts", type=int, default=24, help="VPC hosts (fleet)")
    up.add_argument("--fleet", help="the servers' own YAML files (a directory) instead of derived ones (fleet)")
    up.add_argument("--peer", choices=("hypernat", "linux", "noop"), default="hypernat",
                    help="what translates in gw: HyperNAT's daemons, Linux's nftables NAT, or the no-op forwarder")
    up.add_argument("--steer-seed", type=lambda v: int(v, 0), default=None,
                    help="steer return traffic in inet by nftables jhash with this seed (default: kernel ECMP)")
    up.add_argument("--config", default="conf/testbed.yaml", help="addresses (internal prefixes, pool) and daemon config")
    up.add_argument("--backend", default=None, choices=("packet_mmap", "af_xdp"),
                    help="packet I/O: of the no-op forwarders (default packet_mmap), and of HyperNAT's daemons "
                         "in place of the config's nics[].io when given")
    up.add_argument("--offloads", choices=("on", "off"), default=None,
                    help="checksum/TSO/GSO on the veths (default: on; off with --backend af_xdp, which is per-frame)")
    up.add_argument("--queues", type=int, default=1, help="receive/transmit queues per veth (multi-queue links)")
    run = sub.add_parser("run", help="drive traffic through a testbed and report")
    run.add_argument("--tag", default=DEFAULT_TAG)
    run.add_argument("--conns", type=int, default=200)
    run.add_argument("--udp", type=int, default=50)
    run.add_argument("--pings", type=int, default=5)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", action="store_true")
    for name, what in (("fail", "SIGKILL every daemon of a fleet's server"), ("recover", "start a failed server again"),
                       ("drain", "drain a server (no new hosts), wait, then stop its daemons")):
        op = sub.add_parser(name, help=what)
        op.add_argument("server", type=int, help="server number (1..N)")
        op.add_argument("--tag", default=DEFAULT_TAG)
    down = sub.add_parser("down", help="remove a testbed (idempotent)")
    down.add_argument("--tag", default=DEFAULT_TAG)
    down.add_argument("--all", action="store_true", help="every hn-* testbed on this machine")
    sub.add_parser("list", help="testbeds whose namespaces exist")
    return p


def start_gateway(topo, config: str | None, backend: str | None = None, rx_ring: str = "v2") -> None:
    """``backend``: the no-op forwarders' I/O (packet_mmap when None); for HyperNAT, every
    NIC's ``io`` in place of the config's when given."""
    """Start what runs inside gw for the topology's mode (processes recorded for `down`);
    ``rx_ring``: the no-op forwarder's PACKET_MMAP receive ring (HyperNAT's is its config's)."""
    py = sys.executable
    if topo.mode == "noop":
        from .noop import start_in_lab

        start_in_lab(topo, backend=backend or "packet_mmap", rx_ring=rx_ring)
    elif topo.mode == "hypernat":
        import importlib.util

        if importlib.util.find_spec("hypernat.nic") is None or importlib.util.find_spec("hypernat.coord") is None:
            raise RuntimeError("hypernat.nic / hypernat.coord are not in this build: use --peer linux or noop")
        # The lab names its links inside<k>/outside<k>; a config that names other NICs
        # (or fewer: `--nics 3` on conf/testbed.yaml) is derived to match, in the run's dir.
        from .fleet import derived_config

        run = topo.run_dir()
        config = derived_config(config, topo.nics, run, io=backend)
        topo.config = config
        # A coordinator socket and state directories of the run's own: two labs from the
        # same config never meet, and a new lab never restores an old run's snapshot.
        os.makedirs(run, exist_ok=True)
        topo.endpoint = f"ipc://{run}/coord.sock"
        # (Metrics servers listen on gw's own loopback: no clash between runs.)
        topo.start(topo.gw, coord_argv(topo))
        from ..config import load

        workers = load(config).n_nics  # nics x queues where the config serves queues
        for k in range(workers):
            topo.start(topo.gw, nic_argv(topo, k))
        wait_for_nics(topo, workers=workers)


def coord_argv(topo) -> list:
    """The coordinator's command line in a hypernat-mode lab (tests restart it with it)."""
    return [sys.executable, "-m", "hypernat.coord", "--config", topo.config, "--endpoint", topo.endpoint]


def nic_argv(topo, k: int) -> list:
    """NIC k's daemon command line in a hypernat-mode lab."""
    return [sys.executable, "-m", "hypernat.nic", "--config", topo.config, "--nic", str(k),
            "--endpoint", topo.endpoint, "--state-dir", os.path.join(topo.run_dir(), f"nic{k}")]


def _ctl(topo):
    from ..config import load
    from ..coord.ctl import CtlClient

    return CtlClient(topo.endpoint or load(topo.config).coordinator.endpoint, timeout=1.0)


def wait_for_nics(topo, timeout: float = 15.0, workers: int | None = None) -> None:
    """Until the coordinator reports every NIC up (their HELLO arrived): `workers` of
    them (default: one per port pair of the lab)."""
    want = topo.nics if workers is None else workers
    import time

    from ..coord.ctl import CtlError

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with _ctl(topo) as c:
                rows = c.query("nics") or []
            up = sum(1 for r in rows if r.get("up"))
            if up >= want:
                return
            last = f"{up} of {want} NICs up"
        except CtlError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"the gateway did not come up in {timeout:g} s ({last}); see the logs in /run/hypernat-lab")


def gateway_counters(topo) -> dict:
    """The NICs' counters summed by the coordinator (non-zero ones), or {'error': ...}."""
    from ..coord.ctl import CtlError

    try:
        with _ctl(topo) as c:
            r = c.query("counters") or {}
    except (CtlError, OSError, ValueError) as exc:
        return {"error": str(exc)}

    def flat(d, prefix=""):
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                yield from flat(v, name)
            else:
                yield name, v

    return {k: v for k, v in sorted(flat(r.get("total", {}))) if v}


def _is_fleet(args) -> bool:
    from .topology import STATE_DIR

    if args.cmd == "up":
        return args.servers > 0
    return os.path.exists(os.path.join(STATE_DIR, f"{args.tag}.fleet.json"))


def main(argv=None) -> int:
    from .topology import Addressing, Topology, list_runs

    args = _parser().parse_args(argv)
    if args.cmd != "list" and os.geteuid() != 0:
        print("hypernat lab: needs root (network namespaces); `hypernat demo` runs the emulated deployment",
              file=sys.stderr)
        return 2
    if args.cmd == "list":
        for tag in list_runs():
            print(tag)
        return 0
    if args.cmd in ("fail", "recover", "drain") or (args.cmd in ("up", "run") and _is_fleet(args)):
        from . import fleet as fleet_lab

        return fleet_lab.cli(args)
    if args.cmd == "down":
        tags = list_runs() if args.all else [args.tag]
        for tag in tags:
            from .fleet import STATE_DIR as _sd, Fleet

            if os.path.exists(os.path.join(_sd, f"{tag}.fleet.json")):
                Fleet.load(tag).down()
                print(f"lab {tag}: down (fleet)")
                continue
            try:
                topo = Topology.load(tag)
            except (FileNotFoundError, ValueError, TypeError):
                topo = Topology(tag=tag)
            topo.down()
            Fleet(tag=tag, servers=0).down()  # a fleet's leftovers without a state file (no-op otherwise)
            print(f"lab {tag}: down")
        return 0
    if args.cmd == "up":
        offloads = args.offloads == "on" if args.offloads else args.backend != "af_xdp"
        topo = Topology(tag=args.tag, nics=args.nics, mode=args.peer, addr=Addressing.from_config(args.config),
                        steer_seed=args.steer_seed, offloads=offloads, queues=args.queues)
        topo.up()
        try:
            start_gateway(topo, args.config, args.backend)
        except BaseException:
            topo.down()
            raise
        print(f"lab {topo.tag}: up ({topo.mode}, {topo.nics} NICs): {', '.join(topo.namespaces)}")
        if topo.pids:
            from .topology import STATE_DIR

            print(f"lab {topo.tag}: {len(topo.pids)} processes in {topo.gw}, logs in {STATE_DIR}/{topo.tag}-*.log")
        return 0
    if args.cmd == "run":
        from . import traffic

        try:
            topo = Topology.load(args.tag)
        except FileNotFoundError:
            print(f"hypernat lab run: no testbed {args.tag!r} (hypernat lab up --tag {args.tag})", file=sys.stderr)
            return 2
        rep = traffic.run_all(topo, n_conns=args.conns, udp_flows=args.udp, pings=args.pings, seed=args.seed)
        rep["links"] = {k: {"rx": v[0], "tx": v[1]} for k, v in topo.link_counters().items()}
        if topo.mode == "linux":
            from .peer import conntrack_count, nat_counters

            rep["linux_nat"] = dict(nat_counters(topo), conntrack=conntrack_count(topo))
        if topo.mode == "hypernat" and (topo.config or topo.endpoint):
            import time

            time.sleep(1.2)  # the NICs report their counters every second
            rep["gateway"] = gateway_counters(topo)
        if args.json:
            print(json.dumps(rep, indent=1, default=str))
        else:
            t = rep["tcp"]
            print(f"TCP  {t['intact']}/{t['connections']} connections intact, {t['bytes_checked']} bytes checked, "
                  f"{t['crossed_nics']}/{t['located']} with the two directions on different NICs "
                  f"({100 * t['crossed_fraction']:.0f}%)  pairs {t['link_pairs_out_to_in']}")
            if t["errors"]:
                print(f"     errors: {dict(t['errors'])}")
            u = rep["udp"]
            print(f"UDP  {u['answered']}/{u['flows']} flows answered ({u['retries']} retries)")
            p = rep["ping"]
            print(f"ping {p['received']}/{p['sent']} replies")
            for k, v in rep.get("linux_nat", {}).items():
                print(f"linux-nat {k}: {v}")
            if "gateway" in rep:
                keys = ("clone", "drop", "fetch", "push", "miss", "translated", "hairpin", "nack", "revoke")
                for k, v in rep["gateway"].items():
                    if k == "error" or any(w in k for w in keys):
                        print(f"gateway {k}: {v}")
            for name, v in rep["links"].items():
                print(f"link {name:<9} rx {v['rx']:>8} tx {v['tx']:>8}")
        good = (rep["tcp"]["intact"] == rep["tcp"]["connections"] and rep["udp"]["answered"] == rep["udp"]["flows"]
                and rep["ping"]["received"] == rep["ping"]["sent"])
        return 0 if good else 1
    return 2

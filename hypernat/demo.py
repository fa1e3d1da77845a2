"""`hypernat demo`: the gateway's main job on a configuration, start to finish.

As root (network namespaces available): builds the namespace testbed of the config
(`hypernat lab up`), starts the coordinator and one `hypernat-nic` per NIC in `gw`, drives
real TCP connections, UDP flows and pings from `vpc` to `inet` through it
(`hypernat lab run`), prints the report, and tears everything down (`hypernat lab down`),
also after a failure.  The exit status is 0 only if every byte arrived.

Without root it says so and runs the emulated deployment instead: the coordinator and
the NIC workers as real processes, fed by an emulated switch and Internet.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parser():
    p = argparse.ArgumentParser(prog="hypernat demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="conf/testbed.yaml", help="the deployment (default: %(default)s)")
    p.add_argument("--conns", type=int, default=200, help="concurrent TCP connections (default: %(default)s)")
    p.add_argument("--udp", type=int, default=50, help="UDP request/response flows (default: %(default)s)")
    p.add_argument("--pings", type=int, default=5, help="pings (default: %(default)s)")
    p.add_argument("--tag", default="demo", help="testbed name: namespaces hn-TAG-{vpc,gw,inet}")
    p.add_argument("--emulated", action="store_true", help="run the emulated deployment even as root")
    return p


def _lab(args) -> int:
    from .lab import cli as lab

    if lab.main(["down", "--tag", args.tag]) != 0:
        return 2
    try:
        rc = lab.main(["up", "--tag", args.tag, "--peer", "hypernat", "--config", args.config])
        if rc != 0:
            return rc
        return lab.main(["run", "--tag", args.tag, "--conns", str(args.conns), "--udp", str(args.udp),
                         "--pings", str(args.pings)])
    finally:
        lab.main(["down", "--tag", args.tag])


def _emulated(args) -> int:
    from .config import load
    from .lab.emulated import run_emulated

    report = run_emulated(load(args.config), flows=args.conns)
    print(json.dumps(report, indent=1, default=str))
    return 0 if report.get("consistent") else 1


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .lab.preflight import netns_unavailable_reason

    reason = netns_unavailable_reason()
    if args.emulated or reason is not None:
        if reason is not None:
            print(f"hypernat demo: {reason}: running the emulated deployment instead of the testbed",
                  file=sys.stderr)
        return _emulated(args)
    return _lab(args)


if __name__ == "__main__":
    sys.exit(main())

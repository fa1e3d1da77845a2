"""``hypernat ctl``: ask a running coordinator.

    hypernat ctl [--config F | --endpoint E] status       the coordinator: uptime, NICs, totals
    hypernat ctl ... nics                                  each NIC: up?, last seen, messages
    hypernat ctl ... counters                              the NICs' counters summed, per NIC,
                                                           and the coordinator's own
    hypernat ctl ... rule ADDR:PORT [--proto tcp|udp|icmp] who owns / holds clones of the
                                                           rule for that external endpoint
    hypernat ctl ... drain                                 a fleet's server: no new hosts
    hypernat ctl --tag T [--server S] ...                  a lab run's coordinator
    hypernat ctl keygen DIR --nics N                       CURVE keys (see hypernat.auth)

A control client is a DEALER with an anonymous identity that sends ``QUERY`` (JSON
``{"id", "op", "args"}``) to the coordinator and waits for the ``REPLY`` with the same
id.  With CURVE it uses the ``ctl.key_secret`` pair that lies beside the coordinator's
key files (or ``--key``); that key may not pose as a NIC.  ``CtlClient`` is the same
thing as a library (tests, the lab).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Optional

import zmq

from .. import messages as M
from ..auth import AuthError, client_curve, generate
from .broker import DEFAULT_ENDPOINT

PROTOS = {"tcp": 6, "udp": 17, "icmp": 1}


class CtlError(Exception):
    """No answer, or an error answer, from the coordinator."""


class CtlClient:
    """Send control queries to a coordinator; one DEALER, closed by ``close()``."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, *, timeout: float = 2.0, curve_secret_key: Optional[str] = None,
                 server_public_key: Optional[str] = None, ctx: Optional[zmq.Context] = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if curve_secret_key:
            if not server_public_key:
                raise CtlError("CURVE needs the coordinator's public key too")
            client_curve(self.sock, curve_secret_key, server_public_key)
        self.sock.connect(endpoint)

    def query(self, op: str, **args):
        """The ``result`` of a query; CtlError on timeout or an error answer."""
        qid = next(self._ids)
        self.sock.send_multipart(M.frames(M.COORD, M.T_QUERY, M.pack_json({"id": qid, "op": op, "args": args})))
        deadline = time.monotonic() + self.timeout  # stray answers do not extend it
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self.sock.poll(left_ms):
                raise CtlError(f"no answer from the coordinator at {self.endpoint} within {self.timeout:g} s "
                               "(is hypernat-coord running? with CURVE: is this key authorized?)")
            frames = self.sock.recv_multipart()
            if len(frames) != 3 or M.type_of(frames[1]) != M.T_REPLY:
                continue
            d = M.decode(frames[1], frames[2])
            if d.reason is not None or d.recs.get("id") != qid:
                continue
            if not d.recs.get("ok"):
                raise CtlError(d.recs.get("error", "error"))
            return d.recs.get("result")

    def close(self):
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------- printing


def _print_status(r: dict) -> None:
    print(f"coordinator {r['endpoint']}  incarnation {r['incarnation']}  up {r['uptime_s']:.0f} s"
          f"{'  CURVE' if r.get('curve') else ''}")
    print(f"  NICs up {r['nics_up']} of {r['nics_known']} known" + ("  DRAINING" if r.get("draining") else ""))
    print(f"  messages received {r['messages_received']}, routed {r['messages_routed']}, "
          f"dropped {r['drops']}, connections refused {r['auth_refused']}")


def _print_nics(rows: list) -> None:
    if not rows:
        print("no NIC has said HELLO")
        return
    print(f"{'nic':>4} {'state':<5} {'last seen':>10} {'from':>10} {'to':>10} {'hellos':>6}  incarnation")
    for r in rows:
        print(f"{r['nic']:>4} {'up' if r['up'] else 'DOWN':<5} {r['last_seen_s']:>9.1f}s {r['messages_from']:>10} "
              f"{r['messages_to']:>10} {r['hellos']:>6}  {r['incarnation']}")


def _flat(d: dict, prefix=""):
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flat(v, name)
        else:
            yield name, v


def _print_counters(r: dict) -> None:
    total = dict(_flat(r.get("total", {})))
    print("gateway (sum of the NICs' last STATS):" if total else "gateway: no STATS received yet")
    for k, v in sorted(total.items()):
        if v:
            print(f"  {k:<40} {v}")
    print("coordinator:")
    for k, v in sorted(_flat(r.get("coordinator", {}))):
        print(f"  {k:<40} {v}")


def _print_rule(r: dict) -> None:
    q = r["query"]
    print(f"external endpoint {q['addr']}:{q['port']}" + (f" proto {q['proto']}" if q.get("proto") else "")
          + (f"  owner by partition: {r['owner']}" if r.get("owner") else ""))
    if not r["answers"] and not r["missing"]:
        print("  no NIC is up")
    for nic, a in sorted(r["answers"].items()):
        if not a.get("ok"):
            print(f"  {nic}: error: {a.get('error')}")
        elif not a.get("result"):
            print(f"  {nic}: nothing")
        else:
            for rule in a["result"] if isinstance(a["result"], list) else [a["result"]]:
                print(f"  {nic}: {json.dumps(rule, sort_keys=True)}")
    for nic in r["missing"]:
        print(f"  {nic}: no answer")


# ------------------------------------------------------------------------ command


def _endpoint_and_keys(args):
    endpoint, key, server = args.endpoint, args.key, args.server_key
    if args.tag and not endpoint:
        from ..lab.fleet import coord_endpoint  # a lab run's coordinator (its own socket)

        endpoint = coord_endpoint(args.tag, args.server)
    if args.config:
        from ..config import load

        cfg = load(args.config)
        c = cfg.coordinator
        endpoint = endpoint or c.endpoint
        if c.curve_secret_key:
            key = key or os.path.join(os.path.dirname(os.path.abspath(c.curve_secret_key)), "ctl.key_secret")
            server = server or c.curve_public_key
    return endpoint or DEFAULT_ENDPOINT, key, server


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hypernat ctl", description="Query a running HyperNAT coordinator.")
    ap.add_argument("--config", help="gateway YAML configuration (endpoint and keys from there)")
    ap.add_argument("--endpoint", help=f"coordinator endpoint (default: config, else {DEFAULT_ENDPOINT})")
    ap.add_argument("--tag", help="a lab run (hypernat lab up --tag T): its coordinator")
    ap.add_argument("--server", type=int, help="with --tag on a fleet: server number (default 1)")
    ap.add_argument("--key", help="CURVE key pair of this client (.key_secret)")
    ap.add_argument("--server-key", help="the coordinator's public key file (.key)")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer (default 2)")
    ap.add_argument("--json", action="store_true", help="print the raw JSON answer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="the coordinator's state")
    sub.add_parser("nics", help="the NICs and their liveness")
    sub.add_parser("counters", help="counters summed over the NICs, and the coordinator's")
    sub.add_parser("drain", help="fleet: stop taking new hosts (the speaker withdraws; see docs/scale-out.md)")
    rp = sub.add_parser("rule", help="the rule (owner and clones) for an external endpoint")
    rp.add_argument("endpoint_addr", metavar="ADDR:PORT")
    rp.add_argument("--proto", choices=sorted(PROTOS), help="only this protocol")
    kp = sub.add_parser("keygen", help="write CURVE key pairs for the coordinator, N NICs and ctl")
    kp.add_argument("dir")
    kp.add_argument("--nics", type=int, required=True, help="number of NICs (ids 0..N-1)")
    kp.add_argument("--force", action="store_true", help="overwrite existing keys")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "keygen":
        try:
            paths = generate(args.dir, range(args.nics), overwrite=args.force)
        except AuthError as exc:
            print(f"hypernat ctl keygen: {exc}", file=sys.stderr)
            return 1
        for name, pub in paths.items():
            print(f"{name:<8} {pub}")
        print(f"authorized client keys: {os.path.join(args.dir, 'authorized')}")
        return 0
    try:
        endpoint, key, server = _endpoint_and_keys(args)
        with CtlClient(endpoint, timeout=args.timeout, curve_secret_key=key, server_public_key=server) as c:
            if args.cmd == "rule":
                addr, sep, port = args.endpoint_addr.rpartition(":")
                if not sep or not port.isdigit():
                    print("hypernat ctl rule: expected ADDR:PORT, e.g. 203.0.113.5:40000", file=sys.stderr)
                    return 2
                M.ip_int(addr)  # ValueError early, with the address in the message
                kw = {"proto": PROTOS[args.proto]} if args.proto else {}
                result = c.query("rule", addr=addr, port=int(port), **kw)
            else:
                result = c.query(args.cmd)
    except (CtlError, AuthError, ValueError, OSError, RuntimeError, zmq.ZMQError) as exc:
        print(f"hypernat ctl {args.cmd}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        printers = {"status": _print_status, "nics": _print_nics, "counters": _print_counters, "rule": _print_rule,
                    "drain": _print_status}
        printers[args.cmd](result)
    return 0

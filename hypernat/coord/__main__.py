"""``hypernat-coord``: run the coordinator (a thin wrapper over ``broker.Coordinator``)."""
from __future__ import annotations

import argparse
import glob
import logging
import os
import signal
import sys

from ..auth import AuthError, load_authorized, load_public
from .broker import DEFAULT_ENDPOINT, Coordinator, CoordinatorError, predicates_from_config

DESCRIPTION = """\
The HyperNAT coordinator.  It binds a ZeroMQ ROUTER on the configured endpoint and
routes rule messages (FETCH, RULE, PUSH, REVOKE, ACTIVITY, BORROW, ...) between the
NIC workers, tracks their liveness by heartbeats, answers `hypernat ctl` queries and
serves Prometheus metrics.  It keeps no rule state: the NICs own it, so killing and
restarting it loses nothing they cannot resend.

Settings come from --config (the gateway's YAML file: coordinator.endpoint, its CURVE
key files, heartbeats; metrics.address/port) and are overridden by the options below.
On a tcp:// endpoint off loopback the coordinator refuses to start without CURVE: the
coordinator's secret key and the NICs' public keys (each bound to its NIC id).
Stop it with SIGTERM or SIGINT.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hypernat-coord", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="gateway YAML configuration (hypernat.config)")
    ap.add_argument("--endpoint", help=f"ZeroMQ endpoint to bind (default: config, else {DEFAULT_ENDPOINT})")
    ap.add_argument("--metrics-port", type=int,
                    help="serve Prometheus metrics on this port (default: config's metrics.port; 0 = off)")
    ap.add_argument("--metrics-addr", help="address for the metrics server (default: config, else 127.0.0.1)")
    ap.add_argument("--heartbeat-interval", type=float, help="seconds between NIC heartbeats (default 1.0)")
    ap.add_argument("--heartbeat-timeout", type=float, help="a NIC silent this long is down (default 5.0)")
    ap.add_argument("--curve-secret-key", help="the coordinator's CURVE key pair file (.key_secret); turns CURVE on")
    ap.add_argument("--authorized-keys", help="directory of client public keys nic<N>.key / ctl*.key "
                    "(added to the NIC keys named in the config)")
    ap.add_argument("--check-partitions", action="store_true",
                    help="also drop rule records whose external endpoint is outside the sender's partition "
                         "(partition arithmetic plus the spill-over loans seen in BORROW_ACK / RETURN; "
                         "NICs check anyway)")
    ap.add_argument("--check-records", action="store_true",
                    help="read and check every record of a routed message before passing it on (fields, the "
                         "sender named as owner, internal prefixes); by default a message is routed by its header "
                         "(type, target, whole records) and the receiving NIC checks every record")
    ap.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return ap


def options(args) -> dict:
    """Coordinator keyword arguments from the config file and the command line."""
    kw: dict = {}
    cfg = None
    if args.config:
        from ..config import ConfigError, load

        try:
            cfg = load(args.config)
        except (ConfigError, OSError) as exc:
            raise CoordinatorError(str(exc)) from exc
        c = cfg.coordinator
        kw.update(endpoint=c.endpoint, heartbeat_interval=c.heartbeat_interval,
                  heartbeat_timeout=c.heartbeat_timeout, n_nics=cfg.n_nics)
        if cfg.metrics.enabled:
            kw.update(metrics_port=cfg.metrics.port, metrics_addr=cfg.metrics.address)
        owns, internal, owner_of = predicates_from_config(cfg)
        kw.update(internal=internal, owner_of=owner_of)
        if args.check_partitions:
            kw["owns"] = owns
        if c.curve_secret_key:
            kw["curve_secret_key"] = c.curve_secret_key
            kw["authorized"] = authorized_from_config(cfg)
    elif args.check_partitions:
        raise CoordinatorError("--check-partitions needs --config (the partition is defined there)")
    if args.endpoint:
        kw["endpoint"] = args.endpoint
    if args.metrics_port is not None:
        kw["metrics_port"] = args.metrics_port or None
    if args.metrics_addr:
        kw["metrics_addr"] = args.metrics_addr
    if args.heartbeat_interval:
        kw["heartbeat_interval"] = args.heartbeat_interval
    if args.heartbeat_timeout:
        kw["heartbeat_timeout"] = args.heartbeat_timeout
    if args.curve_secret_key:
        kw["curve_secret_key"] = args.curve_secret_key
    if args.authorized_keys:
        extra = load_authorized(args.authorized_keys)
        merged = dict(kw.get("authorized") or {})
        for key, user in extra.items():
            if key in merged and merged[key] != user:
                raise CoordinatorError(f"key bound to both {merged[key].decode()} and {user.decode()}")
            merged[key] = user
        kw["authorized"] = merged
    if args.check_records:
        kw["check_records"] = True
    return kw


def authorized_from_config(cfg) -> dict:
    """{public key: user id}: each NIC's curve_public_key bound to b"nic<id>", plus the
    control keys ``ctl*.key`` lying beside the coordinator's own key files."""
    out = {}
    for nic in cfg.nics:
        if nic.curve_public_key:
            out[load_public(nic.curve_public_key)] = b"nic%d" % nic.id
    keydir = os.path.dirname(os.path.abspath(cfg.coordinator.curve_secret_key))
    for path in sorted(glob.glob(os.path.join(keydir, "ctl*.key"))):
        out.setdefault(load_public(path), os.path.basename(path)[: -len(".key")].encode())
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("hypernat.coord")
    try:
        coord = Coordinator(**options(args))
    except (CoordinatorError, AuthError) as exc:
        print(f"hypernat-coord: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        log.info("signal %s: stopping", signal.Signals(signum).name)
        coord.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        coord.run()
    except (CoordinatorError, AuthError) as exc:
        print(f"hypernat-coord: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The no-op forwarder: HyperNAT's packet I/O path with nothing in the middle.

Frames addressed to NIC k's inside MAC go out on outside_k, and back, untranslated;
only the MAC addresses are rewritten (source: our port, destination: the resolved next
hop).  Everything that is not IPv4 for us — ARP, broadcasts, IPv6 — is left to the
kernel, which sees every frame too and answers ARP for the gateway's link addresses::

     inside_k ─ recv() ─► select IPv4 to our MAC ─► outside_k.send()   (MACs rewritten
     outside_k ─ recv() ─► select IPv4 to our MAC ─► inside_k.send()    on the tx copy)

The same loop runs over PACKET_MMAP or AF_XDP ports (``--backend``).  It is the
same-run ceiling for the benchmarks (HyperNAT does this plus the fast path)
and, on the testbed, a check of the I/O path with plain routing: real TCP across the
gateway with no NAT at all.

    python -m hypernat.lab.noop --inside inside0 --outside outside0 [--backend af_xdp] \\
        [--inside-peer 172.16.0.2 --outside-peer 172.17.0.2] [--ready-file F] [--stats-file F]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import time

import numpy as np

log = logging.getLogger("hypernat.noop")


class NoopForwarder:
    """Moves frames between two ports; `run()` until `stop()`."""

    def __init__(self, inside, outside, inside_next_mac: bytes, outside_next_mac: bytes, batch: int = 256):
        from ..io._ring import select_ipv4_to

        self._select = select_ipv4_to
        self.inside, self.outside = inside, outside
        self.batch = batch
        inside.set_macs(inside.mac(), inside_next_mac)
        outside.set_macs(outside.mac(), outside_next_mac)
        self._routes = [(inside, outside, inside.mac(), "out"), (outside, inside, outside.mac(), "in")]
        self._idx = np.empty(batch, dtype=np.int64)
        self.counters = {"out_frames": 0, "in_frames": 0, "out_left_to_kernel": 0, "in_left_to_kernel": 0,
                         "out_tx_dropped": 0, "in_tx_dropped": 0, "batches": 0}
        self._running = False
        self.tx_waiting = 0

    def poll_once(self) -> int:
        """Drain both ports once; returns frames forwarded."""
        moved = 0
        for rx, tx, mac, d in self._routes:
            b = rx.recv(self.batch)
            if b is None:
                continue
            try:
                m = self._select(b.buf, b.offsets, b.lengths, b.n, mac, self._idx)
                if m:
                    q = tx.send(b, self._idx[:m])
                    self.counters[f"{d}_frames"] += q
                    self.counters[f"{d}_tx_dropped"] += m - q
                    moved += q
                self.counters[f"{d}_left_to_kernel"] += b.n - m
                self.counters["batches"] += 1
            finally:
                rx.release(b)
        # frames a device refused earlier are sent again every turn, new frames or not
        self.tx_waiting = self.inside.flush() + self.outside.flush()
        return moved

    def run(self, duration: float | None = None) -> None:
        p = select.poll()
        p.register(self.inside.fileno(), select.POLLIN)
        p.register(self.outside.fileno(), select.POLLIN)
        self._running = True
        end = None if duration is None else time.monotonic() + duration
        while self._running and (end is None or time.monotonic() < end):
            if not self.poll_once():
                # wait for the next frame (wakes at once when one lands); soon again
                # while a transmit ring holds frames its device refused
                p.poll(1 if self.tx_waiting else 50)

    def stop(self, *_):
        self._running = False

    def stats(self) -> dict:
        return {"forwarder": dict(self.counters), "inside": self.inside.stats(), "outside": self.outside.stats()}


def start_in_lab(topo, timeout: float = 10.0, rx_frames: int = 0, backend: str = "packet_mmap",
                 rx_ring: str = "v2") -> list:
    """Start one forwarder process per NIC inside the lab's gw; wait until each is
    ready.  Returns the stats-file paths (written when `topo.down()` stops them)."""
    from .topology import STATE_DIR

    os.makedirs(STATE_DIR, exist_ok=True)
    a = topo.addr
    waiting, stats = [], []
    for k in range(topo.nics):
        ready = os.path.join(STATE_DIR, f"{topo.tag}-noop{k}.ready")
        st = os.path.join(STATE_DIR, f"{topo.tag}-noop{k}.json")
        for f in (ready, st):
            if os.path.exists(f):
                os.unlink(f)
        p = topo.start(topo.gw, [sys.executable, "-m", "hypernat.lab.noop", "--inside", topo.inside(k),
                                 "--outside", topo.outside(k), "--inside-peer", a.link("inside", k, "far"),
                                 "--outside-peer", a.link("outside", k, "far"), "--rx-frames", str(rx_frames),
                                 "--backend", backend, "--rx-ring", rx_ring,
                                 "--ready-file", ready, "--stats-file", st])
        waiting.append((p, ready))
        stats.append(st)
    deadline = time.monotonic() + timeout
    for p, ready in waiting:
        while not os.path.exists(ready):
            if p.poll() is not None:
                raise RuntimeError(f"no-op forwarder exited with {p.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError("no-op forwarder not ready in time")
            time.sleep(0.02)
        os.unlink(ready)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hypernat.lab.noop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inside", required=True)
    ap.add_argument("--outside", required=True)
    ap.add_argument("--inside-peer", help="IPv4 next hop on the inside link (default: the route through it)")
    ap.add_argument("--outside-peer", help="IPv4 next hop on the outside link (default: the route through it)")
    ap.add_argument("--backend", default="packet_mmap", choices=("packet_mmap", "af_xdp"))
    ap.add_argument("--rx-frames", type=int, default=0,
                    help="receive ring frames (0: the port's default, its memory budget for super-frame slots)")
    ap.add_argument("--rx-ring", default="v2", choices=("v2", "v3"), help="PACKET_MMAP receive ring (TPACKET_V3/V2)")
    ap.add_argument("--ready-file", help="created once the rings are open and next hops resolved")
    ap.add_argument("--stats-file", help="JSON counters written on exit")
    ap.add_argument("--duration", type=float)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s noop %(message)s")

    from .. import l2

    nb = l2.Neighbours()
    try:
        in_mac = nb.resolve(args.inside_peer or l2.gateway_via(args.inside), args.inside, timeout=5)
        out_mac = nb.resolve(args.outside_peer or l2.gateway_via(args.outside), args.outside, timeout=5)
    except (TimeoutError, ValueError) as exc:
        log.error("next hop: %s", exc)
        return 1
    if args.backend == "af_xdp":
        from ..io.af_xdp import AfXdpPort

        inside, outside = AfXdpPort(args.inside), AfXdpPort(args.outside)
    else:
        from ..io.packet_mmap import PacketMmapPort

        inside = PacketMmapPort(args.inside, rx_frames=args.rx_frames or None, rx_ring=args.rx_ring)
        outside = PacketMmapPort(args.outside, rx_frames=args.rx_frames or None, rx_ring=args.rx_ring)
    fwd = NoopForwarder(inside, outside, in_mac, out_mac)
    signal.signal(signal.SIGTERM, fwd.stop)
    signal.signal(signal.SIGINT, fwd.stop)
    log.info("forwarding %s (next hop %s) <-> %s (next hop %s) over %s", args.inside, l2.mac_str(in_mac),
             args.outside, l2.mac_str(out_mac), args.backend)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(str(os.getpid()))
    try:
        fwd.run(args.duration)
    finally:
        st = fwd.stats()
        if args.stats_file:
            with open(args.stats_file + ".tmp", "w") as f:
                json.dump(st, f)
            os.replace(args.stats_file + ".tmp", args.stats_file)
        log.info("stopped: %s", json.dumps(st["forwarder"]))
        inside.close()
        outside.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
